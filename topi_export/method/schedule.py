"""The temporal controller (docs/design.md, "The method" and "Runtime"): the one place that decides, for every denoising
step, whether it is an anchor (full sequence, re-score influence, choose the kept set), a pruned step (the latest
kept set, at its bucket) or a reused step (no transformer call: the velocity of the last computed steps, by the
run's reuse plan, method/reuse.py). The denoising loop, the diffusers drop-ins and the Triton loop model all use
it; backends only execute the steps it plans."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from topi_export.errors import TopiError
from topi_export.plan.limits import check_steps, check_update_interval
from topi_export.plan.reuse import OFF, ReusePlan


# --- reference K/V cache (docs/design.md, "Reference K/V cache") ---------------------------------------------
# ref_kv modes: "exact" (a KV-trained model: step 0 extracts the references' K/V, every later step is cached) and
# "reuse" (approximate, any model: every anchor extracts, the steps between reuse what it recorded).
REF_KV_MODES = ("exact", "reuse")
# extract: the full sequence, recording the references' K/V (and, with a selector, scoring influence: an anchor);
# kv-anchor: a cached step scoring influence over the cached keys (an exact model's later anchors);
# kv-pruned: a cached step attending from L0 on to the kept set's K/V; kv-full: to every cached K/V.
KV_KINDS = ("extract", "kv-anchor", "kv-pruned", "kv-full")


def check_ref_kv(mode):
    if mode is not None and mode not in REF_KV_MODES:
        raise TopiError(f"reference K/V mode {mode!r}: choose {' or '.join(REF_KV_MODES)}")
    return mode
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepPlan:
    step: int
    kind: str  # "anchor" | "pruned" | "full" (unpruned, through the topi graph) | "dense" (the plain model) | "reuse"
    #            | KV_KINDS
    anchor: int  # the anchor step whose kept set this step uses
    keep_idx: torch.Tensor | None = None  # None: every context token
    ratio: float = 0.0
    keep: int = 0
    reuses: int | None = None  # reuse: the last computed step, whose velocity (order 0) or trend (order 1) is used
    # anchors: also run the kept set on the anchor's input; the pruned steps until the next anchor add the difference
    residual: bool = False


def make_plan(num_steps: int, update_interval: int) -> list[StepPlan]:
    """Anchor steps at 0, dT, 2dT, ...; every other step pruned (the kind only; kept sets come at run time)."""
    check_steps(num_steps)
    check_update_interval(update_interval)
    return [StepPlan(s, "anchor" if s % update_interval == 0 else "pruned", s - s % update_interval)
            for s in range(num_steps)]


class TemporalController:
    """Plans step after step. ``selector`` None plans a baseline: every step ``baseline`` ("full": unpruned through
    the topi graph, or "dense": the plain model).

    Usage: ``plan = c.plan(step)``; run it; for an anchor call ``c.observe(step, influence)`` with the positive
    branch's influence over every context token [Nc]; that fixes the kept set of the following pruned steps. A step
    may be planned again (the second guidance branch of a diffusers pipeline) without re-scoring. ``residual``:
    anchors plan the pruning residual (one more engine call each; the step runner adds it to the pruned steps), those
    followed by a pruned step before the next anchor or ``num_steps`` (when known)."""

    def __init__(self, selector, update_interval: int, num_ctx: int, grids=None, baseline: str = "full",
                 reuse: ReusePlan = OFF, ref_kv: str | None = None, start: int = 0, residual: bool = False,
                 num_steps: int | None = None):
        if baseline not in ("full", "dense"):
            raise TopiError(f"unknown baseline {baseline!r}: full or dense")
        self.selector, self.num_ctx, self.baseline = selector, int(num_ctx), baseline
        self.reuse = reuse if selector is not None else OFF  # baselines compute every step
        self.reused = frozenset(self.reuse.steps)
        self.residual = bool(residual) and selector is not None  # baselines prune nothing
        # the dense baseline recomputes the references every step: no cache. A reused step calls nothing, so the
        # cached K/V stays valid across it (reuse never plans an anchor, and step 0 is always one).
        self.ref_kv = check_ref_kv(ref_kv) if baseline != "dense" or selector is not None else None
        self.update_interval = check_update_interval(int(update_interval))
        self.grids = tuple(grids) if grids else ((1, self.num_ctx),)
        self.keep_idx, self.ratio, self.keep = None, 0.0, self.num_ctx
        self.kept = {}  # anchor step -> kept indices (None = all)
        self.anchor_info = {}  # anchor step -> what observe() returned
        self.start = int(start)  # a loop resumed at this step (a baseline's rollout): an exact cache extracts there
        self.num_steps = num_steps

    def _residual(self, anchor: int) -> bool:
        """Whether the anchor measures the pruning residual: only when a pruned step of its window will use it."""
        end = anchor + self.update_interval
        end = end if self.num_steps is None else min(end, self.num_steps)
        return self.residual and any(s not in self.reused for s in range(anchor + 1, end))

    def plan(self, step: int) -> StepPlan:
        anchor = step - step % self.update_interval
        if step in self.reused:
            if step == anchor:
                raise TopiError(f"step {step} is an anchor and cannot be reused: the reuse plan does not fit the "
                                f"update interval {self.update_interval}")
            last = step - 1
            while last in self.reused:
                last -= 1
            return StepPlan(step, "reuse", anchor, None, 0.0, 0, reuses=last)
        if self.ref_kv is not None:
            return self._plan_kv(step, anchor)
        if self.selector is None:
            return StepPlan(step, self.baseline, anchor, None, 0.0, self.num_ctx)
        if step == anchor:
            return StepPlan(step, "anchor", anchor, None, 0.0, self.num_ctx, residual=self._residual(anchor))
        if anchor not in self.kept:
            raise TopiError(f"step {step} was planned before its anchor step {anchor} observed influence")
        return StepPlan(step, "pruned", anchor, self.keep_idx, self.ratio, self.keep)

    # --- reference K/V cache (docs/design.md, "Reference K/V cache") -------------------------------------------
    def _plan_kv(self, step: int, anchor: int) -> StepPlan:
        extract = step == self.start if self.ref_kv == "exact" else step == anchor
        if extract:  # an anchor too when it falls on one (a selector scores there)
            return StepPlan(step, "extract", anchor, None, 0.0, self.num_ctx,
                            residual=step == anchor and self._residual(anchor))
        if self.selector is None:
            return StepPlan(step, "kv-full", anchor, None, 0.0, self.num_ctx)
        if step == anchor:
            return StepPlan(step, "kv-anchor", anchor, None, 0.0, self.num_ctx, residual=self._residual(anchor))
        if anchor not in self.kept:
            raise TopiError(f"step {step} was planned before its anchor step {anchor} observed influence")
        return StepPlan(step, "kv-pruned", anchor, self.keep_idx, self.ratio, self.keep)
    # -----------------------------------------------------------------------------------------------------------

    def observe(self, step: int, influence: torch.Tensor) -> dict:
        """An anchor's influence [Nc] -> the kept set of the next pruned steps. Returns the anchor's record."""
        from topi_export.method.selection import kept_mass

        influence = influence.detach().float().cpu().reshape(-1)
        if influence.numel() != self.num_ctx:
            raise TopiError(f"anchor step {step} returned influence for {influence.numel()} context tokens, expected "
                            f"{self.num_ctx}: the engine does not match the request")
        if not torch.isfinite(influence).all():
            raise TopiError(f"influence at step {step} is not finite: the model produced NaN/Inf; check the inputs "
                            f"and weights")
        self.keep_idx, self.ratio, self.keep = self.selector.select(influence, step)
        self.kept[step] = None if self.keep_idx is None else self.keep_idx.tolist()
        info = {"kept_influence": 1.0 if self.keep_idx is None else kept_mass(influence, self.keep_idx),
                "selected_keep": self.keep, "selected_per_reference": self.keep_per_reference(self.keep_idx)}
        self.anchor_info[step] = info
        return info

    def keep_per_reference(self, idx=None) -> list[int]:
        """Kept tokens per reference for indices idx (None: every token)."""
        from topi_export.method.selection import keep_per_reference

        if idx is None:
            return [h * w for h, w in self.grids]
        return keep_per_reference(idx, self.grids)
