"""Versions of the tools an artifact was made with (manifests, ONNX caches, calibration profiles)."""
from __future__ import annotations

import sys

PACKAGES = ("topi-export", "torch", "diffusers", "onnx", "onnxscript", "onnxruntime")


def tool_versions(extra: dict | None = None, packages=PACKAGES) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    out["python"] = sys.version.split()[0]
    out.update(extra or {})
    return out
