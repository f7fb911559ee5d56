"""TensorRT backend (docs/design.md, "Backends"), and the package shared with TensorRT-RTX
(``backends/tensorrt_rtx.py``): the Python modules ``tensorrt`` and ``tensorrt_rtx`` have the same API for
everything used here; only TensorRT-RTX's ahead-of-time compute-capability targets differ.

Build (``building.py``): the exported ``topi`` graph is parsed once (strongly typed: the graph carries the build
precision) into ONE engine, ``topi.engine``, with an optimization profile per (layout, anchor) and per
(layout, bucket), profile i = manifest profile i; the optional ``dense`` graph becomes ``dense.engine`` with one
profile per layout. The engine holds the weights and the ONNX graphs are dropped, or with ``strip_weights`` the
engines are weight-stripped and refitted at load from the ONNX weights the directory keeps.

Runtime (``runtime.py``): ``TensorRTEngine`` picks the profile per call from the request's layout and keep count
and runs ``execute_async_v3`` on a torch CUDA stream, optionally replaying CUDA graphs.

Neither module is imported here: the CLI works without TensorRT installed."""
from __future__ import annotations

from topi_export.backends.base import Backend
from topi_export.backends.tensorrt.common import (  # noqa: F401  (the package's API)
    PRECISIONS, TensorRTOptions, check_target, import_trt, normalize_compute_capability, parse_workspace,
    polygraphy, profile_shapes, running_target, sm_name)

BACKEND = Backend("tensorrt", builds=True, precisions=PRECISIONS, runs_on="data-center / Jetson NVIDIA GPU "
                  "(the GPU it was built on)", description="TensorRT engine: one engine, a profile per shape and "
                  "bucket, built on the target GPU", triton_platform="tensorrt_plan", triton_model_file="model.plan",
                  options=TensorRTOptions)


def check(options, name: str = "tensorrt") -> None:
    """Before the export (minutes on a real model): the TensorRT module is installed; the workspace parses."""
    parse_workspace(options.workspace if options is not None else None)
    import_trt(name)
    polygraphy(name)


def build(job, name: str = "tensorrt"):
    from topi_export.backends.tensorrt.building import build as build_engines

    return build_engines(job, name)


def refit(job, name: str = "tensorrt"):
    from topi_export.backends.tensorrt.refitting import refit as refit_engines

    return refit_engines(job, name)


def open_engine(source):
    from topi_export.backends.tensorrt.runtime import open_engine as open_trt

    return open_trt(source)
