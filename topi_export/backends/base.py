"""The backend contract (docs/design.md, "Backends"): every backend module exposes

    BACKEND: Backend                         what it is and what it supports
    build(job: BuildJob) -> BuildOutput      engines from the exported ONNX graphs (backends that build)
    open_engine(manifest, **options)         a StepEngine over an engine directory's verified manifest
    check(precision, options)                (optional) refuse early what build would refuse after the export

A StepEngine runs the steps the temporal controller plans (method/schedule.py); it is generic over model
families: the family's conditioning tensors arrive by name (``bind``) and are fed to the graph inputs of the same
name. Backends import the plan objects and the export layer below them, never the runtime above."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class Backend:
    name: str
    builds: bool  # has a build step (torch runs the model directly)
    precisions: tuple[str, ...]
    runs_on: str  # where its engines execute
    description: str


@dataclass(frozen=True)
class BuildJob:
    """What a backend build receives: the exported graphs and everything the profiles depend on."""

    onnx_dir: Path  # topi.onnx (+ dense.onnx) + weights.data
    out_dir: Path  # the staging engine directory
    graphs: dict  # kind -> plan.GraphEntry of the exported ONNX graphs
    layouts: tuple  # plan.Layout per built resolution
    profiles: tuple  # plan.Profile table (layouts x (anchor + buckets))
    batch: int
    precision: str
    options: dict = field(default_factory=dict)
    echo: object = print


@dataclass(frozen=True)
class BuildOutput:
    graphs: dict  # kind -> relative file the runtime loads
    target: dict  # where the engines run (execution provider, GPU, compute capabilities, versions)
    keep_onnx: bool = True  # whether the portable ONNX graphs stay in the engine directory
    versions: dict = field(default_factory=dict)


class StepEngine:
    """Shared step logic of every backend: ``_call(kind, latents, timestep, keep_idx, score_idx)`` is all a
    backend implements. ``bind`` fixes one request's conditioning (batch B) and its context latents [1, Nc, C]."""

    name = "engine"
    has_dense = False
    # torch threads for the loop's host-side work (scheduler, guidance) while this engine runs the model: 1, because
    # torch's OpenMP pool spinning beside the runtime's own threads made the ONNX Runtime ToPi loop 5-9% slower on a
    # 2-core CPU (docs/benchmarks.md, section 4). None keeps torch's setting (the torch backend computes on them).
    host_threads: int | None = 1

    def bind(self, cond: dict, context: torch.Tensor, layout) -> None:
        self.cond, self.layout = cond, layout
        self.context = context.float()
        self.all_idx = torch.arange(layout.num_ctx, dtype=torch.int64)
        self.all_queries = torch.arange(layout.num_target, dtype=torch.int64)
        self.one_query = torch.zeros(1, dtype=torch.int64)

    def anchor(self, latents, timestep):
        """Velocity [B, Nx, C] and influence [B, Nc] over the full sequence."""
        return self._call("topi", latents, timestep, self.all_idx, self.all_queries)

    def full(self, latents, timestep):
        """The unpruned velocity from the ToPi graph (every context token, influence not scored)."""
        return self._call("topi", latents, timestep, self.all_idx, self.one_query)[0]

    def pruned(self, latents, timestep, keep_idx):
        """Velocity with only the kept context tokens (sorted int64 indices) from layer L0 on."""
        keep_idx = torch.as_tensor(keep_idx, dtype=torch.int64)
        return self._call("topi", latents, timestep, keep_idx, self.one_query)[0]

    def dense(self, latents, timestep):
        """The plain model (the dense baseline graph)."""
        return self._call("dense", latents, timestep, None, None)[0]

    def _call(self, kind, latents, timestep, keep_idx, score_idx):
        raise NotImplementedError
