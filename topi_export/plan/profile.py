"""Calibration profiles (``topi-export calibrate --out NAME.json``) as a typed, versioned object. Schema 2 adds
the family and its layer groups; schema 3 the step-reuse criterion (plan/reuse.py), measured on velocities; schema 4
measures it by rollouts (its ``reuse.measure`` is "rollout"); schema 5 adds ``reuse.aggregate`` (each step's error
from the worst calibration sample by default). Schema 1 to 4 files are still read (1 and 2 have no reuse criterion:
step reuse stays off by default for their models; 3 keeps its velocity rule; 4 its mean over the samples)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from topi_export.errors import TopiError
from topi_export.plan.schema import Reader
from topi_export.plan.reuse import ReuseCriterion
from topi_export.plan.settings import MAX_UPDATE_INTERVAL, MethodSettings

SCHEMA = "topi-calibration/5"
READS = ("topi-calibration/1", "topi-calibration/2", "topi-calibration/3", "topi-calibration/4", SCHEMA)


@dataclass(frozen=True)
class CalibrationProfile:
    model_class: str
    family: str | None
    config_hash: str
    weights_hash: str | None  # None: any weights of that config
    num_layers: int
    pivotal_layers: tuple[int, ...]
    prune_start: int
    update_interval: int
    measured: bool
    path: str = ""
    top_k: int | None = None
    reuse: ReuseCriterion | None = None
    data: dict = field(default_factory=dict, compare=False, hash=False)  # everything else, as written

    def settings(self) -> MethodSettings:
        return MethodSettings(self.pivotal_layers, self.prune_start, self.update_interval, self.path,
                              "measured" if self.measured else "published", self.reuse)

    def check_model(self, identity) -> None:
        """Refuse a profile made for another model (config or weights) or another depth."""
        for key, want, have in (("config_hash", self.config_hash, identity.config_hash),
                                ("weights_hash", self.weights_hash, identity.weights_hash)):
            if want is not None and want != have:
                raise TopiError(f"calibration profile {self.path} was made for another model ({key} {want} != "
                                f"{have} of {identity.source}): calibrate this model with "
                                f"`topi-export calibrate --model {identity.source}`")
        if self.num_layers != identity.num_layers:
            raise TopiError(f"calibration profile {self.path} is for a {self.num_layers}-layer model, "
                            f"{identity.source} has {identity.num_layers}: calibrate this model")
        self.settings().check(identity.num_layers, f"calibration profile {self.path}")


def parse_profile(data, path) -> CalibrationProfile:
    fix = "re-run `topi-export calibrate`"
    r = Reader(data, f"calibration profile {path}", fix)
    schema = r.get("schema")
    if schema not in READS:
        raise TopiError(f"calibration profile {path} has schema {schema!r}, expected {SCHEMA!r}: {fix}")
    m = r.obj("model")
    num_layers = m.int("num_layers", lo=1, hi=100_000)
    prof = CalibrationProfile(
        model_class=m.str("class"), family=m.str("family", optional=True), config_hash=m.str("config_hash"),
        weights_hash=m.str("weights_hash", optional=True), num_layers=num_layers,
        pivotal_layers=r.ints("pivotal_layers", lo=0, hi=num_layers - 1, nonempty=True),
        prune_start=r.int("prune_start", lo=0, hi=num_layers - 1),
        update_interval=r.int("update_interval", lo=1, hi=MAX_UPDATE_INTERVAL),
        measured=r.bool("measured", optional=True, default=True), path=str(path),
        top_k=r.int("top_k", lo=1, hi=num_layers, optional=True),
        reuse=ReuseCriterion.from_reader(r.obj("reuse")) if r.has("reuse") else None, data=data)
    if len(set(prof.pivotal_layers)) != len(prof.pivotal_layers):
        raise r.fail("pivotal_layers", "repeats a layer")
    return prof


MAX_PROFILE_BYTES = 16 << 20  # profiles are a few kB; a larger file (or a device such as /dev/zero) is not one


def read_profile(path) -> CalibrationProfile:
    from topi_export.fsutil import read_json_file

    path = Path(path)
    data = read_json_file(path, "calibration profile", "pass the file `topi-export calibrate --out` wrote",
                          max_bytes=MAX_PROFILE_BYTES, follow_symlinks=True,
                          missing=f"calibration profile {path} not found: run `topi-export calibrate --out {path}` "
                                  f"first")
    return parse_profile(data, path)
