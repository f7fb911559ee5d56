"""Selection (DESIGN §2.3): fixed ratio r keeps ceil((1-r)|C|) tokens; adaptive tau keeps the smallest
set reaching tau of the total influence, rounded UP to a compiled bucket (or everything). Policies decide
WHICH tokens fill a keep count; all rank by the same influence scores except the baselines."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from topi_export.errors import TopiError


def validate_ratio(ratio: float, what: str = "ratio") -> float:
    ratio = float(ratio)
    if not math.isfinite(ratio) or not 0.0 <= ratio < 1.0:
        raise TopiError(f"{what} {ratio} is outside [0, 1): it is the fraction of context tokens pruned "
                        f"(e.g. 0.5 keeps half)")
    return ratio


def parse_buckets(text) -> tuple[float, ...]:
    """'0.3,0.5' -> (0.3, 0.5); each in (0,1), ascending, no duplicates."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise TopiError(f"bad --ratio-buckets {text!r}: give comma-separated fractions, e.g. 0.3,0.5")
    else:
        values = [float(v) for v in text]
    if not values:
        raise TopiError("--ratio-buckets is empty: give comma-separated fractions, e.g. 0.3,0.5")
    for v in values:
        if not math.isfinite(v) or not 0.0 < v < 1.0:
            raise TopiError(f"ratio bucket {v} is outside (0, 1): each bucket is a prune fraction, e.g. 0.3,0.5")
    if len(set(values)) != len(values):
        raise TopiError(f"duplicate ratio buckets in {values}: list each bucket once")
    if values != sorted(values):
        raise TopiError(f"ratio buckets {values} are not ascending: write them sorted, e.g. "
                        f"{','.join(str(v) for v in sorted(values))}")
    return tuple(values)


def keep_count(ratio: float, num_ctx: int) -> int:
    # round() guards float noise such as (1-0.3)*10 = 6.999999999999999 -> 7 -> ceil stays 7
    return max(1, math.ceil(round((1.0 - ratio) * num_ctx, 9)))


def tau_keep_count(influence: torch.Tensor, tau: float) -> int:
    """Smallest m with sum of the m largest influences >= tau * total."""
    values = influence.double().flatten().sort(descending=True).values.clamp_min(0)
    total = values.sum()
    if total <= 0:
        return values.numel()
    cum = values.cumsum(0)
    m = int(torch.searchsorted(cum, tau * total - 1e-12 * total).item()) + 1
    return min(m, values.numel())


# --- policies: (influence [Nc], k, grid (h, w), generator) -> sorted int64 indices -------------------

def _topi(influence, k, grid, gen):
    return influence.topk(k).indices


def _random(influence, k, grid, gen):
    return torch.randperm(influence.numel(), generator=gen)[:k]


def _uniform(influence, k, grid, gen):
    n = influence.numel()
    return (torch.arange(k, dtype=torch.float64) * n / k).floor().long()


def _coverage(influence, k, grid, gen, cell: int = 2):
    """Influence ranking within spatial strata: every cell x cell block keeps its share (floor(k/N) of its
    tokens, best-influence first); the remaining slots go to the highest influence globally."""
    h, w = grid
    n = influence.numel()
    if h * w != n:
        return _topi(influence, k, grid, gen)
    rows = torch.arange(h).repeat_interleave(w) // cell
    cols = torch.arange(w).repeat(h) // cell
    cell_id = rows * ((w + cell - 1) // cell) + cols
    chosen = torch.zeros(n, dtype=torch.bool)
    for c in cell_id.unique():
        members = (cell_id == c).nonzero().flatten()
        quota = int(members.numel() * k // n)
        if quota:
            chosen[members[influence[members].topk(quota).indices]] = True
    rest = k - int(chosen.sum())
    if rest > 0:
        masked = influence.clone().float()
        masked[chosen] = -float("inf")
        chosen[masked.topk(rest).indices] = True
    return chosen.nonzero().flatten()


def _bayer_rank(grid) -> torch.Tensor:
    """Ordered-dither threshold of every token: removing tokens in this order spreads them evenly."""
    h, w = grid
    m = torch.zeros(1, 1)
    while m.shape[0] < max(h, w):
        m = torch.cat([torch.cat([4 * m, 4 * m + 2], 1), torch.cat([4 * m + 3, 4 * m + 1], 1)], 0)
    return m[:h, :w].reshape(-1)


def _dither(influence, k, grid, gen, low: float = 0.5):
    """Coverage-aware ToPi: first drop the tokens whose influence is far below the median (lowest first),
    then remove the rest by an ordered (Bayer) dither so no region loses all its tokens; tokens with the
    same dither threshold go lowest-influence first. Copy-like edits need a source near every target."""
    h, w = grid
    n = influence.numel()
    if h * w != n:
        return _topi(influence, k, grid, gen)
    drop = torch.zeros(n, dtype=torch.bool)
    order = influence.argsort()
    weak = order[influence[order] < low * influence.median()][: n - k]
    drop[weak] = True
    rest = n - k - len(weak)
    if rest > 0:
        score = _bayer_rank(grid) - 0.5 * influence / influence.max().clamp_min(1e-30)
        score[drop] = -float("inf")
        drop[score.topk(rest).indices] = True
    return (~drop).nonzero().flatten()


# The default is the policy with the best measured fidelity at equal keep count on the trained model's
# held-out samples (docs/benchmarks.md): top-k by influence leaves spatial holes on copy-like edits.
DEFAULT_POLICY = "topi-dither"

POLICIES = {"topi": _topi, "topi-dither": _dither, "topi-cov": _coverage, "random": _random, "uniform": _uniform}


def select_tokens(influence: torch.Tensor, k: int, policy: str = DEFAULT_POLICY, grid=None, seed: int = 0) -> torch.Tensor:
    influence = influence.flatten().float()
    n = influence.numel()
    if policy not in POLICIES:
        raise TopiError(f"unknown policy {policy!r}: choose one of {', '.join(POLICIES)}")
    if k >= n:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    idx = POLICIES[policy](influence, k, grid or (1, n), gen)
    return idx.sort().values.long()


@dataclass
class Selector:
    """Turns an anchor step's influence into kept indices. mode 'ratio' (one ratio) or 'tau' (buckets)."""

    num_ctx: int
    ratio: float = 0.0
    tau: float | None = None
    buckets: tuple[float, ...] = ()
    policy: str = DEFAULT_POLICY
    grid: tuple[int, int] | None = None
    seed: int = 0

    def __post_init__(self):
        if self.tau is not None:
            if not 0.0 < self.tau <= 1.0:
                raise TopiError(f"--tau {self.tau} is outside (0, 1]: it is the fraction of total influence kept")
            if not self.buckets:
                raise TopiError("--tau needs --ratio-buckets: the kept count is rounded up to a compiled bucket")
        else:
            validate_ratio(self.ratio)
        if self.policy not in POLICIES:
            raise TopiError(f"unknown policy {self.policy!r}: choose one of {', '.join(POLICIES)}")

    def bucket_keeps(self) -> list[tuple[float, int]]:
        return [(r, keep_count(r, self.num_ctx)) for r in self.buckets]

    def choose(self, influence: torch.Tensor) -> tuple[float, int]:
        """(ratio, keep) to use after this anchor; ratio 0 / keep Nc means unpruned."""
        if self.tau is None:
            return self.ratio, keep_count(self.ratio, self.num_ctx)
        need = tau_keep_count(influence, self.tau)
        fits = [(r, k) for r, k in self.bucket_keeps() if k >= need]
        if not fits:
            return 0.0, self.num_ctx
        return min(fits, key=lambda rk: rk[1])

    def select(self, influence: torch.Tensor, step: int = 0):
        """(keep_idx or None for unpruned, ratio, keep)."""
        ratio, keep = self.choose(influence)
        if keep >= self.num_ctx:
            return None, 0.0, self.num_ctx
        idx = select_tokens(influence, keep, self.policy, self.grid, self.seed + step)
        return idx, ratio, keep
