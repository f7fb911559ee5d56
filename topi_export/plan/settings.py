"""The method settings of a deployment: pivotal layers P, prune-start layer L0, update interval dT, where they
come from (a measured calibration profile, the published setting, or a published setting scaled to depth), and
the step-reuse criterion when a calibration measured one on the model (plan/reuse.py)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from topi_export.errors import TopiError
from topi_export.plan.reuse import ReuseCriterion

PROVENANCES = ("measured", "published", "published-scaled", "given")
MAX_UPDATE_INTERVAL = 1000


@dataclass(frozen=True)
class MethodSettings:
    pivotal_layers: tuple[int, ...]
    prune_start: int
    update_interval: int
    source: str  # a profile path, or what the default is
    provenance: str = "given"
    reuse: ReuseCriterion | None = None  # measured on this model by `topi-export calibrate`, when it was

    def check(self, num_layers: int, where: str = "method settings") -> "MethodSettings":
        if not self.pivotal_layers:
            raise TopiError(f"{where}: no pivotal layers: ToPi scores influence at >= 1 layer; re-run calibration")
        bad = [v for v in self.pivotal_layers if not 0 <= v < num_layers]
        if bad:
            raise TopiError(f"{where}: pivotal layers {bad} are outside 0..{num_layers - 1} (the model has "
                            f"{num_layers} layers): calibrate this model")
        if len(set(self.pivotal_layers)) != len(self.pivotal_layers):
            raise TopiError(f"{where}: pivotal layers {list(self.pivotal_layers)} repeat a layer")
        if not 0 <= self.prune_start < num_layers:
            raise TopiError(f"{where}: prune start L0 = {self.prune_start} is outside 0..{num_layers - 1}")
        if not 1 <= self.update_interval <= MAX_UPDATE_INTERVAL:
            raise TopiError(f"{where}: update interval {self.update_interval} is outside 1..{MAX_UPDATE_INTERVAL}")
        if self.provenance not in PROVENANCES:
            raise TopiError(f"{where}: provenance {self.provenance!r} is not one of {', '.join(PROVENANCES)}")
        return self

    def with_overrides(self, update_interval=None, prune_start=None) -> "MethodSettings":
        out = self
        if update_interval is not None:
            out = replace(out, update_interval=int(update_interval))
        if prune_start is not None:
            out = replace(out, prune_start=int(prune_start))
        return out

    def to_json(self) -> dict:
        return {"pivotal_layers": list(self.pivotal_layers), "prune_start": self.prune_start,
                "update_interval": self.update_interval, "source": self.source, "provenance": self.provenance,
                "reuse": self.reuse.to_json() if self.reuse is not None else None}

    @classmethod
    def from_reader(cls, r) -> "MethodSettings":
        return cls(r.ints("pivotal_layers", lo=0, nonempty=True), r.int("prune_start", lo=0),
                   r.int("update_interval", lo=1, hi=MAX_UPDATE_INTERVAL), r.str("source"),
                   r.str("provenance", choices=PROVENANCES),
                   ReuseCriterion.from_reader(r.obj("reuse")) if r.has("reuse") else None)
