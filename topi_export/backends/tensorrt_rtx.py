"""TensorRT-RTX backend: the TensorRT package (``backends/tensorrt/``) with the ``tensorrt_rtx`` module. Builds
ahead of time, also on a machine without a GPU, for chosen compute capabilities (``--compute-capability``,
default: the GPU present, else SM89); the engines run on RTX-class GPUs (no Hopper). It has no Python plugin API,
so the ONNX parser inlines the topi function bodies."""
from __future__ import annotations

from topi_export.backends import tensorrt as trt
from topi_export.backends.base import Backend
from topi_export.backends.tensorrt.common import PRECISIONS, TensorRTRTXOptions

# Triton's TensorRT backend loads data-center TensorRT plans, not TensorRT-RTX engines: no Triton platform.
BACKEND = Backend("tensorrt-rtx", builds=True, precisions=PRECISIONS,
                  runs_on="RTX-class NVIDIA GPU (SM75-SM121, no Hopper)",
                  description="TensorRT-RTX engine, built ahead of time for chosen compute capabilities",
                  options=TensorRTRTXOptions)


def check(options) -> None:
    trt.check(options, BACKEND.name)


def build(job):
    return trt.build(job, BACKEND.name)


def refit(job):
    return trt.refit(job, BACKEND.name)


open_engine = trt.open_engine
