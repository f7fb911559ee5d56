"""Start a real Triton Inference Server on a model repository, on loopback, and stop it cleanly.

    with TritonServer("triton-repo", env=".venv-triton") as server:      # waits until server and models are ready
        client = tritonclient.http.InferenceServerClient(server.http_url)
        ...
    serve("triton-repo", env=".venv-triton")                             # foreground; SIGINT / SIGTERM stop it

``tritonserver`` is taken from an explicit path, from the nvidia-pytriton wheel installed in ``env`` (the
environment the Python-backend models run in), or from PATH. For the wheel, the backend directory is prepared in a
work directory: the wheel's Python backend plus the stub built for ``env``'s Python, and the server's environment
gets what that stub needs (server_env.py: env/bin first on PATH, the env's libpython and nvidia_pytriton.libs on
LD_LIBRARY_PATH; PYTHONPATH is ignored by the stub). The stub is run once before the server starts, so a stub that
cannot load fails here in one line instead of hanging the model load.

Ports: free HTTP / gRPC / metrics ports on 127.0.0.1, retried when another process takes one first. Readiness:
``/v2/health/ready`` and every model's ``/v2/models/<m>/ready``, bounded; a failure raises TopiError with the
server's error lines and the log path. Stop: SIGINT (Triton drains in-flight requests), then SIGTERM, then
SIGKILL, each bounded; then stubs left by a killed server (every process of the server's own process group, by
pid) and its shared-memory regions (a per-server name prefix) are removed. The server dies with this process
(PR_SET_PDEATHSIG) even when this process is killed.

Standard library only; clients (tritonclient) are for the callers.
"""
from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from topi_export.errors import BackendUnavailable, BadInput, TopiError
from topi_export.serving.server_env import PythonInfo, check_stub_python, python_info

LOOPBACK = "127.0.0.1"
CONTROL_MODES = ("none", "explicit", "poll")
STUB = "triton_python_backend_stub"
PORT_ATTEMPTS = 3
LOG_NAME = "tritonserver.log"


@dataclass(frozen=True)
class ServerInstall:
    """A tritonserver binary and, for the nvidia-pytriton wheel, the pieces the launcher arranges itself."""

    tritonserver: Path
    backends: Path | None = None  # the wheel's backends/ (python/libtriton_python.so, triton_python_backend_utils.py)
    stubs: Path | None = None  # the wheel's python_backend_stubs/<3.X>/triton_python_backend_stub
    libs: Path | None = None  # the wheel's nvidia_pytriton.libs (RPATH of the stubs and the backend)


def _wheel_install(binary: Path) -> ServerInstall:
    """pytriton/tritonserver/bin/tritonserver of the wheel: its backends, stubs and bundled libraries."""
    root = binary.resolve().parent.parent  # .../pytriton/tritonserver
    stubs, backends = root / "python_backend_stubs", root / "backends"
    if stubs.is_dir() and (backends / "python" / "libtriton_python.so").is_file():
        libs = root.parent.parent / "nvidia_pytriton.libs"
        return ServerInstall(binary, backends, stubs, libs if libs.is_dir() else None)
    return ServerInstall(binary)


def _own_pytriton() -> Path | None:
    """site-packages/pytriton of an nvidia-pytriton installed in this interpreter's environment (located, not
    imported: it needs numpy<2)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError):
        return None
    return Path(spec.origin).parent if spec is not None and spec.origin else None


def find_tritonserver(tritonserver=None, env=None, info: PythonInfo | None = None) -> ServerInstall:
    """An explicit ``tritonserver`` path, else the one of nvidia-pytriton installed in ``env`` (without ``env``:
    in this interpreter's environment), else PATH."""
    if tritonserver is not None:
        path = Path(tritonserver)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise TopiError(f"{path} is not an executable tritonserver: pass the binary's path")
        return _wheel_install(path)
    if env is not None:
        info = info or python_info(env)
        if info.pytriton:
            binary = Path(info.pytriton) / "tritonserver" / "bin" / "tritonserver"
            if binary.is_file():
                return _wheel_install(binary)
    elif (own := _own_pytriton()) is not None and (own / "tritonserver" / "bin" / "tritonserver").is_file():
        return _wheel_install(own / "tritonserver" / "bin" / "tritonserver")
    found = shutil.which("tritonserver")
    if found:
        return _wheel_install(Path(found))
    where = f"in {env} or on PATH" if env is not None else "in this environment or on PATH (no --env given)"
    raise BackendUnavailable(f"no tritonserver {where}: create the server environment with `topi-export serve --env "
                             f"ENV --create-env` (its nvidia-pytriton ships one) and pass --env ENV, or pass "
                             f"--server PATH")


def server_backends(install: ServerInstall) -> set[str] | None:
    """The backends this server can load (folders of its backend directory: the wheel's, or
    <prefix>/backends next to <prefix>/bin/tritonserver as in NVIDIA's container); None when unknown."""
    root = install.backends or install.tritonserver.resolve().parent.parent / "backends"
    try:
        return {p.name for p in root.iterdir() if p.is_dir()}
    except OSError:
        return None


def has_backend(install: ServerInstall, name: str) -> bool:
    """Whether this server has Triton backend ``name`` (backends/base.py Backend.triton_backend); unknown: assume
    it has, as a full Triton install does."""
    have = server_backends(install)
    return have is None or name in have


def prepare_backends(install: ServerInstall, info: PythonInfo, workdir) -> Path:
    """<workdir>/backends/python: the wheel's Python backend (linked) and the stub for ``info``'s Python (copied:
    Triton may chmod it). One directory per server, so servers for different Pythons never share a stub."""
    stub = install.stubs / info.version / STUB
    if not stub.is_file():
        have = sorted(p.name for p in install.stubs.iterdir() if (p / STUB).is_file())
        raise TopiError(f"{install.stubs} has no stub for Python {info.version} (it has {', '.join(have)}): create "
                        f"the environment from one of those Pythons")
    backends = Path(workdir) / "backends"
    target = backends / "python"
    target.mkdir(parents=True, exist_ok=True)
    for src in sorted((install.backends / "python").iterdir()):
        if src.name != STUB and not (target / src.name).exists():
            (target / src.name).symlink_to(src.resolve())
    shutil.copyfile(stub, target / STUB)
    (target / STUB).chmod(0o755)
    return backends


def server_environ(install: ServerInstall, info: PythonInfo | None, base=None) -> dict:
    """The server's environment (inherited by the stubs): env/bin first on PATH (the stub's interpreter finds
    ``python3`` there and takes site-packages from its pyvenv.cfg), the env's libpython and the wheel's bundled
    libraries first on LD_LIBRARY_PATH, PYTHONPATH / PYTHONHOME dropped (the stub ignores the one and the other
    would point it at another stdlib)."""
    environ = dict(os.environ if base is None else base)
    lib_dirs = []
    if info is not None:
        environ["PATH"] = os.pathsep.join([str(Path(info.prefix) / "bin"), environ.get("PATH", os.defpath)])
        if info.libpython:
            lib_dirs.append(str(Path(info.libpython).parent))
        for key in ("PYTHONPATH", "PYTHONHOME"):
            environ.pop(key, None)
    if install.libs is not None:
        lib_dirs.append(str(install.libs))
    if environ.get("LD_LIBRARY_PATH"):
        lib_dirs.append(environ["LD_LIBRARY_PATH"])
    if lib_dirs:
        environ["LD_LIBRARY_PATH"] = os.pathsep.join(lib_dirs)
    return environ


def check_stub(backends: Path, environ: dict, timeout: float = 60.0) -> None:
    """Run the stub without arguments as Triton will start it: it exits 1 ("Expected 9 arguments") when its
    libraries load. Anything else (127: a missing library) would hang Triton's model load, so it is an error."""
    stub = backends / "python" / STUB
    try:
        proc = subprocess.run([str(stub)], env=environ, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TopiError(f"cannot run the Python backend stub {stub} ({type(exc).__name__}): check the server "
                        f"environment") from None
    if proc.returncode != 1:
        said = " ".join((proc.stderr + proc.stdout).split())[:400] or "no output"
        raise TopiError(f"the Python backend stub does not start (exit {proc.returncode}: {said}): its libpython "
                        f"or nvidia_pytriton.libs is not found; recreate the environment with `python -m "
                        f"topi_export.serving.server_env create`")


def free_ports(count: int = 3, host: str = LOOPBACK) -> list[int]:
    """Ports free now on ``host`` (bound together, so distinct); another process may still take one first."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


_PR_SET_PDEATHSIG = 1
_prctl = None


def _die_with_parent():
    """preexec_fn: SIGTERM to the server when the thread that started it exits (this process killed included)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


def _load_prctl():
    global _prctl
    if _prctl is None:
        try:
            import ctypes

            _prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork: the child only calls it
        except (OSError, AttributeError):
            _prctl = None


# Logged as errors by every start on a machine without an NVIDIA driver, and harmless there.
BENIGN = ("CudaDriverHelper has not been initialized", "Failed to initialize NVML", "Unable to allocate pinned")


def error_lines(log: str, limit: int = 1500) -> str:
    """The server log's error lines on one line (model-table rows that failed included)."""
    picked = []
    for line in log.splitlines():
        text = line.strip()
        if not text or any(b in text for b in BENIGN):
            continue
        if (text[:1] == "E" and text[1:5].isdigit()) or text.startswith("error:") or "UNAVAILABLE" in text \
                or "Error" in text or "error while loading" in text or "already in use" in text:
            text = " ".join(text.split())
            if text not in picked:
                picked.append(text)
    out = " | ".join(picked) or " | ".join(" ".join(ln.split()) for ln in log.splitlines()[-5:] if ln.strip())
    return out if len(out) <= limit else out[:limit] + " ..."


class TritonServer:
    """One tritonserver process on ``repository`` (see the module docstring).

    repository: a model repository, or a list of them (one --model-repository each; model names must differ).
    env: the Python environment the Python-backend models run in (a venv made by server_env.create_environment);
        None: for the wheel's tritonserver the environment it is installed in, else the current environment (a
        tritonserver whose own stub fits it, as in NVIDIA's container).
    tritonserver: the binary; default from ``env``'s nvidia-pytriton, else PATH.
    model_control_mode: none | explicit | poll; load_models: the models --load-model loads in explicit mode.
    host: the address every endpoint binds (loopback by default).
    ports: (http, grpc, metrics); 0 picks a free port (then a port another process takes first is retried).
    ready_timeout: seconds for the server and every model to become ready.
    exit_timeout: seconds Triton drains in-flight requests on SIGINT (--exit-timeout-secs).
    workdir: backends and log (default: a temporary directory, removed by a clean stop).
    After start(): http_url ("http://127.0.0.1:PORT"), grpc_url ("127.0.0.1:PORT", tritonclient.grpc's form),
    metrics_url, the ports, pid, log_path."""

    def __init__(self, repository, *, env=None, tritonserver=None, model_control_mode: str = "none",
                 load_models=(), host: str = LOOPBACK, ports=(0, 0, 0), ready_timeout: float = 180.0,
                 exit_timeout: int = 10, log_verbose: int = 0, extra_args=(), workdir=None, echo=None):
        repos = [repository] if isinstance(repository, (str, os.PathLike)) else list(repository)
        self.repositories = [Path(r).resolve() for r in repos]
        for repo in self.repositories:
            if not repo.is_dir():
                raise BadInput(f"model repository {repo} does not exist: write one with `topi-export triton`")
        if not self.repositories:
            raise BadInput("no model repository given: pass one")
        self.repository = self.repositories[0]
        if model_control_mode not in CONTROL_MODES:
            raise BadInput(f"model control mode {model_control_mode!r}: choose one of {', '.join(CONTROL_MODES)}")
        if load_models and model_control_mode != "explicit":
            raise BadInput("models to load at start need model control mode 'explicit'")
        ports = tuple(int(p) for p in ports)
        if len(ports) != 3 or not all(0 <= p <= 65535 for p in ports):
            raise BadInput(f"ports {ports}: give three ports (HTTP, gRPC, metrics) in 0..65535, 0 for a free one")
        if len({p for p in ports if p}) != len([p for p in ports if p]):
            raise BadInput(f"ports {ports}: HTTP, gRPC and metrics need different ports")
        try:
            ipaddress.IPv4Address(str(host))
        except ValueError:
            raise BadInput(f"host {host!r}: give an IPv4 address to bind (127.0.0.1: this machine only, 0.0.0.0: "
                           f"every interface)") from None
        self.host, self.ports = str(host), ports
        self.env = Path(env).absolute() if env is not None else None
        self.tritonserver = tritonserver
        self.model_control_mode = model_control_mode
        self.load_models = tuple(load_models)
        self.ready_timeout, self.exit_timeout = float(ready_timeout), int(exit_timeout)
        self.log_verbose, self.extra_args = int(log_verbose), tuple(extra_args)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else None
        self.echo = echo or (lambda s: None)
        self.http_port = self.grpc_port = self.metrics_port = None
        self.log_path = None
        self._proc = self._log = None
        self._shm_prefix = None
        self._cancel = threading.Event()  # set by serve()'s signal handler: stop waiting for readiness
        self._started = False  # became ready once

    # --- endpoints ------------------------------------------------------------------------------------------
    @property
    def _client_host(self) -> str:
        """Where a client on this machine reaches the server: loopback for a wildcard bind."""
        return LOOPBACK if self.host in ("0.0.0.0", "", "::") else self.host

    @property
    def http_url(self) -> str:
        return f"http://{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""

    # --- start ------------------------------------------------------------------------------------------------
    def _prepare(self):
        info = python_info(self.env) if self.env is not None else None
        install = find_tritonserver(self.tritonserver, self.env, info)
        if info is None and install.stubs is not None:
            # the wheel has no stub in place (PyTriton copies one at run time): run the models in the environment
            # the wheel is installed in, <prefix>/lib/python3.X/site-packages/pytriton/tritonserver/bin/tritonserver
            parents = install.tritonserver.resolve().parents
            prefix = parents[6] if len(parents) > 6 else Path("/nonexistent")
            if not (prefix / "pyvenv.cfg").is_file() and not (prefix / "bin" / "python3").exists():
                raise TopiError(f"{install.tritonserver} is nvidia-pytriton's server outside a Python environment: "
                                f"pass env= (the environment the Python-backend models run in)")
            self.env, info = prefix, python_info(prefix)
        wheel = info is not None and install.stubs is not None
        if wheel:
            check_stub_python(info)  # this wheel's stub needs numpy<2 and a shared libpython
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="topi-triton-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        environ = server_environ(install, info)
        try:
            backends = prepare_backends(install, info, self.workdir) if wheel else None
            if backends is not None:
                check_stub(backends, environ)
        except BaseException:
            self._remove_workdir(keep_log=False)
            raise
        return install, backends, environ

    def _command(self, install, backends) -> list[str]:
        cmd = [str(install.tritonserver)]
        for repo in self.repositories:
            cmd += ["--model-repository", str(repo)]
        cmd += ["--http-address", self.host, "--http-port", str(self.http_port),
                "--grpc-address", self.host, "--grpc-port", str(self.grpc_port),
                "--metrics-address", self.host, "--metrics-port", str(self.metrics_port),
               "--allow-gpu-metrics", "false", "--model-control-mode", self.model_control_mode,
               "--exit-timeout-secs", str(self.exit_timeout), "--log-verbose", str(self.log_verbose),
               # the configs are complete: no extra stub start per model to auto-complete them
               "--disable-auto-complete-config",
               # a per-server prefix: the regions of a killed server can be found and removed
               f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}"]
        if backends is not None:
            cmd += ["--backend-directory", str(backends)]
        for name in self.load_models:
            cmd += ["--load-model", name]
        return cmd + list(self.extra_args)

    def start(self) -> "TritonServer":
        """Launch and wait until the server and its models are ready (``ready_timeout``)."""
        if self._proc is not None:
            raise TopiError("this server was started already: create a new TritonServer to start it again")
        install, backends, environ = self._prepare()
        _load_prctl()
        self.log_path = self.workdir / LOG_NAME
        for attempt in range(1, PORT_ATTEMPTS + 1):
            free = iter(free_ports(3, self.host))
            self.http_port, self.grpc_port, self.metrics_port = (p or next(free) for p in self.ports)
            self._shm_prefix = f"topi_triton_{os.getpid()}_{secrets.token_hex(4)}_"
            self._log = open(self.log_path, "wb")
            self.echo(f"starting tritonserver on {self.host} (http {self.http_port}, grpc {self.grpc_port}, "
                      f"metrics {self.metrics_port}); log: {self.log_path}")
            self._proc = subprocess.Popen(self._command(install, backends), env=environ, stdin=subprocess.DEVNULL,
                                          stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                          preexec_fn=_die_with_parent)
            try:
                self.wait_ready(self.ready_timeout)
                self._started = True
                return self
            except BaseException as exc:  # KeyboardInterrupt included: never leave a half-started server
                in_use = (isinstance(exc, TopiError) and self.returncode is not None
                          and "already in use" in self.log_text())
                retry = in_use and attempt < PORT_ATTEMPTS and not all(self.ports)
                self._terminate()
                if in_use and not retry and any(self.ports):
                    self._remove_workdir(keep_log=True)
                    raise BadInput(f"a port tritonserver was told to use is taken on {self.host} (http "
                                   f"{self.http_port}, grpc {self.grpc_port}, metrics {self.metrics_port}): stop what "
                                   f"uses it or choose other ports (0: a free one); log: {self.log_path}") from None
                if not retry:
                    self._remove_workdir(keep_log=True)  # the error message points to the log
                    raise
                self._proc = None
        raise AssertionError("unreachable")

    def _models_to_wait_for(self) -> list[str]:
        if self.model_control_mode == "explicit":
            return list(self.load_models)
        status, body = self._http("POST", "/v2/repository/index", b"{}")
        if status != 200:
            return []
        return sorted({m["name"] for m in json.loads(body or b"[]")})

    def wait_ready(self, timeout: float | None = None, models=None) -> None:
        """Until /v2/health/ready and every model's ready endpoint answer 200; TopiError (with the server's error
        lines) when the server exits, ``timeout`` passes or serve() is told to stop."""
        deadline = time.monotonic() + (self.ready_timeout if timeout is None else timeout)
        pending = None
        while True:
            code = self.returncode
            if code is not None:
                raise TopiError(f"tritonserver exited with code {code} before it was ready: "
                                f"{error_lines(self.log_text())}; log: {self.log_path}")
            if self._cancel.is_set():
                raise TopiError("stopped before tritonserver was ready (signal)")
            if self.ready():
                if pending is None:
                    pending = list(models) if models is not None else self._models_to_wait_for()
                pending = [m for m in pending if not self.model_ready(m)]
                if not pending:
                    return
            if time.monotonic() > deadline:
                what = f"models {', '.join(pending)} were" if pending else "the server was"
                raise TopiError(f"tritonserver is not ready after {timeout or self.ready_timeout:.0f} s ({what} not "
                                f"ready): {error_lines(self.log_text())}; log: {self.log_path}; raise the timeout or "
                                f"fix the repository")
            time.sleep(0.25)

    # --- HTTP v2 API (stdlib) -----------------------------------------------------------------------------------
    def _http(self, method: str, path: str, body: bytes | None = None, timeout: float = 5.0):
        """(status, body); status None when nothing answers."""
        if self.http_port is None:
            return None, b""
        req = urllib.request.Request(self.http_url + path, data=body, method=method,
                                     headers={"Content-Type": "application/json"} if body is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (urllib.error.URLError, OSError):
            return None, b""

    def live(self) -> bool:
        return self._http("GET", "/v2/health/live")[0] == 200

    def ready(self) -> bool:
        return self._http("GET", "/v2/health/ready")[0] == 200

    def model_ready(self, name: str) -> bool:
        return self._http("GET", f"/v2/models/{name}/ready")[0] == 200

    def load_model(self, name: str, timeout: float | None = None) -> None:
        """Load (or reload) a model in explicit mode; returns when it is ready."""
        timeout = self.ready_timeout if timeout is None else timeout
        status, body = self._http("POST", f"/v2/repository/models/{name}/load", b"{}", timeout=timeout)
        if status != 200:
            raise TopiError(f"loading model {name} failed ({status}: {_message(body)}): see {self.log_path}")
        self.wait_ready(timeout, models=[name])

    def unload_model(self, name: str, timeout: float = 60.0) -> None:
        """Unload a model in explicit mode; returns when it no longer answers ready."""
        status, body = self._http("POST", f"/v2/repository/models/{name}/unload", b"{}", timeout=timeout)
        if status != 200:
            raise TopiError(f"unloading model {name} failed ({status}: {_message(body)}): see {self.log_path}")
        deadline = time.monotonic() + timeout
        while self.model_ready(name):
            if time.monotonic() > deadline:
                raise TopiError(f"model {name} is still ready {timeout:.0f} s after unloading: see {self.log_path}")
            time.sleep(0.1)

    # --- stop -----------------------------------------------------------------------------------------------------
    def kill(self) -> None:
        """SIGKILL the server now (no draining); stop() still cleans up after it."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()

    def stop(self, grace: float | None = None) -> int | None:
        """SIGINT, then SIGTERM, then SIGKILL (each bounded); stubs and shared memory left behind are removed, and
        the temporary work directory. Returns the server's exit code. Safe to call twice."""
        code = self._terminate(grace)
        if code is not None:
            self._remove_workdir(keep_log=not self._started)  # a failed start's error message names the log
        return code

    def _remove_workdir(self, keep_log: bool) -> None:
        if not self._own_workdir or self.workdir is None:
            return
        if keep_log and self.log_path is not None and self.log_path.is_file():
            shutil.rmtree(self.workdir / "backends", ignore_errors=True)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _terminate(self, grace: float | None = None) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        grace = self.exit_timeout + 20.0 if grace is None else grace
        for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            if proc.poll() is not None:
                break
            try:
                proc.send_signal(sig)
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        self._reap_stubs(proc.pid)
        self._remove_shm()
        if self._log is not None:
            self._log.close()
            self._log = None
        return proc.returncode

    def _reap_stubs(self, pgid: int) -> None:
        """Stubs of a server that was killed: every process left in its own process group (start_new_session: only
        the server's descendants are in it), signalled one by one by pid, until the group is empty (bounded). Any
        member counts, not only those whose command line names the stub: a stub that is exiting has an empty
        /proc/<pid>/cmdline but is not gone yet."""
        deadline = time.monotonic() + 10.0
        while True:
            left = _group_members(pgid)
            if not left:
                return
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL if time.monotonic() > deadline - 5 else signal.SIGTERM)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                return
            time.sleep(0.2)

    def _remove_shm(self) -> None:
        if not self._shm_prefix:
            return
        shm = Path("/dev/shm")
        for p in shm.glob(self._shm_prefix + "*") if shm.is_dir() else ():
            try:
                p.unlink()
            except OSError:
                pass

    def __enter__(self) -> "TritonServer":
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _message(body: bytes) -> str:
    try:
        return json.loads(body).get("error", "")[:500]
    except (ValueError, AttributeError):
        return body.decode(errors="replace")[:500]


def _group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
            if int(fields[2]) == pgid and fields[0] != "Z":  # a zombie has exited; init reaps it
                out.append(int(d.name))
        except (OSError, ValueError, IndexError):
            continue
    return out


def serve(repository, *, echo=print, **kwargs) -> int:
    """Run a server in the foreground until SIGINT or SIGTERM (or until it exits), then stop it. kwargs: those
    of TritonServer. Returns 0 after a signal, 1 when the server exited by itself."""
    server = TritonServer(repository, echo=echo, **kwargs)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()
        server._cancel.set()

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        echo(f"ready (pid {server.pid}): HTTP {server.http_url}  gRPC {server.grpc_url}  metrics "
             f"{server.metrics_url}  (Ctrl-C stops)")
        while not stop.wait(0.5):
            if server.returncode is not None:
                echo(f"tritonserver exited with code {server.returncode}: {error_lines(server.log_text())}")
                return 1
        echo("stopping tritonserver")
        return 0
    finally:
        code = server.stop()
        for sig, handler in old.items():
            signal.signal(sig, handler)
        echo(f"tritonserver stopped (exit code {code})")
