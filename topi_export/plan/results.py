"""Typed results with stable JSON (docs/design.md, "Plan objects"): one step of a run, the run report of
``run --json``, a row of ``check``, a calibration measurement. Their JSON keys are a public contract (README)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields


def _plain(v):
    """JSON-ready values: tuples to lists, non-finite floats to None (reports are strict JSON)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if hasattr(v, "to_json"):
        return v.to_json()
    return v


@dataclass(frozen=True)
class StepRecord:
    """One denoising step as the temporal controller planned and the engine ran it.

    kind: ``anchor`` (full sequence, influence scored, kept set chosen), ``pruned`` (the kept set from L0 on),
    ``full`` (every context token: the unpruned baseline through the topi graph), ``dense`` (the plain model),
    ``reuse`` (no transformer call: the velocity of the last computed steps, method/reuse.py).
    graph: the graph call that ran (``anchor`` | ``pruned`` | ``full`` | ``dense`` | ``none``; an anchor whose kept
    set is everything runs its next steps as ``full``). The kind-only fields are None (and absent in JSON) on other
    steps.
    Reference K/V cache kinds and graph calls (docs/design.md): ``extract`` (the full sequence, recording the
    references' keys/values; an anchor when it scores), ``kv-anchor`` (a cached step scoring influence over the
    cached keys), ``kv-pruned`` (cached, the kept set from L0 on), ``kv-full`` (cached, every reference)."""

    step: int
    kind: str
    graph: str
    keep: int
    keep_per_reference: tuple[int, ...]
    bucket: float
    time_s: float
    kept_influence: float | None = None  # anchors: fraction of the influence mass the chosen set keeps
    selected_keep: int | None = None  # anchors: the keep count chosen (tau: rounded up to a bucket)
    selected_per_reference: tuple[int, ...] | None = None
    reuses: int | None = None  # reuse steps: the last computed step, whose velocity (or trend) this step takes
    # anchors with the pruning residual on: True when the kept set also ran on this input (one more engine call,
    # its difference added to the next pruned steps), False when every token was kept (nothing to correct)
    residual: bool | None = None

    ANCHOR_ONLY = ("kept_influence", "selected_keep", "selected_per_reference", "reuses", "residual")

    @property
    def engine_calls(self) -> int:
        """Engine calls the step made: none when reused, two when an anchor measured the pruning residual."""
        return 0 if self.graph == "none" else 1 + bool(self.residual)

    def to_json(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in self.ANCHOR_ONLY and v is None:
                continue
            out[f.name] = _plain(v)
        return out


@dataclass(frozen=True)
class CheckRow:
    """One comparison of ``topi-export check``: an engine output against the PyTorch reference (worst trial)."""

    layout: str
    graph: str  # anchor | full | pruned | dense | extract | kv-anchor | kv-pruned
    bucket: float | None
    keep: int
    output: str  # velocity | influence | ref_kv
    max_abs: float
    rel_l2: float
    finite: bool
    passed: bool | None = None

    def to_json(self) -> dict:
        out = {f.name: _plain(getattr(self, f.name)) for f in fields(self)}
        out["pass"] = out.pop("passed")
        return out


@dataclass(frozen=True)
class RunReport:
    """The report of ``run --json`` (README, "run report"). The comparison fields are set with ``--compare``."""

    model: str
    family: str
    backend: str
    engine_dir: str | None
    inputs: str
    steps: int
    guidance: str
    true_cfg: bool
    layout: dict
    selection: dict  # ratio, tau, buckets, policy
    method: dict  # pivotal_layers, prune_start, update_interval, source, provenance
    schedule: tuple[StepRecord, ...]
    time_s: dict  # "topi" and, with --compare, the baseline's mode ("dense" or "full") and "kv-cache"
    reuse: dict | None = None  # the run's reuse plan (plan/reuse.py ReusePlan): mode, order, steps, source, why
    computed_steps: int | None = None  # steps that called the transformer
    engine_calls: int | None = None  # transformer calls: computed steps plus one per anchor measuring the residual
    pruning_residual: bool | None = None  # whether an anchor planned the pruning residual (docs/design.md)
    repeats: int | None = None
    baseline: str | None = None  # "dense" | "in-engine-full"
    speedup: float | None = None  # fastest baseline run / fastest ToPi run
    speedup_spread: tuple[float, float] | None = None  # lowest and highest speedup of the interleaved pairs
    psnr_db: float | None = None
    rel_l2: float | None = None
    psnr_db_vs_truth: dict | None = None
    adapters: list | None = None  # LoRA adapters fused into the weights ({"file", "sha256", "scale"})
    # --- reference K/V cache (docs/design.md, "Reference K/V cache") ---
    ref_kv: dict | None = None  # mode, exact, label, cache_bytes, cache_bytes_per_reference, layers, heads, head_dim
    speedup_vs_kv_cache: float | None = None  # fastest unpruned cached loop / fastest ToPi run (KV-trained models)
    speedup_vs_kv_cache_spread: tuple[float, float] | None = None

    OPTIONAL = ("repeats", "baseline", "speedup", "speedup_spread", "psnr_db", "rel_l2", "psnr_db_vs_truth", "reuse",
                "computed_steps", "engine_calls", "pruning_residual", "adapters", "ref_kv", "speedup_vs_kv_cache",
                "speedup_vs_kv_cache_spread")

    def to_json(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in self.OPTIONAL and v is None:
                continue
            out[f.name] = _plain(v)
        return out


@dataclass(frozen=True)
class CalibrationResult:
    """What ``topi-export calibrate`` measured (method/calibration.py) and the setting its rules chose."""

    num_layers: int
    layer_groups: tuple
    layer_names: tuple[str, ...]
    timesteps: tuple[float, ...]
    num_samples: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    by_timestep: tuple[dict, ...]
    values: tuple  # [samples][timesteps][layers]
    ranking: tuple[int, ...]
    top_k: int
    pivotal_layers: tuple[int, ...]
    prune_start: int
    update_interval: int
    rules: dict
    seed: int
    forward_passes: int
    elapsed_s: float = field(compare=False, default=0.0)
    reuse: object = None  # plan.reuse.ReuseCriterion measured on full runs, when asked

    def to_json(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}
