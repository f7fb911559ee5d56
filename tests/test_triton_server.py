"""A real Triton Inference Server (2.51, from PyPI's nvidia-pytriton wheel) on loopback: the launcher
(serving/server.py), the stub's environment (serving/server_env.py) and the Python-backend engine model
(serving/ort_engine_model.py) over an ONNX graph of a tiny engine directory.

The server environment is TOPI_TRITON_ENV when set (made by `python -m topi_export.serving.server_env create`);
otherwise it is created once per checkout under ~/.cache/topi-export (about 1.5 minutes, needs PyPI) and reused.
TOPI_TRITON_SERVER=0 skips the server tests with that reason; an environment that cannot be created skips them
with pip's error. The tests without a server (top of the file) always run."""
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
SLOW_MODEL = '''import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Test model: marks that a request arrived, then holds it (the server is killed meanwhile)."""

    def initialize(self, args):
        self.marker = Path(args["model_repository"]) / "started"

    def execute(self, requests):
        self.marker.write_text("1")
        time.sleep(60)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("y", np.zeros(1, np.float32))]) for _ in requests]
'''
SLOW_CONFIG = '''name: "slow"
backend: "python"
max_batch_size: 0
input [ { name: "x" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 2 } ]
'''


# --- helpers ------------------------------------------------------------------------------------------------------
def _graph(engine_dir, kind):
    return json.loads((Path(engine_dir) / "manifest.json").read_text())["graphs"][kind]


def _feeds(engine_dir, kind="topi", keep=None, seed=0):
    """Inputs of the engine graph for tiny-kontext's 8x8 layout (8 text, 64 target, 64 context tokens): an anchor
    step (every context token kept and scored) or, with ``keep``, a pruned step (a sorted subset, one query)."""
    rng = np.random.default_rng(seed)
    n_ctx = 64
    keep_idx = np.arange(n_ctx) if keep is None else np.sort(rng.choice(n_ctx, keep, replace=False))
    sizes = {"B": 1, "Nx": 64, "Nc": n_ctx, "T": 8, "K": len(keep_idx), "Q": 64 if keep is None else 1}
    feeds = {}
    for t in _graph(engine_dir, kind)["inputs"]:
        shape = [d if isinstance(d, int) else sum(sizes[p] for p in d.split("+")) for d in t["dims"]]
        if t["name"] == "keep_idx":
            feeds[t["name"]] = keep_idx.astype(np.int64)
        elif t["name"] == "score_idx":
            feeds[t["name"]] = np.arange(shape[0], dtype=np.int64)
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
    return {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32"}[array.dtype]


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
    with pytest.raises(TopiError, match="no tritonserver on PATH.*server_env create"):
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


# --- the server environment and a repository ------------------------------------------------------------------
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


@pytest.fixture(scope="session")
def server_env():
    """The Python environment of the stub: TOPI_TRITON_ENV, or one created (once) for this checkout."""
    from topi_export.serving.server_env import check_stub_python, create_environment, python_info, read_marker

    given = _env_from_setting()
    if given is not None:
        return given
    key = hashlib.sha256(f"{ROOT}|{sys.version_info[:2]}|".encode() + (ROOT / "pyproject.toml").read_bytes())
    env = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "topi-export" / \
        f"triton-env-{key.hexdigest()[:12]}"
    if read_marker(env) is not None:
        try:
            check_stub_python(python_info(env))
            return env
        except TopiError:
            pass  # broken since: recreate
    try:
        create_environment(env, force=True, echo=lambda s: print(s, file=sys.stderr))
    except TopiError as exc:
        pytest.skip(f"cannot create the Triton server environment: {exc}")
    return env


@pytest.fixture(scope="session")
def tiny_repo(ort_engine_dir, tmp_path_factory):
    """topi_topi and topi_dense as Python-backend engine models (ort_engine_model.py) over the graphs of the
    tiny-kontext engine directory, and a test model `slow` that holds a request."""
    from topi_export.serving.python_engine import write_engine_model

    repo = tmp_path_factory.mktemp("triton-server") / "repo"
    for kind in ("topi", "dense"):
        write_engine_model(repo, f"topi_{kind}", Path(ort_engine_dir) / _graph(ort_engine_dir, kind)["onnx"],
                           parameters={"intra_op_num_threads": "1"})
    (repo / "slow" / "1").mkdir(parents=True)
    (repo / "slow" / "1" / "model.py").write_text(SLOW_MODEL)
    (repo / "slow" / "config.pbtxt").write_text(SLOW_CONFIG)
    return repo


def _start(repo, env, **kwargs):
    from topi_export.serving.server import TritonServer

    kwargs.setdefault("ready_timeout", 180)
    kwargs.setdefault("exit_timeout", 5)
    try:
        return TritonServer(repo, env=env, **kwargs).start()
    except TopiError as exc:
        pytest.fail(f"tritonserver did not start: {exc}")


@pytest.fixture(scope="module")
def server(tiny_repo, server_env):
    srv = _start(tiny_repo, server_env)
    yield srv
    prefix = srv._shm_prefix
    assert srv.stop() == 0, srv.log_text()[-3000:]  # a clean SIGINT stop
    assert not _group(srv.pid) and not _shm(prefix)


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


def test_server_killed_mid_request_gives_errors_then_restarts(tiny_repo, server_env, ort_engine_dir):
    """SIGKILL while an HTTP and a gRPC request are in flight: both clients get an error within seconds (their own
    timeouts are 120 s), stop() removes the stubs and shared memory left behind, and a server restarted on the same
    repository serves again."""
    httpclient, grpcclient = _http(), _grpc()
    marker = tiny_repo / "slow" / "started"
    marker.unlink(missing_ok=True)
    srv = _start(tiny_repo, server_env)
    prefix = srv._shm_prefix
    assert _shm(prefix)  # the Python backend's regions exist while it runs
    outcomes = {}

    def call(name, module, client, **kwargs):
        start = time.monotonic()
        try:
            _infer(module, client, "slow", {"x": np.ones(3, np.float32)}, ["y"], **kwargs)
            outcomes[name] = ("answered", time.monotonic() - start)
        except Exception as exc:  # noqa: BLE001 - what the client raises is the point
            outcomes[name] = (type(exc).__name__ + ": " + str(exc)[:200], time.monotonic() - start)

    http = _http_client(srv)
    grpc = grpcclient.InferenceServerClient(srv.grpc_url)
    threads = [threading.Thread(target=call, args=("http", httpclient, http), daemon=True),
               threading.Thread(target=call, args=("grpc", grpcclient, grpc), kwargs={"client_timeout": 120},
                                daemon=True)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert time.monotonic() < deadline, "the slow model never received the request"
            time.sleep(0.1)
        time.sleep(0.5)  # both requests in the server
        killed_at = time.monotonic()
        srv.kill()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads), f"a client hangs after the server was killed: {outcomes}"
        for name, (what, _) in outcomes.items():
            assert what != "answered", name
        assert time.monotonic() - killed_at < 30, outcomes
    finally:
        http.close()
        grpc.close()
    code = srv.stop()
    assert code == -signal.SIGKILL
    assert not _group(srv.pid), "stub processes outlived the killed server"
    assert not _shm(prefix), "shared-memory regions of the killed server were left"

    marker.unlink(missing_ok=True)
    again = _start(tiny_repo, server_env)
    try:
        feeds = _feeds(ort_engine_dir, "topi", keep=32, seed=5)
        client = _http_client(again)
        got = _infer(httpclient, client, "topi_topi", feeds, ["velocity"])
        client.close()
        assert _rel_l2(got["velocity"], _reference(ort_engine_dir, "topi", feeds)["velocity"]) <= REL_L2
    finally:
        assert again.stop() == 0


def test_explicit_mode_unload_and_reload(tiny_repo, server_env, ort_engine_dir):
    """--model-control-mode explicit with --load-model topi_topi: only that model is up; unloaded it refuses
    requests, reloaded it serves the same answers again."""
    httpclient = _http()
    from tritonclient.utils import InferenceServerException

    srv = _start(tiny_repo, server_env, model_control_mode="explicit", load_models=["topi_topi"])
    feeds = _feeds(ort_engine_dir, "topi", keep=45, seed=9)
    expected = _reference(ort_engine_dir, "topi", feeds)
    try:
        assert srv.model_ready("topi_topi") and not srv.model_ready("topi_dense") and not srv.model_ready("slow")
        client = _http_client(srv)
        assert _rel_l2(_infer(httpclient, client, "topi_topi", feeds, ["velocity"])["velocity"],
                       expected["velocity"]) <= REL_L2
        srv.unload_model("topi_topi")
        with pytest.raises(InferenceServerException, match="topi_topi"):
            _infer(httpclient, client, "topi_topi", feeds, ["velocity"])
        srv.load_model("topi_topi")
        got = _infer(httpclient, client, "topi_topi", feeds, ["velocity", "influence"])
        assert all(_rel_l2(got[n], expected[n]) <= REL_L2 for n in expected)
        client.close()
    finally:
        assert srv.stop() == 0


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


_SERVE_CHILD = """
import sys
from topi_export.serving.server import TritonServer, serve
mode, repo, env = sys.argv[1:4]
if mode == "serve":
    sys.exit(serve(repo, env=env, exit_timeout=5, echo=lambda s: print(s, flush=True)))
server = TritonServer(repo, env=env, exit_timeout=5, workdir=sys.argv[4]).start()
print(f"ready (pid {server.pid})", flush=True)
import time
time.sleep(600)  # killed by the test
"""


def _child(mode, repo, env, workdir=""):
    proc = subprocess.Popen([sys.executable, "-c", _SERVE_CHILD, mode, str(repo), str(env), str(workdir)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + 240
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("ready"):
            break
        assert time.monotonic() < deadline, "".join(lines)
    assert lines and lines[-1].startswith("ready"), "".join(lines)
    return proc, lines


def _wait_gone(pid, timeout):
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    return not Path(f"/proc/{pid}").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_stops_the_server_on_a_signal(tiny_repo, server_env, sig):
    """serve() in its own process: SIGINT or SIGTERM to it stops tritonserver cleanly (exit 0 after the signal)."""
    proc, lines = _child("serve", tiny_repo, server_env)
    pid = int(lines[-1].split("(pid ")[1].split(")")[0])
    try:
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, "".join(lines) + out
    assert "tritonserver stopped (exit code 0)" in out
    assert _wait_gone(pid, 5) and not _group(pid)


def test_server_dies_with_a_killed_parent(tiny_repo, server_env, tmp_path):
    """The parent SIGKILLed (no cleanup runs): PR_SET_PDEATHSIG stops tritonserver and its stubs."""
    proc, lines = _child("plain", tiny_repo, server_env, tmp_path / "work")
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


def test_generated_loop_model_over_python_engine_models(ort_engine_dir, server_env, tmp_path, capsys):
    """The loop model `topi-export triton` generates (BLS, topi_export imported in the stub) calling Python-backend
    engine models on a real server: the latents of a pruned request equal `topi-export run --engine-dir`
    (bit-identical here: the same graphs, session options and ONNX Runtime), the schedule too."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from conftest import run_cli
    from topi_export.serving.python_engine import write_engine_model
    from topi_export.serving.triton_repo import generate_repository

    grpcclient = _grpc()
    pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs tritonclient[grpc]")
    generate_repository(ort_engine_dir, tmp_path / "generated", kind="cpu")
    repo = tmp_path / "repo"
    for kind in ("topi", "dense"):
        write_engine_model(repo, f"topi_{kind}", Path(ort_engine_dir) / _graph(ort_engine_dir, kind)["onnx"],
                           parameters={"intra_op_num_threads": "1"})
    shutil.copytree(tmp_path / "generated" / "topi_loop", repo / "topi_loop")

    g = torch.Generator().manual_seed(7)
    tensors = {"reference_latents": torch.randn(1, 64, 16, generator=g),
               "prompt_embeds": torch.randn(1, 8, 32, generator=g),
               "pooled_prompt_embeds": torch.randn(1, 16, generator=g), "guidance": torch.tensor([3.0])}
    save_file(tensors, str(tmp_path / "in.safetensors"), metadata={"target_grid": "8x8", "reference_grids": "8x8"})
    code, _, err = run_cli(["run", "--engine-dir", str(ort_engine_dir), "--inputs", str(tmp_path / "in.safetensors"),
                            "-q", "--steps", "5", "--seed", "3", "--ratio", "0.5", "--update-interval", "2",
                            "--out", str(tmp_path / "run.safetensors"), "--json", str(tmp_path / "run.json")], capsys)
    assert code == 0, err
    expected = load_file(str(tmp_path / "run.safetensors"))["latents"].numpy()
    report = json.loads((tmp_path / "run.json").read_text())

    srv = _start(repo, server_env)
    try:
        client = grpcclient.InferenceServerClient(srv.grpc_url)
        feeds = {k: v.numpy() for k, v in tensors.items()}
        inputs = []
        for name, array, dtype in [*((k, v, "FP32") for k, v in feeds.items()),
                                   ("steps", np.array([5], np.int32), "INT32"),
                                   ("seed", np.array([3], np.uint64), "UINT64"),
                                   ("ratio", np.array([0.5], np.float32), "FP32"),
                                   ("update_interval", np.array([2], np.int32), "INT32")]:
            tensor = grpcclient.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        result = client.infer("topi_loop", inputs, outputs=[grpcclient.InferRequestedOutput("latents"),
                                                            grpcclient.InferRequestedOutput("schedule")],
                              client_timeout=300)
        client.close()
    finally:
        assert srv.stop() == 0
    schedule = json.loads(result.as_numpy("schedule")[0])
    assert [(r["kind"], r["keep"]) for r in schedule["schedule"]] == [(r["kind"], r["keep"])
                                                                      for r in report["schedule"]]
    assert {r["kind"] for r in schedule["schedule"]} == {"anchor", "pruned"}
    assert _rel_l2(result.as_numpy("latents"), expected) <= REL_L2
