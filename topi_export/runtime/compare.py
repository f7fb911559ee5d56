"""The one timing policy of ``run --compare`` and ``bench`` (docs/design.md, "Runtime"): the ToPi loop and its
baseline run interleaved (ToPi, baseline, ToPi, baseline, ...) so that a machine whose speed drifts favours neither;
the speedup is fastest over fastest, and the spread of the pairwise speedups says how much to trust it."""
from __future__ import annotations

from dataclasses import dataclass, field

# Pairwise speedups further apart than this (max / min) mean the machine was busy: say so.
NOISY_SPREAD = 1.2


@dataclass(frozen=True)
class Comparison:
    topi: object  # runtime.loop.RunResult with the fastest ToPi time
    baseline: object  # runtime.loop.RunResult with the fastest baseline time
    mode: str  # the baseline: "dense" (the plain model) or "full" (unpruned through the topi graph)
    topi_times: tuple[float, ...]
    baseline_times: tuple[float, ...]
    # further baselines run in the same interleaving: name -> (fastest RunResult, times); e.g. "kv-cache", a
    # KV-trained model's unpruned cached loop (docs/design.md, "Reference K/V cache")
    others: dict = field(default_factory=dict)

    @property
    def repeats(self) -> int:
        return len(self.topi_times)

    @property
    def speedup(self) -> float:
        return min(self.baseline_times) / min(self.topi_times)

    @property
    def spread(self) -> tuple[float, float]:
        """Lowest and highest speedup over the interleaved pairs."""
        pairs = [b / t for t, b in zip(self.topi_times, self.baseline_times)]
        return min(pairs), max(pairs)

    def speedup_over(self, name: str) -> float:
        """Fastest run of baseline ``name`` (one of ``others``) over the fastest ToPi run."""
        return min(self.others[name][1]) / min(self.topi_times)

    def spread_over(self, name: str) -> tuple[float, float]:
        pairs = [b / t for t, b in zip(self.topi_times, self.others[name][1])]
        return min(pairs), max(pairs)

    def warning(self) -> str | None:
        """A one-line caution when the timing cannot be trusted much, else None."""
        lo, hi = self.spread
        if self.repeats == 1:
            return "speed from one run of each loop: use --repeats 3 or more for a number to trust"
        if hi / lo > NOISY_SPREAD:
            return (f"the pairwise speedups range from {lo:.2f}x to {hi:.2f}x: the machine was busy; rerun, or raise "
                    f"--repeats")
        return None


def compare(session, data, *, steps: int, seed: int = 0, selector, update_interval=None, repeats: int = 3,
            progress: bool = False, reuse=None, ref_kv: str | None = None,
            pruning_residual: bool = False) -> Comparison:
    """Run the ToPi loop and the session's baseline ``repeats`` times each, interleaved. Every run of one loop gives
    the same latents (seeded); only the times differ. ref_kv: the ToPi loop's reference K/V mode (None: the
    session's). A KV-trained model is also timed as its unpruned cached loop, "kv-cache", the deployment a user
    would otherwise run, when the baseline is the dense model."""
    mode = session.baseline_mode()
    loops = {"topi": dict(selector=selector, ref_kv=ref_kv, reuse=reuse, pruning_residual=pruning_residual),
             mode: dict(mode=mode, desc=mode)}
    if session.ref_kv == "exact" and mode == "dense":  # (imported late: session.py imports this module)
        from topi_export.runtime.session import KV_CACHE_BASELINE

        loops[KV_CACHE_BASELINE] = dict(mode="full", ref_kv="exact", desc=KV_CACHE_BASELINE)
    best, times = {}, {name: [] for name in loops}
    for i in range(repeats):
        for name, kwargs in loops.items():
            r = session.denoise(data, steps=steps, seed=seed, update_interval=update_interval,
                                progress=progress and i == 0, **kwargs)
            times[name].append(r.time_s)
            best[name] = r if name not in best or r.time_s < best[name].time_s else best[name]
    others = {name: (best[name], tuple(times[name])) for name in loops if name not in ("topi", mode)}
    return Comparison(best["topi"], best[mode], mode, tuple(times["topi"]), tuple(times[mode]), others)
