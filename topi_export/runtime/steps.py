"""The one step runner (docs/design.md, "Runtime"): for every step the temporal controller (method/schedule.py)
plans, the engine call it takes and the record it leaves. The denoising loop (runtime/loop.py), the diffusers
drop-in (runtime/diffusers_transformer.py) and the Triton loop model (through the loop) all run steps here, so a
new step kind (or the pruning residual the anchors measure) is added in this one place."""
from __future__ import annotations

import time

import torch

from topi_export.method.reuse import extrapolate
from topi_export.method.schedule import KV_KINDS
from topi_export.plan.results import StepRecord

PRUNED_GRAPHS = ("pruned", "kv-pruned")  # graph calls that ran on the kept set


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
        # the engine's per-request state (the reference K/V cache) of each guidance branch: the drop-in runs the
        # branches as separate calls (each with its own cache); the loop batches them, so only branch 0 exists
        self.states = {}
        self.history = {}  # branch -> the last two computed (sigma, velocity), for reused steps
        self.residuals = {}  # branch -> the last anchor's (unpruned - pruned) velocity, before guidance

    def step(self, step: int, x: torch.Tensor, timestep: torch.Tensor, branch: int = 0):
        """(the step's velocity: guided when the runner has ``guide``, the step's record)."""
        plan = self.controller.plan(step)
        engine, info = self.engine, {}
        sigma = float(timestep.reshape(-1)[0])
        t0 = time.perf_counter()
        if plan.kind == "reuse":  # calls nothing: the reference K/V cache, if any, stays as it is
            history = self.history.get(branch)
            if not history:
                raise RuntimeError(f"step {step} reuses a velocity before any step was computed")
            velocity = extrapolate(history, sigma, self.controller.reuse.order)
            return velocity, StepRecord(
                step=step, kind="reuse", graph="none", keep=0, keep_per_reference=(0,) * len(self.layout.ref_grids),
                bucket=0.0, time_s=time.perf_counter() - t0, reuses=plan.reuses)
        engine.state = self.states.setdefault(branch, engine.state)
        if plan.kind in KV_KINDS:
            velocity, graph, info = self._kv_step(plan, x, timestep, branch)
        elif plan.kind == "dense":
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
        residual = self._residual(plan, x, timestep, branch, velocity)
        if graph in PRUNED_GRAPHS and branch in self.residuals:
            velocity = velocity + self.residuals[branch]
        if self.guide is not None:
            velocity = self.guide(velocity)
        if self.controller.reuse.enabled:
            self.history[branch] = (self.history.get(branch, [])[-1:] + [(sigma, velocity)])
        elapsed = time.perf_counter() - t0
        pruned = graph in PRUNED_GRAPHS
        record = StepRecord(
            step=step, kind=plan.kind, graph=graph, keep=plan.keep if pruned else self.layout.num_ctx,
            keep_per_reference=tuple(self.controller.keep_per_reference(plan.keep_idx if pruned else None)),
            bucket=plan.ratio if pruned else 0.0, time_s=elapsed, kept_influence=info.get("kept_influence"),
            selected_keep=info.get("selected_keep"),
            selected_per_reference=tuple(info["selected_per_reference"]) if info else None,
            residual=residual if plan.residual else None)
        return velocity, record

    # --- pruning residual (docs/design.md, "Pruning residual") -------------------------------------------------
    def _residual(self, plan, x, timestep, branch, velocity) -> bool:
        """At an anchor that plans it: run the kept set on the anchor's own input (the graph the next pruned steps
        run) and keep (unpruned - pruned) for them. False when there is nothing to correct (every token kept)."""
        if plan.step == plan.anchor:
            self.residuals.pop(branch, None)  # a residual is measured for its own anchor's kept set only
        keep = self.controller.keep_idx
        if not plan.residual or keep is None:
            return False
        if plan.kind in KV_KINDS:  # the cache now holds this step's reference K/V
            pruned, _ = self.engine.cached(x, timestep, keep)
        else:
            pruned = self.engine.pruned(x, timestep, keep)
        self.residuals[branch] = velocity - pruned
        return True

    # --- reference K/V cache steps (docs/design.md, "Reference K/V cache") -------------------------------------
    def _kv_step(self, plan, x, timestep, branch):
        """(velocity, the graph call that ran, the anchor's record fields) of a KV_KINDS step."""
        engine = self.engine
        if plan.kind in ("kv-pruned", "kv-full"):
            velocity, _ = engine.cached(x, timestep, plan.keep_idx)
            return velocity, "kv-pruned" if plan.keep_idx is not None else "kv-full", {}
        scores = self.controller.selector is not None and branch == 0  # the positive branch decides
        if plan.kind == "extract":
            velocity, influence = engine.extract(x, timestep, score=scores)
        else:  # kv-anchor: influence over the cached keys, nothing recomputed
            velocity, influence = engine.cached(x, timestep, None, score=scores)
        if not scores:
            return velocity, plan.kind if plan.kind == "extract" else "kv-full", {}
        info = self.controller.observe(plan.step, influence[0])
        self.kept[plan.step] = self.controller.kept[plan.step]
        return velocity, plan.kind, info
