"""TensorRT plugins for the ``topi`` ops, via TensorRT's Python plugin API (``tensorrt.plugin``).

Importing this file needs neither TensorRT nor a GPU: all TensorRT imports happen in
``register_plugins``. After ``register_plugins()`` the ONNX parser imports a node whose op_type is
``influence_score`` / ``token_gather`` with attribute ``plugin_namespace="topi"`` as the plugin
(version "1"). Each plugin's ``aot_impl`` returns a Triton kernel compiled to PTX, which TensorRT
serializes into the engine, so the engine runs under plain ``trtexec`` without Python.

No ``from __future__ import annotations`` here: tensorrt.plugin validates the real annotation
objects of the decorated functions.
"""
import importlib
from typing import List, Tuple, Union

from topi_export.errors import TopiError

PLUGIN_NAMESPACE = "topi"
PLUGIN_VERSION = "1"

# What each plugin looks like from the outside, checkable without TensorRT. Shapes use the input
# names; "types" lists the supported data dtypes (TensorRT names), shared by all float I/O.
PLUGINS = {
    "influence_score": {
        "id": f"{PLUGIN_NAMESPACE}::influence_score",
        "name": "influence_score",
        "namespace": PLUGIN_NAMESPACE,
        "version": PLUGIN_VERSION,
        "inputs": ("q_target", "k", "v_ctx"),
        "input_shapes": ("[B,H,Nx,D]", "[B,H,S,D]", "[B,H,Nc,D]"),
        "outputs": ("influence",),
        "output_shapes": ("[B,Nc]",),
        "output_dtype": "q_target",
        "attributes": {},
        "types": ("FP32", "FP16", "BF16"),
        "formats": ("LINEAR",),
        "aot_kernel": "_influence_fused_kernel",
        "jit_kernels": ("_lse_kernel", "_colsum_kernel", "_head_sum_kernel"),
    },
    "token_gather": {
        "id": f"{PLUGIN_NAMESPACE}::token_gather",
        "name": "token_gather",
        "namespace": PLUGIN_NAMESPACE,
        "version": PLUGIN_VERSION,
        "inputs": ("x", "keep_idx"),
        "input_shapes": ("[B,N,C]", "[K]"),
        "outputs": ("y",),
        "output_shapes": ("[B,K,C]",),
        "output_dtype": "x",
        "attributes": {},
        "types": ("FP32", "FP16", "BF16"),
        "index_type": "INT64",
        "formats": ("LINEAR",),
        "aot_kernel": "_token_gather_kernel",
        "jit_kernels": ("_token_gather_kernel",),
    },
}


class PluginUnavailableError(TopiError):
    """The requested TensorRT flavour has no Python plugin API."""


_registered: dict = {}  # trt module name -> (jit, ops) it was registered with


def register_plugins(trt_module_name: str = "tensorrt", jit: bool = False, ops=tuple(PLUGINS)) -> None:
    """Register the plugins named in ``ops`` with ``<trt_module_name>.plugin``; idempotent per module.

    jit=False registers only the AOT kernels (engines run without Python). jit=True also registers
    Python ``impl``s (for influence the two-pass kernels, 100-200x faster than the single-launch
    AOT kernel at FLUX 1024x1024 on an H200); with both present, the ONNX node attribute ``aot`` or the network flag
    PREFER_AOT_PYTHON_PLUGINS / PREFER_JIT_PYTHON_PLUGINS must choose, or TensorRT refuses to create
    the plugin. ops=("token_gather",) leaves influence_score to the inlined ONNX function body.
    """
    key = (jit, tuple(sorted(ops)))
    if unknown := set(ops) - set(PLUGINS):
        raise ValueError(f"unknown topi plugins {sorted(unknown)}; known: {sorted(PLUGINS)}")
    if trt_module_name in _registered:
        if _registered[trt_module_name] != key:
            raise PluginUnavailableError(
                f"topi plugins already registered with {trt_module_name} as (jit, ops)={_registered[trt_module_name]}; "
                "TensorRT cannot re-register a plugin in the same process")
        return
    try:
        trtp = importlib.import_module(f"{trt_module_name}.plugin")
    except ImportError as e:
        if trt_module_name == "tensorrt_rtx":
            raise PluginUnavailableError(
                "tensorrt_rtx.plugin does not exist (TensorRT-RTX 1.7.1 has no Python plugin API), so the topi "
                "plugins cannot be registered; build without them and the ONNX parser inlines the topi "
                f"function bodies ({e})") from e
        raise PluginUnavailableError(
            f"cannot import {trt_module_name}.plugin ({e}); the topi plugins need TensorRT >= 10.8 "
            "(Python plugins with aot_impl)") from e
    trt = importlib.import_module(trt_module_name)
    from . import triton_kernels as tk  # Triton is only needed once TensorRT is there

    tl_name = {trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16"}
    types = "|".join(PLUGINS["influence_score"]["types"])
    AotResult = Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]

    def data_type(desc, plugin):
        if desc.dtype not in tl_name:
            raise TypeError(f"topi::{plugin}: unsupported dtype {desc.dtype}")
        return tl_name[desc.dtype]

    if "influence_score" in ops:
        _register_influence(trtp, tk, data_type, types, AotResult)
    if "token_gather" in ops:
        _register_gather(trtp, tk, data_type, types, AotResult)
    if jit:
        _register_jit(trt, trtp, tk, ops)
    _registered[trt_module_name] = key


def _register_influence(trtp, tk, data_type, types, AotResult) -> None:
    @trtp.register(PLUGINS["influence_score"]["id"])
    def influence_score_desc(q_target: trtp.TensorDesc, k: trtp.TensorDesc, v_ctx: trtp.TensorDesc) -> trtp.TensorDesc:
        return trtp.from_shape_expr((q_target.shape_expr[0], v_ctx.shape_expr[2]), dtype=q_target.dtype)

    @trtp.autotune(PLUGINS["influence_score"]["id"])
    def influence_score_autotune(q_target: trtp.TensorDesc, k: trtp.TensorDesc, v_ctx: trtp.TensorDesc,
                                 outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(", ".join([types] * 4), "LINEAR")]

    @trtp.aot_impl(PLUGINS["influence_score"]["id"])
    def influence_score_aot(q_target: trtp.TensorDesc, k: trtp.TensorDesc, v_ctx: trtp.TensorDesc,
                            outputs: Tuple[trtp.TensorDesc], tactic: int) -> AotResult:
        d = q_target.shape_expr[3]
        if not d.is_constant:
            raise ValueError("topi::influence_score: the head dim must be a build-time constant")
        kern = tk.compile_aot("influence_score", data_type(q_target, "influence_score"), d.constant_value())
        b, h, nx = q_target.shape_expr[0], q_target.shape_expr[1], q_target.shape_expr[2]
        s, nc = k.shape_expr[2], v_ctx.shape_expr[2]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(nc, kern["BLOCK_C"])
        launch.grid_y = b
        launch.block_x = kern["block_x"]
        launch.shared_mem = kern["shared"]
        # order = the kernel's int32 parameters H, NX, S, NC
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in (h, nx, s, nc)])
        return kern["name"].encode(), kern["ptx"].encode(), launch, extra


def _register_gather(trtp, tk, data_type, types, AotResult) -> None:
    @trtp.register(PLUGINS["token_gather"]["id"])
    def token_gather_desc(x: trtp.TensorDesc, keep_idx: trtp.TensorDesc) -> trtp.TensorDesc:
        return trtp.from_shape_expr((x.shape_expr[0], keep_idx.shape_expr[0], x.shape_expr[2]), dtype=x.dtype)

    @trtp.autotune(PLUGINS["token_gather"]["id"])
    def token_gather_autotune(x: trtp.TensorDesc, keep_idx: trtp.TensorDesc,
                              outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(f"{types}, {PLUGINS['token_gather']['index_type']}, {types}", "LINEAR")]

    @trtp.aot_impl(PLUGINS["token_gather"]["id"])
    def token_gather_aot(x: trtp.TensorDesc, keep_idx: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc],
                         tactic: int) -> AotResult:
        kern = tk.compile_aot("token_gather", data_type(x, "token_gather"))
        b, n, c = x.shape_expr[0], x.shape_expr[1], x.shape_expr[2]
        kk = keep_idx.shape_expr[0]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(c, kern["BLOCK_C"])
        launch.grid_y = trtp.cdiv(kk, kern["BLOCK_K"])
        launch.grid_z = b
        launch.block_x = kern["block_x"]
        launch.shared_mem = kern["shared"]
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in (n, c, kk)])  # N, C, KEEP
        return kern["name"].encode(), kern["ptx"].encode(), launch, extra


def _register_jit(trt, trtp, tk, ops) -> None:
    """Python run-time impls (need torch + triton in the serving process)."""
    import torch

    torch_dtype = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                   trt.int64: torch.int64}

    def as_torch(t) -> torch.Tensor:
        # tensorrt.plugin.Tensor's __cuda_array_interface__ refuses bf16: describe the same buffer as
        # int16 and reinterpret it.
        dtype = torch_dtype[t.dtype]
        raw = torch.int16 if dtype == torch.bfloat16 else dtype
        size = torch.empty((), dtype=raw).element_size()

        class View:
            __cuda_array_interface__ = {
                "shape": tuple(t.shape), "typestr": {torch.int16: "<i2", torch.float16: "<f2", torch.float32: "<f4",
                                                     torch.int64: "<i8"}[raw],
                "data": (t.data_ptr, False), "strides": tuple(s * size for s in t.strides), "version": 3}
        return torch.as_tensor(View(), device="cuda").view(dtype)

    if "influence_score" in ops:
        @trtp.impl(PLUGINS["influence_score"]["id"])
        def influence_score_impl(q_target: trtp.Tensor, k: trtp.Tensor, v_ctx: trtp.Tensor,
                                 outputs: Tuple[trtp.Tensor], stream: int) -> None:
            with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
                as_torch(outputs[0]).copy_(tk.influence_score(as_torch(q_target), as_torch(k), as_torch(v_ctx)))

    if "token_gather" in ops:
        @trtp.impl(PLUGINS["token_gather"]["id"])
        def token_gather_impl(x: trtp.Tensor, keep_idx: trtp.Tensor, outputs: Tuple[trtp.Tensor],
                              stream: int) -> None:
            with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
                as_torch(outputs[0]).copy_(tk.token_gather(as_torch(x), as_torch(keep_idx)))
