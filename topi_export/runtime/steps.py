"""The one step runner (docs/design.md, "Runtime"): for every step the temporal controller (method/schedule.py)
plans, the engine call it takes and the record it leaves. The denoising loop (runtime/loop.py), the diffusers
drop-in (runtime/diffusers_transformer.py) and the Triton loop model (through the loop) all run steps here, so a
new step kind is added in this one place."""
from __future__ import annotations

import time

import torch

from topi_export.method.reuse import extrapolate
from topi_export.plan.results import StepRecord


class StepRunner:
    """Runs one request's steps on a bound engine.

    ``branch``: the guidance branch a call computes. The loop runs every branch in one batched call (branch 0 is
    the batch's first row) and passes ``guide`` (the family's combination of branches), so the velocity a reused
    step takes is the guided one; the diffusers drop-in sees the pipeline's branches as separate calls (no
    ``guide``: the pipeline combines them): only branch 0's anchor scores influence and chooses the kept set, the
    other branches run the same plan without scoring, and each branch reuses its own velocities."""

    def __init__(self, engine, controller, layout, guide=None):
        self.engine, self.controller, self.layout, self.guide = engine, controller, layout, guide
        self.kept = {}  # anchor step -> kept context indices (None = all)
        self.history = {}  # branch -> the last two computed (sigma, velocity), for reused steps

    def step(self, step: int, x: torch.Tensor, timestep: torch.Tensor, branch: int = 0):
        """(the step's velocity: guided when the runner has ``guide``, the step's record)."""
        plan = self.controller.plan(step)
        engine, info = self.engine, {}
        sigma = float(timestep.reshape(-1)[0])
        t0 = time.perf_counter()
        if plan.kind == "reuse":
            history = self.history.get(branch)
            if not history:
                raise RuntimeError(f"step {step} reuses a velocity before any step was computed")
            velocity = extrapolate(history, sigma, self.controller.reuse.order)
            return velocity, StepRecord(
                step=step, kind="reuse", graph="none", keep=0, keep_per_reference=(0,) * len(self.layout.ref_grids),
                bucket=0.0, time_s=time.perf_counter() - t0, reuses=plan.reuses)
        if plan.kind == "dense":
            velocity, graph = engine.dense(x, timestep), "dense"
        elif plan.kind == "anchor" and branch == 0:
            velocity, influence = engine.anchor(x, timestep)
            info = self.controller.observe(step, influence[0])  # the positive branch decides
            self.kept[step] = self.controller.kept[step]
            graph = "anchor"
        elif plan.kind in ("anchor", "full") or plan.keep_idx is None:
            velocity, graph = engine.full(x, timestep), "full"
        else:
            velocity, graph = engine.pruned(x, timestep, plan.keep_idx), "pruned"
        if self.guide is not None:
            velocity = self.guide(velocity)
        if self.controller.reuse.enabled:
            self.history[branch] = (self.history.get(branch, [])[-1:] + [(sigma, velocity)])
        elapsed = time.perf_counter() - t0
        pruned = graph == "pruned"
        record = StepRecord(
            step=step, kind=plan.kind, graph=graph, keep=plan.keep if pruned else self.layout.num_ctx,
            keep_per_reference=tuple(self.controller.keep_per_reference(plan.keep_idx if pruned else None)),
            bucket=plan.ratio if pruned else 0.0, time_s=elapsed, kept_influence=info.get("kept_influence"),
            selected_keep=info.get("selected_keep"),
            selected_per_reference=tuple(info["selected_per_reference"]) if info else None)
        return velocity, record
