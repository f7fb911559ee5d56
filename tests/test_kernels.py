"""Triton kernels (topi_export/kernels/triton_kernels.py) and TensorRT plugin descriptors (topi_export/kernels/trt_plugins.py).

Without CUDA the kernels run on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1, set before
triton is imported); with CUDA the same tests run on the GPU, plus the @pytest.mark.gpu ones.
"""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="OpenAI Triton is not installed (pip install triton)")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from topi_export.kernels import triton_kernels as tk  # noqa: E402
from topi_export.kernels import trt_plugins  # noqa: E402
from topi_export.ops import reference  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


def _inputs(b, h, nx, s, nc, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda n: (torch.randn(b, h, n, d, generator=g) * 1.5).to(DEVICE, dtype)  # noqa: E731
    return mk(nx), mk(s), mk(nc)


def _rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max()).item()


# B, H, Nx, S, Nc, D: non-powers of two, Nc == S, a single query, several tiles per axis
SHAPES = [(1, 2, 37, 70, 21, 16), (2, 3, 50, 113, 45, 32), (1, 1, 1, 40, 40, 64), (1, 2, 65, 97, 66, 128)]


def _lse_oracle(q, k):
    return torch.logsumexp(q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_influence_fp32_matches_reference_and_oracle(shape):
    q, k, v = _inputs(*shape)
    ref = reference.influence_score(q, k, v)
    oracle = reference.influence_score_materialized(q, k, v)
    out = tk.influence_score(q, k, v)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert _rel(out, ref) < 1e-5
    assert _rel(out, oracle) < 1e-5


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
def test_query_lse_is_the_base_e_log_sum_exp(shape):
    q, k, _ = _inputs(*shape)
    lse = tk.query_lse(q, k)
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert (lse.double().cpu() - _lse_oracle(q, k).cpu()).abs().max().item() < 1e-5


@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("split_heads", [False, True], ids=["one-launch", "split-heads"])
def test_context_influence_both_variants_match(shape, split_heads):
    q, k, v = _inputs(*shape)
    out = tk.context_influence(q, k, v, tk.query_lse(q, k), split_heads=split_heads)
    assert _rel(out, reference.influence_score_materialized(q, k, v)) < 1e-5
    # fed the float64 lse it is the same column sums: the kernel reads the lse, it does not recompute it
    lse = _lse_oracle(q, k).float().to(DEVICE)
    assert _rel(tk.context_influence(q, k, v, lse, split_heads=split_heads), out) < 1e-5
    # a wrong lse gives a wrong answer (lse + log 2 halves every term)
    assert _rel(tk.context_influence(q, k, v, lse + 0.6931471805599453, split_heads=split_heads), out / 2) < 1e-5


def _key_mask(b, s, nc):
    """[B, S] 0/1 on the device: row 0 masks a whole key tile (32 keys under the interpreter, and its start), the
    other rows a few keys; one context key of row 0 is masked too."""
    mask = torch.ones(b, s)
    mask[0, :40] = 0
    for row in range(1, b):
        mask[row, 3 * row:3 * row + 5] = 0
    mask[0, s - nc + 2] = 0
    return mask.to(DEVICE)


@pytest.mark.parametrize("shape", SHAPES[:2] + SHAPES[3:], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("split_heads", [False, True], ids=["one-launch", "split-heads"])
def test_masked_influence_matches_the_op_and_oracle(shape, split_heads):
    b, h, nx, s, nc, d = shape
    q, k, v = _inputs(*shape)
    mask = _key_mask(b, s, nc)
    lse = tk.query_lse(q, k, mask)
    logits = (q.double() @ k.double().transpose(-1, -2) / d ** 0.5).masked_fill(mask[:, None, None] == 0, -torch.inf)
    assert (lse.double().cpu() - torch.logsumexp(logits, dim=-1).cpu()).abs().max().item() < 1e-5
    out = tk.context_influence(q, k, v, lse, mask, split_heads=split_heads)
    assert _rel(out, reference.influence_score(q, k, v, mask)) < 1e-5
    assert _rel(out, reference.influence_score_materialized(q, k, v, mask)) < 1e-5
    assert out[0, 2].item() == 0  # the masked context key
    assert _rel(tk.influence_score(q, k, v, mask, split_heads=split_heads), out) < 1e-6
    # the mask changes the answer (so the comparisons above can fail); a [1, S] mask is broadcast
    assert _rel(tk.influence_score(q, k, v), out) > 1e-3
    assert _rel(tk.influence_score(q, k, v, mask[:1]), reference.influence_score(q, k, v, mask[:1])) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_influence_half_precision(dtype):
    q, k, v = _inputs(1, 2, 40, 90, 33, 32, dtype=dtype)
    out = tk.influence_score(q, k, v)
    assert out.dtype == dtype
    # fp32 maths on the same rounded inputs; the only difference left is the output rounding
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert _rel(out, reference.influence_score_materialized(q, k, v)) < tol
    assert _rel(tk.influence_score_aot(q, k, v), reference.influence_score(q, k, v)) < 1e-2
    assert tk.query_lse(q, k).dtype == torch.float32


def test_influence_rejects_bad_inputs():
    q, k, v = _inputs(1, 1, 4, 8, 4, 16)
    with pytest.raises(ValueError):
        tk.influence_score(q, k[:, :, :3], v)  # Nc > S
    with pytest.raises(ValueError):
        tk.influence_score(q[..., :8], k[..., :8], v[..., :8])  # D = 8
    with pytest.raises(TypeError):
        tk.influence_score(q, k.double(), v)
    lse = tk.query_lse(q, k)
    with pytest.raises(ValueError, match="lse must be float32"):
        tk.context_influence(q, k, v, lse[:, :, :3])
    with pytest.raises(ValueError, match="lse must be float32"):
        tk.context_influence(q, k, v, lse.double())
    with pytest.raises(ValueError, match="key_mask must be"):
        tk.query_lse(q, k, torch.ones(1, 7, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_gather_matches_reference(dtype):
    x = torch.randn(2, 37, 600).to(DEVICE, dtype)  # C spans two column tiles
    idx = torch.tensor([0, 5, 36, 3, 3, 20, 11, 12, 13, 30, 1], dtype=torch.int64, device=DEVICE)
    out = tk.token_gather(x, idx)
    assert torch.equal(out, reference.token_gather(x, idx))
    assert tk.token_gather(x, idx[:0]).shape == (2, 0, 600)
    with pytest.raises(TypeError):
        tk.token_gather(x, idx.int())


# ----------------------------------------------------------------------------- plugin descriptors
def test_plugin_descriptors():
    assert trt_plugins.PLUGIN_NAMESPACE == "topi" and trt_plugins.PLUGIN_VERSION == "1"
    assert set(trt_plugins.PLUGINS) == {"query_lse", "context_influence", "token_gather"}
    assert set(trt_plugins.PLUGINS) == set(tk.AOT_KERNELS)
    for name, p in trt_plugins.PLUGINS.items():
        assert p["name"] == name and p["id"] == f"topi::{name}"
        assert p["namespace"] == "topi" and p["version"] == "1"
        assert p["attributes"] == {}
        assert len(p["inputs"]) == len(p["input_shapes"]) and len(p["outputs"]) == len(p["output_shapes"]) == 1
        n_opt = len(p["optional_inputs"])
        assert p["inputs"][len(p["inputs"]) - n_opt:] == p["optional_inputs"]  # optional inputs come last
        assert len(p["io_types"].split(",")) == len(p["inputs"]) - n_opt + len(p["outputs"])
        if n_opt:
            assert len(p["masked_io_types"].split(",")) == len(p["inputs"]) + len(p["outputs"])
            assert hasattr(tk, p["masked_aot_kernel"])
        assert p["output_dtype"] in p["inputs"] or p["output_dtype"] == "FP32"
        assert hasattr(tk, p["aot_kernel"]) and all(hasattr(tk, kern) for kern in p["jit_kernels"])
    # the plugins are the ONNX nodes: same names, inputs (and which are optional) and outputs as the schemas
    from topi_export.ops.onnx import register_schemas
    import onnx

    register_schemas()
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    for name, p in trt_plugins.PLUGINS.items():
        schema = onnx.defs.get_schema(name, 1, "topi")
        assert tuple(i.name for i in schema.inputs) == p["inputs"]
        assert tuple(i.name for i in schema.inputs if i.option == optional) == p["optional_inputs"]
        assert tuple(o.name for o in schema.outputs) == p["outputs"]
    assert trt_plugins.PLUGINS["query_lse"]["output_shapes"] == ("[B,H,Nx]",)
    assert trt_plugins.PLUGINS["context_influence"]["output_shapes"] == ("[B,Nc]",)
    assert trt_plugins.PLUGINS["token_gather"]["output_shapes"] == ("[B,K,C]",)


def test_tensorrt_rtx_has_no_plugin_api():
    try:
        import tensorrt_rtx.plugin  # noqa: F401
        pytest.skip("this tensorrt_rtx has a plugin module")
    except ImportError:
        pass
    with pytest.raises(trt_plugins.PluginUnavailableError, match="tensorrt_rtx.plugin does not exist"):
        trt_plugins.register_plugins("tensorrt_rtx")


# ----------------------------------------------------------------------------- fake tensorrt.plugin
# Integer-valued stand-ins for tensorrt.plugin, enforcing the signature rules of its validators
# (tensorrt/plugin/_validate.py), so the registration code and aot_impl bodies run without TensorRT.
class _Dim(int):
    is_fake = False
    is_constant = True

    def constant_value(self):
        return int(self)


def _make_fake_trt(name):
    trt = types.ModuleType(name)
    trt.float32, trt.float16, trt.bfloat16, trt.int64 = "FLOAT", "HALF", "BF16", "INT64"
    trtp = types.ModuleType(f"{name}.plugin")
    trtp.registry = {}

    class TensorDesc:
        def __init__(self, shape, dtype):
            self.shape_expr, self.dtype = tuple(_Dim(s) for s in shape), dtype

    class KernelLaunchParams:
        grid_x = grid_y = grid_z = block_x = block_y = block_z = 1
        shared_mem = 0

    class SymExprs(list):
        pass

    class SymIntExprs(SymExprs):
        @classmethod
        def from_tuple(cls, values):
            return cls(values)

    def schema(fn, tail):
        import inspect
        sig = inspect.signature(fn)
        params = list(sig.parameters)
        return params[:len(params) - len(tail)], params[len(params) - len(tail):] == tail, sig

    def decorator(kind, tail):
        def deco(plugin_id):
            def wrap(fn):
                entry = trtp.registry.setdefault(plugin_id, {})
                inputs, ok, sig = schema(fn, tail)
                assert ok, f"{kind} of {plugin_id}: parameters {list(sig.parameters)} must end with {tail}"
                if kind == "register":
                    assert plugin_id.count("::") == 1 and plugin_id.split("::")[0] not in ("", "trt", "tensorrt")
                    assert all(p.annotation is TensorDesc for p in sig.parameters.values()), "annotations"
                    assert sig.return_annotation is TensorDesc
                    entry["inputs"] = inputs
                else:
                    assert inputs == entry["inputs"], f"{kind} inputs {inputs} != {entry['inputs']}"
                if kind == "aot_impl":
                    assert sig.return_annotation is not sig.empty, "aot_impl needs a return annotation"
                assert kind not in entry, f"{kind} registered twice for {plugin_id}"
                entry[kind] = fn
                return fn
            return wrap
        return deco

    trtp.TensorDesc, trtp.Tensor, trtp.KernelLaunchParams = TensorDesc, type("Tensor", (), {}), KernelLaunchParams
    trtp.SymExprs, trtp.SymIntExprs, trtp.SymInt32 = SymExprs, SymIntExprs, lambda e: int(e)
    trtp.AutoTuneCombination = lambda io_types, layouts="LINEAR": (io_types, layouts)
    trtp.from_shape_expr = lambda shape, dtype: TensorDesc(shape, dtype)
    trtp.cdiv = lambda a, b: -(-int(a) // int(b))
    trtp.register = decorator("register", [])
    trtp.autotune = decorator("autotune", ["outputs"])
    trtp.aot_impl = decorator("aot_impl", ["outputs", "tactic"])
    trtp.impl = decorator("impl", ["outputs", "stream"])
    trt.plugin = trtp
    return trt, trtp


@pytest.fixture
def fake_trt(monkeypatch):
    name = f"fake_tensorrt_{os.getpid()}"
    trt, trtp = _make_fake_trt(name)
    monkeypatch.setitem(sys.modules, name, trt)
    monkeypatch.setitem(sys.modules, f"{name}.plugin", trtp)
    monkeypatch.setattr(trt_plugins, "_registered", {})
    return name, trt, trtp


def _compile_aot_elsewhere(requests):
    """compile_aot for sm_90 in a subprocess: the interpreter replaces Triton's compiler in this one."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from topi_export.kernels import triton_kernels as tk; "
            "from triton.backends.compiler import GPUTarget; t = GPUTarget('cuda', 90, 32); "
            "print(json.dumps([tk.compile_aot(*r[:3], target=t, masked=r[4] if len(r) > 4 else False) "
            "for r in json.loads(sys.argv[2])]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-c", code, str(ROOT), json.dumps(requests)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return {tuple(r): res for r, res in zip(requests, json.loads(out.stdout.strip().splitlines()[-1]))}


def _aot_launches(trtp, b=2, h=3, nx=50, s=113, nc=45, d=16, n=37, c=600, kk=11):
    """Run every registered aot_impl on concrete shapes; returns {plugin: (name, ptx, launch, extras)}."""
    F = trtp.TensorDesc
    reg = {name: trtp.registry[f"topi::{name}"] for name in trt_plugins.PLUGINS}
    q, k, v = F((b, h, nx, d), "HALF"), F((b, h, s, d), "HALF"), F((b, h, nc, d), "HALF")
    lse = reg["query_lse"]["register"](q, k)
    assert tuple(lse.shape_expr) == (b, h, nx) and lse.dtype == "FLOAT"
    out = reg["context_influence"]["register"](q, k, v, lse)
    assert tuple(out.shape_expr) == (b, nc) and out.dtype == "HALF"
    x, idx = F((b, n, c), "HALF"), F((kk,), "INT64")
    y = reg["token_gather"]["register"](x, idx)
    assert tuple(y.shape_expr) == (b, kk, c) and y.dtype == "HALF"
    return {"query_lse": reg["query_lse"]["aot_impl"](q, k, (lse,), 0),
            "context_influence": reg["context_influence"]["aot_impl"](q, k, v, lse, (out,), 0),
            "token_gather": reg["token_gather"]["aot_impl"](x, idx, (y,), 0)}


def _entry_params(ptx: bytes, name: bytes) -> int:
    entry = ptx.decode()
    entry = entry[entry.index(f".entry {name.decode()}"):]
    return entry[:entry.index(")")].count(".param")


def test_register_plugins_with_fake_tensorrt(fake_trt, monkeypatch):
    name, trt, trtp = fake_trt
    if not HAS_CUDA:
        compiled = _compile_aot_elsewhere([["query_lse", "fp16", 16], ["context_influence", "fp16", 16],
                                           ["token_gather", "fp16", None]])
        monkeypatch.setattr(tk, "compile_aot", lambda kern, dt, d=None, masked=False: compiled[(kern, dt, d)])
    trt_plugins.register_plugins(name)
    trt_plugins.register_plugins(name)  # idempotent
    assert set(trtp.registry) == {"topi::query_lse", "topi::context_influence", "topi::token_gather"}
    for entry in trtp.registry.values():
        assert {"register", "autotune", "aot_impl"} <= set(entry) and "impl" not in entry
    T = "FP32|FP16|BF16"
    assert trtp.registry["topi::query_lse"]["autotune"](None, None, ()) == [(f"{T}, {T}, FP32", "LINEAR")]
    combos = trtp.registry["topi::context_influence"]["autotune"](None, None, None, None, ())
    assert combos == [(f"{T}, {T}, {T}, FP32, {T}", "LINEAR")]
    assert trtp.registry["topi::token_gather"]["autotune"](None, None, ()) == [(f"{T}, INT64, {T}", "LINEAR")]

    # TensorRT passes (inputs, int32 scalars, outputs) then pads Triton's 2 hidden scratch pointers
    launches = _aot_launches(trtp)
    kname, ptx, launch, extra = launches["query_lse"]
    assert kname == b"_query_lse_kernel" and _entry_params(ptx, kname) == 5 + 2
    assert (launch.grid_x, launch.grid_y) == (-(-50 // tk._AOT_LSE_TILES[0][0]), 2 * 3)  # (query tiles, b*h)
    assert list(extra) == [50, 113] and launch.shared_mem <= tk.AOT_SHARED_LIMIT  # NX, S
    kname, ptx, launch, extra = launches["context_influence"]
    assert kname == b"_context_influence_kernel" and _entry_params(ptx, kname) == 9 + 2
    assert (launch.grid_x, launch.grid_y) == (-(-45 // tk._AOT_CONTEXT_TILES[0][1]), 2)  # (context tiles, b)
    assert list(extra) == [3, 50, 113, 45] and launch.shared_mem <= tk.AOT_SHARED_LIMIT  # H, NX, S, NC
    kname, ptx, launch, extra = launches["token_gather"]
    assert kname == b"_token_gather_kernel" and list(extra) == [37, 600, 11]
    assert (launch.grid_x, launch.grid_y, launch.grid_z) == (2, 2, 2)
    assert _entry_params(ptx, kname) == 6 + 2

    with pytest.raises(trt_plugins.PluginUnavailableError):
        trt_plugins.register_plugins(name, jit=True)


def test_register_masked_plugins_with_fake_tensorrt(fake_trt, monkeypatch):
    name, trt, trtp = fake_trt
    if not HAS_CUDA:
        compiled = _compile_aot_elsewhere([["query_lse", "fp16", 16, None, True],
                                           ["context_influence", "fp16", 16, None, True]])
        monkeypatch.setattr(tk, "compile_aot",
                            lambda kern, dt, d=None, masked=False: compiled[(kern, dt, d, None, masked)])
    trt_plugins.register_plugins(name, ops=("query_lse", "context_influence"), masked=True)
    reg = {n: trtp.registry[f"topi::{n}"] for n in ("query_lse", "context_influence")}
    for n, entry in reg.items():  # the masked registration has every input of the ONNX schema, key_mask last
        assert entry["inputs"] == list(trt_plugins.PLUGINS[n]["inputs"])
    T = "FP32|FP16|BF16"
    assert reg["query_lse"]["autotune"](None, None, None, ()) == [(f"{T}, {T}, FP32, FP32", "LINEAR")]
    F = trtp.TensorDesc
    b, h, nx, s, nc, d = 2, 3, 50, 113, 45, 16
    q, k, v, m = F((b, h, nx, d), "HALF"), F((b, h, s, d), "HALF"), F((b, h, nc, d), "HALF"), F((b, s), "FLOAT")
    lse = reg["query_lse"]["register"](q, k, m)
    assert tuple(lse.shape_expr) == (b, h, nx) and lse.dtype == "FLOAT"
    out = reg["context_influence"]["register"](q, k, v, lse, m)
    assert tuple(out.shape_expr) == (b, nc) and out.dtype == "HALF"
    kname, ptx, launch, extra = reg["query_lse"]["aot_impl"](q, k, m, (lse,), 0)
    assert kname == b"_query_lse_masked_kernel" and _entry_params(ptx, kname) == 7 + 2  # Q K MASK, H NX S, LSE
    assert list(extra) == [h, nx, s] and (launch.grid_x, launch.grid_y) == (-(-nx // tk._AOT_LSE_TILES[0][0]), b * h)
    kname, ptx, launch, extra = reg["context_influence"]["aot_impl"](q, k, v, lse, m, (out,), 0)
    assert kname == b"_context_influence_kernel" and _entry_params(ptx, kname) == 10 + 2  # + MASK
    assert list(extra) == [h, nx, s, nc]
    # one process holds one registration: the unmasked plugins cannot be added next to the masked ones
    with pytest.raises(trt_plugins.PluginUnavailableError, match="new process"):
        trt_plugins.register_plugins(name, ops=("query_lse", "context_influence"))


def test_register_jit_and_subset_with_fake_tensorrt(fake_trt):
    name, trt, trtp = fake_trt
    trt_plugins.register_plugins(name, jit=True, ops=("token_gather",))
    assert set(trtp.registry) == {"topi::token_gather"}
    assert {"register", "autotune", "aot_impl", "impl"} <= set(trtp.registry["topi::token_gather"])
    with pytest.raises(ValueError, match="unknown topi plugins"):
        trt_plugins.register_plugins(name, ops=("nope",))


# ----------------------------------------------------------------------------- GPU only
@gpu
@needs_gpu
@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 128), (torch.float32, 64)])
def test_gpu_influence_flux_like(dtype, d):
    q, k, v = _inputs(1, 4, 300, 777, 250, d, dtype=dtype)
    oracle = reference.influence_score_materialized(q, k, v)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert _rel(tk.influence_score(q, k, v), oracle) < tol
    assert _rel(tk.influence_score_aot(q, k, v), oracle) < tol


def _cu_launch(name, ptx, launch, args):
    """Launch PTX the way TensorRT's AOT path does: given args, then null for Triton's hidden ones."""
    import ctypes
    cu = ctypes.CDLL("libcuda.so.1")
    mod, fn = ctypes.c_void_p(), ctypes.c_void_p()
    assert cu.cuModuleLoadData(ctypes.byref(mod), ctypes.c_char_p(ptx + b"\0")) == 0
    assert cu.cuModuleGetFunction(ctypes.byref(fn), mod, ctypes.c_char_p(name)) == 0
    vals = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int32(a) for a in args]
    vals += [ctypes.c_void_p(0), ctypes.c_void_p(0)]
    params = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(v) for v in vals])
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    rc = cu.cuLaunchKernel(fn, launch.grid_x, launch.grid_y, launch.grid_z, launch.block_x, launch.block_y,
                           launch.block_z, launch.shared_mem, stream, params, None)
    assert rc == 0, f"cuLaunchKernel failed: {rc}"
    torch.cuda.synchronize()
    cu.cuModuleUnload(mod)


@gpu
@needs_gpu
def test_gpu_aot_kernels_launch_like_tensorrt(fake_trt):
    name, trt, trtp = fake_trt
    trt_plugins.register_plugins(name)
    launches = _aot_launches(trtp)
    q, k, v = _inputs(2, 3, 50, 113, 45, 16, dtype=torch.float16)
    lse = torch.full((2, 3, 50), float("nan"), dtype=torch.float32, device="cuda")
    kname, ptx, launch, extra = launches["query_lse"]
    _cu_launch(kname, ptx, launch, [q, k, *extra, lse])
    assert (lse.double() - _lse_oracle(q, k)).abs().max().item() < 1e-4
    out = torch.empty(2, 45, dtype=torch.float16, device="cuda")
    kname, ptx, launch, extra = launches["context_influence"]
    _cu_launch(kname, ptx, launch, [q, k, v, lse, *extra, out])
    assert _rel(out, reference.influence_score_materialized(q, k, v)) < 2e-3
    x = torch.randn(2, 37, 600, device="cuda", dtype=torch.float16)
    idx = torch.tensor([0, 5, 36, 3, 3, 20, 11, 12, 13, 30, 1], device="cuda")
    y = torch.empty(2, 11, 600, device="cuda", dtype=torch.float16)
    kname, ptx, launch, extra = launches["token_gather"]
    _cu_launch(kname, ptx, launch, [x, idx, *extra, y])
    assert torch.equal(y, x[:, idx])


@gpu
@needs_gpu
def test_gpu_masked_aot_kernels_launch_like_tensorrt(fake_trt):
    name, trt, trtp = fake_trt
    trt_plugins.register_plugins(name, ops=("query_lse", "context_influence"), masked=True)
    F = trtp.TensorDesc
    b, h, nx, s, nc, d = 2, 3, 50, 113, 45, 16
    dq, dk, dv, dm = F((b, h, nx, d), "HALF"), F((b, h, s, d), "HALF"), F((b, h, nc, d), "HALF"), F((b, s), "FLOAT")
    reg = {n: trtp.registry[f"topi::{n}"] for n in ("query_lse", "context_influence")}
    dl = reg["query_lse"]["register"](dq, dk, dm)
    do = reg["context_influence"]["register"](dq, dk, dv, dl, dm)
    q, k, v = _inputs(b, h, nx, s, nc, d, dtype=torch.float16)
    mask = _key_mask(b, s, nc)
    lse = torch.full((b, h, nx), float("nan"), dtype=torch.float32, device="cuda")
    kname, ptx, launch, extra = reg["query_lse"]["aot_impl"](dq, dk, dm, (dl,), 0)
    _cu_launch(kname, ptx, launch, [q, k, mask, *extra, lse])
    out = torch.empty(b, nc, dtype=torch.float16, device="cuda")
    kname, ptx, launch, extra = reg["context_influence"]["aot_impl"](dq, dk, dv, dl, dm, (do,), 0)
    _cu_launch(kname, ptx, launch, [q, k, v, lse, mask, *extra, out])
    assert _rel(out, reference.influence_score_materialized(q, k, v, mask)) < 2e-3 and out[0, 2].item() == 0


class _FakeTrtTensor:
    """tensorrt.plugin.Tensor as the JIT impls see it: dtype, shape, element strides, data_ptr."""

    def __init__(self, t, dtype_name):
        self.t, self.dtype, self.shape, self.strides, self.data_ptr = t, dtype_name, tuple(t.shape), t.stride(), t.data_ptr()


@gpu
@needs_gpu
def test_gpu_jit_impls_with_fake_tensorrt(fake_trt):
    name, trt, trtp = fake_trt
    trt_plugins.register_plugins(name, jit=True)
    stream = torch.cuda.current_stream().cuda_stream
    q, k, v = _inputs(1, 2, 70, 150, 60, 64, dtype=torch.bfloat16)
    lse = torch.full((1, 2, 70), float("nan"), dtype=torch.float32, device="cuda")
    out = torch.full((1, 60), float("nan"), dtype=torch.bfloat16, device="cuda")
    names = {torch.bfloat16: "BF16", torch.float32: "FLOAT", torch.int64: "INT64"}
    T = lambda t: _FakeTrtTensor(t, names[t.dtype])  # noqa: E731
    trtp.registry["topi::query_lse"]["impl"](T(q), T(k), (T(lse),), stream)
    trtp.registry["topi::context_influence"]["impl"](T(q), T(k), T(v), T(lse), (T(out),), stream)
    torch.cuda.synchronize()
    assert _rel(out, reference.influence_score_materialized(q, k, v)) < 1e-2
    x = torch.randn(2, 37, 600, device="cuda", dtype=torch.bfloat16)
    idx = torch.tensor([0, 5, 36, 3, 3, 20], device="cuda")
    y = torch.empty(2, 6, 600, device="cuda", dtype=torch.bfloat16)
    trtp.registry["topi::token_gather"]["impl"](T(x), T(idx), (T(y),), stream)
    torch.cuda.synchronize()
    assert torch.equal(y, x[:, idx])


@gpu
@needs_gpu
def test_gpu_aot_compiles_all_dtypes():
    for dt in ("fp32", "fp16", "bf16"):
        for d in tk.SUPPORTED_HEAD_DIMS:
            for kern in ("query_lse", "context_influence"):
                assert tk.compile_aot(kern, dt, d)["shared"] <= tk.AOT_SHARED_LIMIT
        assert tk.compile_aot("token_gather", dt)["block_x"] > 0


# ----------------------------------------------------------------------------- bench script (pure Python parts)
def _bench_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_kernels_bench", ROOT / "scripts" / "gpu_kernels_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_script_helpers(tmp_path):
    bench = _bench_module()
    failures = []
    assert bench.check("a", 1e-6, 1e-5, failures)["ok"] and not failures
    assert not bench.check("b", 2e-2, 1e-2, failures)["ok"] and len(failures) == 1
    assert not bench.check("c", float("nan"), 1e-2, failures)["ok"] and len(failures) == 2
    assert bench.rel_err(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])) == 0.0
    table = bench.format_table([{"name": "fast", "ms": 1.0}, {"name": "slow", "ms": 4.0, "note": "x"}])
    assert "0.25x" in table and "slow" in table
    assert bench.FLUX["text"] + bench.FLUX["target"] + bench.FLUX["context"] == 8704
    q, k, v = _inputs(1, 2, 9, 20, 7, 16)
    assert _rel(bench.full_softmax_influence(q, k, v), reference.influence_score_materialized(q, k, v)) < 1e-5
    if not HAS_CUDA:
        assert bench.main(["--json", str(tmp_path / "r.json")]) == 2
