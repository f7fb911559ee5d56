"""TensorRT plugins for the ``topi`` ops, via TensorRT's Python plugin API (``tensorrt.plugin``).

Importing this file needs neither TensorRT nor a GPU: all TensorRT imports happen in
``register_plugins``. After ``register_plugins()`` the ONNX parser imports a node whose op_type is
``query_lse`` / ``context_influence`` / ``token_gather`` with attribute ``plugin_namespace="topi"`` as the
plugin (version "1"). Each plugin's ``aot_impl`` returns ONE Triton kernel compiled to PTX, which TensorRT
serializes into the engine, so the engine runs under plain ``trtexec`` without Python. Influence is two
nodes (``topi_export/ops/onnx.py``): the log-sum-exps are a tensor between them, so no kernel recomputes them.

Key mask: ``query_lse`` and ``context_influence`` take an optional last input ``key_mask`` [B,S] float32 (their
ONNX schemas; a family with masked keys, Qwen-Image-Edit, passes it to every influence node). A TensorRT Python
plugin has a fixed input list and its version is always "1", so one process registers either the unmasked
plugins or the masked ones (``register_plugins(masked=True)``), as the graph being built needs.

No ``from __future__ import annotations`` here: tensorrt.plugin validates the real annotation
objects of the decorated functions.
"""
import importlib
from typing import List, Tuple, Union

from topi_export.errors import TopiError

PLUGIN_NAMESPACE = "topi"
PLUGIN_VERSION = "1"
_FLOATS = "FP32|FP16|BF16"

# What each plugin looks like from the outside, checkable without TensorRT. Shapes use the input
# names; "optional_inputs" are trailing inputs only the masked registration has; "output_dtype" is the input
# whose dtype the output takes, or a fixed TensorRT type; "io_types" / "masked_io_types" are the autotune type
# combinations over inputs then outputs ('|' options go together); "masked_aot_kernel" the kernel of the masked
# registration.
PLUGINS = {
    "query_lse": {
        "id": f"{PLUGIN_NAMESPACE}::query_lse",
        "name": "query_lse",
        "namespace": PLUGIN_NAMESPACE,
        "version": PLUGIN_VERSION,
        "inputs": ("q_target", "k", "key_mask"),
        "optional_inputs": ("key_mask",),
        "input_shapes": ("[B,H,Nx,D]", "[B,H,S,D]", "[B,S]"),
        "outputs": ("lse",),
        "output_shapes": ("[B,H,Nx]",),
        "output_dtype": "FP32",
        "attributes": {},
        "io_types": f"{_FLOATS}, {_FLOATS}, FP32",
        "masked_io_types": f"{_FLOATS}, {_FLOATS}, FP32, FP32",
        "formats": ("LINEAR",),
        "aot_kernel": "_query_lse_kernel",
        "masked_aot_kernel": "_query_lse_masked_kernel",
        "jit_kernels": ("_query_lse_kernel", "_query_lse_masked_kernel"),
    },
    "context_influence": {
        "id": f"{PLUGIN_NAMESPACE}::context_influence",
        "name": "context_influence",
        "namespace": PLUGIN_NAMESPACE,
        "version": PLUGIN_VERSION,
        "inputs": ("q_target", "k", "v_ctx", "lse", "key_mask"),
        "optional_inputs": ("key_mask",),
        "input_shapes": ("[B,H,Nx,D]", "[B,H,S,D]", "[B,H,Nc,D]", "[B,H,Nx]", "[B,S]"),
        "outputs": ("influence",),
        "output_shapes": ("[B,Nc]",),
        "output_dtype": "q_target",
        "attributes": {},
        "io_types": f"{_FLOATS}, {_FLOATS}, {_FLOATS}, FP32, {_FLOATS}",
        "masked_io_types": f"{_FLOATS}, {_FLOATS}, {_FLOATS}, FP32, FP32, {_FLOATS}",
        "formats": ("LINEAR",),
        "aot_kernel": "_context_influence_kernel",
        "masked_aot_kernel": "_context_influence_kernel",
        "jit_kernels": ("_colsum_kernel", "_head_sum_kernel"),
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
        "optional_inputs": (),
        "attributes": {},
        "io_types": f"{_FLOATS}, INT64, {_FLOATS}",
        "formats": ("LINEAR",),
        "aot_kernel": "_token_gather_kernel",
        "jit_kernels": ("_token_gather_kernel",),
    },
}


class PluginUnavailableError(TopiError):
    """The requested TensorRT flavour has no Python plugin API."""


_registered: dict = {}  # trt module name -> (jit, ops, masked) it was registered with


def register_plugins(trt_module_name: str = "tensorrt", jit: bool = False, ops=tuple(PLUGINS),
                     masked: bool = False) -> None:
    """Register the plugins named in ``ops`` with ``<trt_module_name>.plugin``; idempotent per module.

    jit=False registers only the AOT kernels (engines run without Python). jit=True also registers
    Python ``impl``s (Triton launches from the serving process; for context_influence the head-parallel
    two-launch kernels); with both present, the ONNX node attribute ``aot`` or the network flag
    PREFER_AOT_PYTHON_PLUGINS / PREFER_JIT_PYTHON_PLUGINS must choose, or TensorRT refuses to create
    the plugin. ops=("token_gather",) leaves influence to the inlined ONNX function bodies. masked=True
    registers query_lse and context_influence with their key_mask input (graphs whose influence nodes have it,
    ``topi_export.ops.onnx.graph_has_key_mask``).
    """
    key = (jit, tuple(sorted(ops)), bool(masked))
    if unknown := set(ops) - set(PLUGINS):
        raise ValueError(f"unknown topi plugins {sorted(unknown)}; known: {sorted(PLUGINS)}")
    if trt_module_name in _registered:
        if _registered[trt_module_name] != key:
            raise PluginUnavailableError(
                f"topi plugins already registered with {trt_module_name} as (jit, ops, masked)="
                f"{_registered[trt_module_name]}; TensorRT cannot re-register a plugin in the same process: build "
                f"this graph in a new process")
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
    AotResult = Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]

    def data_type(desc, plugin):
        if desc.dtype not in tl_name:
            raise TypeError(f"topi::{plugin}: unsupported dtype {desc.dtype}")
        return tl_name[desc.dtype]

    def head_dim(q, plugin):
        d = q.shape_expr[3]
        if not d.is_constant:
            raise ValueError(f"topi::{plugin}: the head dim must be a build-time constant")
        return d.constant_value()

    def launch(kern, grid, scalars):
        """Launch parameters and the kernel's int32 scalar arguments (in its parameter order)."""
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y = grid[0], grid[1]
        if len(grid) > 2:
            params.grid_z = grid[2]
        params.block_x = kern["block_x"]
        params.shared_mem = kern["shared"]
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in scalars])
        return kern["name"].encode(), kern["ptx"].encode(), params, extra

    registrations = dict(query_lse=_register_query_lse, context_influence=_register_context_influence,
                         token_gather=_register_gather)
    for op in ops:
        registrations[op](trt, trtp, tk, data_type, head_dim, launch, AotResult, masked)
    if jit:
        _register_jit(trt, trtp, tk, ops, masked)
    _registered[trt_module_name] = key


def _autotune_types(name, masked=False):
    return PLUGINS[name]["masked_io_types" if masked else "io_types"], PLUGINS[name]["formats"][0]


def _register_query_lse(trt, trtp, tk, data_type, head_dim, launch, AotResult, masked=False) -> None:
    pid = PLUGINS["query_lse"]["id"]

    def desc(q_target):
        shape = q_target.shape_expr
        return trtp.from_shape_expr((shape[0], shape[1], shape[2]), dtype=trt.float32)

    def aot(q_target, k):
        kern = tk.compile_aot("query_lse", data_type(q_target, "query_lse"), head_dim(q_target, "query_lse"),
                              masked=masked)
        b, h, nx = q_target.shape_expr[0], q_target.shape_expr[1], q_target.shape_expr[2]
        # one program per (query tile, b*h); scalars NX, S (masked: H, NX, S)
        scalars = ((h,) if masked else ()) + (nx, k.shape_expr[2])
        return launch(kern, (trtp.cdiv(nx, kern["BLOCK_M"]), b * h), scalars)

    if not masked:
        @trtp.register(pid)
        def query_lse_desc(q_target: trtp.TensorDesc, k: trtp.TensorDesc) -> trtp.TensorDesc:
            return desc(q_target)

        @trtp.autotune(pid)
        def query_lse_autotune(q_target: trtp.TensorDesc, k: trtp.TensorDesc,
                               outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
            return [trtp.AutoTuneCombination(*_autotune_types("query_lse"))]

        @trtp.aot_impl(pid)
        def query_lse_aot(q_target: trtp.TensorDesc, k: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc],
                          tactic: int) -> AotResult:
            return aot(q_target, k)
        return

    @trtp.register(pid)
    def query_lse_masked_desc(q_target: trtp.TensorDesc, k: trtp.TensorDesc,
                              key_mask: trtp.TensorDesc) -> trtp.TensorDesc:
        return desc(q_target)

    @trtp.autotune(pid)
    def query_lse_masked_autotune(q_target: trtp.TensorDesc, k: trtp.TensorDesc, key_mask: trtp.TensorDesc,
                                  outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(*_autotune_types("query_lse", masked=True))]

    @trtp.aot_impl(pid)
    def query_lse_masked_aot(q_target: trtp.TensorDesc, k: trtp.TensorDesc, key_mask: trtp.TensorDesc,
                             outputs: Tuple[trtp.TensorDesc], tactic: int) -> AotResult:
        return aot(q_target, k)


def _register_context_influence(trt, trtp, tk, data_type, head_dim, launch, AotResult, masked=False) -> None:
    pid = PLUGINS["context_influence"]["id"]

    def desc(q_target, v_ctx):
        return trtp.from_shape_expr((q_target.shape_expr[0], v_ctx.shape_expr[2]), dtype=q_target.dtype)

    def aot(q_target, k, v_ctx):
        kern = tk.compile_aot("context_influence", data_type(q_target, "context_influence"),
                              head_dim(q_target, "context_influence"), masked=masked)
        b, h, nx = q_target.shape_expr[0], q_target.shape_expr[1], q_target.shape_expr[2]
        s, nc = k.shape_expr[2], v_ctx.shape_expr[2]
        # one program per (context tile, b), looping over heads; scalars H, NX, S, NC
        return launch(kern, (trtp.cdiv(nc, kern["BLOCK_C"]), b), (h, nx, s, nc))

    if not masked:
        @trtp.register(pid)
        def context_influence_desc(q_target: trtp.TensorDesc, k: trtp.TensorDesc, v_ctx: trtp.TensorDesc,
                                   lse: trtp.TensorDesc) -> trtp.TensorDesc:
            return desc(q_target, v_ctx)

        @trtp.autotune(pid)
        def context_influence_autotune(q_target: trtp.TensorDesc, k: trtp.TensorDesc, v_ctx: trtp.TensorDesc,
                                       lse: trtp.TensorDesc,
                                       outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
            return [trtp.AutoTuneCombination(*_autotune_types("context_influence"))]

        @trtp.aot_impl(pid)
        def context_influence_aot(q_target: trtp.TensorDesc, k: trtp.TensorDesc, v_ctx: trtp.TensorDesc,
                                  lse: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc], tactic: int) -> AotResult:
            return aot(q_target, k, v_ctx)
        return

    @trtp.register(pid)
    def context_influence_masked_desc(q_target: trtp.TensorDesc, k: trtp.TensorDesc, v_ctx: trtp.TensorDesc,
                                      lse: trtp.TensorDesc, key_mask: trtp.TensorDesc) -> trtp.TensorDesc:
        return desc(q_target, v_ctx)

    @trtp.autotune(pid)
    def context_influence_masked_autotune(q_target: trtp.TensorDesc, k: trtp.TensorDesc, v_ctx: trtp.TensorDesc,
                                          lse: trtp.TensorDesc, key_mask: trtp.TensorDesc,
                                          outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(*_autotune_types("context_influence", masked=True))]

    @trtp.aot_impl(pid)
    def context_influence_masked_aot(q_target: trtp.TensorDesc, k: trtp.TensorDesc, v_ctx: trtp.TensorDesc,
                                     lse: trtp.TensorDesc, key_mask: trtp.TensorDesc,
                                     outputs: Tuple[trtp.TensorDesc], tactic: int) -> AotResult:
        return aot(q_target, k, v_ctx)


def _register_gather(trt, trtp, tk, data_type, head_dim, launch, AotResult, masked=False) -> None:
    pid = PLUGINS["token_gather"]["id"]

    @trtp.register(pid)
    def token_gather_desc(x: trtp.TensorDesc, keep_idx: trtp.TensorDesc) -> trtp.TensorDesc:
        return trtp.from_shape_expr((x.shape_expr[0], keep_idx.shape_expr[0], x.shape_expr[2]), dtype=x.dtype)

    @trtp.autotune(pid)
    def token_gather_autotune(x: trtp.TensorDesc, keep_idx: trtp.TensorDesc,
                              outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(*_autotune_types("token_gather"))]

    @trtp.aot_impl(pid)
    def token_gather_aot(x: trtp.TensorDesc, keep_idx: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc],
                         tactic: int) -> AotResult:
        kern = tk.compile_aot("token_gather", data_type(x, "token_gather"))
        b, n, c = x.shape_expr[0], x.shape_expr[1], x.shape_expr[2]
        kk = keep_idx.shape_expr[0]
        grid = (trtp.cdiv(c, kern["BLOCK_C"]), trtp.cdiv(kk, kern["BLOCK_K"]), b)
        return launch(kern, grid, (n, c, kk))  # N, C, KEEP


def _register_jit(trt, trtp, tk, ops, masked=False) -> None:
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

    if "query_lse" in ops and not masked:
        @trtp.impl(PLUGINS["query_lse"]["id"])
        def query_lse_impl(q_target: trtp.Tensor, k: trtp.Tensor, outputs: Tuple[trtp.Tensor], stream: int) -> None:
            with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
                tk.query_lse(as_torch(q_target), as_torch(k), out=as_torch(outputs[0]))

    if "query_lse" in ops and masked:
        @trtp.impl(PLUGINS["query_lse"]["id"])
        def query_lse_masked_impl(q_target: trtp.Tensor, k: trtp.Tensor, key_mask: trtp.Tensor,
                                  outputs: Tuple[trtp.Tensor], stream: int) -> None:
            with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
                tk.query_lse(as_torch(q_target), as_torch(k), as_torch(key_mask), out=as_torch(outputs[0]))

    if "context_influence" in ops and not masked:
        @trtp.impl(PLUGINS["context_influence"]["id"])
        def context_influence_impl(q_target: trtp.Tensor, k: trtp.Tensor, v_ctx: trtp.Tensor, lse: trtp.Tensor,
                                   outputs: Tuple[trtp.Tensor], stream: int) -> None:
            with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
                tk.context_influence(as_torch(q_target), as_torch(k), as_torch(v_ctx), as_torch(lse),
                                     out=as_torch(outputs[0]))

    if "context_influence" in ops and masked:
        @trtp.impl(PLUGINS["context_influence"]["id"])
        def context_influence_masked_impl(q_target: trtp.Tensor, k: trtp.Tensor, v_ctx: trtp.Tensor,
                                          lse: trtp.Tensor, key_mask: trtp.Tensor, outputs: Tuple[trtp.Tensor],
                                          stream: int) -> None:
            with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
                tk.context_influence(as_torch(q_target), as_torch(k), as_torch(v_ctx), as_torch(lse),
                                     as_torch(key_mask), out=as_torch(outputs[0]))

    if "token_gather" in ops:
        @trtp.impl(PLUGINS["token_gather"]["id"])
        def token_gather_impl(x: trtp.Tensor, keep_idx: trtp.Tensor, outputs: Tuple[trtp.Tensor],
                              stream: int) -> None:
            with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
                as_torch(outputs[0]).copy_(tk.token_gather(as_torch(x), as_torch(keep_idx)))
