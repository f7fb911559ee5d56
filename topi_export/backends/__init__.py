"""Step engines, one module per backend; heavy backends are imported only when asked for."""
from __future__ import annotations


BACKENDS = ("torch", "onnxruntime", "tensorrt", "tensorrt-rtx")
