"""The Python environment that Triton's Python-backend stub runs the models in, and how to create it.

What the stub of Triton 2.51 (PyPI's nvidia-pytriton 0.7.0 wheel) needs, each found on this project's machines
(docs/triton-server.md has the experiments):

- its own build per Python: ``pytriton/tritonserver/python_backend_stubs/3.X/triton_python_backend_stub`` links
  ``libpython3.X.so.1.0``, so 3.X must be the environment's Python and that Python must be a shared build;
- the libpython of the SAME interpreter first on ``LD_LIBRARY_PATH``: a venv of pyenv's 3.11.7 run on Debian's
  libpython 3.11.2 mixes a 3.11.7 stdlib with a 3.11.2 runtime (``'_thread.RLock' object has no attribute
  '_recursion_count'``);
- the environment's ``bin`` first on ``PATH``: the stub embeds Python through pybind11 2.10's isolated config,
  which ignores ``PYTHONPATH``; the interpreter finds ``python3`` on ``PATH`` as its executable and takes
  sys.prefix and site-packages from the ``pyvenv.cfg`` next to it;
- numpy < 2: pybind11 2.10 reads numpy 1.x's array descriptor, so with numpy 2 an input [1, 2, 3] arrives as
  [1, 1, 1] and outputs fail (python_backend moved to pybind11 2.12 after the 24.10 release);
- ``nvidia_pytriton.libs`` on ``LD_LIBRARY_PATH`` when the stub or libtriton_python.so is copied out of the wheel
  (their RPATH is ``$ORIGIN/../../../../nvidia_pytriton.libs``).

``create_environment`` makes such a virtual environment: numpy<2, topi-export with its runtime dependencies
(torch==2.13.0, ONNX Runtime, diffusers) and the ``serve`` extra (nvidia-pytriton==0.7.0, tritonclient), and
links the base interpreter's libpython into ``<env>/lib`` so that the env also works as a model's
``EXECUTION_ENV_PATH`` (the backend sources ``<env>/bin/activate`` and puts ``<env>/lib`` on LD_LIBRARY_PATH).

    python -m topi_export.serving.server_env create ENV [--python PYTHON] [--project SPEC] [--force]
    python -m topi_export.serving.server_env check ENV

Standard library only (the launcher, server.py, imports it).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from topi_export.errors import TopiError

STUB_PYTHONS = ("3.8", "3.9", "3.10", "3.11", "3.12", "3.13")  # python_backend_stubs/ of nvidia-pytriton 0.7.0
PYTRITON = "nvidia-pytriton==0.7.0"  # Triton 2.51
NUMPY = "numpy<2"
MARKER = "topi-triton-env.json"  # written last by create_environment: the environment is complete
PROBE_TIMEOUT_S = 60

# Run by the environment's interpreter: stdlib only, imports nothing it inspects.
_PROBE = r"""
import importlib.util, json, os, platform, sys, sysconfig
from importlib import metadata
def version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
libdir = sysconfig.get_config_var("LIBDIR") or ""
soname = sysconfig.get_config_var("INSTSONAME") or ""
lib = os.path.join(libdir, soname) if ".so" in soname else ""
spec = importlib.util.find_spec("pytriton")
print(json.dumps({"executable": sys.executable, "prefix": sys.prefix, "base_prefix": sys.base_prefix,
    "version": "%d.%d" % sys.version_info[:2], "full_version": platform.python_version(),
    "libpython": lib if lib and os.path.exists(lib) else None,
    "pytriton": os.path.dirname(spec.origin) if spec and spec.origin else None,
    "packages": {d: version(d) for d in ("numpy", "nvidia-pytriton", "topi-export", "onnxruntime", "torch")}}))
"""


@dataclass(frozen=True)
class PythonInfo:
    """What the stub needs to know of an environment's interpreter (``python_info``)."""

    executable: str
    prefix: str  # sys.prefix: the environment; its bin/ goes first on PATH
    base_prefix: str
    version: str  # "3.11": picks python_backend_stubs/3.11
    full_version: str
    libpython: str | None  # the base interpreter's shared libpython, None for a static build
    pytriton: str | None  # site-packages/pytriton of an installed nvidia-pytriton, None without
    packages: dict  # distribution -> version (None: not installed)

    @property
    def numpy(self) -> str | None:
        return self.packages.get("numpy")


def env_python(env) -> Path:
    """The interpreter of a virtual environment (or any prefix with bin/python3)."""
    env = Path(env)
    for name in ("python3", "python"):
        if (env / "bin" / name).exists():
            return env / "bin" / name
    raise TopiError(f"{env} has no bin/python3: create the environment with "
                    f"`python -m topi_export.serving.server_env create {env}`")


def python_info(python) -> PythonInfo:
    """Ask ``python`` (an interpreter or an environment directory) what the stub needs; < 1 s, imports nothing."""
    python = Path(python)
    if python.is_dir():
        python = env_python(python)
    try:
        out = subprocess.run([str(python), "-I", "-c", _PROBE], capture_output=True, text=True,
                             timeout=PROBE_TIMEOUT_S, check=True).stdout
        return PythonInfo(**json.loads(out.strip().splitlines()[-1]))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError, TypeError) as exc:
        raise TopiError(f"cannot run {python} to inspect it ({type(exc).__name__}): pass a working Python "
                        f"interpreter or environment") from None


def _major(version: str | None) -> int | None:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


def check_stub_python(info: PythonInfo, *, need_numpy: bool = True) -> None:
    """Refuse an environment whose interpreter the bundled stubs cannot embed (TopiError naming the fix)."""
    if info.version not in STUB_PYTHONS:
        raise TopiError(f"{info.executable} is Python {info.version}; the stubs of {PYTRITON} exist for Python "
                        f"{', '.join(STUB_PYTHONS)}: create the environment from one of those")
    if not info.libpython:
        raise TopiError(f"{info.executable} (Python {info.full_version}) has no shared libpython{info.version}: the "
                        f"stub links libpython{info.version}.so.1.0; use a shared build (Debian's "
                        f"python{info.version}, or pyenv with PYTHON_CONFIGURE_OPTS=--enable-shared)")
    if need_numpy and info.numpy is None:
        raise TopiError(f"{info.prefix} has no numpy: install '{NUMPY}' in it (`python -m "
                        f"topi_export.serving.server_env create`)")
    if need_numpy and (_major(info.numpy) or 0) >= 2:
        raise TopiError(f"{info.prefix} has numpy {info.numpy}; the stub of Triton 2.51 (pybind11 2.10) reads "
                        f"tensors wrong with numpy 2: install '{NUMPY}' in it")


def _default_project() -> list[str]:
    """topi-export with the serve extra: this source checkout (editable) or the released version."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "topi_export").is_dir():
        return ["-e", f"{root}[serve]"]
    from importlib import metadata

    try:
        return [f"topi-export[serve]=={metadata.version('topi-export')}"]
    except metadata.PackageNotFoundError:
        return ["topi-export[serve]"]


def _run_logged(cmd, log: Path, what: str) -> None:
    with open(log, "a") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n")
        f.flush()
        code = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL).returncode
    if code != 0:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR") or "rror:" in ln] or lines[-1:]
        raise TopiError(f"{what} failed (exit {code}: {errors[-1][:300] if errors else 'no output'}); full log: {log}")


def link_libpython(info: PythonInfo) -> Path | None:
    """<env>/lib/libpython3.X.so.1.0 -> the base interpreter's: what EXECUTION_ENV_PATH=<env> puts on
    LD_LIBRARY_PATH (python_backend src/stub_launcher.cc: ``LD_LIBRARY_PATH=<env>/lib:...``)."""
    if not info.libpython or Path(info.prefix).resolve() == Path(info.base_prefix).resolve():
        return None
    dst = Path(info.prefix) / "lib" / Path(info.libpython).name
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(info.libpython)
    return dst


def create_environment(path, *, python=None, project=None, force: bool = False, echo=print) -> PythonInfo:
    """Create the stub's environment at ``path`` (a new venv). ``python``: the base interpreter (default: the one
    running this); ``project``: pip arguments installing topi-export (default ``_default_project()``).
    Returns its PythonInfo; writes ``<path>/topi-triton-env.json`` last, with the time it took."""
    start = time.monotonic()
    path = Path(path).absolute()
    base = python_info(python or sys.executable)
    check_stub_python(base, need_numpy=False)  # before any work: the venv inherits these
    if path.exists() or path.is_symlink():
        is_venv = (path / "pyvenv.cfg").is_file() and not path.is_symlink()
        if not force:
            raise TopiError(f"{path} already exists: pass --force to replace it (only a virtual environment is "
                            f"replaced), or choose a new path")
        if not is_venv and any(path.iterdir()):
            raise TopiError(f"{path} is not a virtual environment (no pyvenv.cfg): it is not replaced; choose "
                            f"a new path")
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    log = path.parent / f".{path.name}.install.log"  # outside: kept when a failed environment is removed
    log.write_text("")
    try:
        echo(f"[1/3] venv from {base.executable} (Python {base.full_version}) -> {path}")
        _run_logged([base.executable, "-m", "venv", path], log, "python -m venv")
        project_args = list(project) if project else _default_project()
        echo(f"[2/3] pip install {NUMPY} {' '.join(project_args)} (log: {log})")
        _run_logged([env_python(path), "-m", "pip", "install", "--disable-pip-version-check", "-q", NUMPY,
                     *project_args], log, "pip install")
        info = python_info(path)
        check_stub_python(info)
        missing = [d for d in ("nvidia-pytriton", "topi-export", "onnxruntime", "torch") if not info.packages.get(d)]
        if missing:
            raise TopiError(f"{path} lacks {', '.join(missing)} after pip install: install them, or pass --project "
                            f"with the serve extra")
        echo("[3/3] link libpython for EXECUTION_ENV_PATH, check imports")
        link_libpython(info)
        _run_logged([info.executable, "-c", "import numpy, onnxruntime, torch, topi_export, pytriton"], log,
                    "importing numpy, onnxruntime, torch, topi_export, pytriton in the new environment")
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)  # a half-made environment would be taken for a complete one
        raise
    record = {**asdict(info), "created_s": round(time.monotonic() - start, 1), "pip": project_args}
    (path / MARKER).write_text(json.dumps(record, indent=2) + "\n")
    log.unlink(missing_ok=True)
    echo(f"environment ready in {record['created_s']} s: {path}")
    return info


def read_marker(path) -> dict | None:
    """The record create_environment wrote, None for an environment it did not complete."""
    try:
        return json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m topi_export.serving.server_env",
                                     description="The Python environment of Triton's Python-backend stub.")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="create the environment (a venv with numpy<2, topi-export[serve])")
    create.add_argument("env")
    create.add_argument("--python", help="base interpreter (a shared build of Python 3.8-3.13; default: this one)")
    create.add_argument("--project", nargs="+", help="pip arguments installing topi-export (default: this checkout "
                                                     "editable with [serve], or the released version)")
    create.add_argument("--force", action="store_true", help="replace an existing virtual environment")
    check = sub.add_parser("check", help="print what the stub needs to know of an environment, check it")
    check.add_argument("env")
    args = parser.parse_args(argv)
    try:
        if args.command == "create":
            create_environment(args.env, python=args.python, project=args.project, force=args.force)
        else:
            info = python_info(args.env)
            print(json.dumps(asdict(info), indent=2))
            check_stub_python(info)
    except TopiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
