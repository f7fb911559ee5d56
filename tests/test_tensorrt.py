"""TensorRT / TensorRT-RTX backend: profile table, precision pass, manifest target checks (pure), real
TensorRT-RTX ahead-of-time builds of tiny-kontext on CPU, and GPU / data-center TensorRT tests that skip
with a reason where the hardware or module is absent."""
import importlib.util
import json
import sys

import numpy as np
import pytest
import torch

from topi_export.backends import tensorrt as T
from topi_export.errors import TopiError
from topi_export.models import Layout
from topi_export.runtime.manifest import bucket_table

LAYOUT = Layout(4, (4, 4), (4, 4))  # 16 target + 16 context tokens
BUCKETS = "0.3,0.5"


def _has(module):
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _cuda():
    return torch.cuda.is_available()


def _shapes(keep_dim=None):
    common = {"hidden_states": [1, 32, 16], "encoder_hidden_states": [1, 4, 32], "pooled_projections": [1, 16],
              "timestep": [1], "img_ids": [32, 3], "txt_ids": [4, 3], "guidance": [1]}
    return {"anchor": dict(common), "pruned": {**common, "keep_idx": [keep_dim]}}


# ------------------------------------------------------------------------------------------------- pure
def test_profile_table_anchor_one_profile_pruned_one_per_bucket():
    table = bucket_table([0.3, 0.5], LAYOUT.num_ctx)
    assert [b["keep"] for b in table] == [12, 8]
    prof = T.profile_table(table, LAYOUT, _shapes())
    assert len(prof["anchor"]) == 1
    assert "keep_idx" not in prof["anchor"][0]
    assert prof["anchor"][0]["hidden_states"] == ((1, 32, 16),) * 3
    assert len(prof["pruned"]) == 2
    for b, p in zip(table, prof["pruned"]):
        assert p["keep_idx"] == ((b["keep"],),) * 3  # min = opt = max = the bucket's keep count
        for name, shape in _shapes()["anchor"].items():
            assert p[name] == (tuple(shape),) * 3  # every other input fixed to the build shape


@pytest.mark.parametrize("change, match", [
    (lambda s: s["pruned"].update(hidden_states=[1, None, 16]), "dynamic dimension"),
    (lambda s: s["anchor"].update(hidden_states=[1, 40, 16]), "40 image tokens"),
    (lambda s: s["pruned"].pop("keep_idx"), "no 'keep_idx'"),
    (lambda s: s["anchor"].update(keep_idx=[None]), "swapped or stale"),
    (lambda s: s["pruned"].update(keep_idx=[None, 2]), "1-D"),
])
def test_profile_table_rejects_bad_graph_shapes(change, match):
    shapes = _shapes()
    change(shapes)
    with pytest.raises(TopiError, match=match):
        T.profile_table(bucket_table([0.3, 0.5], LAYOUT.num_ctx), LAYOUT, shapes)


def test_profile_table_rejects_bad_buckets():
    with pytest.raises(TopiError, match="outside 1..16"):
        T.profile_table([{"ratio": 0.1, "keep": 17, "profile": 0}], LAYOUT, _shapes())
    with pytest.raises(TopiError, match="equal keep counts"):
        T.profile_table(bucket_table([0.3, 0.31], 4), Layout(4, (4, 4), (2, 2)),
                        {"anchor": {"hidden_states": [1, 20, 16]}, "pruned": {"hidden_states": [1, 20, 16],
                                                                               "keep_idx": [None]}})
    with pytest.raises(TopiError, match="profile i must be bucket i"):
        T.profile_table([{"ratio": 0.5, "keep": 8, "profile": 1}], LAYOUT, _shapes())


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
def test_import_trt_missing_module_names_install(monkeypatch, backend, module):
    monkeypatch.setitem(sys.modules, module, None)  # import of that name raises ImportError
    with pytest.raises(TopiError, match=r"needs the Python module '%s'.*pip install" % module):
        T.import_trt(backend)


def test_build_tensorrt_fails_early_without_module(monkeypatch, tmp_path):
    from topi_export.builder import build_engines

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TopiError, match="tensorrt"):
        build_engines(model="tiny-kontext", backend="tensorrt", layout=LAYOUT, engine_dir=tmp_path / "e",
                      echo=lambda s: None)
    assert not (tmp_path / "e").exists()


def _small_onnx():
    """x[1,4,8] -> MatMul -> LayerNorm -> Softmax -> MatMul (+ bias) -> y, plus a Sin branch on t."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w2")
    b = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")
    sc = numpy_helper.from_array(np.ones(8, np.float32), "scale")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("LayerNormalization", ["h", "scale"], ["n"], axis=-1),
             helper.make_node("Softmax", ["n"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "w2"], ["q"]),
             helper.make_node("Add", ["q", "b"], ["r"]),
             helper.make_node("Sin", ["t"], ["st"]),
             helper.make_node("Mul", ["r", "st"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8]),
                                       helper.make_tensor_value_info("t", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])], [w1, w2, b, sc])
    return onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)]))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_autocast_keeps_io_fp32_and_sensitive_ops_fp32(precision):
    import onnx
    from onnx import TensorProto

    low = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}[precision]
    model, stats = T.autocast_onnx(_small_onnx(), precision)
    onnx.checker.check_model(model, full_check=True)
    g = model.graph
    assert [i.type.tensor_type.elem_type for i in g.input] == [TensorProto.FLOAT] * 2
    assert g.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in onnx.shape_inference.infer_shapes(model, strict_mode=True).graph.value_info}
    by_op = {n.op_type: n for n in g.node if not n.name.startswith("autocast_")}
    assert types[by_op["LayerNormalization"].output[0]] == TensorProto.FLOAT
    assert types[by_op["Softmax"].output[0]] == TensorProto.FLOAT
    assert types[by_op["Sin"].output[0]] == TensorProto.FLOAT
    assert types[[n for n in g.node if n.op_type == "MatMul"][1].output[0]] == low
    assert stats["low_initializers"] == 3  # w1, w2, b converted; the LayerNorm scale stays fp32
    if precision == "fp16":  # ONNX Runtime's CPU kernels cover fp16: the pass keeps the graph's meaning
        import onnxruntime as ort

        feed = {"x": np.random.default_rng(1).standard_normal((1, 4, 8)).astype(np.float32),
                "t": np.array([0.7], np.float32)}
        ref = ort.InferenceSession(_small_onnx().SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
        out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
        assert out[0].dtype == np.float32
        np.testing.assert_allclose(out[0], ref[0], atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------------------ real TensorRT-RTX builds
@pytest.fixture(scope="module")
def rtx_build(tmp_path_factory):
    """tiny-kontext engines built ahead of time for SM89 on this machine (no GPU needed)."""
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx not installed (pip install tensorrt-rtx-cu13)")
    from topi_export.builder import build_engines

    root = tmp_path_factory.mktemp("trt")
    lines = []
    out = build_engines(model="tiny-kontext", backend="tensorrt-rtx", ratio_buckets=BUCKETS, layout=LAYOUT,
                        engine_dir=root / "rtx", onnx_dir=root / "onnx-cache", echo=lines.append,
                        backend_options={"precision": "fp32", "compute_capabilities": ["SM89"], "plugins": False,
                                         "optimization_level": 3, "workspace": "1G"})
    return {"dir": out, "root": root, "trt": trt, "echo": lines}


@pytest.mark.tensorrt_rtx
def test_rtx_build_writes_engines_log_and_manifest(rtx_build):
    from topi_export.runtime.manifest import read_manifest

    out, trt = rtx_build["dir"], rtx_build["trt"]
    for f in ("anchor.engine", "pruned.engine", "build_log.txt", "onnx/anchor.onnx", "onnx/pruned.onnx"):
        assert (out / f).is_file(), f
    assert (out / "pruned.engine").stat().st_size > 100_000
    m = read_manifest(out)  # sha256 of every file verified, build_log.txt included
    assert {"anchor.engine", "pruned.engine", "build_log.txt"} <= set(m.data["files"])
    assert m.backend == "tensorrt-rtx" and m.data["precision"] == "fp32"
    target = m.data["target"]
    assert target["module"] == "tensorrt_rtx" and target["version"] == trt.__version__
    assert target["compute_capabilities"] == ["SM89"] and target["ahead_of_time"] is True
    assert target["plugins"] == "inlined" and target["strongly_typed"] is True
    assert m.data["versions"]["tensorrt_rtx"] == trt.__version__
    log = (out / "build_log.txt").read_text()
    assert "PARSER_ERROR" not in log and "] ERROR:" not in log and "INTERNAL_ERROR" not in log
    assert "[anchor] TOPI: parsed anchor.onnx" in log and "[pruned] TOPI: parsed pruned.onnx" in log
    assert log.count("parser errors: 0") >= 2
    assert any("pruned:" in line and "2 profile(s)" in line for line in rtx_build["echo"])


@pytest.mark.tensorrt_rtx
def test_rtx_profiles_match_buckets(rtx_build):
    from topi_export.export.graphs import graph_io
    from topi_export.models import load_model
    from topi_export.runtime.manifest import read_manifest

    m = read_manifest(rtx_build["dir"])
    graphs, buckets = m.data["graphs"], m.data["buckets"]
    assert [b["keep"] for b in buckets] == [12, 8] and [b["profile"] for b in buckets] == [0, 1]
    assert len(graphs["anchor"]["profiles"]) == 1
    pruned = graphs["pruned"]["profiles"]
    assert len(pruned) == 2  # read back from TensorRT's IOptimizationProfile objects
    adapter = load_model("tiny-kontext").adapter
    for b, p in zip(buckets, pruned):
        assert p["index"] == b["profile"] and p["keep"] == b["keep"] and p["ratio"] == b["ratio"]
        assert p["shapes"]["keep_idx"] == {"min": [b["keep"]], "opt": [b["keep"]], "max": [b["keep"]]}
        assert m.profile_for(b["keep"]) == p["index"]
    for kind in ("anchor", "pruned"):
        inputs, _ = graph_io(adapter, LAYOUT, kind)
        for prof in graphs[kind]["profiles"]:
            for name, t in inputs.items():
                if name != "keep_idx":
                    assert prof["shapes"][name] == {k: list(t.shape) for k in ("min", "opt", "max")}, name
            assert set(prof["shapes"]) == set(inputs)


@pytest.mark.tensorrt_rtx
def test_rtx_bf16_build_two_targets(rtx_build):
    """Strongly typed bf16 (autocast graph) for SM89 + SM120, reusing the exported ONNX graphs."""
    from topi_export.builder import build_engines
    from topi_export.runtime.manifest import read_manifest

    root = rtx_build["root"]
    cache = root / "timing.cache"
    out = build_engines(model="tiny-kontext", backend="tensorrt-rtx", ratio_buckets=BUCKETS, layout=LAYOUT,
                        engine_dir=root / "rtx-bf16", onnx_dir=root / "onnx-cache", echo=lambda s: None,
                        backend_options={"precision": "bf16", "compute_capabilities": ["SM89", "SM120"],
                                         "plugins": True, "timing_cache": str(cache)})
    m = read_manifest(out)
    assert m.data["precision"] == "bf16"
    assert m.data["target"]["compute_capabilities"] == ["SM89", "SM120"]
    assert m.data["target"]["plugins"] == "inlined"  # TensorRT-RTX has no Python plugin API
    for kind in ("anchor", "pruned"):
        stats = m.data["graphs"][kind]["autocast"]
        assert stats["precision"] == "bf16" and stats["low_nodes"] > 0 and stats["fp32_nodes"] > 0
    assert len(m.data["graphs"]["pruned"]["profiles"]) == 2
    log = (out / "build_log.txt").read_text()
    assert "PARSER_ERROR" not in log and "] ERROR:" not in log
    assert "TensorRT-RTX has no Python plugin API" in log
    assert "timing caches are no-ops in TensorRT-RTX" in log and not cache.exists()


@pytest.mark.tensorrt_rtx
def test_rtx_autocast_of_project_graph_runs_in_onnxruntime(rtx_build):
    """The fp16 pass applied to the real anchor graph still computes the same velocity / influence."""
    import onnx
    import onnxruntime as ort

    from topi_export.export.graphs import graph_io
    from topi_export.models import load_model
    from topi_export.ops.onnx import register_schemas

    register_schemas()
    path = rtx_build["dir"] / "onnx" / "anchor.onnx"
    inputs, _ = graph_io(load_model("tiny-kontext").adapter, LAYOUT, "anchor")
    feed = {k: v.numpy() for k, v in inputs.items()}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    ref = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feed)
    model, _ = T.autocast_onnx(onnx.load(str(path)), "fp16")
    out = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)
    for r, o in zip(ref, out):
        assert o.dtype == np.float32
        assert np.linalg.norm(o - r) / np.linalg.norm(r) < 1e-2


def _tiny_graphs(tmp_path, op="Relu", domain=""):
    """Minimal anchor/pruned ONNX files (input x[1,4]) whose one node is `op`."""
    import onnx
    from onnx import TensorProto, helper

    d = tmp_path / "graphs"
    d.mkdir()
    for kind in ("anchor", "pruned"):
        ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])]
        nodes = [helper.make_node(op, ["x"], ["y"], domain=domain, name=f"{kind}_node")]
        if kind == "pruned":
            ins.append(helper.make_tensor_value_info("keep_idx", TensorProto.INT64, ["keep"]))
            nodes.append(helper.make_node("Gather", ["y", "keep_idx"], ["z"], axis=1))
        out = helper.make_tensor_value_info("z" if kind == "pruned" else "y", TensorProto.FLOAT, None)
        opsets = [helper.make_opsetid("", 20)] + ([helper.make_opsetid(domain, 1)] if domain else [])
        onnx.save(helper.make_model(helper.make_graph(nodes, kind, ins, [out]), opset_imports=opsets),
                  str(d / f"{kind}.onnx"))
    return d


@pytest.mark.tensorrt_rtx
def test_rtx_parser_error_is_named(tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx not installed (pip install tensorrt-rtx-cu13)")
    graphs = _tiny_graphs(tmp_path, op="NoSuchOp", domain="nowhere")
    layout = Layout(1, (1, 1), (1, 4))
    with pytest.raises(TopiError, match=r"ONNX parser rejected the anchor graph .*first: .*NoSuchOp"):
        T.build(graphs, tmp_path, bucket_table([0.5], 4), layout, "tensorrt-rtx",
                {"compute_capabilities": ["SM89"], "plugins": False}, echo=lambda s: None)


@pytest.mark.tensorrt_rtx
def test_rtx_rejects_non_rtx_compute_capability(tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx not installed (pip install tensorrt-rtx-cu13)")
    graphs = _tiny_graphs(tmp_path)
    with pytest.raises(TopiError, match="SM90 is not a TensorRT-RTX .* target.*Hopper"):
        T.build(graphs, tmp_path, bucket_table([0.5], 4), Layout(1, (1, 1), (1, 4)), "tensorrt-rtx",
                {"compute_capabilities": ["SM90"]}, echo=lambda s: None)


@pytest.mark.tensorrt_rtx
def test_rtx_small_graph_profiles_per_keep(tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx not installed (pip install tensorrt-rtx-cu13)")
    graphs = _tiny_graphs(tmp_path)
    table = bucket_table([0.25, 0.5, 0.75], 4)  # keeps 3, 2, 1
    built = T.build(graphs, tmp_path, table, Layout(1, (1, 1), (1, 4)), "tensorrt-rtx",
                    {"compute_capabilities": ["SM86"], "plugins": False, "optimization_level": 0},
                    echo=lambda s: None)
    assert [p["shapes"]["keep_idx"]["opt"] for p in built["graphs"]["pruned"]["profiles"]] == [[3], [2], [1]]
    assert built["target"]["compute_capabilities"] == ["SM86"]
    assert (tmp_path / "pruned.engine").is_file() and (tmp_path / "build_log.txt").is_file()


@pytest.mark.tensorrt_rtx
def test_rtx_runtime_refuses_without_gpu(rtx_build):
    if _cuda():
        pytest.skip("a CUDA GPU is present: the no-GPU refusal does not apply")
    from topi_export.runtime.manifest import open_engine_session

    with pytest.raises(TopiError, match="no CUDA GPU is visible"):
        open_engine_session(rtx_build["dir"])


@pytest.mark.tensorrt_rtx
def test_rtx_manifest_target_refuses_other_gpu(rtx_build):
    from topi_export.runtime.manifest import read_manifest

    m = read_manifest(rtx_build["dir"])
    running = {"module": "tensorrt_rtx", "version": rtx_build["trt"].__version__, "compute_capability": (9, 0),
               "gpu": "NVIDIA H100"}
    with pytest.raises(TopiError, match="compute capability SM89 but NVIDIA H100 is SM90"):
        T.check_target(m.data["target"], running, m.path)


# --------------------------------------------------------------------------------- GPU / data-center TRT
def _compare_with_torch(engine_dir):
    from topi_export.runtime.loop import rel_l2
    from topi_export.runtime.manifest import open_engine_session

    session = open_engine_session(engine_dir)
    reference = open_engine_session(engine_dir, backend="torch")
    data = session.load_inputs(None)
    latents = data.initial_noise(0)
    t = torch.tensor([0.5])
    for eng in (session.engine, reference.engine):
        eng.bind(data)
    v, inf = session.engine.anchor(latents, t)
    rv, rinf = reference.engine.anchor(latents, t)
    assert rel_l2(v, rv) < 1e-3 and rel_l2(inf, rinf) < 1e-3
    for b in session.manifest.data["buckets"]:
        keep_idx = torch.arange(b["keep"]) * (data.layout.num_ctx // b["keep"])
        assert rel_l2(session.engine.pruned(latents, t, keep_idx), reference.engine.pruned(latents, t, keep_idx)) < 1e-3


@pytest.mark.gpu
@pytest.mark.tensorrt_rtx
def test_rtx_engines_run_on_rtx_gpu(tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx not installed (pip install tensorrt-rtx-cu13)")
    if not _cuda():
        pytest.skip("no CUDA GPU: TensorRT-RTX engines run on RTX-class GPUs")
    if T.sm_name(torch.cuda.get_device_capability()) not in ("SM75", "SM80", "SM86", "SM89", "SM120", "SM121"):
        pytest.skip(f"{torch.cuda.get_device_name()} is not a TensorRT-RTX target (e.g. Hopper SM90)")
    from topi_export.builder import build_engines

    out = build_engines(model="tiny-kontext", backend="tensorrt-rtx", ratio_buckets=BUCKETS, layout=LAYOUT,
                        engine_dir=tmp_path / "rtx", echo=lambda s: None, backend_options={"plugins": False})
    _compare_with_torch(out)


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_tensorrt_build_and_run_on_gpu(tmp_path):
    pytest.importorskip("tensorrt", reason="data-center TensorRT is not installed (it needs NVIDIA's package index)")
    if not _cuda():
        pytest.skip("no CUDA GPU: data-center TensorRT builds and runs on the GPU")
    from topi_export.builder import build_engines

    out = build_engines(model="tiny-kontext", backend="tensorrt", ratio_buckets=BUCKETS, layout=LAYOUT,
                        engine_dir=tmp_path / "trt", echo=lambda s: None, backend_options={"plugins": True})
    data = json.loads((out / "manifest.json").read_text())
    assert data["target"]["module"] == "tensorrt" and data["target"]["gpu"]
    assert len(data["graphs"]["pruned"]["profiles"]) == 2
    _compare_with_torch(out)


@pytest.mark.tensorrt
def test_tensorrt_build_without_gpu_is_refused(tmp_path):
    pytest.importorskip("tensorrt", reason="data-center TensorRT is not installed (it needs NVIDIA's package index)")
    if _cuda():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(TopiError, match="no CUDA GPU is visible"):
        T.build(_tiny_graphs(tmp_path), tmp_path, bucket_table([0.5], 4), Layout(1, (1, 1), (1, 4)), "tensorrt",
                {}, echo=lambda s: None)


# ------------------------------------------- runtime plumbing on a GPU with a stand-in TensorRT module
class _FakeTRT:
    """Just enough of the TensorRT Python API for TensorRTEngine; 'engines' run the exported graphs' torch
    modules on the raw CUDA addresses bound with set_tensor_address (via __cuda_array_interface__)."""

    def __init__(self, modules, profiles, version):
        import types

        self.mod = types.ModuleType("tensorrt_rtx")
        m = self.mod
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
        self.calls = []  # (kind, profile, keep length)

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
                ok = tuple(shape) == tuple(self.e.profiles[self.profile][name])
                self.shapes[name] = tuple(shape)
                return ok

            def get_tensor_shape(self, name):
                return self.e.out_shape(name, self.profile)

            def set_tensor_address(self, name, ptr):
                self.addr[name] = ptr
                return True

            def execute_async_v3(self, stream):
                def wrap(ptr, shape, dtype):
                    typestr = {torch.float32: "<f4", torch.int64: "<i8"}[dtype]

                    class View:
                        __cuda_array_interface__ = {"shape": tuple(shape), "typestr": typestr,
                                                    "data": (ptr, False), "version": 3}
                    return torch.as_tensor(View(), device="cuda")

                prof = self.e.profiles[self.profile]
                ins = {n: wrap(self.addr[n], prof[n], self.e.dtypes[n]) for n in self.e.inputs}
                with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
                    outs = self.e.module(**ins)
                    outs = outs if isinstance(outs, tuple) else (outs,)
                    for name, value in zip(self.e.outputs, outs):
                        wrap(self.addr[name], self.e.out_shape(name, self.profile), torch.float32).copy_(value)
                if not torch.cuda.is_current_stream_capturing():
                    fake.calls.append((self.e.kind, self.profile, tuple(ins.get("keep_idx", torch.empty(0)).shape)))
                return True

        class Engine:
            device_memory_size_v2 = 4096

            def __init__(self, kind):
                self.kind, self.module, self.profiles = kind, modules[kind], profiles[kind]
                self.inputs = list(self.profiles[0])
                self.outputs = ["velocity", "influence"] if kind == "anchor" else ["velocity"]
                self.dtypes = {n: torch.int64 if n == "keep_idx" else torch.float32 for n in self.inputs}
                self.num_io_tensors = len(self.inputs) + len(self.outputs)
                self.num_optimization_profiles = len(self.profiles)

            def get_tensor_name(self, i):
                return (self.inputs + self.outputs)[i]

            def get_tensor_mode(self, name):
                return "in" if name in self.inputs else "out"

            def get_tensor_dtype(self, name):
                return self.dtypes.get(name, torch.float32)

            def get_tensor_profile_shape(self, name, p):
                return [self.profiles[p][name]] * 3

            def out_shape(self, name, p):
                hs = self.profiles[p]["hidden_states"]
                return (1, LAYOUT.num_target, hs[2]) if name == "velocity" else (1, LAYOUT.num_ctx)

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
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_runtime_plumbing_on_gpu_with_stand_in_module(tmp_path, monkeypatch, cuda_graphs):
    """TensorRTEngine's buffers, per-bucket profile switching, shared memory, outputs and CUDA graphs,
    with the engines replaced by the graphs' torch modules on the GPU (real TensorRT is not needed)."""
    if not _cuda():
        pytest.skip("no CUDA GPU")
    import copy

    from topi_export.builder import build_engines
    from topi_export.export.graphs import _Graph
    from topi_export.models import load_model
    from topi_export.runtime.manifest import NAME, file_entries, open_engine_session
    from topi_export.runtime.settings import method_settings

    out = build_engines(model="tiny-kontext", ratio_buckets=BUCKETS, layout=LAYOUT, engine_dir=tmp_path / "e",
                        echo=lambda s: None)  # an ONNX Runtime directory, turned into a fake TensorRT-RTX one
    data = json.loads((out / NAME).read_text())
    loaded = load_model("tiny-kontext")
    settings = method_settings(loaded.identity())
    adapter = copy.deepcopy(loaded.adapter)
    modules = {k: _Graph(adapter, LAYOUT, settings, k).cuda().eval() for k in ("anchor", "pruned")}
    profiles = T.profile_table(data["buckets"], LAYOUT,
                               {k: T.onnx_input_shapes(out / "onnx" / f"{k}.onnx") for k in ("anchor", "pruned")})
    profiles = {k: [{n: s[1] for n, s in p.items()} for p in v] for k, v in profiles.items()}
    for kind in ("anchor", "pruned"):
        (out / f"{kind}.engine").write_bytes(f"FAKE {kind}".encode())
        data["graphs"][kind] = {"file": f"{kind}.engine", "profiles": [{"index": i} for i in range(len(profiles[kind]))]}
    data["files"] = file_entries(out, [f for f in data["files"] if not f.endswith(".ort.onnx")] +
                                 ["anchor.engine", "pruned.engine"])
    data["backend"] = "tensorrt-rtx"
    data["target"] = {"module": "tensorrt_rtx", "version": "0.0-fake",
                      "compute_capabilities": [T.sm_name(torch.cuda.get_device_capability())]}
    (out / NAME).write_text(json.dumps(data))
    fake = _FakeTRT(modules, profiles, "0.0-fake")
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", fake.mod)
    monkeypatch.setenv("TOPI_TRT_CUDA_GRAPHS", "1" if cuda_graphs else "0")

    session = open_engine_session(out)
    ref = open_engine_session(out, backend="torch").engine
    eng = session.engine
    inputs = session.load_inputs(None)
    eng.bind(inputs)
    ref.bind(inputs)
    from topi_export.runtime.loop import rel_l2

    t = torch.tensor([0.4])
    with torch.inference_mode():
        for seed in (0, 1):  # second pass: replays (CUDA graphs) must see the new latents
            lat = inputs.initial_noise(seed)
            v, inf = eng.anchor(lat, t)
            rv, rinf = ref.anchor(lat, t)
            assert v.device.type == "cpu" and v.shape == rv.shape and inf.shape == rinf.shape
            assert rel_l2(v, rv) < 1e-3 and rel_l2(inf, rinf) < 1e-3
            assert rel_l2(eng.full(lat, t), ref.full(lat, t)) < 1e-3
            for keep in (12, 8, 12):
                idx = torch.randperm(LAYOUT.num_ctx, generator=torch.Generator().manual_seed(keep))[:keep].sort().values
                assert rel_l2(eng.pruned(lat, t, idx), ref.pruned(lat, t, idx)) < 1e-3
        with pytest.raises(TopiError, match="no compiled bucket keeps 5"):
            eng.pruned(lat, t, torch.arange(5))
    pruned_calls = [c for c in fake.calls if c[0] == "pruned"]
    assert all(shape == ((12,) if p == 0 else (8,)) for _, p, shape in pruned_calls)  # profile <-> keep length
    if cuda_graphs and eng.cuda_graphs:  # captured: one eager run per (engine, profile), then replays
        assert len(fake.calls) == 3 and all(s.graph is not None for s in eng.slots.values())
