"""Backend registry: one module per backend (backends/base.py contract), imported only when asked for.
Adding a backend = one module + one line here."""
from __future__ import annotations

import importlib

from topi_export.errors import BadInput

BACKEND_MODULES = {
    "torch": "topi_export.backends.torch",
    "onnxruntime": "topi_export.backends.onnxruntime",
    "tensorrt": "topi_export.backends.tensorrt",
    "tensorrt-rtx": "topi_export.backends.tensorrt_rtx",
}
BACKENDS = tuple(BACKEND_MODULES)
DEFAULT_BUILD_BACKEND = "onnxruntime"  # runs anywhere, holds the weights once, and its dense baseline is free


def get_backend(name: str):
    """The backend module (with BACKEND, build, open_engine)."""
    if name not in BACKEND_MODULES:
        raise BadInput(f"unknown backend {name!r}: choose one of {', '.join(BACKEND_MODULES)}")
    return importlib.import_module(BACKEND_MODULES[name])


def model_backend() -> str:
    """The backend that runs a model itself (no engine directory): the reference and the default without one."""
    return next(n for n in BACKEND_MODULES if not get_backend(n).BACKEND.builds)


def build_backends() -> list[str]:
    """Backends with a build step (an engine directory)."""
    return [n for n in BACKEND_MODULES if get_backend(n).BACKEND.builds]


def options_for(name: str, given: dict):
    """The backend's typed build options from the build command's flags. ``given``: field name -> value of every
    backend flag the user set; a flag the backend does not own is refused (it would be silently ignored)."""
    from topi_export.errors import BadInput

    if name not in build_backends():
        raise BadInput(f"unknown build backend {name!r}: choose {', '.join(build_backends())}")
    cls = get_backend(name).BACKEND.options
    owned = cls.flags() if cls is not None else {}
    foreign = [f for f in given if f not in owned]
    if foreign:
        flags = {}
        for other in build_backends():
            o = get_backend(other).BACKEND.options
            for f, flag in (o.flags() if o is not None else {}).items():
                flags.setdefault(f, (flag, []))[1].append(other)
        f = foreign[0]
        flag, users = flags.get(f, (f, []))
        raise BadInput(f"{flag} is an option of --backend {' / '.join(users) or '?'}, not {name}: drop it or choose "
                       f"that backend")
    return cls(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in given.items()}) if cls else None
