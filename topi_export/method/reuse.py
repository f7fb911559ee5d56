"""Step reuse (docs/design.md, "Step reuse"): which steps of a denoising schedule skip the transformer and reuse the
last computed velocity (order 0) or extrapolate it in sigma from the last two (order 1). Composed with ToPi in the
one temporal plan: a reused step costs nothing, the computed ones are pruned.

Which steps, by rule:
- never an anchor (it chooses the kept set), never the first ``protect_first`` or last ``protect_last`` steps
  (default 2 and 2: the largest and the finishing velocity changes);
- ``auto`` with a criterion measured by rollouts (``measure`` "rollout", profiles from schema 4): calibration reused
  each step alone and measured what it did to the FINAL latents (RMS over the output's range, the error PSNR
  counts). A run of reused steps accumulates: its k-th step reuses a velocity k steps old, so it carries the errors
  of the run so far (MagCache's accumulated error, on final-output errors). Each step's error is, by default, the
  worst calibration sample's (``aggregate`` "worst", schema 5; schema 4 kept the mean, which let one sample's edit
  fall under the budget), so a plan within the budget is within it for every calibration sample. ``auto`` takes
  the most steps whose predicted final error stays within the criterion's budget (``threshold``; default 0.01 of
  the range, i.e. 40 dB against the same run without reuse) with runs of at most ``max_consecutive``, the cheapest
  such plan;
- ``auto`` with a schema-3 criterion (``measure`` "velocity": the relative change of the velocity between steps):
  walk the schedule, reuse while the error accumulated since the last computed step stays within the threshold;
- ``N``: the N eligible steps with the lowest predicted error (or, without a criterion, N steps spread evenly over
  the eligible ones).

Default: ``auto`` when the model's calibration profile was measured on it and holds a criterion, else off."""
from __future__ import annotations

import math

import torch

from topi_export.errors import BadInput
from topi_export.plan.reuse import AGGREGATES, OFF, ReuseCriterion, ReusePlan

ORDERS = (0, 1)
PROTECT_FIRST = PROTECT_LAST = 2
MEASURES = ("rollout", "velocity")
# The rollout criterion's budget: predicted final error <= 1% of the output's range (40 dB against the same run
# without reuse), a tenth of the error energy of a 30 dB result, so reuse cannot be what takes a run under the
# fidelity floor the project benchmarks against (docs/design.md, "Step reuse"). Not chosen on any model.
DEFAULT_BUDGET_DB = 40.0
# The schema-3 velocity criterion's accumulated relative velocity error per run (chosen on flux2-pick and
# kontext-digits, docs/benchmarks.md section 8). Both: at most 2 reused steps in a row.
DEFAULT_THRESHOLD = 0.1
DEFAULT_MAX_CONSECUTIVE = 2
# How the rollout criterion combines its calibration samples into one error per step (plan/reuse.py AGGREGATES).
DEFAULT_AGGREGATE = "worst"


def budget_error(budget_db: float) -> float:
    """The final error (RMS over the output's range) a PSNR budget in dB allows."""
    return 10 ** (-float(budget_db) / 20)


def error_db(error: float) -> float:
    """A final error (RMS over the output's range) as PSNR in dB (inf for no error)."""
    return math.inf if error <= 0 else -20 * math.log10(error)


def parse_reuse(text) -> str | int:
    """'off' | 'auto' | N (a count of steps) from the command line or a request."""
    value = str(text).strip().lower()
    if value in ("off", "auto"):
        return value
    try:
        n = int(value)
    except ValueError:
        raise BadInput(f"--reuse {text!r}: give off, auto or a number of steps to reuse, e.g. 8") from None
    if n < 0:
        raise BadInput(f"--reuse {n}: the number of reused steps cannot be negative")
    return "off" if n == 0 else n


def check_order(order) -> int:
    if isinstance(order, bool) or order not in ORDERS:
        raise BadInput(f"--reuse-order {order!r}: 0 (the last velocity) or 1 (extrapolated from the last two)")
    return int(order)


def eligible_steps(num_steps: int, anchors, protect_first: int = PROTECT_FIRST,
                   protect_last: int = PROTECT_LAST) -> list[int]:
    anchors = set(anchors)
    return [s for s in range(protect_first, num_steps - protect_last) if s not in anchors]


def predicted_errors(criterion: ReuseCriterion, sigmas, order: int) -> list[float]:
    """Predicted error of reusing each step of a schedule (sigma of every step): the measured density at the step's
    sigma (interpolated) times the step's width in sigma (velocity criterion: a relative velocity change), or times
    the widths of the step and of the one before it (rollout criterion: the velocity is one step stale, and the stale
    velocity moves the latents over the step; the final error scales with both). The schedule ends at sigma 0."""
    ref_s = torch.tensor(criterion.sigmas, dtype=torch.float64)
    dens = torch.tensor(criterion.density_order1 if order else criterion.density, dtype=torch.float64)
    order_idx = torch.argsort(ref_s)
    ref_s, dens = ref_s[order_idx], dens[order_idx]
    out = []
    for i, s in enumerate(sigmas):
        width = abs(float(sigmas[i - 1]) - float(s)) if i > 0 else math.inf
        d = float(_interp(float(s), ref_s, dens))
        if criterion.measure == "rollout":
            width *= abs(float(s) - (float(sigmas[i + 1]) if i + 1 < len(sigmas) else 0.0))
        out.append(d * width)
    return out


def plan_cost(steps, errors) -> float:
    """Predicted final error of reusing ``steps`` (rollout criterion): single-step errors add, and the k-th step of a
    run of consecutive reused steps carries the errors of the run so far (its velocity is k steps old)."""
    total = acc = 0.0
    prev = None
    for s in sorted(steps):
        acc = acc + errors[s] if prev == s - 1 else errors[s]
        total, prev = total + acc, s
    return total


def _within_budget(eligible, errors, budget: float, max_consecutive: int, num_steps: int) -> list[int]:
    """The most eligible steps whose predicted final error (``plan_cost``) stays within the budget with no run
    longer than max_consecutive; among plans of that size the cheapest. Exact, by dynamic programming over the steps
    with the current run length as state (a step's cost depends only on the run before it)."""
    eligible = set(eligible)
    states = {(0, 0): (0.0, ())}  # (reused so far, current run) -> (cost, steps)
    for s in range(num_steps):
        nxt: dict = {}
        for (count, run), (cost, steps) in states.items():
            options = [((count, 0), (cost, steps))]  # computed
            if s in eligible and run < max_consecutive:
                acc = sum(errors[s - k] for k in range(run + 1))
                options.append(((count + 1, run + 1), (cost + acc, steps + (s,))))
            for key, val in options:
                if key not in nxt or val < nxt[key]:
                    nxt[key] = val
        states = nxt
    fits = [(-count, cost, steps) for (count, _), (cost, steps) in states.items() if cost <= budget]
    return list(min(fits)[2]) if fits else []


def _interp(x: float, xs: torch.Tensor, ys: torch.Tensor) -> float:
    if x <= xs[0]:
        return float(ys[0])
    if x >= xs[-1]:
        return float(ys[-1])
    j = int(torch.searchsorted(xs, torch.tensor(x, dtype=torch.float64)))
    x0, x1, y0, y1 = float(xs[j - 1]), float(xs[j]), float(ys[j - 1]), float(ys[j])
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def plan_reuse(spec, order: int, sigmas, anchors, criterion: ReuseCriterion | None, *,
               measured: bool = False, source: str = "") -> ReusePlan:
    """The reuse plan of one run. spec: 'off' | 'auto' | N | None (the default: auto when a criterion was measured
    on this model, else off); sigmas: the noise level of every step; anchors: the anchor steps."""
    order = check_order(order)
    n = len(sigmas)
    if spec is None:
        if criterion is not None and measured:
            spec, why = "auto", f"default: the calibration profile {source} measured this model's step-reuse errors"
        else:
            return ReusePlan("off", order, (), "none", "default off: no step-reuse criterion was measured on this "
                             "model (run `topi-export calibrate` on it to measure one)")
    else:
        why = None
    spec = parse_reuse(spec) if isinstance(spec, str) else spec
    if spec == "off":
        return ReusePlan("off", order, (), "none", "step reuse off (asked)")
    first = criterion.protect_first if criterion is not None else PROTECT_FIRST
    last = criterion.protect_last if criterion is not None else PROTECT_LAST
    eligible = eligible_steps(n, anchors, first, last)
    if spec == "auto":
        if criterion is None:
            raise BadInput("--reuse auto needs a step-reuse criterion measured on this model: calibrate it with "
                           "`topi-export calibrate`, or give --reuse N")
        errors = predicted_errors(criterion, sigmas, order)
        if criterion.measure == "rollout":
            chosen = _within_budget(eligible, errors, criterion.threshold, criterion.max_consecutive, n)
            cost = plan_cost(chosen, errors)
            whose = "the worst calibration sample's" if criterion.aggregate == "worst" else "the mean"
            rule = (f"predicted final error of the reused steps ({whose}) {error_db(cost):.1f} dB against the run "
                    f"without reuse, budget {error_db(criterion.threshold):.1f} dB, at most "
                    f"{criterion.max_consecutive} in a row")
            return ReusePlan("auto", order, tuple(chosen), source,
                             f"{why}; {rule}" if why else f"auto: {rule} ({source})",
                             predicted_db=error_db(cost) if chosen else None)
        chosen, acc, run = [], 0.0, 0
        for s in range(n):
            if s in eligible and acc + errors[s] <= criterion.threshold and run < criterion.max_consecutive:
                chosen.append(s)
                acc, run = acc + errors[s], run + 1
            else:
                acc, run = 0.0, 0
        return ReusePlan("auto", order, tuple(chosen), source,
                         why or f"auto: accumulated predicted error <= {criterion.threshold:g}, at most "
                                f"{criterion.max_consecutive} in a row ({source})")
    if not isinstance(spec, int) or isinstance(spec, bool):
        raise BadInput(f"--reuse {spec!r}: give off, auto or a number of steps")
    if spec > len(eligible):
        raise BadInput(f"--reuse {spec}: only {len(eligible)} of the {n} steps can be reused (never an anchor, the "
                       f"first {first} or the last {last}): ask for at most {len(eligible)}")
    if criterion is not None:
        errors = predicted_errors(criterion, sigmas, order)
        chosen = sorted(sorted(eligible, key=lambda s: (errors[s], s))[:spec])
        predicted = error_db(plan_cost(chosen, errors)) if criterion.measure == "rollout" and chosen else None
        return ReusePlan("count", order, tuple(chosen), source,
                         f"{spec} steps with the lowest predicted error ({source})", predicted_db=predicted)
    picks = sorted({eligible[round(i * (len(eligible) - 1) / max(spec - 1, 1))] for i in range(spec)}) if spec else []
    k = 0
    while len(picks) < spec:  # rounding collided: fill with the nearest free eligible steps
        if eligible[k] not in picks:
            picks.append(eligible[k])
        k += 1
    return ReusePlan("count", order, tuple(sorted(picks)), "even spread",
                     f"{spec} steps spread evenly over the middle of the schedule (no criterion measured on this "
                     f"model)")


def extrapolate(history, sigma: float, order: int) -> torch.Tensor:
    """The reused velocity at ``sigma`` from the computed history [(sigma, velocity), ...] (latest last)."""
    if order == 0 or len(history) < 2:
        return history[-1][1]
    (s0, v0), (s1, v1) = history[-2], history[-1]
    if s1 == s0:
        return v1
    return v1 + (v1 - v0) * ((sigma - s1) / (s1 - s0))


def measure_criterion(velocities_per_sample, sigmas, *, threshold: float = DEFAULT_THRESHOLD,
                      max_consecutive: int = DEFAULT_MAX_CONSECUTIVE) -> ReuseCriterion:
    """The criterion from full (unpruned) runs: velocities_per_sample[i][step] [1, Nx, C] at sigmas[step]. The error
    of reusing step i is the relative L2 distance between its velocity and the reused one; divided by the step's
    width in sigma it is a density that maps onto other schedules (method/reuse.py predicted_errors)."""
    n = len(sigmas)
    d0 = torch.zeros(n, dtype=torch.float64)
    d1 = torch.zeros(n, dtype=torch.float64)
    for vs in velocities_per_sample:
        for i in range(1, n):
            width = abs(float(sigmas[i - 1]) - float(sigmas[i]))
            v = vs[i].double()
            norm = v.norm().clamp_min(1e-30)
            d0[i] += float((v - vs[i - 1].double()).norm() / norm) / width
            if i >= 2:
                guess = extrapolate([(float(sigmas[i - 2]), vs[i - 2].double()),
                                     (float(sigmas[i - 1]), vs[i - 1].double())], float(sigmas[i]), 1)
                d1[i] += float((v - guess).norm() / norm) / width
            else:
                d1[i] += float((v - vs[i - 1].double()).norm() / norm) / width
    k = max(len(velocities_per_sample), 1)
    d0, d1 = d0 / k, d1 / k
    d0[0], d1[0] = d0[1], d1[1]  # step 0 is never reused; keep the curve defined there
    return ReuseCriterion(tuple(float(s) for s in sigmas), tuple(d0.tolist()), tuple(d1.tolist()), float(threshold),
                          int(max_consecutive), PROTECT_FIRST, PROTECT_LAST, len(velocities_per_sample), "velocity")


def check_aggregate(aggregate) -> str:
    if aggregate not in AGGREGATES:
        raise BadInput(f"--reuse-aggregate {aggregate!r}: worst (every calibration sample within the budget) or mean "
                       f"(the average sample)")
    return aggregate


def rollout_criterion(errors_per_sample, errors_order1_per_sample, sigmas, *, budget_db: float = DEFAULT_BUDGET_DB,
                      max_consecutive: int = DEFAULT_MAX_CONSECUTIVE,
                      aggregate: str = DEFAULT_AGGREGATE) -> ReuseCriterion:
    """The criterion from rollouts: errors_per_sample[i][step] is the final error (RMS over the output's range) of
    the run that reused ``step`` alone (order 0; errors_order1_per_sample: order 1), measured at ``sigmas`` (every
    step's sigma; the schedule ends at 0). Stored as densities per unit of (step width x previous step width), so
    they map onto other schedules (``predicted_errors``). ``aggregate`` "worst" keeps each step's largest sample
    error: ``plan_cost`` adds errors, so the sum of per-step maxima bounds every sample's own sum, and a plan within
    the budget is within it for each calibration sample. "mean" keeps the average sample's."""
    n = len(sigmas)
    s = [float(v) for v in sigmas] + [0.0]
    combine = max if check_aggregate(aggregate) == "worst" else (lambda v: sum(v) / len(v))

    def density(rows):
        out = []
        for i in range(1, n):
            area = abs(s[i - 1] - s[i]) * abs(s[i] - s[i + 1])
            out.append(combine([float(r[i]) for r in rows] or [0.0]) / max(area, 1e-30))
        return [out[0]] + out  # step 0 is never reused; keep the curve defined there

    return ReuseCriterion(tuple(s[:n]), tuple(density(errors_per_sample)), tuple(density(errors_order1_per_sample)),
                          budget_error(budget_db), int(max_consecutive), PROTECT_FIRST, PROTECT_LAST,
                          len(errors_per_sample), "rollout", aggregate)


__all__ = ["OFF", "ORDERS", "MEASURES", "parse_reuse", "check_order", "plan_reuse", "extrapolate",
           "measure_criterion", "rollout_criterion", "predicted_errors", "plan_cost", "eligible_steps",
           "budget_error", "error_db", "check_aggregate", "DEFAULT_AGGREGATE"]
