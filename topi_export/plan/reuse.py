"""Step reuse as typed plan objects (docs/design.md, "Step reuse"): the reuse criterion a calibration measured on a
model (``ReuseCriterion``, stored in calibration profiles and manifests) and the reuse plan of one run
(``ReusePlan``, in run reports). The rule that turns one into the other is method/reuse.py."""
from __future__ import annotations

from dataclasses import dataclass

from topi_export.plan.schema import Reader

MAX_THRESHOLD = 10.0
AGGREGATES = ("worst", "mean")


@dataclass(frozen=True)
class ReuseCriterion:
    """What calibration measured: for each step of a reference schedule (``sigmas``, the noise level of each
    step), the error that reusing the previous velocity would make, as a density that maps onto schedules of other
    lengths, for zero-order reuse (the last velocity) and first-order reuse (extrapolated from the last two).

    ``measure`` says what the error is. "rollout" (schema 4): the final error (RMS of the final latents' change over
    their range, what PSNR counts) of a run that reused that step alone, per unit of (step width x previous step
    width); ``threshold`` is the final error the plan may reach (0.01 = 40 dB). "velocity" (schema 3): the relative
    change of the velocity per unit of sigma; ``threshold`` bounds each run's accumulated change. ``aggregate`` says
    how the calibration samples were combined into one density per step: "worst" (schema 5: the largest sample's,
    so a plan within the budget is within it for every calibration sample) or "mean" (schemas 3 and 4). Both: at most
    ``max_consecutive`` steps in a row; the first ``protect_first`` and last ``protect_last`` steps and every anchor
    are always computed (the rule: method/reuse.py)."""

    sigmas: tuple[float, ...]
    density: tuple[float, ...]  # order 0
    density_order1: tuple[float, ...]
    threshold: float
    max_consecutive: int
    protect_first: int = 2
    protect_last: int = 2
    samples: int = 0
    measure: str = "velocity"
    aggregate: str = "mean"

    def to_json(self) -> dict:
        return {"measure": self.measure, "aggregate": self.aggregate, "sigmas": list(self.sigmas),
                "density": list(self.density), "density_order1": list(self.density_order1), "threshold": self.threshold,
                "max_consecutive": self.max_consecutive, "protect_first": self.protect_first,
                "protect_last": self.protect_last, "samples": self.samples}

    @classmethod
    def from_reader(cls, r: Reader) -> "ReuseCriterion":
        sigmas = tuple(_floats(r, "sigmas"))
        density, density1 = tuple(_floats(r, "density")), tuple(_floats(r, "density_order1"))
        if not (len(sigmas) == len(density) == len(density1) >= 2):
            raise r.fail("sigmas", "density and density_order1 must be lists of the same length (>= 2)")
        return cls(sigmas, density, density1, r.float("threshold", lo=0.0, hi=MAX_THRESHOLD),
                   r.int("max_consecutive", lo=1, hi=1000), r.int("protect_first", lo=0, hi=1000),
                   r.int("protect_last", lo=0, hi=1000), r.int("samples", lo=0, hi=1_000_000),
                   r.str("measure", choices=("rollout", "velocity")) if r.has("measure") else "velocity",
                   r.str("aggregate", choices=AGGREGATES) if r.has("aggregate") else "mean")


def _floats(r: Reader, key: str):
    import math

    out = []
    for i, v in enumerate(r.list(key)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise r.fail(f"{key}[{i}]", f"is {v!r}, expected a finite number >= 0")
        out.append(float(v))
    return out


@dataclass(frozen=True)
class ReusePlan:
    """Which steps of one run reuse a velocity instead of calling the transformer, and why.

    mode: ``off``, ``auto`` (the criterion measured on this model), or ``count`` (a number of steps asked for).
    order: 0 (the last computed velocity) or 1 (extrapolated in sigma from the last two)."""

    mode: str
    order: int
    steps: tuple[int, ...]
    source: str
    why: str
    predicted_db: float | None = None  # rollout criterion: the plan's predicted PSNR against the run without reuse

    @property
    def enabled(self) -> bool:
        return bool(self.steps)

    def to_json(self) -> dict:
        out = {"mode": self.mode, "order": self.order, "steps": list(self.steps), "source": self.source,
               "why": self.why}
        if self.predicted_db is not None:
            out["predicted_db"] = round(self.predicted_db, 2)
        return out


OFF = ReusePlan("off", 0, (), "none", "step reuse off")
