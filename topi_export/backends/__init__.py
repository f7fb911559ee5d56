"""Backend registry: one module per backend (backends/base.py contract), imported only when asked for.
Adding a backend = one module + one line here."""
from __future__ import annotations

import importlib

from topi_export.errors import TopiError

BACKEND_MODULES = {
    "torch": "topi_export.backends.torch",
    "onnxruntime": "topi_export.backends.onnxruntime",
    "tensorrt": "topi_export.backends.tensorrt",
    "tensorrt-rtx": "topi_export.backends.tensorrt_rtx",
}
BACKENDS = tuple(BACKEND_MODULES)


def get_backend(name: str):
    """The backend module (with BACKEND, build, open_engine)."""
    if name not in BACKEND_MODULES:
        raise TopiError(f"unknown backend {name!r}: choose one of {', '.join(BACKEND_MODULES)}")
    return importlib.import_module(BACKEND_MODULES[name])


def build_backends() -> list[str]:
    return [n for n in BACKEND_MODULES if n != "torch"]
