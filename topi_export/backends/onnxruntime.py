"""ONNX Runtime backend: builds ORT-optimized copies of the portable graphs and runs them per step.
The ``topi`` nodes run through their model-local function bodies (ORT inlines them)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from topi_export.errors import TopiError
from topi_export.runtime.engine import static_feed


def _ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise TopiError("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)")
    return ort


def providers(prefer_gpu: bool = True) -> list[str]:
    available = _ort().get_available_providers()
    if prefer_gpu and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def build(onnx_dir: Path, out_dir: Path, options: dict, progress=None) -> dict:
    """Write <graph>.ort.onnx optimized for the CPU EP; returns the manifest's graphs/target entries."""
    ort = _ort()
    graphs = {}
    for kind in ("anchor", "pruned"):
        if progress:
            progress(f"optimize {kind} graph for ONNX Runtime")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(out_dir / f"{kind}.ort.onnx")
        if (onnx_dir / f"{kind}.onnx.data").exists():  # > 2 GB graph: the optimized copy needs its own data file
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                        f"{kind}.ort.onnx.data")
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(onnx_dir / f"{kind}.onnx"), so, providers=["CPUExecutionProvider"])
        graphs[kind] = {"file": f"{kind}.ort.onnx", "onnx": f"onnx/{kind}.onnx"}
    target = {"execution_provider": "CPUExecutionProvider", "onnxruntime": ort.__version__,
              "optimization": "ORT_ENABLE_EXTENDED"}
    return {"graphs": graphs, "target": target, "precision": "fp32"}


class OrtEngine:
    name = "onnxruntime"

    def __init__(self, manifest, prefer_gpu: bool = True):
        ort = _ort()
        self.manifest = manifest
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # optimized at build time
        so.log_severity_level = 3
        provs = providers(prefer_gpu)
        self.sessions = {}
        for kind in ("anchor", "pruned"):
            try:
                self.sessions[kind] = ort.InferenceSession(str(manifest.graph_file(kind)), so, providers=provs)
            except Exception as exc:
                raise TopiError(f"ONNX Runtime cannot load {manifest.graph_file(kind)} ({str(exc).splitlines()[0]}): "
                                f"rebuild the engine directory")
        self.input_names = {k: {i.name for i in s.get_inputs()} for k, s in self.sessions.items()}

    def bind(self, inputs) -> None:
        self.reference, self.static, self.all_idx = static_feed(inputs)

    def _feed(self, kind, latents, timestep, keep_idx=None):
        feed = {"hidden_states": np.concatenate([latents.numpy().astype(np.float32), self.reference], axis=1),
                "timestep": timestep.numpy().astype(np.float32), **self.static}
        if keep_idx is not None:
            feed["keep_idx"] = keep_idx
        return {k: v for k, v in feed.items() if k in self.input_names[kind]}

    def full(self, latents, timestep):
        return self.pruned(latents, timestep, self.all_idx)

    def anchor(self, latents, timestep):
        velocity, influence = self.sessions["anchor"].run(None, self._feed("anchor", latents, timestep))
        return torch.from_numpy(velocity), torch.from_numpy(influence)[0]

    def pruned(self, latents, timestep, keep_idx):
        idx = keep_idx.numpy().astype(np.int64) if isinstance(keep_idx, torch.Tensor) else keep_idx
        (velocity,) = self.sessions["pruned"].run(None, self._feed("pruned", latents, timestep, idx))
        return torch.from_numpy(velocity)
