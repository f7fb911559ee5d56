"""TensorRT / TensorRT-RTX backend: the profile shapes, target checks and profile selection (pure), real
TensorRT-RTX ahead-of-time engines of tiny-kontext built on CPU through the CLI, and GPU / data-center TensorRT
tests that skip with a reason where the hardware or module is absent."""
import json
import re
import sys

import pytest
import torch

from topi_export.backends import tensorrt as T
from topi_export.backends.base import BuildJob
from topi_export.backends.tensorrt.runtime import select_profile
from topi_export.errors import TopiError
from topi_export.fsutil import MARKER_FILE
from topi_export.plan import GraphEntry, GraphTensor, Layout, profile_table

RTX = "tensorrt-rtx not installed (pip install tensorrt-rtx-cu13)"
DC = "data-center TensorRT is not installed (it needs NVIDIA's package index)"
LAY = Layout(8, (8, 8), ((8, 8),))  # tiny-kontext's default request: 64 target + 64 context tokens
WIDE = Layout(8, (6, 10), ((6, 10),))  # 160x96 pixels at 16 pixels per token


def _cuda():
    return torch.cuda.is_available()


def _cli(args):
    from click.testing import CliRunner

    from topi_export.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def _graph(tiny, kind="topi"):
    from topi_export.export.graphs import graph_tensors

    entry = graph_tensors(tiny.family, kind)
    return GraphEntry(f"{kind}.onnx", entry.inputs, entry.outputs, f"{kind}.onnx")


# ------------------------------------------------------------------------------------------------- pure
def test_profile_shapes_anchor_and_buckets(tiny):
    layouts = (LAY, WIDE)
    table = profile_table(layouts, (0.3, 0.5))
    assert [(p.layout, p.keep) for p in table] == [(0, 64), (0, 45), (0, 32), (1, 60), (1, 42), (1, 30)]
    prof = T.profile_shapes(_graph(tiny), "topi", table, layouts, batch=2)
    assert len(prof) == 6
    for p, shapes in zip(table, prof):
        lay = layouts[p.layout]
        nx, nc, n = lay.num_target, lay.num_ctx, lay.num_tokens
        assert shapes["keep_idx"] == ((p.keep,),) * 3
        # anchor: 1..Nx scored queries (opt Nx); bucket: one query
        assert shapes["score_idx"] == (((1,), (nx,), (nx,)) if p.ratio == 0 else ((1,),) * 3)
        assert shapes["latents"] == ((1, nx, 16), (2, nx, 16), (2, nx, 16))  # batch 1..2, opt 2
        assert shapes["context"] == ((1, nc, 16), (2, nc, 16), (2, nc, 16))
        assert shapes["rope_cos"] == ((n, 16),) * 3  # fixed by the layout: T + Nx + Nc rows
        assert set(shapes) == {t.name for t in _graph(tiny).inputs}
    dense = T.profile_shapes(_graph(tiny, "dense"), "dense", table, layouts, batch=1)
    assert len(dense) == 2 and "keep_idx" not in dense[0]
    assert [d["latents"] for d in dense] == [((1, 64, 16),) * 3, ((1, 60, 16),) * 3]


def test_profile_shapes_refuses_bad_tables(tiny):
    table = profile_table((LAY,), (0.5,))
    with pytest.raises(TopiError, match="profile i must be entry i"):
        T.profile_shapes(_graph(tiny), "topi", table[::-1], (LAY,), 1)
    bad = GraphEntry("g.onnx", (GraphTensor("x", ("B", "Nx+S"), "float32"),), ())
    with pytest.raises(TopiError, match="unknown dimension"):
        T.profile_shapes(bad, "topi", table, (LAY,), 1)


def test_workspace_and_compute_capability_parsing():
    assert T.parse_workspace("4G") == 4 << 30
    assert T.parse_workspace("512MiB") == 512 << 20
    assert T.parse_workspace("1.5g") == 3 << 29
    assert T.parse_workspace("1024") == 1024
    assert T.parse_workspace(None) is None
    with pytest.raises(TopiError, match="not a size"):
        T.parse_workspace("lots")
    assert [T.normalize_compute_capability(c) for c in ("SM89", "sm_86", "8.9", "120", "12.0")] == \
        ["SM89", "SM86", "SM89", "SM120", "SM120"]
    with pytest.raises(TopiError, match="not a compute capability"):
        T.normalize_compute_capability("ada")


TARGET = {"module": "tensorrt_rtx", "version": "1.7.1.116", "compute_capabilities": ["SM89", "SM120"]}


def test_check_target_accepts_matching_machine():
    T.check_target(TARGET, {"module": "tensorrt_rtx", "version": "1.7.1.116", "compute_capability": (8, 9)})
    T.check_target(TARGET, {"module": "tensorrt_rtx", "version": "1.7.1.116", "compute_capability": (12, 0)})


@pytest.mark.parametrize("running, match", [
    ({"module": "tensorrt_rtx", "version": "1.8.0.1", "compute_capability": (8, 9)}, "built with tensorrt_rtx 1.7.1.116"),
    ({"module": "tensorrt", "version": "1.7.1.116", "compute_capability": (8, 9)}, "built with 'tensorrt_rtx'"),
    ({"module": "tensorrt_rtx", "version": "1.7.1.116", "compute_capability": (9, 0), "gpu": "NVIDIA H100"},
     r"SM89, SM120 but NVIDIA H100 is SM90: rebuild with --compute-capability SM90"),
])
def test_check_target_refuses_other_version_module_or_gpu(running, match):
    with pytest.raises(TopiError, match=match):
        T.check_target(TARGET, running)


def test_check_target_data_center_names_build_gpu():
    target = {"module": "tensorrt", "version": "10.13.0", "compute_capabilities": ["SM90"], "gpu": "NVIDIA H100"}
    T.check_target(target, {"module": "tensorrt", "version": "10.13.0", "compute_capability": (9, 0)})
    with pytest.raises(TopiError, match=r"SM90 \(NVIDIA H100\) but NVIDIA L40S is SM89: rebuild the engines on this GPU"):
        T.check_target(target, {"module": "tensorrt", "version": "10.13.0", "compute_capability": (8, 9),
                                "gpu": "NVIDIA L40S"})


@pytest.mark.parametrize("backend, module", [("tensorrt", "tensorrt"), ("tensorrt-rtx", "tensorrt_rtx")])
def test_missing_module_names_install_and_cli_imports_without_it(monkeypatch, tmp_path, backend, module):
    from topi_export.backends import get_backend

    monkeypatch.setitem(sys.modules, module, None)  # import of that name raises ImportError
    be = get_backend(backend)  # no top-level import of the TensorRT module
    assert be.BACKEND.name == backend and be.BACKEND.builds and be.BACKEND.precisions == ("fp32", "fp16", "bf16")
    job = BuildJob(tmp_path, tmp_path, {}, (LAY,), profile_table((LAY,), (0.5,)), 1, "fp32")
    with pytest.raises(TopiError, match=r"needs the Python module '%s'.*pip install" % module):
        be.build(job)


def test_builder_registers_plugins_with_the_module_it_builds_with(monkeypatch):
    """Data-center TensorRT: topi_export/kernels/trt_plugins.register_plugins(<module name>) runs before parsing (the plugin
    registrations themselves are tested with a fake tensorrt.plugin in test_kernels.py); a failure builds inlined.
    TensorRT-RTX has no Python plugin API: nothing is registered."""
    from topi_export.kernels import trt_plugins
    from topi_export.backends.tensorrt.building import _register_plugins

    calls, notes = [], []

    class Log:
        def note(self, msg):
            notes.append(msg)

    monkeypatch.setattr(trt_plugins, "register_plugins", lambda name, masked=False: calls.append((name, masked)))
    assert _register_plugins("tensorrt", "tensorrt", Log(), lambda s: None) is True
    assert calls == [("tensorrt", False)] and "topi plugins registered" in notes[-1]
    # a graph whose influence nodes take a key mask (Qwen) registers the masked plugins
    assert _register_plugins("tensorrt", "tensorrt", Log(), lambda s: None, masked=True) is True
    assert calls[-1] == ("tensorrt", True)
    calls.clear()
    assert _register_plugins("tensorrt-rtx", "tensorrt_rtx", Log(), lambda s: None) is False
    assert calls == [] and "no Python plugin API" in notes[-1]

    def broken(name, masked=False):
        raise trt_plugins.PluginUnavailableError("cannot import tensorrt.plugin")

    monkeypatch.setattr(trt_plugins, "register_plugins", broken)
    assert _register_plugins("tensorrt", "tensorrt", Log(), lambda s: None) is False
    assert "PluginUnavailableError: cannot import tensorrt.plugin" in notes[-1] and "inlines" in notes[-1]


# ------------------------------------------------------------------------------ real TensorRT-RTX builds
@pytest.fixture(scope="module")
def rtx(tmp_path_factory):
    """Engine directories built ahead of time on this machine (no GPU) by `topi-export build`:
    multi: fp32, two resolutions, dense baseline, SM89. bf16: bf16 graphs, SM89 + SM120, topi graph only."""
    trt = pytest.importorskip("tensorrt_rtx", reason=RTX)
    root = tmp_path_factory.mktemp("rtx")
    common = ["build", "--backend", "tensorrt-rtx", "--model", "tiny-kontext", "--ratio-buckets", "0.3,0.5"]
    runs = {
        "multi": ["--resolutions", "128x128,160x96", "--dense-baseline", "--compute-capability", "SM89",
                  "--onnx-dir", root / "onnx-fp32"],
        "bf16": ["--precision", "bf16", "--compute-capability", "SM89", "--compute-capability", "SM120",
                 "--onnx-dir", root / "onnx-bf16"],
    }
    out = {"root": root, "trt": trt}
    for name, args in runs.items():
        r = _cli(common + args + ["--engine-dir", root / name])
        assert r.exit_code == 0, f"{name}: {r.output}\n{r.exception!r}"
        out[name], out[f"{name}_output"] = root / name, r.output
    return out


def _log(engine_dir):
    return (engine_dir / "build_log.txt").read_text()


def _read_back(log: str, kind: str):
    """The optimization profiles TensorRT read back for one engine (the builder logs them as JSON)."""
    lines = [m.group(1) for m in re.finditer(r"^\[%s\] TOPI: profiles (.*)$" % kind, log, re.M)]
    assert len(lines) == 1, lines
    return json.loads(lines[0])


def _manifest(engine_dir):
    from topi_export.artifacts.manifest import read_manifest

    return read_manifest(engine_dir)  # every file's sha256 verified


@pytest.mark.tensorrt_rtx
def test_rtx_build_parses_without_errors_and_drops_onnx(rtx):
    out = rtx["multi"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["build_log.txt", "dense.engine", "manifest.json",
                                                              "topi.engine", MARKER_FILE])
    m = _manifest(out)
    assert m.backend == "tensorrt-rtx" and m.precision == "fp32"
    assert {k: (g.file, g.onnx) for k, g in m.graphs.items()} == {"topi": ("topi.engine", None),
                                                                 "dense": ("dense.engine", None)}
    assert m.weights == {}  # no portable copy of the weights: the engines hold them
    target = m.target
    assert target["module"] == "tensorrt_rtx" and target["version"] == rtx["trt"].__version__
    assert target["compute_capabilities"] == ["SM89"] and target["ahead_of_time"] is True
    assert target["plugins"] == "inlined" and target["strongly_typed"] is True and target["weights"] == "engine"
    assert m.versions["tensorrt_rtx"] == rtx["trt"].__version__
    log = _log(out)
    assert "PARSER_ERROR" not in log and "] ERROR:" not in log and "INTERNAL_ERROR" not in log
    for kind in ("topi", "dense"):
        assert re.search(r"^\[%s\] TOPI: parsed %s\.onnx: .* parser errors: 0$" % (kind, kind), log, re.M)
    assert "the dense engine holds a second copy of the weights" in rtx["multi_output"]


@pytest.mark.tensorrt_rtx
def test_rtx_profiles_match_manifest_two_resolutions(rtx, tiny):
    m = _manifest(rtx["multi"])
    assert m.layouts == (LAY, WIDE)  # --resolutions 128x128,160x96: 16 pixels per token
    assert len(m.profiles) == len(m.layouts) * (1 + len(m.buckets)) == 6
    assert m.target["engines"]["topi"]["profiles"] == 6 and m.target["engines"]["dense"]["profiles"] == 2
    log = _log(rtx["multi"])
    for kind in ("topi", "dense"):
        want = T.profile_shapes(m.graphs[kind], kind, m.profiles, m.layouts, m.batch)
        got = _read_back(log, kind)
        assert [{n: [list(s) for s in v] for n, v in p.items()} for p in want] == got
    topi = _read_back(log, "topi")
    for p in m.profiles:
        assert topi[p.index]["keep_idx"] == [[p.keep]] * 3  # profile i keeps manifest.profiles[i].keep tokens


@pytest.mark.tensorrt_rtx
def test_rtx_runtime_profile_selection(rtx):
    m = _manifest(rtx["multi"])
    for li, lay in enumerate(m.layouts):
        anchor = [p for p in m.profiles if p.layout == li and p.ratio == 0][0]
        assert select_profile(m, li, "topi", lay.num_ctx) == anchor.index
        for p in m.profiles:
            if p.layout == li and p.ratio > 0:
                assert select_profile(m, li, "topi", p.keep) == p.index
        assert select_profile(m, li, "dense", None) == li
    with pytest.raises(TopiError, match="no compiled profile keeps 5 context tokens"):
        select_profile(m, 1, "topi", 5)


@pytest.mark.tensorrt_rtx
def test_rtx_bf16_two_compute_capabilities_weights_once(rtx):
    import onnx

    out = rtx["bf16"]
    m = _manifest(out)
    assert m.precision == "bf16" and m.target["precision"] == "bf16"
    assert m.target["compute_capabilities"] == ["SM89", "SM120"]
    assert len(m.profiles) == 3 and m.target["engines"]["topi"]["profiles"] == 3 and list(m.graphs) == ["topi"]
    assert "TensorRT-RTX has no Python plugin API" in _log(out)
    assert "PARSER_ERROR" not in _log(out) and "] ERROR:" not in _log(out)
    # the graph the engine was built from carries bf16 weights (exported at the build precision)
    cache = rtx["root"] / "onnx-bf16"
    graph = onnx.load(str(cache / "topi.onnx"), load_external_data=False)
    assert any(i.data_type == onnx.TensorProto.BFLOAT16 for i in graph.graph.initializer)
    # weights once: the directory is the engine (no ONNX, no weights file), and no weight's bytes appear twice
    assert sorted(p.name for p in out.iterdir()) == sorted(["build_log.txt", "manifest.json", "topi.engine",
                                                              MARKER_FILE])
    weights = (cache / "weights.data").read_bytes()
    blob = (out / "topi.engine").read_bytes()
    assert len(blob) > len(weights)
    counts = []
    for init in graph.graph.initializer:
        ext = {e.key: e.value for e in init.external_data}
        if ext and int(ext["length"]) >= 256:
            off = int(ext.get("offset", 0))
            counts.append(blob.count(weights[off:off + 256]))
    assert counts and max(counts) == 1  # never twice (not once per profile or per compute capability)
    assert sum(counts) >= len(counts) // 2  # most weights are stored as exported (the rest reformatted)


@pytest.mark.tensorrt_rtx
def test_rtx_strip_weights_built_or_refused(rtx):
    """--strip-weights: a weight-stripped engine refitted at load from the kept ONNX weights, where this TensorRT
    can build one; TensorRT-RTX 1.7.1 cannot without a GPU, and the build says so."""
    out = rtx["root"] / "stripped"
    r = _cli(["build", "--backend", "tensorrt-rtx", "--model", "tiny-kontext", "--ratio-buckets", "0.3,0.5",
              "--dense-baseline", "--strip-weights", "--compute-capability", "SM89",
              "--onnx-dir", rtx["root"] / "onnx-fp32", "--engine-dir", out])
    if r.exit_code != 0:
        assert isinstance(r.exception, TopiError), r.output
        assert "--strip-weights: " in str(r.exception) and "drop --strip-weights" in str(r.exception)
        assert not out.exists()
        if not _cuda():
            assert rtx["trt"].__version__.startswith("1.7.")  # measured: refittable builds need a GPU there
        return
    m = _manifest(out)
    assert m.target["weights"] == "stripped" and m.weights["file"] == "onnx/weights.data"
    assert {k: g.onnx for k, g in m.graphs.items()} == {"topi": "onnx/topi.onnx", "dense": "onnx/dense.onnx"}
    weights = m.files["onnx/weights.data"].bytes
    assert sum(f.bytes for rel, f in m.files.items() if rel.endswith(".engine")) < \
        sum(f.bytes for rel, f in _manifest(rtx["multi"]).files.items() if rel.endswith(".engine"))
    assert weights > 0 and not any(rel.endswith(".data") and rel != "onnx/weights.data" for rel in m.files)


def _tiny_graph(tmp_path, op="Relu", domain=""):
    """A minimal topi graph (latents -> op -> velocity) and its GraphEntry."""
    import onnx
    from onnx import TensorProto, helper

    d = tmp_path / "graphs"
    d.mkdir()
    ins = [helper.make_tensor_value_info("latents", TensorProto.FLOAT, ["B", "Nx", 4])]
    nodes = [helper.make_node(op, ["latents"], ["velocity"], domain=domain, name="the_node")]
    out = helper.make_tensor_value_info("velocity", TensorProto.FLOAT, ["B", "Nx", 4])
    opsets = [helper.make_opsetid("", 20)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    onnx.save(helper.make_model(helper.make_graph(nodes, "topi", ins, [out]), opset_imports=opsets),
              str(d / "topi.onnx"))
    entry = GraphEntry("topi.onnx", (GraphTensor("latents", ("B", "Nx", 4), "float32"),),
                       (GraphTensor("velocity", ("B", "Nx", 4), "float32"),))
    return d, {"topi": entry}


def _job(tmp_path, graphs_dir, graphs, **options):
    from topi_export.backends.tensorrt.common import TensorRTRTXOptions

    options = {"compute_capabilities": ("SM89",), **options}
    options["compute_capabilities"] = tuple(options["compute_capabilities"])
    return BuildJob(graphs_dir, tmp_path, graphs, (LAY,), profile_table((LAY,), (0.5,)), 1, "fp32",
                    TensorRTRTXOptions(**options), echo=lambda s: None)


@pytest.mark.tensorrt_rtx
def test_rtx_parser_error_is_named(tmp_path):
    pytest.importorskip("tensorrt_rtx", reason=RTX)
    from topi_export.backends import tensorrt_rtx

    d, graphs = _tiny_graph(tmp_path, op="NoSuchOp", domain="nowhere")
    with pytest.raises(TopiError, match=r"ONNX parser rejected the topi graph .*first: .*NoSuchOp"):
        tensorrt_rtx.build(_job(tmp_path, d, graphs))


@pytest.mark.tensorrt_rtx
def test_rtx_rejects_non_rtx_compute_capability(tmp_path):
    pytest.importorskip("tensorrt_rtx", reason=RTX)
    from topi_export.backends import tensorrt_rtx

    d, graphs = _tiny_graph(tmp_path)
    with pytest.raises(TopiError, match="SM90 is not a TensorRT-RTX .* target.*Hopper"):
        tensorrt_rtx.build(_job(tmp_path, d, graphs, compute_capabilities=["SM90"]))


@pytest.mark.tensorrt_rtx
def test_rtx_timing_cache_is_a_noted_no_op(tmp_path):
    pytest.importorskip("tensorrt_rtx", reason=RTX)
    from topi_export.backends import tensorrt_rtx

    d, graphs = _tiny_graph(tmp_path)
    cache = tmp_path / "timing.cache"
    out = tensorrt_rtx.build(_job(tmp_path, d, graphs, timing_cache=str(cache), optimization_level=0))
    assert out.graphs == {"topi": "topi.engine"} and out.keep_onnx is False
    assert "timing caches are no-ops in TensorRT-RTX" in (tmp_path / "build_log.txt").read_text()
    assert not cache.exists() and (tmp_path / "topi.engine").stat().st_size > 0


@pytest.mark.tensorrt_rtx
def test_rtx_runtime_refuses_without_gpu(rtx):
    if _cuda():
        pytest.skip("a CUDA GPU is present: the no-GPU refusal does not apply")
    from topi_export.runtime.session import open_session

    with pytest.raises(TopiError, match="no CUDA GPU is visible"):
        open_session(engine_dir=rtx["multi"])


@pytest.mark.tensorrt_rtx
def test_rtx_manifest_target_refuses_other_gpu(rtx):
    m = _manifest(rtx["bf16"])
    running = {"module": "tensorrt_rtx", "version": rtx["trt"].__version__, "compute_capability": (9, 0),
               "gpu": "NVIDIA H100"}
    with pytest.raises(TopiError, match="compute capability SM89, SM120 but NVIDIA H100 is SM90"):
        T.check_target(m.target, running, m.root)


# --------------------------------------------------------------------------------- GPU / data-center TRT
def _compare_with_torch(engine_dir, dense=False):
    from topi_export.runtime.loop import rel_l2
    from topi_export.runtime.session import open_session

    session = open_session(engine_dir=engine_dir)
    ref = open_session(engine_dir=engine_dir, backend="torch")
    data = session.load_inputs(None)
    cond = session.family.conditioning(data, data.layout)
    for eng in (session.engine, ref.engine):
        eng.bind(cond, data.reference_latents, data.layout)
    lat, t = data.initial_noise(0), torch.tensor([0.5])
    with torch.inference_mode():
        v, inf = session.engine.anchor(lat, t)
        rv, rinf = ref.engine.anchor(lat, t)
        assert rel_l2(v, rv) < 1e-3 and rel_l2(inf, rinf) < 1e-3
        for p in session.manifest.profiles:
            if p.layout == session.manifest.layout_index(data.layout) and p.ratio > 0:
                keep = torch.linspace(0, data.layout.num_ctx - 1, p.keep).round().long()
                assert rel_l2(session.engine.pruned(lat, t, keep), ref.engine.pruned(lat, t, keep)) < 1e-3
        if dense:
            assert rel_l2(session.engine.dense(lat, t), ref.engine.dense(lat, t)) < 1e-3


@pytest.mark.gpu
@pytest.mark.tensorrt_rtx
def test_rtx_engines_run_on_rtx_gpu(tmp_path):
    pytest.importorskip("tensorrt_rtx", reason=RTX)
    if not _cuda():
        pytest.skip("no CUDA GPU: TensorRT-RTX engines run on RTX-class GPUs")
    if T.sm_name(torch.cuda.get_device_capability()) not in ("SM75", "SM80", "SM86", "SM89", "SM120", "SM121"):
        pytest.skip(f"{torch.cuda.get_device_name()} is not a TensorRT-RTX target (e.g. Hopper SM90)")
    r = _cli(["build", "--backend", "tensorrt-rtx", "--model", "tiny-kontext", "--dense-baseline",
              "--engine-dir", tmp_path / "rtx"])
    assert r.exit_code == 0, r.output
    _compare_with_torch(tmp_path / "rtx", dense=True)


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_tensorrt_build_and_run_on_gpu(tmp_path):
    pytest.importorskip("tensorrt", reason=DC)
    if not _cuda():
        pytest.skip("no CUDA GPU: data-center TensorRT builds and runs on the GPU")
    for name, extra in (("trt", []), ("stripped", ["--strip-weights"])):
        r = _cli(["build", "--backend", "tensorrt", "--model", "tiny-kontext", "--dense-baseline",
                  "--engine-dir", tmp_path / name] + extra)
        assert r.exit_code == 0, r.output
        m = _manifest(tmp_path / name)
        assert m.target["module"] == "tensorrt" and m.target["gpu"]
        assert m.target["engines"]["topi"]["profiles"] == len(m.profiles)
        _compare_with_torch(tmp_path / name, dense=True)


@pytest.mark.tensorrt
def test_tensorrt_build_without_gpu_is_refused(tmp_path):
    pytest.importorskip("tensorrt", reason=DC)
    if _cuda():
        pytest.skip("a CUDA GPU is present")
    from topi_export.backends import tensorrt

    d, graphs = _tiny_graph(tmp_path)
    with pytest.raises(TopiError, match="no CUDA GPU is visible"):
        tensorrt.build(_job(tmp_path, d, graphs, compute_capabilities=[]))


# ------------------------------------------- runtime plumbing on a GPU with a stand-in TensorRT module
class _FakeTRT:
    """Just enough of the TensorRT Python API for TensorRTEngine; an 'engine' runs the exported graph's torch
    module on the raw CUDA addresses bound with set_tensor_address (via __cuda_array_interface__), with the
    profiles of profile_shapes."""

    def __init__(self, modules, profiles, version):
        import types

        self.mod = m = types.ModuleType("tensorrt_rtx")
        m.__version__ = version
        m.float32, m.float16, m.bfloat16, m.int64, m.int32, m.bool, m.uint8 = (
            torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool, torch.uint8)
        m.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
        m.ExecutionContextAllocationStrategy = types.SimpleNamespace(USER_MANAGED="user")

        class ILogger:
            def __init__(self):
                pass

        m.ILogger = ILogger
        fake = self
        self.calls = []  # (kind, profile, keep length, scored queries)

        def wrap(ptr, shape, dtype):
            typestr = {torch.float32: "<f4", torch.int64: "<i8"}[dtype]

            class View:
                __cuda_array_interface__ = {"shape": tuple(shape), "typestr": typestr, "data": (ptr, False),
                                            "version": 3}
            return torch.as_tensor(View(), device="cuda")

        class Context:
            def __init__(self, engine):
                self.e, self.profile, self.addr, self.shapes = engine, 0, {}, {}

            def set_device_memory(self, ptr, size):
                assert ptr and size >= self.e.device_memory_size_v2

            def set_optimization_profile_async(self, p, stream):
                assert isinstance(stream, int) and 0 <= p < len(self.e.profiles)
                self.profile = p
                return True

            def set_input_shape(self, name, shape):
                lo, _, hi = self.e.profiles[self.profile][name]
                self.shapes[name] = tuple(shape)
                return all(a <= s <= b for a, s, b in zip(lo, shape, hi))

            def _run(self, zeros=False):
                ins = {n: torch.zeros(self.shapes[n], dtype=self.e.dtypes[n], device="cuda") if zeros else
                       wrap(self.addr[n], self.shapes[n], self.e.dtypes[n]) for n in self.e.inputs}
                outs = self.e.module(**ins)
                return outs if isinstance(outs, tuple) else (outs,)

            def get_tensor_shape(self, name):  # the shapes TensorRT would infer: run the module once
                with torch.no_grad():
                    return tuple(self._run(zeros=True)[self.e.outputs.index(name)].shape)

            def set_tensor_address(self, name, ptr):
                self.addr[name] = ptr
                return True

            def execute_async_v3(self, stream):
                with torch.cuda.stream(torch.cuda.ExternalStream(stream)), torch.no_grad():
                    for name, value in zip(self.e.outputs, self._run()):
                        wrap(self.addr[name], value.shape, torch.float32).copy_(value)
                if not torch.cuda.is_current_stream_capturing():
                    fake.calls.append((self.e.kind, self.profile, self.shapes.get("keep_idx"),
                                       self.shapes.get("score_idx")))
                return True

        class Engine:
            device_memory_size_v2 = 4096

            def __init__(self, kind):
                self.kind, self.module, self.profiles = kind, modules[kind], profiles[kind]
                self.inputs = list(self.profiles[0])
                self.outputs = ["velocity", "influence"] if kind == "topi" else ["velocity"]
                self.dtypes = {n: torch.int64 if n.endswith("_idx") else torch.float32 for n in self.inputs}
                self.num_io_tensors = len(self.inputs) + len(self.outputs)
                self.num_optimization_profiles = len(self.profiles)

            def get_tensor_name(self, i):
                return (self.inputs + self.outputs)[i]

            def get_tensor_mode(self, name):
                return "in" if name in self.inputs else "out"

            def get_tensor_dtype(self, name):
                return self.dtypes.get(name, torch.float32)

            def create_execution_context(self, strategy):
                assert strategy == "user"
                return Context(self)

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                return Engine(data.decode().split()[-1])

        m.Runtime = Runtime


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")  # before the fixtures are built
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_runtime_plumbing_on_gpu_with_stand_in_module(tmp_path, monkeypatch, ort_engine_dir, tiny, cuda_graphs):
    """TensorRTEngine's buffers, per-call profile choice, shared memory, lazy dense engine, outputs and CUDA
    graphs, with the engines replaced by the graphs' torch modules on the GPU (real TensorRT is not needed)."""
    import copy
    import shutil

    from topi_export.export.graphs import graph_module
    from topi_export.plan import NAME
    from topi_export.runtime.loop import rel_l2
    from topi_export.artifacts.manifest import file_entries, read_manifest

    out = tmp_path / "e"
    shutil.copytree(ort_engine_dir, out)  # an ONNX Runtime directory, turned into a fake TensorRT-RTX one
    m = read_manifest(out)
    family = copy.deepcopy(tiny.family)  # one copy: the attention processors call this copy's hooks
    family.model.cuda()
    modules, profiles = {}, {}
    for kind, g in m.graphs.items():
        modules[kind] = graph_module(family, m.settings, kind, [t.name for t in g.inputs])
        profiles[kind] = T.profile_shapes(g, kind, m.profiles, m.layouts, m.batch)
        (out / f"{kind}.engine").write_bytes(f"FAKE {kind}".encode())
    data = json.loads((out / NAME).read_text())
    for kind in m.graphs:
        data["graphs"][kind]["file"] = f"{kind}.engine"
    data["files"] = {k: {"sha256": v.sha256, "bytes": v.bytes} for k, v in
                     file_entries(out, list(data["files"]) + [f"{k}.engine" for k in m.graphs]).items()}
    data["backend"] = "tensorrt-rtx"
    data["target"] = {"module": "tensorrt_rtx", "version": "0.0-fake", "weights": "engine",
                      "compute_capabilities": [T.sm_name(torch.cuda.get_device_capability())]}
    (out / NAME).write_text(json.dumps(data))
    fake = _FakeTRT(modules, profiles, "0.0-fake")
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", fake.mod)
    monkeypatch.setenv("TOPI_TRT_CUDA_GRAPHS", "1" if cuda_graphs else "0")
    monkeypatch.delenv("TOPI_TRT_RUNTIME_CACHE", raising=False)

    from topi_export.runtime.session import open_session

    session = open_session(engine_dir=out)
    ref = open_session(engine_dir=out, backend="torch").engine
    eng = session.engine
    assert "dense" not in eng.engines  # deserialised on the first dense step
    inputs = session.load_inputs(None)
    cond = session.family.conditioning(inputs, inputs.layout)
    eng.bind(cond, inputs.reference_latents, inputs.layout)
    ref.bind(cond, inputs.reference_latents, inputs.layout)
    keeps = [p.keep for p in session.manifest.profiles if p.ratio > 0]
    t = torch.tensor([0.4])
    with torch.inference_mode():
        for seed in (0, 1):  # second pass: replays (CUDA graphs) must see the new latents
            lat = inputs.initial_noise(seed)
            v, inf = eng.anchor(lat, t)
            rv, rinf = ref.anchor(lat, t)
            assert v.device.type == "cpu" and v.shape == rv.shape and inf.shape == rinf.shape
            assert rel_l2(v, rv) < 1e-3 and rel_l2(inf, rinf) < 1e-3
            assert rel_l2(eng.full(lat, t), ref.full(lat, t)) < 1e-3
            for keep in keeps + keeps[:1]:
                g = torch.Generator().manual_seed(keep)
                idx = torch.randperm(inputs.layout.num_ctx, generator=g)[:keep].sort().values
                assert rel_l2(eng.pruned(lat, t, idx), ref.pruned(lat, t, idx)) < 1e-3
            assert rel_l2(eng.dense(lat, t), ref.dense(lat, t)) < 1e-3
        with pytest.raises(TopiError, match="no compiled profile keeps 5"):
            eng.pruned(lat, t, torch.arange(5))
    nc, nx = inputs.layout.num_ctx, inputs.layout.num_target
    for kind, profile, k, q in fake.calls:  # profile <-> shapes: anchor/full at profile 0, bucket i at i + 1
        if kind == "topi":
            p = session.manifest.profiles[profile]
            assert k == (p.keep,) and (p.ratio == 0) == (k == (nc,))
            assert q in ((nx,), (1,)) if p.ratio == 0 else q == (1,)
    if cuda_graphs and eng.cuda_graphs:  # captured: one eager run per slot, then replays
        assert len(fake.calls) == len(eng.slots) and all(s.graph is not None for s in eng.slots.values())
