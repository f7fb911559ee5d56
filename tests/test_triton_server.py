"""A real Triton Inference Server (2.51, from PyPI's nvidia-pytriton wheel) on loopback, serving the repositories
`topi-export triton --engine-models python` writes: the BLS loop model over FLUX.2 (three references) and
Qwen-Image-Edit (true CFG) engine directories, equal to `topi-export run`; bad requests, concurrent load, a server
killed mid-request, explicit unload / reload; the launcher (serving/server.py), `topi-export serve` and the
stub's environment (serving/server_env.py).

The server environment is TOPI_TRITON_ENV when set (made by `topi-export serve --env ENV --create-env`); otherwise
a thin one is created once per checkout and interpreter under ~/.cache/topi-export (`server_env create
--layer-on`: numpy<2 and nvidia-pytriton from PyPI, everything else from the test environment; under a minute)
and reused. TOPI_TRITON_SERVER=0 skips the server tests with that reason; an environment that cannot be created
(no PyPI, no shared libpython) skips them with the reason. One server serves every repository of the module; the
fault tests start their own. The tests without a server (top of the file) always run."""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from topi_export.errors import TopiError

ROOT = Path(__file__).resolve().parents[1]
REL_L2 = 1e-4
STEPS, UPDATE_INTERVAL, RATIO = 6, 3, 0.5  # anchors at steps 0 and 3, pruned steps between


# --- helpers ------------------------------------------------------------------------------------------------------
def _graph(engine_dir, kind):
    return json.loads((Path(engine_dir) / "manifest.json").read_text())["graphs"][kind]


def _feeds(engine_dir, kind="topi", keep=None, seed=0):
    """Inputs of the engine graph for the engine directory's first layout (tiny-kontext's 8x8: 8 text, 64 target,
    64 context tokens): an anchor step (every context token kept and scored) or, with ``keep``, a pruned step (a
    sorted subset, one query)."""
    manifest = json.loads((Path(engine_dir) / "manifest.json").read_text())
    layout = manifest["layouts"][0]
    n_x = layout["target_grid"][0] * layout["target_grid"][1]
    n_ctx = sum(h * w for h, w in layout["reference_grids"])
    rng = np.random.default_rng(seed)
    keep_idx = np.arange(n_ctx) if keep is None else np.sort(rng.choice(n_ctx, keep, replace=False))
    sizes = {"B": manifest["batch"], "Nx": n_x, "Nc": n_ctx, "T": layout["text_tokens"], "K": len(keep_idx),
             "Q": n_x if keep is None else 1}
    feeds = {}
    for t in _graph(engine_dir, kind)["inputs"]:
        shape = [d if isinstance(d, int) else sum(sizes[p] for p in d.split("+")) for d in t["dims"]]
        if t["name"] == "keep_idx":
            feeds[t["name"]] = keep_idx.astype(np.int64)
        elif t["name"] == "score_idx":
            feeds[t["name"]] = np.arange(shape[0], dtype=np.int64)
        elif t["name"].endswith("_mask"):
            feeds[t["name"]] = np.ones(shape, np.float32)
        else:
            feeds[t["name"]] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _reference(engine_dir, kind, feeds):
    """ONNX Runtime in-process, opened as `topi-export run` opens it."""
    import onnxruntime as ort

    from topi_export.backends.onnxruntime import session_options

    graph = _graph(engine_dir, kind)
    sess = ort.InferenceSession(str(Path(engine_dir) / graph["onnx"]), session_options(),
                                providers=["CPUExecutionProvider"])
    names = [t["name"] for t in graph["outputs"]]
    return dict(zip(names, sess.run(names, feeds)))


def _rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _triton_type(array):
    return {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64", np.dtype(np.int64): "INT64",
            np.dtype(np.int32): "INT32", np.dtype(np.uint64): "UINT64", np.dtype(np.object_): "BYTES"}[array.dtype]


def _infer(client_module, client, model, feeds, outputs, **kwargs):
    inputs = []
    for name, array in feeds.items():
        tensor = client_module.InferInput(name, list(array.shape), _triton_type(array))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = client.infer(model, inputs, outputs=[client_module.InferRequestedOutput(n) for n in outputs], **kwargs)
    return {n: result.as_numpy(n) for n in outputs}


def _http():
    return pytest.importorskip("tritonclient.http", reason="needs tritonclient[http] (pip install 'topi-export[dev]')")


def _grpc():
    return pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc] (pip install 'topi-export[dev]')")


def _http_client(server):
    return _http().InferenceServerClient(server.http_url.removeprefix("http://"), network_timeout=120)


def _group(pgid):
    from topi_export.serving.server import _group_members

    return _group_members(pgid)


def _shm(prefix):
    return sorted(Path("/dev/shm").glob(prefix + "*")) if prefix else []


# --- without a server -----------------------------------------------------------------------------------------------
def test_server_module_imports_only_the_standard_library():
    """Importing the launcher (and server_env) loads no third-party module beyond what `import topi_export` does."""
    code = ("import sys, topi_export; before = set(sys.modules); import topi_export.serving.server; "
            "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
            "print(sorted(m for m in new if m != 'topi_export' and m not in sys.stdlib_module_names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout
    assert out.strip() == "[]"


def _info(**changes):
    from topi_export.serving.server_env import PythonInfo

    base = dict(executable="/env/bin/python3", prefix="/env", base_prefix="/base", version="3.11",
                full_version="3.11.7", libpython="/base/lib/libpython3.11.so.1.0", pytriton=None,
                packages={"numpy": "1.26.4"})
    return PythonInfo(**{**base, **changes})


@pytest.mark.parametrize("changes, needle", [
    ({"packages": {"numpy": "2.4.6"}}, "install 'numpy<2'"),
    ({"packages": {"numpy": None}}, "has no numpy"),
    ({"libpython": None}, "shared libpython3.11"),
    ({"version": "3.14", "full_version": "3.14.0"}, "exist for Python 3.8"),
])
def test_stub_python_refusals(changes, needle):
    from topi_export.serving.server_env import check_stub_python

    with pytest.raises(TopiError, match=needle.replace("(", r"\(")) as exc:
        check_stub_python(_info(**changes))
    assert "\n" not in str(exc.value)
    check_stub_python(_info())


def test_create_environment_refuses_before_any_work(tmp_path):
    """An existing path needs --force, and --force replaces only a virtual environment: nothing is touched."""
    from topi_export.serving.server_env import create_environment

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.txt").write_text("keep")
    with pytest.raises(TopiError, match="already exists: pass --force"):
        create_environment(mine, echo=lambda s: None)
    with pytest.raises(TopiError, match="not a virtual environment"):
        create_environment(mine, force=True, echo=lambda s: None)
    assert [p.name for p in mine.iterdir()] == ["data.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_server_environ_puts_the_env_first(tmp_path):
    from topi_export.serving.server import ServerInstall, server_environ

    install = ServerInstall(tmp_path / "tritonserver", libs=tmp_path / "libs")
    environ = server_environ(install, _info(), base={"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/x",
                                                     "PYTHONPATH": "/elsewhere", "PYTHONHOME": "/other"})
    assert environ["PATH"] == "/env/bin:/usr/bin"
    assert environ["LD_LIBRARY_PATH"] == f"/base/lib:{tmp_path / 'libs'}:/opt/x"
    assert "PYTHONPATH" not in environ and "PYTHONHOME" not in environ


def test_unloadable_stub_is_one_line_error(tmp_path):
    """A stub whose libraries do not load would hang Triton's model load: refused before the server starts."""
    from topi_export.serving.server import check_stub

    stub = tmp_path / "backends" / "python" / "triton_python_backend_stub"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\necho 'stub: error while loading shared libraries: libpython3.11.so.1.0' >&2\n"
                    "exit 127\n")
    stub.chmod(0o755)
    with pytest.raises(TopiError, match="exit 127: stub: error while loading shared libraries") as exc:
        check_stub(tmp_path / "backends", dict(os.environ))
    assert "\n" not in str(exc.value)


def test_no_tritonserver_is_one_line_error(tmp_path, monkeypatch):
    from topi_export.serving.server import find_tritonserver

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("topi_export.serving.server._own_pytriton", lambda: None)
    with pytest.raises(TopiError, match="no tritonserver in this environment or on PATH.*--create-env"):
        find_tritonserver()
    with pytest.raises(TopiError, match="not an executable tritonserver"):
        find_tritonserver(tmp_path / "tritonserver")


def test_error_lines_pick_the_failures():
    from topi_export.serving.server import error_lines

    log = ('I1207 10:49:28.5 1 model_lifecycle.cc:472] "loading: m:1"\n'
           'E1207 10:49:28.5 1 model_lifecycle.cc:642] "failed to load \'m\' version 1: Internal: boom"\n'
           "| m | 1 | UNAVAILABLE: Internal: boom |\nerror: creating server: Internal - failed to load all models\n")
    text = error_lines(log)
    assert "failed to load 'm'" in text and "UNAVAILABLE" in text and "creating server" in text
    assert "loading: m:1" not in text and "\n" not in text


def test_template_session_options_match_run():
    """ort_engine_model.py opens graphs with the options of `run` (backends/onnxruntime.py), so the server
    computes what `run` computes; the template itself needs no topi_export."""
    import importlib.util

    import onnxruntime as ort

    from topi_export.backends.onnxruntime import session_options

    spec = importlib.util.spec_from_file_location("ort_template", ROOT / "topi_export/serving/ort_engine_model.py")
    template = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(template)
    assert template.pb_utils is None
    ours, run = template.session_options(ort, {}), session_options()
    assert ours.graph_optimization_level == run.graph_optimization_level
    assert ours.log_severity_level == run.log_severity_level
    key = "session.disable_prepacking"
    assert ours.get_session_config_entry(key) == run.get_session_config_entry(key) == "1"
    assert "import topi_export" not in (ROOT / "topi_export/serving/ort_engine_model.py").read_text()


def test_python_engine_config_has_the_platform_models_tensors(ort_engine_dir, tmp_path):
    """The Python-backend engine model declares exactly the tensors (names, types, dims) and batching of the
    onnxruntime_onnx model `topi-export triton` writes, so the loop model calls it unchanged."""
    pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs tritonclient[grpc]")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from topi_export.serving.python_engine import write_engine_model
    from topi_export.serving.triton_repo import generate_repository

    generate_repository(ort_engine_dir, tmp_path / "platform", kind="cpu")
    for kind in ("topi", "dense"):
        model_dir = write_engine_model(tmp_path / "python", f"topi_{kind}", Path(ort_engine_dir) /
                                       _graph(ort_engine_dir, kind)["onnx"])
        ours = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        platform = text_format.Parse((tmp_path / "platform" / f"topi_{kind}" / "config.pbtxt").read_text(),
                                     model_config_pb2.ModelConfig())
        assert ours.backend == "python" and platform.platform == "onnxruntime_onnx"
        assert ours.name == platform.name and ours.max_batch_size == platform.max_batch_size == 0
        assert list(ours.input) == list(platform.input) and list(ours.output) == list(platform.output)
        version = model_dir / "1"
        assert sorted(p.name for p in version.iterdir()) == ["model.onnx", "model.py", "weights.data"]
        template = ROOT / "topi_export" / "serving" / "ort_engine_model.py"
        assert (version / "model.py").read_bytes() == template.read_bytes()
    with pytest.raises(TopiError, match="already exists"):
        write_engine_model(tmp_path / "python", "topi_topi",
                           Path(ort_engine_dir) / _graph(ort_engine_dir, "topi")["onnx"])


@pytest.mark.parametrize("args, needle", [
    ([], "give --repo REPO"),
    (["--repo", "r", "--engine-dir", "e"], "not both"),
    (["--out", "o", "--repo", "r"], "--out is where --engine-dir"),
    (["--create-env"], "--create-env needs --env"),
    (["--repo", "r", "--project", "dist/topi_export-0.2.0-py3-none-any.whl[serve]"], "add --create-env"),
    (["--repo", "r", "--env", "/nonexistent/env"], "--create-env"),
    (["--repo", "/nonexistent/repo", "--env", "{tmp}", "--server", "{tmp}/tritonserver"], "does not exist"),
    (["--repo", "{tmp}", "--server", "{tmp}/tritonserver", "--host", "localhost:1"], "IPv4 address"),
    (["--repo", "{tmp}", "--server", "{tmp}/tritonserver", "--http-port", "9000", "--grpc-port", "9000"],
     "different ports"),
])
def test_serve_command_refusals_are_one_line(tmp_path, capsys, args, needle):
    """Bad flags of `topi-export serve` are one `error:` line naming the fix, before anything starts."""
    from conftest import run_cli

    server = tmp_path / "tritonserver"
    server.write_text("#!/bin/sh\nexit 1\n")
    server.chmod(0o755)
    code, _, err = run_cli(["serve", *(a.replace("{tmp}", str(tmp_path)) for a in args)], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err


def test_server_env_installs_topi_export_from_its_checkout_or_wheel(tmp_path, monkeypatch):
    """topi-export is on no package index: the server environment gets this checkout (editable), else the wheel
    this installation came from (pip's direct_url.json); otherwise one line asking for --project, never a pip
    install from an index."""
    from importlib import metadata

    from topi_export.serving import server_env

    assert server_env._default_project() == ["-e", f"{ROOT}[serve]"]
    monkeypatch.setattr(server_env, "__file__", str(tmp_path / "site" / "topi_export" / "serving" / "server_env.py"))
    wheel = tmp_path / "dist" / "topi_export-0.2.0-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"")

    class Dist:
        def __init__(self, direct):
            self.direct = direct

        def read_text(self, name):
            return json.dumps(self.direct) if name == "direct_url.json" and self.direct is not None else None

    monkeypatch.setattr(metadata, "distribution", lambda name: Dist({"url": wheel.as_uri(), "archive_info": {}}))
    assert server_env._default_project() == [f"{wheel}[serve]"]
    wheel.unlink()
    for direct in ({"url": wheel.as_uri(), "archive_info": {}}, None, {"url": "https://example.org/x.whl"}):
        monkeypatch.setattr(metadata, "distribution", lambda name, d=direct: Dist(d))
        with pytest.raises(TopiError, match=r"on no package index: pass its wheel or checkout with --project"):
            server_env._default_project()


def test_engine_models_follow_the_servers_backends(tmp_path):
    """serve --engine-dir writes platform models where the server has the platform's backend (NVIDIA's container:
    <prefix>/backends next to <prefix>/bin/tritonserver), python engine models where it has only the Python
    backend (the wheel)."""
    from topi_export.backends import get_backend
    from topi_export.serving.server import ServerInstall, has_backend

    ort = get_backend("onnxruntime").BACKEND.triton_backend
    binary = tmp_path / "bin" / "tritonserver"
    binary.parent.mkdir()
    binary.write_text("")
    (tmp_path / "backends" / "python").mkdir(parents=True)
    install = ServerInstall(binary)
    assert not has_backend(install, ort) and has_backend(install, "python")
    (tmp_path / "backends" / ort).mkdir()
    assert has_backend(install, ort) and not has_backend(install, get_backend("tensorrt").BACKEND.triton_backend)
    assert has_backend(ServerInstall(tmp_path / "elsewhere" / "bin" / "tritonserver"), "tensorrt")  # unknown


# --- the server environment and the repositories ------------------------------------------------------------------
def _env_from_setting():
    from topi_export.serving.server_env import check_stub_python, python_info

    if os.environ.get("TOPI_TRITON_SERVER") == "0":
        pytest.skip("Triton server tests disabled by TOPI_TRITON_SERVER=0")
    given = os.environ.get("TOPI_TRITON_ENV")
    if given:
        info = python_info(given)  # a TopiError here fails the test: the variable names a broken environment
        check_stub_python(info)
        return Path(given)
    return None


def _env_cache_path() -> Path:
    """Inside the test environment when it is a venv (CI's fresh venv: created once per run, removed with it),
    else ~/.cache/topi-export; keyed by checkout, interpreter and pyproject.toml (the serve extra's pins)."""
    key = hashlib.sha256(f"{ROOT}|{sys.prefix}|{sys.version_info[:2]}|layer|".encode()
                         + (ROOT / "pyproject.toml").read_bytes()).hexdigest()[:12]
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix) / f"topi-triton-env-{key}"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "topi-export" / f"triton-env-{key}"


@pytest.fixture(scope="session")
def server_env():
    """The Python environment of the stub: TOPI_TRITON_ENV, or a thin one layered on this test environment
    (server_env create --layer-on), created once (under a lock: parallel runs wait) and reused."""
    from filelock import FileLock

    from topi_export.serving.server_env import check_stub_python, create_environment, python_info, read_marker

    given = _env_from_setting()
    if given is not None:
        return given
    env = _env_cache_path()
    env.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(env) + ".lock", timeout=900):
        if read_marker(env) is not None:
            try:
                check_stub_python(python_info(env))
                return env
            except TopiError:
                pass  # broken since: recreate
        try:
            create_environment(env, layer_on=sys.executable, root=ROOT, force=True,
                               echo=lambda s: print(s, file=sys.stderr))
        except TopiError as exc:
            pytest.skip(f"cannot create the Triton server environment: {exc}")
    return env


@pytest.fixture(scope="session")
def tiny_repo(ort_engine_dir, tmp_path_factory):
    """topi_topi and topi_dense as Python-backend engine models (python_engine.write_engine_model) over the graphs
    of the tiny-kontext engine directory."""
    from topi_export.serving.python_engine import write_engine_model

    repo = tmp_path_factory.mktemp("triton-server") / "repo"
    for kind in ("topi", "dense"):
        write_engine_model(repo, f"topi_{kind}", Path(ort_engine_dir) / _graph(ort_engine_dir, kind)["onnx"],
                           parameters={"intra_op_num_threads": "1"})
    return repo


def _build(args, out):
    from conftest import run_cli

    code, _, err = run_cli(["build", *args, "--no-dense-baseline", "--engine-dir", str(out)])
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def engine_dirs(server_env, tmp_path_factory):
    """FLUX.2 with three references and Qwen-Image-Edit with true CFG (batch 2), ONNX Runtime, built with the CLI
    (after server_env: no build when the server tests are skipped)."""
    root = tmp_path_factory.mktemp("serve-engines")
    return {"flux2": _build(["--model", "tiny-flux2", "--target-grid", "4x4", "--ref-grids", "4x4,4x4,2x4",
                             "--ratio-buckets", "0.3,0.5"], root / "flux2"),
            "qwen": _build(["--model", "tiny-qwen-edit", "--target-grid", "4x4", "--ref-grids", "4x4",
                            "--ratio-buckets", "0.5"], root / "qwen")}


@pytest.fixture(scope="module")
def repos(engine_dirs, tmp_path_factory):
    """`topi-export triton --engine-models python` repositories: flux2 (1 instance per model), flux2x2 (the same
    engines, 2 instances per model) and qwen."""
    from conftest import run_cli

    root = tmp_path_factory.mktemp("serve-repos")
    out = {}
    for name, engines, instances in (("flux2", "flux2", 1), ("flux2x2", "flux2", 2), ("qwen", "qwen", 1)):
        code, _, err = run_cli(["triton", "--engine-dir", str(engine_dirs[engines]), "--out", str(root / name),
                                "--name", name, "--kind", "cpu", "--engine-models", "python", "--instances",
                                str(instances), "--ort-threads", "1"])
        assert code == 0, err
        out[name] = root / name
    return out


def _start(repo, env, **kwargs):
    from topi_export.serving.server import TritonServer

    kwargs.setdefault("ready_timeout", 300)
    kwargs.setdefault("exit_timeout", 60)  # a loop model's stub (torch, diffusers) takes seconds to shut down
    try:
        return TritonServer(repo, env=env, **kwargs).start()
    except TopiError as exc:
        pytest.fail(f"tritonserver did not start: {exc}")


@pytest.fixture(scope="module")
def server(server_env, tiny_repo, repos):
    """One server for the module: the tiny engine models and every generated repository."""
    srv = _start([tiny_repo, *repos.values()], server_env)
    yield srv
    prefix = srv._shm_prefix
    assert srv.stop() == 0, srv.log_text()[-3000:]  # a clean SIGINT stop
    assert not _group(srv.pid) and not _shm(prefix)


# --- loop requests and `run` references ------------------------------------------------------------------------
def _write_inputs(engine_dir, path, seed=7):
    """An inputs file for the engine directory's layout: every tensor the family declares (Qwen: negative
    embeddings and true_cfg_scale, so both CFG branches run)."""
    import torch

    from topi_export import Inputs, save_inputs
    from topi_export.artifacts.manifest import adapter, read_manifest

    m = read_manifest(engine_dir, verify_files=False)
    family, layout = adapter(m), m.layouts[0]
    g = torch.Generator().manual_seed(seed)
    tensors, scalars = {}, {}
    for spec in family.tensor_specs():
        if spec.role == "text":
            tensors[spec.name] = torch.randn(1, layout.text_tokens, spec.features, generator=g)
        elif spec.role == "mask":
            tensors[spec.name] = torch.ones(1, layout.text_tokens)
        elif spec.role == "pooled":
            tensors[spec.name] = torch.randn(1, spec.features, generator=g)
        else:
            scalars[spec.name] = spec.default
    save_inputs(path, Inputs(layout, torch.randn(1, layout.num_ctx, family.in_channels, generator=g), tensors,
                             scalars))
    return path


def _file_request(path, **options):
    """The request the docs' client sends: the inputs file's tensors, its grids, `run`'s options."""
    from safetensors import safe_open

    arrays = {}
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata() or {}
        for name in f.keys():
            arrays[name] = f.get_tensor(name).astype(np.float32)
    for key in ("target_grid", "reference_grids"):
        if key in meta:
            arrays[key] = np.array([meta[key].encode()], dtype=np.object_)
    types = {"steps": np.int32, "update_interval": np.int32, "seed": np.uint64, "ratio": np.float32,
             "reuse_order": np.int32}
    for name, value in options.items():
        arrays[name] = (np.array([value.encode()], dtype=np.object_) if isinstance(value, str)
                        else np.array([value], dtype=types[name]))
    return arrays


@pytest.fixture(scope="module")
def inputs(engine_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-inputs")
    return {name: _write_inputs(d, root / f"{name}.safetensors") for name, d in engine_dirs.items()}


@pytest.fixture(scope="module")
def run_result(engine_dirs, inputs, tmp_path_factory):
    """`topi-export run --engine-dir` (the CLI, in-process) for a family and seed, optionally with step reuse
    (`--reuse`, `--reuse-order`) and the pruning residual: (latents, report); cached."""
    from safetensors.torch import load_file

    from conftest import run_cli

    root, cache = tmp_path_factory.mktemp("serve-runs"), {}

    def result(family, seed, reuse=None, reuse_order=0, residual="off"):
        key = (family, seed, reuse, reuse_order, residual)
        if key not in cache:
            stem = f"{family}-{seed}-{reuse}-{reuse_order}-{residual}"
            out, report = root / f"{stem}.safetensors", root / f"{stem}.json"
            extra = ["--reuse", str(reuse), "--reuse-order", str(reuse_order)] if reuse is not None else []
            extra += ["--pruning-residual", residual]
            code, _, err = run_cli(["run", "--engine-dir", str(engine_dirs[family]), "--inputs",
                                    str(inputs[family]), "-q", "--steps", str(STEPS), "--seed", str(seed),
                                    "--ratio", str(RATIO), "--update-interval", str(UPDATE_INTERVAL), "--out",
                                    str(out), "--json", str(report), *extra])
            assert code == 0, err
            cache[key] = (load_file(str(out))["latents"].numpy(), json.loads(report.read_text()))
        return cache[key]

    return result


def _loop(module, client, model, arrays, timeout=300):
    """(latents, schedule report) of one loop-model request."""
    inputs = []
    for name, array in arrays.items():
        tensor = module.InferInput(name, list(array.shape), _triton_type(array))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    outputs = [module.InferRequestedOutput(n) for n in ("latents", "schedule")]
    if module.__name__.endswith("grpc"):
        result = client.infer(model, inputs, outputs=outputs, client_timeout=timeout)
    else:
        result = client.infer(model, inputs, outputs=outputs)
    return result.as_numpy("latents"), json.loads(result.as_numpy("schedule")[0])


def _client(server, protocol):
    """(tritonclient module, client) over "http" or "grpc". Close every client: an open HTTP connection holds a
    server's clean stop for its whole exit timeout."""
    if protocol == "http":
        return _http(), _http_client(server)
    return _grpc(), _grpc().InferenceServerClient(server.grpc_url)


# --- against the server ---------------------------------------------------------------------------------------
def test_http_and_grpc_answer_like_onnxruntime(server, ort_engine_dir):
    """A direct request to each engine model, over HTTP and gRPC, anchor and pruned steps: the outputs equal
    ONNX Runtime in-process (rel. L2 <= 1e-4). The models declare the graphs' inputs (metadata)."""
    httpclient, grpcclient = _http(), _grpc()
    http = _http_client(server)
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        meta = http.get_model_metadata("topi_topi")
        assert sorted(i["name"] for i in meta["inputs"]) == sorted(t["name"] for t in _graph(ort_engine_dir,
                                                                                             "topi")["inputs"])
        cases = [(httpclient, http, "topi", None), (grpcclient, grpc, "topi", 32), (grpcclient, grpc, "topi", None),
                 (httpclient, http, "topi", 45), (grpcclient, grpc, "dense", None)]
        for i, (module, client, kind, keep) in enumerate(cases):
            feeds = _feeds(ort_engine_dir, kind, keep=keep, seed=i)
            expected = _reference(ort_engine_dir, kind, feeds)
            got = _infer(module, client, f"topi_{kind}", feeds, list(expected))
            for name, ref in expected.items():
                assert got[name].shape == ref.shape and got[name].dtype == ref.dtype
                assert _rel_l2(got[name], ref) <= REL_L2, (kind, keep, name)
    finally:
        http.close()
        grpc.close()


def test_bad_requests_get_errors_and_the_server_keeps_serving(server, ort_engine_dir):
    httpclient, grpcclient = _http(), _grpc()
    from tritonclient.utils import InferenceServerException

    good = _feeds(ort_engine_dir, "topi", keep=32)
    bad = {
        "unexpected shape for input 'latents'": dict(good, latents=np.zeros((1, 64, 8), np.float32)),  # C is 16
        "'keep_idx' data-type is 'INT32', but model 'topi_topi' expects 'INT64'":
            dict(good, keep_idx=good["keep_idx"].astype(np.int32)),
        "missing required input(s) ['timestep']": {k: v for k, v in good.items() if k != "timestep"},
        # passes Triton's checks (dims -1), fails in ONNX Runtime: an error response from the model
        "ONNXRuntimeError": dict(good, rope_cos=np.zeros((7, 16), np.float32), rope_sin=np.zeros((7, 16), np.float32)),
    }
    http = _http_client(server)
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        for module, client in ((httpclient, http), (grpcclient, grpc)):
            for needle, feeds in bad.items():
                with pytest.raises(InferenceServerException, match=re.escape(needle)):
                    _infer(module, client, "topi_topi", feeds, ["velocity"])
            got = _infer(module, client, "topi_topi", good, ["velocity", "influence"])
            expected = _reference(ort_engine_dir, "topi", good)
            assert all(_rel_l2(got[n], expected[n]) <= REL_L2 for n in expected)
        assert server.live() and server.ready() and server.returncode is None
    finally:
        http.close()
        grpc.close()


@pytest.mark.parametrize("family", ["flux2", "qwen"])
def test_loop_model_over_http_and_grpc_equals_run(server, engine_dirs, inputs, run_result, family):
    """The generated loop model (BLS over the Python-backend engine models) answers a pruned request over HTTP and
    over gRPC with the latents of `topi-export run --engine-dir` (rel. L2 <= 1e-4) and its schedule: FLUX.2 with
    three references, Qwen-Image-Edit with true CFG (both branches in one batch-2 engine call). The generated
    engine model answers a direct anchor request like ONNX Runtime in-process."""
    expected, report = run_result(family, 3)
    arrays = _file_request(inputs[family], steps=STEPS, seed=3, ratio=RATIO, update_interval=UPDATE_INTERVAL)
    for protocol in ("http", "grpc"):
        module, client = _client(server, protocol)
        try:
            latents, schedule = _loop(module, client, f"{family}_loop", arrays)
            assert latents.shape == expected.shape and _rel_l2(latents, expected) <= REL_L2, module.__name__
            assert [(r["kind"], r["keep"], r["keep_per_reference"]) for r in schedule["schedule"]] == [
                (r["kind"], r["keep"], r["keep_per_reference"]) for r in report["schedule"]]
            feeds = _feeds(engine_dirs[family], "topi", seed=11)
            want = _reference(engine_dirs[family], "topi", feeds)
            got = _infer(module, client, f"{family}_topi", feeds, list(want))
            assert all(_rel_l2(got[n], want[n]) <= REL_L2 for n in want)
        finally:
            client.close()
    assert {r["kind"] for r in schedule["schedule"]} == {"anchor", "pruned"}
    assert len(schedule["layout"]["reference_grids"]) == (3 if family == "flux2" else 1)
    assert report["true_cfg"] is (family == "qwen")


@pytest.mark.parametrize("order, residual", [(0, "off"), (1, "off"), (0, "on")])
def test_loop_model_with_step_reuse_equals_run(server, inputs, run_result, order, residual):
    """Step reuse (`reuse` / `reuse_order` request inputs) on the real server: the only eligible step of the
    6-step schedule (step 2: after the two protected steps, before the anchor at 3) reuses the last velocity
    (order 0) or extrapolates the last two (order 1), as `run --reuse 1 --reuse-order N`; with the
    `pruning_residual` input "on" the anchors also measure the pruning residual, as `run --pruning-residual on`;
    latents and schedule equal run's, over gRPC."""
    expected, report = run_result("flux2", 5, reuse=1, reuse_order=order, residual=residual)
    assert [r["kind"] for r in report["schedule"]].count("reuse") == 1
    assert [r.get("residual") for r in report["schedule"] if r["kind"] == "anchor"] == (
        [True, True] if residual == "on" else [None, None])
    arrays = _file_request(inputs["flux2"], steps=STEPS, seed=5, ratio=RATIO, update_interval=UPDATE_INTERVAL,
                           reuse="1", reuse_order=order, pruning_residual=residual)
    module, client = _client(server, "grpc")
    try:
        latents, schedule = _loop(module, client, "flux2_loop", arrays)
    finally:
        client.close()
    assert latents.shape == expected.shape and _rel_l2(latents, expected) <= REL_L2
    assert [(r["kind"], r["keep"]) for r in schedule["schedule"]] == [
        (r["kind"], r["keep"]) for r in report["schedule"]]
    assert schedule["reuse"] == report["reuse"]
    assert schedule["pruning_residual"] is (residual == "on")
    assert [r.get("residual") for r in schedule["schedule"]] == [r.get("residual") for r in report["schedule"]]
    assert _rel_l2(latents, run_result("flux2", 5)[0]) > 1e-6  # reuse changed the result: it was applied
    if residual == "on":  # and the residual changed it again
        assert _rel_l2(latents, run_result("flux2", 5, reuse=1, reuse_order=order)[0]) > 1e-6


def test_loop_bad_requests_get_errors_and_the_server_keeps_serving(server, inputs, run_result):
    """Wrong shape and dtype (refused by Triton against the config), a missing input, NaN, a ratio that is not a
    bucket, an unbuilt layout, an option out of range (refused by the loop model with `run`'s message): each is
    an error response, and the next request is answered right, over HTTP and gRPC."""
    from tritonclient.utils import InferenceServerException

    expected, _ = run_result("flux2", 3)
    good = _file_request(inputs["flux2"], steps=STEPS, seed=3, ratio=RATIO, update_interval=UPDATE_INTERVAL)
    ref = good["reference_latents"]
    nan = ref.copy()
    nan[0, 5, 3] = np.nan
    bad = {
        "unexpected shape for input 'reference_latents'": dict(good, reference_latents=ref[:, :, :8].copy()),
        "'reference_latents' data-type is 'FP64'": dict(good, reference_latents=ref.astype(np.float64)),
        # Triton checks required inputs only for models without optional ones: the loop model refuses it itself
        "the request has no tensor 'reference_latents'": {k: v for k, v in good.items()
                                                          if k != "reference_latents"},
        "contains NaN or Inf": dict(good, reference_latents=nan),
        "ratio 0.4 is not a compiled bucket": dict(good, ratio=np.array([0.4], np.float32)),
        "serves only t8-x4x4": dict(good, target_grid=np.array([b"2x8"], dtype=np.object_)),
        "outside 1..1000": dict(good, steps=np.array([0], np.int32)),
    }
    for protocol in ("http", "grpc"):
        module, client = _client(server, protocol)
        try:
            for needle, arrays in bad.items():
                with pytest.raises(InferenceServerException, match=re.escape(needle)):
                    _loop(module, client, "flux2_loop", arrays)
            latents, _ = _loop(module, client, "flux2_loop", good)
            assert _rel_l2(latents, expected) <= REL_L2
        finally:
            client.close()
    assert server.live() and server.ready() and server.returncode is None


@pytest.mark.parametrize("repo", ["flux2", "flux2x2"], ids=["instances1", "instances2"])
def test_concurrent_clients_each_get_their_own_result(server, inputs, run_result, repo):
    """C = 3 clients (HTTP and gRPC) x R = 2 requests each with distinct seeds, all at once: every response equals
    `run` for its own seed (nothing lost, nothing mixed between requests), with 1 and 2 instances per model."""
    clients, rounds = 3, 2
    seeds = [[100 + c * rounds + r for r in range(rounds)] for c in range(clients)]
    expected = {s: run_result("flux2", s)[0] for row in seeds for s in row}
    distinct = sorted(expected)
    assert all(_rel_l2(expected[a], expected[b]) > 1e-2 for a in distinct for b in distinct if a < b)
    got, errors = {}, []
    barrier = threading.Barrier(clients)

    def client(c):
        module, conn = _client(server, ("http", "grpc")[c % 2])
        try:
            barrier.wait(60)
            for seed in seeds[c]:
                arrays = _file_request(inputs["flux2"], steps=STEPS, seed=seed, ratio=RATIO,
                                       update_interval=UPDATE_INTERVAL)
                latents, schedule = _loop(module, conn, f"{repo}_loop", arrays)
                got[seed] = (latents, schedule["seed"])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"client {c}: {type(exc).__name__}: {exc}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors and not any(t.is_alive() for t in threads), errors
    assert sorted(got) == distinct
    for seed, (latents, echoed) in got.items():
        assert echoed == seed and _rel_l2(latents, expected[seed]) <= REL_L2, seed
    assert server.ready() and server.returncode is None


def _served_count(server, model) -> int:
    status, body = server._http("GET", f"/v2/models/{model}/stats")
    if status != 200:
        return 0
    stats = json.loads(body)["model_stats"]
    return sum(int(s["inference_stats"]["success"]["count"]) for s in stats)


def test_killed_mid_request_then_restarted_and_reloaded(server_env, repos, inputs, run_result):
    """SIGKILL while a long loop request is in flight over HTTP and another over gRPC: both clients get an error
    within seconds (their own timeouts are 300 s), stop() leaves no stub and no shared memory. A server started
    again on the same repository (explicit model control) serves; the loop model unloaded refuses requests,
    reloaded it serves the same answer again."""
    from tritonclient.utils import InferenceServerException

    repo = repos["flux2"]
    srv = _start(repo, server_env)
    prefix = srv._shm_prefix
    assert _shm(prefix)  # the Python backend's regions exist while it runs
    long = _file_request(inputs["flux2"], steps=1000, seed=1, ratio=RATIO)
    outcomes = {}

    def call(module, client):
        start = time.monotonic()
        try:
            _loop(module, client, "flux2_loop", long)
            outcomes[module.__name__] = ("answered", time.monotonic() - start)
        except Exception as exc:  # noqa: BLE001 - what the client raises is the point
            outcomes[module.__name__] = (type(exc).__name__ + ": " + str(exc)[:200], time.monotonic() - start)

    clients = [_client(srv, "http"), _client(srv, "grpc")]
    threads = [threading.Thread(target=call, args=c, daemon=True) for c in clients]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while _served_count(srv, "flux2_topi") < 2:  # both loops are calling the engine model
            assert time.monotonic() < deadline, "the loop model never called the engine model"
            time.sleep(0.1)
        killed_at = time.monotonic()
        srv.kill()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), f"a client hangs after the server was killed: {outcomes}"
        assert len(outcomes) == 2 and all(what != "answered" for what, _ in outcomes.values()), outcomes
        assert time.monotonic() - killed_at < 60, outcomes
    finally:
        for _, client in clients:
            client.close()
    assert srv.stop() == -signal.SIGKILL
    assert not _group(srv.pid), "stub processes outlived the killed server"
    assert not _shm(prefix), "shared-memory regions of the killed server were left"

    expected, _ = run_result("flux2", 3)
    arrays = _file_request(inputs["flux2"], steps=STEPS, seed=3, ratio=RATIO, update_interval=UPDATE_INTERVAL)
    again = _start(repo, server_env, model_control_mode="explicit", load_models=["flux2_topi", "flux2_loop"])
    try:
        module, client = _client(again, "grpc")
        assert _rel_l2(_loop(module, client, "flux2_loop", arrays)[0], expected) <= REL_L2
        again.unload_model("flux2_loop")
        with pytest.raises(InferenceServerException, match="flux2_loop"):
            _loop(module, client, "flux2_loop", arrays)
        assert again.model_ready("flux2_topi")
        again.load_model("flux2_loop")
        assert _rel_l2(_loop(module, client, "flux2_loop", arrays)[0], expected) <= REL_L2
        client.close()
    finally:
        assert again.stop() == 0, again.log_text()[-3000:]


def test_a_port_taken_meanwhile_is_retried(tiny_repo, server_env, monkeypatch):
    """Another process binds the HTTP port between the pick and the server's bind: the server exits with 'already
    in use' and the launcher starts it again on new ports."""
    import socket

    from topi_export.serving import server as launcher

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    picks, real = [], launcher.free_ports

    def first_taken(count=3, host="127.0.0.1"):
        ports = real(count, host)
        picks.append(ports if picks else [taken.getsockname()[1], *ports[1:]])
        return picks[-1]

    monkeypatch.setattr(launcher, "free_ports", first_taken)
    try:
        srv = _start(tiny_repo, server_env)
    finally:
        taken.close()
    try:
        assert len(picks) == 2 and srv.http_port == picks[1][0] != picks[0][0] and srv.model_ready("topi_topi")
    finally:
        assert srv.stop() == 0


def test_broken_model_is_a_one_line_error_with_the_log(tiny_repo, server_env, tmp_path):
    """A model that cannot load: start() raises one line naming the model and the backend's message, and the
    log path; nothing is left running."""
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo / "topi_dense", repo / "broken", copy_function=os.link)
    config = (repo / "broken" / "config.pbtxt").read_text().replace('"topi_dense"', '"broken"')
    (repo / "broken" / "config.pbtxt").unlink()  # a hard link to the shared repository's file: not written through
    (repo / "broken" / "config.pbtxt").write_text(config + 'parameters {\n  key: "onnx_file"\n  value { '
                                                  'string_value: "missing.onnx" }\n}\n')
    from topi_export.serving.server import TritonServer

    srv = TritonServer(repo, env=server_env, ready_timeout=120, exit_timeout=5, workdir=tmp_path / "work")
    with pytest.raises(TopiError) as exc:
        srv.start()
    message = str(exc.value)
    assert "\n" not in message and "broken" in message and "missing.onnx is missing" in message
    assert f"log: {srv.log_path}" in message and srv.log_path.is_file()
    assert srv.returncode is not None and not _group(srv.pid)


_PLAIN_CHILD = """
import sys, time
from topi_export.serving.server import TritonServer
repo, env, workdir = sys.argv[1:4]
server = TritonServer(repo, env=env, exit_timeout=5, workdir=workdir).start()
print(f"ready (pid {server.pid})", flush=True)
time.sleep(600)  # killed by the test
"""


def _child(args, ready="ready"):
    """A child process (the CLI or a launcher script) until it prints its ready line: (process, lines)."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(ready):
            break
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("".join(lines))
    if not (lines and lines[-1].startswith(ready)):
        proc.kill()
        pytest.fail("".join(lines))
    return proc, lines


def _wait_gone(pid, timeout):
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    return not Path(f"/proc/{pid}").exists()


@pytest.mark.parametrize("sig, source", [(signal.SIGINT, "engine-dir"), (signal.SIGTERM, "repo")],
                         ids=["SIGINT-engine-dir", "SIGTERM-repo"])
def test_serve_command_until_a_signal(server_env, tiny_repo, engine_dirs, sig, source):
    """`topi-export serve` in its own process: --engine-dir writes the repository first (python engine models:
    the wheel's server has no onnxruntime backend) into a temporary directory; --repo serves one. It prints the
    endpoints when every model is ready; SIGINT or SIGTERM stops tritonserver cleanly (exit 0) and removes the
    temporary repository."""
    import urllib.request

    what = ["--engine-dir", str(engine_dirs["flux2"])] if source == "engine-dir" else ["--repo", str(tiny_repo)]
    proc, lines = _child(["-m", "topi_export.cli", "serve", *what, "--env", str(server_env), "--http-port", "0",
                          "--grpc-port", "0", "--metrics-port", "0", "--exit-timeout", "60"])
    ready = lines[-1]
    pid = int(ready.split("(pid ")[1].split(")")[0])
    http = re.search(r"HTTP (http://127\.0\.0\.1:\d+)", ready).group(1)
    assert re.search(r"gRPC 127\.0\.0\.1:\d+ ", ready) and "metrics http://127.0.0.1:" in ready
    models = ["topi_topi", "topi_loop"] if source == "engine-dir" else ["topi_topi", "topi_dense"]
    try:
        for model in models:
            with urllib.request.urlopen(f"{http}/v2/models/{model}/ready", timeout=10) as resp:
                assert resp.status == 200
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines) + out
    assert proc.returncode == 0, text
    assert "tritonserver stopped (exit code 0)" in out
    assert _wait_gone(pid, 5) and not _group(pid)
    if source == "engine-dir":
        written = re.search(r"repository -> (\S+) \(python engine models, cpu instances", text)
        assert written, text
        assert not Path(written.group(1)).exists()  # the temporary repository is removed


def test_server_dies_with_a_killed_parent(tiny_repo, server_env, tmp_path):
    """The parent SIGKILLed (no cleanup runs): PR_SET_PDEATHSIG stops tritonserver and its stubs."""
    proc, lines = _child(["-c", _PLAIN_CHILD, str(tiny_repo), str(server_env), str(tmp_path / "work")])
    pid = int(lines[-1].split("(pid ")[1].split(")")[0])
    proc.kill()
    proc.wait(30)
    try:
        assert _wait_gone(pid, 60), "tritonserver outlived its killed parent"
        deadline = time.monotonic() + 30
        while _group(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _group(pid), "stubs outlived their server"
    finally:
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)


def test_wheel_server_defaults_to_its_own_environment(tiny_repo, server_env):
    """tritonserver= the wheel's binary, no env: the models run in the environment the wheel is installed in."""
    from topi_export.serving.server_env import python_info

    binary = Path(python_info(server_env).pytriton) / "tritonserver" / "bin" / "tritonserver"
    srv = _start(tiny_repo, None, tritonserver=binary)
    try:
        assert srv.env == Path(server_env).resolve() and srv.model_ready("topi_topi")
    finally:
        assert srv.stop() == 0
