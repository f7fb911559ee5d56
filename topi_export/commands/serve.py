"""``topi-export serve``: a real Triton Inference Server on a model repository (or an engine directory), in the
foreground until SIGINT / SIGTERM. The launcher is serving/server.py; the server's Python environment is
serving/server_env.py's recipe (docs/triton.md, "Serving it: topi-export serve")."""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import click


@click.command("serve")
@click.option("--repo", type=click.Path(file_okay=False), default=None,
              help="Model repository to serve (from `topi-export triton`).")
@click.option("--engine-dir", type=click.Path(file_okay=False), default=None,
              help="Engine directory: write its repository first (into --out, or a temporary one removed at exit).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="With --engine-dir: keep the repository here (must not exist, or --force).")
@click.option("--force", is_flag=True, help="With --out: replace a repository topi-export made.")
@click.option("--name", default="topi", show_default=True, help="With --engine-dir: model-name prefix.")
@click.option("--instances", type=int, default=1, show_default=True, help="With --engine-dir: instances per model.")
@click.option("--kind", type=click.Choice(["auto", "gpu", "cpu"]), default="auto", show_default=True,
              help="With --engine-dir: instance kind of the engine models; auto: cpu for engines that run on the CPU "
                   "(ONNX Runtime), gpu otherwise (TensorRT).")
@click.option("--engine-models", type=click.Choice(["auto", "platform", "python"]), default="auto",
              show_default=True,
              help="With --engine-dir: auto: the backend's Triton platform where the server has that backend, else "
                   "python (ONNX Runtime inside Python-backend models, as on PyPI's nvidia-pytriton).")
@click.option("--ort-threads", type=int, default=None,
              help="With --engine-dir and python engine models: ONNX Runtime threads per instance.")
@click.option("--env", "env", type=click.Path(file_okay=False), default=None, envvar="TOPI_TRITON_ENV",
              help="The Python environment of the Python-backend models (made by --create-env; $TOPI_TRITON_ENV). "
                   "Default: this environment when it has nvidia-pytriton, else the server's own.")
@click.option("--create-env", is_flag=True,
              help="Create --env first when it is not a complete server environment (a venv with numpy<2 and "
                   "topi-export[serve]: minutes, needs PyPI). Without --repo / --engine-dir: create it and exit.")
@click.option("--python", "python", default=None,
              help="With --create-env: the base interpreter (a shared build of Python 3.8-3.13; default: this one).")
@click.option("--project", default=None,
              help="With --create-env: what pip installs as topi-export in the environment, e.g. "
                   "'dist/topi_export-0.2.0-py3-none-any.whl[serve]' or '/path/to/checkout[serve]' (default: this "
                   "checkout, or the wheel this installation came from).")
@click.option("--server", "server", type=click.Path(dir_okay=False), default=None,
              help="The tritonserver binary (default: nvidia-pytriton's in --env, then tritonserver on PATH).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="IPv4 address the HTTP, gRPC and metrics endpoints bind (0.0.0.0: every interface).")
@click.option("--http-port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: a free port.")
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=8001, show_default=True, help="0: a free port.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=8002, show_default=True,
              help="0: a free port.")
@click.option("--model-control-mode", type=click.Choice(["none", "explicit", "poll"]), default="none",
              show_default=True, help="Triton's model control (explicit: load and unload over the API).")
@click.option("--load-model", "load_models", multiple=True,
              help="With explicit model control: a model to load at start (repeatable; default: every model).")
@click.option("--ready-timeout", type=click.FloatRange(1, 86400), default=600, show_default=True,
              help="Seconds until the server and every model must be ready.")
@click.option("--exit-timeout", type=click.IntRange(0, 3600), default=30, show_default=True,
              help="Seconds Triton lets in-flight requests finish when stopped.")
@click.option("--log-verbose", type=click.IntRange(0, 3), default=0, show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Backend directory and tritonserver.log here (default: a temporary directory, removed at a clean "
                   "stop).")
def cmd(repo, engine_dir, out, force, name, instances, kind, engine_models, ort_threads, env, create_env, python,
        project, server, host, http_port, grpc_port, metrics_port, model_control_mode, load_models, ready_timeout,
        exit_timeout, log_verbose, workdir):
    """Serve a Triton model repository (or an engine directory) until Ctrl-C / SIGTERM."""
    from topi_export.errors import BadInput
    from topi_export.serving import server as launcher

    def echo(text):
        click.echo(text)
        sys.stdout.flush()

    if repo and engine_dir:
        raise BadInput("give --repo or --engine-dir, not both")
    if out and not engine_dir:
        raise BadInput("--out is where --engine-dir's repository is written: give --engine-dir too")
    if create_env:
        if env is None:
            raise BadInput("--create-env needs --env ENV: the path of the environment to create")
        ensure_env(env, python, echo, project=project)
        if not (repo or engine_dir):
            echo(f"next: topi-export serve --repo REPO --env {env}")
            return
    elif project is not None or python is not None:
        raise BadInput("--project and --python say how --create-env makes the environment: add --create-env, or "
                       "drop them")
    elif not (repo or engine_dir):
        raise BadInput("give --repo REPO (from `topi-export triton`) or --engine-dir DIR to serve, or --create-env "
                       "with --env ENV")
    if env is not None:
        check_env(env)
    install = launcher.find_tritonserver(server, env)
    temp = None
    try:
        if engine_dir:
            if out is None:
                temp = Path(tempfile.mkdtemp(prefix="topi-serve-"))
                out = temp / "repo"
            repo = write_repository(engine_dir, out, install, name=name, instances=instances, kind=kind,
                                    engine_models=engine_models, ort_threads=ort_threads, force=force, echo=echo)
        if model_control_mode == "explicit" and not load_models:
            load_models = repository_models(repo)
        code = launcher.serve(repo, echo=echo, env=env, tritonserver=install.tritonserver,
                              model_control_mode=model_control_mode, load_models=load_models, host=host,
                              ports=(http_port, grpc_port, metrics_port), ready_timeout=ready_timeout,
                              exit_timeout=exit_timeout, log_verbose=log_verbose, workdir=workdir)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    if code:
        raise SystemExit(code)


def ensure_env(env, python, echo, project=None) -> None:
    """Create the server environment at ``env`` unless a complete one is there (its marker, written last)."""
    from topi_export.errors import BadInput
    from topi_export.serving.server_env import create_environment, read_marker

    if read_marker(env) is not None:
        echo(f"server environment {env}: present (remove it to create it again)")
        return
    if Path(env).exists():
        raise BadInput(f"{env} exists but is not a complete server environment (no topi-triton-env.json): remove it "
                       f"or choose another --env")
    create_environment(env, python=python, project=[project] if project else None, echo=echo)


def check_env(env) -> None:
    """An --env that does not exist names the command creating it (the launcher checks the rest)."""
    from topi_export.errors import BadInput

    if not Path(env).is_dir():
        raise BadInput(f"server environment {env} does not exist: create it with `topi-export serve --env {env} "
                       f"--create-env`")


def write_repository(engine_dir, out, install, *, name, instances, kind, engine_models, ort_threads, force, echo):
    """The engine directory's repository for this server: python engine models where it lacks the platform's
    backend (the nvidia-pytriton wheel has only the Python backend)."""
    from topi_export.artifacts.manifest import read_manifest
    from topi_export.backends import get_backend
    from topi_export.errors import BadInput
    from topi_export.serving.server import has_backend
    from topi_export.serving.triton_repo import generate_repository

    m = read_manifest(engine_dir, verify_files=False)
    backend = get_backend(m.backend).BACKEND
    if engine_models == "auto":
        platform = backend.triton_platform
        engine_models = ("platform" if platform is None or has_backend(install, backend.triton_backend)
                         else "python")
        portable = all(g.file.endswith(".onnx") for g in m.graphs.values())  # what python engine models run
        if engine_models == "python" and not portable:
            raise BadInput(f"{install.tritonserver} has no {platform} backend for the {backend.name} engines of "
                           f"{engine_dir}: serve them with a Triton that has it (NVIDIA's container), or build "
                           f"--backend onnxruntime")
    if kind == "auto":
        kind = "cpu" if "CPU" in backend.runs_on else "gpu"
    summary = generate_repository(engine_dir, out, name=name, instances=instances, kind=kind,
                                  engine_models=engine_models, ort_threads=ort_threads, force=force)
    echo(f"repository -> {summary['out']} ({engine_models} engine models, {kind} instances: "
         f"{', '.join(summary['models'])})")
    return summary["out"]


def repository_models(repo) -> list[str]:
    """Every model folder of a repository (what explicit mode loads when no --load-model is given)."""
    return sorted(p.name for p in Path(repo).iterdir() if (p / "config.pbtxt").is_file())
