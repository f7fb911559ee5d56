"""ONNX Runtime backend: runs the portable graphs (``topi`` nodes run through their model-local function bodies,
which ONNX Runtime inlines). The build step only checks that the graphs load: ONNX Runtime optimizes a graph when
it opens it, and an offline-optimized copy would be a second copy of the weights on disk. The dense baseline
session is opened only when asked for, so a deployment holds the weights once in memory."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from topi_export.backends.base import Backend, BuildOutput, Options, StepEngine
from topi_export.errors import BackendUnavailable, RebuildNeeded


@dataclass(frozen=True)
class OrtOptions(Options):
    """ONNX Runtime builds take no options (graphs are optimized when a session opens them)."""


BACKEND = Backend("onnxruntime", builds=True, precisions=("fp32",), runs_on="CPU (CUDA with onnxruntime-gpu)",
                  description="ONNX Runtime, portable graphs with topi function bodies",
                  dense_by_default=True,  # the dense graph reads the same weights file: free on disk
                  triton_platform="onnxruntime_onnx", triton_model_file="model.onnx", options=OrtOptions)
NUMPY = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


def _ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailable("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)")
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


def load_session(path, prefer_gpu=True):
    ort = _ort()
    try:
        return ort.InferenceSession(str(path), session_options(), providers=providers(prefer_gpu))
    except Exception as exc:  # noqa: BLE001 - any load failure means a broken directory
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RebuildNeeded(f"ONNX Runtime cannot load {path} ({first}): rebuild the engine directory")


def build(job) -> BuildOutput:
    ort = _ort()
    for kind, graph in job.graphs.items():
        job.echo(f"  check that ONNX Runtime loads the {kind} graph")
        load_session(job.onnx_dir / graph.file, prefer_gpu=False)
    target = {"execution_provider": "CPUExecutionProvider", "onnxruntime": ort.__version__,
              "optimization": "ORT_ENABLE_EXTENDED at session load"}
    return BuildOutput({kind: f"onnx/{g.file}" for kind, g in job.graphs.items()}, target,
                       versions={"onnxruntime": ort.__version__})


def refit(job) -> list[str]:
    """New weights beside the same graphs: the graph files stay byte for byte; their weights file is rewritten
    where the new parameters differ (export/weights_map.py)."""
    return refit_onnx_weights(job)


def refit_onnx_weights(job) -> list[str]:
    from topi_export.export.weights_map import new_values, write_weights

    m = job.manifest
    graph_files = [g.onnx or g.file for g in m.graphs.values()]
    values = new_values(job.slots, job.changed, job.new, m.precision, graph_files)
    written = write_weights(m.root, job.out_dir, values)
    job.echo(f"  {len(values)} initializer(s) rewritten in {', '.join(written) or 'no file'}; graphs unchanged")
    return written


class OrtEngine(StepEngine):
    name = "onnxruntime"

    def __init__(self, manifest, prefer_gpu: bool = True):
        super().__init__(manifest.graphs)
        self.manifest, self.prefer_gpu = manifest, prefer_gpu
        self.has_dense = manifest.has_graph("dense")
        self.sessions = {}
        self.session("topi")

    def session(self, kind):
        if kind not in self.sessions:
            self.sessions[kind] = load_session(self.manifest.file(self.manifest.graphs[kind].file), self.prefer_gpu)
            self.manifest.check_unchanged()  # what ONNX Runtime read is what was verified
        return self.sessions[kind]

    def to_backend(self, tensor, spec):
        return np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=NUMPY.get(spec.dtype, np.float32))

    def run(self, kind, step, feed):
        out = self.session(kind).run([t.name for t in self.graphs[kind].outputs], feed)
        return {t.name: torch.from_numpy(v) for t, v in zip(self.graphs[kind].outputs, out)}


def open_engine(source):
    return OrtEngine(source.manifest, source.options.get("prefer_gpu", True))
