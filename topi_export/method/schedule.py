"""Temporal schedule (DESIGN §2.5): anchor steps at 0, dT, 2dT, ... run the full sequence and re-score;
every other step runs pruned with the latest kept set. The plan is shared by every backend."""
from __future__ import annotations

from dataclasses import dataclass

from topi_export.errors import TopiError


@dataclass(frozen=True)
class StepPlan:
    step: int
    kind: str  # "anchor" | "pruned"
    anchor: int  # the anchor step whose influence this step uses


def make_plan(num_steps: int, update_interval: int) -> list[StepPlan]:
    if num_steps < 1:
        raise TopiError(f"--steps {num_steps} must be >= 1")
    if update_interval < 1:
        raise TopiError(f"--update-interval {update_interval} must be >= 1 (steps between anchor re-scorings)")
    plan = []
    for step in range(num_steps):
        anchor = step - step % update_interval
        plan.append(StepPlan(step, "anchor" if step == anchor else "pruned", anchor))
    return plan
