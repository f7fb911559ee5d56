"""TensorRT and TensorRT-RTX backends: one builder and one runtime for both (DESIGN §3).

``tensorrt`` (data-center TensorRT 10.x/11.x) and ``tensorrt_rtx`` (TensorRT for RTX) expose the same Python
API for everything used here; the module is imported by name and only the TensorRT-RTX ahead-of-time
compute-capability targets differ.

Build: the portable ONNX graphs are parsed with the ``OnnxParser`` (``topi`` nodes become plugins when the
plugins are registered, otherwise the parser inlines their model-local function bodies), then

- ``anchor.engine``: one optimization profile at the build shape;
- ``pruned.engine``: one optimization profile per ratio bucket, ``keep_idx`` length = the bucket's keep count
  (min = opt = max), every other input fixed to the build shape. Profile i <-> bucket i (ascending ratios).

Precision: every network is created strongly typed. TensorRT 11 and TensorRT-RTX have no FP16/BF16 builder
flags (weak typing was deprecated in TensorRT 10.12 and removed in 11; TensorRT-RTX never had it), and
NVIDIA's documented replacement is to put the precision into the ONNX graph (ModelOpt AutoCast) and build
strongly typed. ``autocast_onnx`` below is a small built-in pass of that kind, so fp16/bf16 builds work the
same on every member of the family without an extra dependency: I/O stays fp32, matrix products run in
the low precision, numerically sensitive ops (normalisations, softmax, reductions, pow/sqrt/exp, sin/cos
of RoPE and the timestep embedding) and the ``topi`` ops run in fp32, other ops follow their inputs.

Runtime: ``TensorRTEngine`` deserialises both engines, one execution context each sharing one device
memory block, switches the pruned profile per step with ``set_optimization_profile_async``, binds torch
CUDA tensors with ``set_tensor_address`` and runs ``execute_async_v3`` on a torch CUDA stream; with
``TOPI_TRT_CUDA_GRAPHS=1`` each (engine, profile) is captured once into a CUDA graph (shapes are static per
profile, so replaying is legal) and replayed.
"""
from topi_export.backends.tensorrt.build import build  # noqa: F401
from topi_export.backends.tensorrt.common import (  # noqa: F401
    DEFAULT_RTX_TARGET, GRAPH_KINDS, KEEP_INPUT, MODULES, PRECISIONS, check_target, import_trt, module_name,
    normalize_compute_capability, onnx_input_shapes, parse_workspace, profile_table, running_target, sm_name)
from topi_export.backends.tensorrt.runtime import TensorRTEngine  # noqa: F401
from topi_export.export.precision import autocast_onnx  # noqa: F401
