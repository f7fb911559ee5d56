"""Step engines, one module per backend; heavy backends are imported only when asked for."""
from __future__ import annotations

from topi_export.errors import TopiError

BACKENDS = ("torch", "onnxruntime", "tensorrt", "tensorrt-rtx")
