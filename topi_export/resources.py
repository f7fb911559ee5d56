"""Files shipped inside the package (trained models, calibration profiles, kernels, the Triton model template),
found through ``importlib.resources`` so that a wheel install finds exactly what a checkout does."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def resource(*parts: str) -> Path:
    """A file or folder of the installed ``topi_export`` package (pip always installs packages unpacked)."""
    return Path(str(files("topi_export").joinpath(*parts)))
