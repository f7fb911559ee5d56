"""TensorRT-RTX backend: the TensorRT package (``backends/tensorrt/``) with the ``tensorrt_rtx`` module. Builds
ahead of time, also on a machine without a GPU, for chosen compute capabilities (``--compute-capability``,
default: the GPU present, else SM89); the engines run on RTX-class GPUs (no Hopper). It has no Python plugin API,
so the ONNX parser inlines the topi function bodies."""
from __future__ import annotations

from topi_export.backends.base import Backend
from topi_export.backends.tensorrt.common import PRECISIONS

BACKEND = Backend("tensorrt-rtx", builds=True, precisions=PRECISIONS,
                  runs_on="RTX-class NVIDIA GPU (SM75-SM121, no Hopper)",
                  description="TensorRT-RTX engine, built ahead of time for chosen compute capabilities")


def check(precision: str, options: dict) -> None:
    """Before the export (minutes on a real model): the TensorRT module is installed."""
    from topi_export.backends.tensorrt.common import import_trt

    import_trt(BACKEND.name)


def build(job):
    from topi_export.backends.tensorrt.build import build as build_engines

    return build_engines(job, BACKEND.name)


def open_engine(manifest, **options):
    from topi_export.backends.tensorrt.runtime import open_engine as open_trt

    return open_trt(manifest, **options)
