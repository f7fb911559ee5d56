"""The one timing policy of ``run --compare`` and ``bench`` (docs/design.md, "Runtime"): the ToPi loop and its
baseline run interleaved (ToPi, baseline, ToPi, baseline, ...) so that a machine whose speed drifts favours neither;
the speedup is fastest over fastest, and the spread of the pairwise speedups says how much to trust it."""
from __future__ import annotations

from dataclasses import dataclass

# Pairwise speedups further apart than this (max / min) mean the machine was busy: say so.
NOISY_SPREAD = 1.2


@dataclass(frozen=True)
class Comparison:
    topi: object  # runtime.loop.RunResult with the fastest ToPi time
    baseline: object  # runtime.loop.RunResult with the fastest baseline time
    mode: str  # the baseline: "dense" (the plain model) or "full" (unpruned through the topi graph)
    topi_times: tuple[float, ...]
    baseline_times: tuple[float, ...]

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
            progress: bool = False, reuse=None) -> Comparison:
    """Run the ToPi loop and the session's baseline ``repeats`` times each, interleaved. Every run of one loop gives
    the same latents (seeded); only the times differ."""
    mode = session.baseline_mode()
    topi = base = None
    topi_times, base_times = [], []
    for i in range(repeats):
        t = session.denoise(data, steps=steps, seed=seed, selector=selector, update_interval=update_interval,
                            progress=progress and i == 0, reuse=reuse)
        b = session.denoise(data, steps=steps, seed=seed, mode=mode, update_interval=update_interval,
                            progress=progress and i == 0, desc=mode)
        topi_times.append(t.time_s)
        base_times.append(b.time_s)
        topi = t if topi is None or t.time_s < topi.time_s else topi
        base = b if base is None or b.time_s < base.time_s else base
    return Comparison(topi, base, mode, tuple(topi_times), tuple(base_times))
