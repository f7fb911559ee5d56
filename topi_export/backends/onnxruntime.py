"""ONNX Runtime backend: runs the portable graphs (``topi`` nodes run through their model-local function bodies,
which ONNX Runtime inlines). The build step only checks that the graphs load: ONNX Runtime optimizes a graph when
it opens it, and an offline-optimized copy would be a second copy of the weights on disk. The dense baseline
session is opened only when asked for, so a deployment holds the weights once in memory."""
from __future__ import annotations

import numpy as np
import torch

from topi_export.backends.base import Backend, BuildOutput, StepEngine
from topi_export.errors import TopiError

BACKEND = Backend("onnxruntime", builds=True, precisions=("fp32",), runs_on="CPU (CUDA with onnxruntime-gpu)",
                  description="ONNX Runtime, portable graphs with topi function bodies")


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


def session_options():
    ort = _ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.log_severity_level = 3
    so.add_session_config_entry("session.disable_prepacking", "1")  # prepacked copies would double the weights
    return so


def _session(path, prefer_gpu=True):
    ort = _ort()
    try:
        return ort.InferenceSession(str(path), session_options(), providers=providers(prefer_gpu))
    except Exception as exc:  # noqa: BLE001 - any load failure means a broken directory
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TopiError(f"ONNX Runtime cannot load {path} ({first}): rebuild the engine directory")


def build(job) -> BuildOutput:
    ort = _ort()
    for kind, graph in job.graphs.items():
        job.echo(f"  check that ONNX Runtime loads the {kind} graph")
        _session(job.onnx_dir / graph.file, prefer_gpu=False)
    target = {"execution_provider": "CPUExecutionProvider", "onnxruntime": ort.__version__,
              "optimization": "ORT_ENABLE_EXTENDED at session load"}
    return BuildOutput({kind: f"onnx/{g.file}" for kind, g in job.graphs.items()}, target,
                       versions={"onnxruntime": ort.__version__})


class OrtEngine(StepEngine):
    name = "onnxruntime"

    def __init__(self, manifest, prefer_gpu: bool = True):
        self.manifest, self.prefer_gpu = manifest, prefer_gpu
        self.has_dense = manifest.has_graph("dense")
        self.sessions = {"topi": _session(manifest.file(manifest.graphs["topi"].file), prefer_gpu)}

    def session(self, kind):
        if kind not in self.sessions:
            if kind not in self.manifest.graphs:
                raise TopiError(f"{self.manifest.root} has no {kind} graph: rebuild with --dense-baseline")
            self.sessions[kind] = _session(self.manifest.file(self.manifest.graphs[kind].file), self.prefer_gpu)
        return self.sessions[kind]

    def bind(self, cond, context, layout):
        super().bind(cond, context, layout)
        self.np_cond = {k: v.numpy() for k, v in cond.items()}
        self.np_context = self.context.numpy()

    def _call(self, kind, latents, timestep, keep_idx, score_idx):
        sess = self.session(kind)
        b = latents.shape[0]
        feed = {"latents": latents.float().numpy(), "context": np.ascontiguousarray(
                    np.broadcast_to(self.np_context, (b,) + self.np_context.shape[1:])),
                "timestep": timestep.float().numpy(), **self.np_cond}
        if keep_idx is not None:
            feed["keep_idx"], feed["score_idx"] = keep_idx.numpy(), score_idx.numpy()
        names = [i.name for i in sess.get_inputs()]
        missing = [n for n in names if n not in feed]
        if missing:
            raise TopiError(f"the {kind} graph needs inputs {missing} this request does not provide: the engine "
                            f"directory was built for another model family")
        out = sess.run(None, {n: feed[n] for n in names})
        return torch.from_numpy(out[0]), (torch.from_numpy(out[1]) if len(out) > 1 else None)


def open_engine(manifest, *, prefer_gpu=True, **_):
    return OrtEngine(manifest, prefer_gpu)
