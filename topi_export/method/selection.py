"""Selection (docs/design.md, "The method"): fixed ratio r keeps ceil((1-r)|C|) tokens; adaptive tau keeps the smallest
set reaching tau of the total influence, rounded UP to a compiled bucket (or everything), and the kept set
holds at least tau of the influence mass whatever the policy. Policies decide WHICH tokens fill a keep count.

The context C is the concatenation of one or more references, each a token grid (H_i x W_i, raster order,
references in order): ``grids``. Callers that know no grid pass ``((1, Nc),)``."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from topi_export.errors import TopiError
from topi_export.plan.layout import keep_count
from topi_export.plan.limits import check_tau

Grids = tuple[tuple[int, int], ...]


def validate_ratio(ratio: float, what: str = "ratio") -> float:
    ratio = float(ratio)
    if not math.isfinite(ratio) or not 0.0 <= ratio < 1.0:
        raise TopiError(f"{what} {ratio} is outside [0, 1): it is the fraction of context tokens pruned "
                        f"(e.g. 0.5 keeps half)")
    return ratio


def check_bucket_keeps(ratios, num_ctx: int) -> None:
    """Engines are compiled per keep count: two buckets with the same count are one engine twice, and a bucket that
    keeps every context token prunes nothing."""
    seen: dict[int, float] = {}
    for r in ratios:
        k = keep_count(r, num_ctx)
        if k >= num_ctx:
            raise TopiError(f"ratio bucket {r:g} keeps all {num_ctx} context tokens: it prunes nothing; drop it or use "
                            f"a larger ratio")
        if k in seen:
            raise TopiError(f"ratio buckets {seen[k]:g} and {r:g} both keep {k} of {num_ctx} context tokens: "
                            f"drop one or space the buckets further apart")
        seen[k] = r


def parse_buckets(text, num_ctx: int | None = None) -> tuple[float, ...]:
    """'0.3,0.5' -> (0.3, 0.5); each in (0,1), ascending, no duplicates; with num_ctx, distinct keep counts."""
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
    if num_ctx is not None:
        check_bucket_keeps(values, num_ctx)
    return tuple(values)


def _mass(influence: torch.Tensor) -> torch.Tensor:
    return influence.detach().double().flatten().clamp_min(0)


def tau_keep_count(influence: torch.Tensor, tau: float) -> int:
    """Smallest m with sum of the m largest influences >= tau * total (negative influence counts as 0)."""
    values = _mass(influence).sort(descending=True).values
    total = values.sum()
    if total <= 0:
        return values.numel()
    cum = values.cumsum(0)
    m = int(torch.searchsorted(cum, tau * total - 1e-12 * total).item()) + 1
    return min(m, values.numel())


def kept_mass(influence: torch.Tensor, idx) -> float:
    """Fraction of the total influence mass that the kept indices hold (1.0 when all influence is zero)."""
    mass = _mass(influence)
    total = float(mass.sum())
    if total <= 0:
        return 1.0
    if idx is None:
        return 1.0
    return float(mass[torch.as_tensor(idx, dtype=torch.long)].sum()) / total


def ensure_mass(influence: torch.Tensor, idx: torch.Tensor, tau: float) -> torch.Tensor:
    """Repair a placement so that it holds >= tau of the influence mass: swap its weakest kept tokens for the
    strongest dropped ones, as few swaps as reach tau (the top-k set always does when k >= tau_keep_count)."""
    mass = _mass(influence)
    total = float(mass.sum())
    if total <= 0:
        return idx
    goal = tau * total - 1e-12 * total  # the same criterion as tau_keep_count
    have = float(mass[idx].sum())
    if have >= goal:
        return idx
    kept = torch.zeros(mass.numel(), dtype=torch.bool)
    kept[idx] = True
    ins = kept.nonzero().flatten()
    outs = (~kept).nonzero().flatten()
    weakest = ins[mass[ins].argsort(stable=True)]
    strongest = outs[mass[outs].argsort(descending=True, stable=True)]
    s = min(len(weakest), len(strongest))
    gain = (mass[strongest[:s]] - mass[weakest[:s]]).clamp_min(0).cumsum(0)  # non-decreasing: searchable
    swaps = int(torch.searchsorted(gain, goal - have).item()) + 1
    swaps = min(swaps, s)
    kept[weakest[:swaps]] = False
    kept[strongest[:swaps]] = True
    return kept.nonzero().flatten()


# --- grids ------------------------------------------------------------------------------------------

def normalize_grids(grids, num_ctx: int) -> Grids:
    """() -> ((1, Nc),); a single (h, w) -> ((h, w),); every grid positive and all of them summing to Nc."""
    if not grids:
        return ((1, int(num_ctx)),)
    grids = tuple(grids)
    if len(grids) == 2 and all(isinstance(g, int) for g in grids):
        grids = (grids,)
    try:
        out = tuple((int(h), int(w)) for h, w in grids)
    except (TypeError, ValueError):
        raise TopiError(f"reference grids {grids!r} are not (height, width) pairs: pass e.g. ((16, 16), (8, 12))")
    if any(h <= 0 or w <= 0 for h, w in out):
        raise TopiError(f"reference grids {out} have an empty grid: every reference needs at least one token")
    if sum(h * w for h, w in out) != num_ctx:
        raise TopiError(f"reference grids {out} hold {sum(h * w for h, w in out)} tokens but the context has "
                        f"{num_ctx}: give one (height, width) per reference, in order")
    return out


def _offsets(grids: Grids) -> list[int]:
    out = [0]
    for h, w in grids:
        out.append(out[-1] + h * w)
    return out


def keep_per_reference(idx, grids) -> list[int]:
    """How many kept indices fall in each reference."""
    grids = tuple(grids)
    bounds = torch.tensor(_offsets(grids)[1:])
    idx = torch.as_tensor(idx, dtype=torch.long).flatten()
    ref = torch.bucketize(idx, bounds, right=True)
    return torch.bincount(ref, minlength=len(grids)).tolist()


def bayer_rank(grid) -> torch.Tensor:
    """Ordered-dither threshold of every token of an h x w grid (the Bayer matrix of the enclosing
    power-of-two square, cropped): keeping the lowest thresholds first spreads tokens evenly."""
    h, w = grid
    levels = max(max(h, w) - 1, 0).bit_length()
    i = torch.arange(h).repeat_interleave(w)
    j = torch.arange(w).repeat(h)
    rank = torch.zeros(h * w, dtype=torch.long)
    for lev in range(levels):  # the finest bit is the most significant digit
        di, dj = (i >> lev) & 1, (j >> lev) & 1
        rank = rank * 4 + ((2 * dj) ^ (3 * di))  # the 2x2 Bayer matrix [[0, 2], [3, 1]]
    return rank


# --- allocation: largest remainder, capped, caps redistributed --------------------------------------

def _apportion(weights: torch.Tensor, quota: torch.Tensor, caps: torch.Tensor, priority: torch.Tensor) -> torch.Tensor:
    """Split each group's quota over its members in proportion to their weights: rows are groups [G, m].
    Members are capped by caps (the overflow goes to the others by weight; a group whose uncapped members
    all weigh 0 splits by room left); rounding by largest remainder, ties to the lowest priority value.
    Needs quota <= caps.sum(1). Returns int64 [G, m] summing to quota per row."""
    weights = weights.double().clamp_min(0)
    caps = caps.long()
    quota = quota.long()
    alloc = torch.zeros_like(caps)
    for _ in range(weights.shape[1] + 1):
        room = caps - alloc
        left = (quota - alloc.sum(1)).double()
        active = room > 0
        w = torch.where(active, weights, torch.zeros_like(weights))
        flat = w.sum(1, keepdim=True) <= 0
        w = torch.where(flat, room.double() * active, w)
        share = left[:, None] * w / w.sum(1, keepdim=True).clamp_min(1e-300)
        full = active & (share >= room) & (left[:, None] > 0)
        if not full.any():
            break
        alloc = torch.where(full, caps, alloc)
    base = torch.where(active, share.floor(), torch.zeros_like(share))
    base = torch.minimum(base.long(), caps - alloc)
    alloc = alloc + base
    leftover = quota - alloc.sum(1)
    rem = torch.where(active & (caps > alloc), share - base.double(), torch.full_like(share, -1.0))
    # rank by remainder (descending), ties by priority: sort by priority first, then a stable sort by remainder
    by_prio = priority.expand_as(rem).argsort(dim=1, stable=True)
    rem_p = rem.gather(1, by_prio)
    order = by_prio.gather(1, rem_p.argsort(dim=1, descending=True, stable=True))
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order).contiguous())
    return alloc + (rank < leftover[:, None]).long()


def _temper(mass: torch.Tensor, size: torch.Tensor, gamma: float) -> torch.Tensor:
    """size * (mass / size)^gamma (0 where size is 0): the mass itself at gamma 1."""
    if gamma == 1.0:
        return mass.double()
    size = size.double()
    dens = (mass.double() / size.clamp_min(1)).clamp_min(0)
    return torch.where(size > 0, size * dens ** gamma, torch.zeros_like(size))


def _split_references(weights: torch.Tensor, k: int, grids: Grids) -> list[int]:
    """k slots over the references in proportion to their weight sums, capped by their sizes."""
    offs = _offsets(grids)
    sums = torch.stack([weights[a:b].sum() for a, b in zip(offs, offs[1:])])
    sizes = torch.tensor([h * w for h, w in grids])
    return _apportion(sums[None], torch.tensor([k]), sizes[None], torch.arange(len(grids))[None])[0].tolist()


def _quadtree_keep(weights: torch.Tensor, q: int, grid: tuple[int, int], cell: int = 1,
                   gamma: float = 1.0) -> torch.Tensor:
    """Hierarchical budget on one reference: the grid (padded to powers of two) is halved along each side
    level by level; every node's slots go to its children in proportion to their weight, capped by their
    token counts, by largest remainder; equal remainders go to the child holding the lowest ordered-dither
    threshold. So counts follow the weights at every scale and equal weights give an even 2-D spread
    (a checkerboard at half). gamma < 1 tempers the weights: a child weighs size * density^gamma (1: its mass;
    0: its size, the uniform spread). Returns the kept local indices."""
    h, w = grid
    a, b = max(h - 1, 0).bit_length(), max(w - 1, 0).bit_length()
    H, W = 1 << a, 1 << b
    wgt = torch.zeros(H, W, dtype=torch.float64)
    cap = torch.zeros(H, W, dtype=torch.long)
    prio = torch.full((H, W), torch.iinfo(torch.long).max, dtype=torch.long)
    wgt[:h, :w] = weights.double().reshape(h, w)
    cap[:h, :w] = 1
    prio[:h, :w] = bayer_rank(grid).reshape(h, w)
    pyramid = []  # per level, (weights, caps, priority) pooled to nodes, coarse to fine
    for lev in range(max(a, b) + 1):
        hs, ws = H >> min(lev, a), W >> min(lev, b)
        pool = lambda t: t.reshape(H // hs, hs, W // ws, ws).transpose(1, 2).reshape(H // hs, W // ws, -1)  # noqa: E731
        pyramid.append((pool(wgt).sum(-1), pool(cap).sum(-1), pool(prio).amin(-1)))
    quota = torch.tensor([[q]])
    for (pw, _, _), (cw, cc, cp) in zip(pyramid, pyramid[1:]):
        R, C = pw.shape
        fr, fc = cw.shape[0] // R, cw.shape[1] // C
        group = lambda t: t.reshape(R, fr, C, fc).permute(0, 2, 1, 3).reshape(R * C, fr * fc)  # noqa: E731
        # below the budget cell size the weights are flat: slots are spread, not ranked by influence
        cw = _temper(cw, cc, gamma) if cw.numel() * cell * cell <= H * W else cc.double()
        alloc = _apportion(group(cw), quota.reshape(-1), group(cc), group(cp))
        quota = alloc.reshape(R, C, fr, fc).permute(0, 2, 1, 3).reshape(R * fr, C * fc)
    return quota[:h, :w].reshape(-1).nonzero().flatten()


# --- policies: (influence [Nc], k, grids, generator) -> int64 indices (any order) --------------------

def _per_reference(weights, k, grids, place) -> torch.Tensor:
    offs = _offsets(grids)
    parts = [place(weights[a:b], q, g) + a
             for a, b, q, g in zip(offs, offs[1:], _split_references(weights, k, grids), grids) if q > 0]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _topi(influence, k, grids, gen):
    return influence.topk(k).indices


def _random(influence, k, grids, gen):
    return torch.randperm(influence.numel(), generator=gen)[:k]


# Smallest region (tokens per side) whose slots follow influence; inside it slots are spread. Ranking
# single tokens by influence within 2x2 cells breaks the checkerboard and leaves gaps that copy-like
# edits pay for (several dB on kontext-digits at ratio 0.5); budgeting whole 2x2 cells does not.
BUDGET_CELL = 2


def _budget(influence, k, grids, gen):
    return _per_reference(influence.double().clamp_min(0), k, grids,
                          lambda w, q, g: _quadtree_keep(w, q, g, BUDGET_CELL))


def _uniform(influence, k, grids, gen):
    return _per_reference(torch.ones(influence.numel(), dtype=torch.float64), k, grids, _quadtree_keep)


def _dither_keep(weights, q, grid):
    return bayer_rank(grid).argsort(stable=True)[:q]


def _dither(influence, k, grids, gen):
    return _per_reference(torch.ones(influence.numel(), dtype=torch.float64), k, grids, _dither_keep)


def _coverage(influence, k, grids, gen, cell: int = 2):
    """Strata = cell x cell blocks of every reference; each keeps floor(size * k / Nc) tokens, best influence
    first; the remaining slots go to the highest influence anywhere."""
    n = influence.numel()
    ids = []
    base = 0
    for h, w in grids:
        cw = (w + cell - 1) // cell
        rows = torch.arange(h).repeat_interleave(w) // cell
        cols = torch.arange(w).repeat(h) // cell
        ids.append(base + rows * cw + cols)
        base += ((h + cell - 1) // cell) * cw
    cell_id = torch.cat(ids)
    size = torch.bincount(cell_id, minlength=base)
    quota = size * k // n
    # position of every token within its cell by influence (descending): sort by influence, then stably by cell
    by_infl = influence.argsort(descending=True, stable=True)
    order = by_infl[cell_id[by_infl].argsort(stable=True)]
    start = torch.cumsum(size, 0) - size
    pos = torch.empty(n, dtype=torch.long)
    pos[order] = torch.arange(n) - start[cell_id[order]]
    chosen = pos < quota[cell_id]
    rest = k - int(chosen.sum())
    if rest > 0:
        masked = influence.clone().float()
        masked[chosen] = -float("inf")
        chosen[masked.topk(rest).indices] = True
    return chosen.nonzero().flatten()


# --- topi-mix: cover what the target copies from, rank what it only glances at -----------------------------
# docs/design.md, "Selection". Each reference is cut into about MIX_BLOCKS square blocks; a block is relevant when its
# influence density reaches MIX_RELEVANCE of the density an average unit of influence sits at (the mass-weighted
# mean block density over every reference). Relevant tokens are kept first, split over the references by mass and
# spread inside each by the tempered budget (the target copies them by position: holes cost, so coverage wins);
# slots left over go to the strongest other tokens (nothing copies them: what their loss costs is the attention mass
# they held, so top-k wins).
MIX_BLOCKS = 16
# between the blocks of copy-like edits (>= 0.36 on kontext-digits) and unselected references (<= 0.21 on flux2-pick)
MIX_RELEVANCE = 0.3
MIX_GAMMA = 0.5  # inside a reference, slots follow size * density^0.5: half way from the uniform spread


def _block_ids(grid) -> torch.Tensor:
    """Block of every token of an h x w grid, in raster order: square blocks whose side is the power of two nearest
    (in log scale) to sqrt(hw / MIX_BLOCKS), at least 2, so that blocks line up with the halves and quarters of the
    usual grids (edge blocks may be smaller)."""
    h, w = grid
    side = 1 << max(1, round(math.log2(max(h * w / MIX_BLOCKS, 1)) / 2))
    bh = min(h, side)
    bw = max(1, side * side // bh)  # a grid thinner than a block (one row: no grid known) gets side^2-token runs
    rows = torch.arange(h).repeat_interleave(w) // bh
    cols = torch.arange(w).repeat(h) // bw
    return rows * ((w + bw - 1) // bw) + cols


def relevance(influence: torch.Tensor, grids) -> torch.Tensor:
    """Per token, its block's influence density over the mass-weighted mean block density of all references (float64
    [Nc]; ~1 where the target copies from, a small fraction where it only glances; all ones without influence)."""
    w = _mass(influence)
    grids = normalize_grids(grids, w.numel())
    total = float(w.sum())
    if total <= 0:
        return torch.ones_like(w)
    dens = torch.empty_like(w)
    offs = _offsets(grids)
    for a, b, g in zip(offs, offs[1:], grids):
        ids = _block_ids(g)
        mass = torch.zeros(int(ids.max()) + 1, dtype=torch.float64).index_add_(0, ids, w[a:b])
        dens[a:b] = (mass / torch.bincount(ids).double())[ids]
    return dens / (float((w * dens).sum()) / total)


def _mix(influence, k, grids, gen):
    w = influence.double().clamp_min(0)
    if float(w.sum()) <= 0:
        return _uniform(influence, k, grids, gen)
    rel = relevance(w, grids) >= MIX_RELEVANCE
    n_rel = int(rel.sum())
    if k < n_rel:
        return _per_reference(torch.where(rel, w, torch.zeros_like(w)), k, grids,
                              lambda x, q, g: _quadtree_keep(x, q, g, BUDGET_CELL, MIX_GAMMA))
    kept = rel.clone()
    if k > n_rel:
        kept[torch.where(rel, torch.full_like(w, -1.0), w).topk(k - n_rel).indices] = True
    return kept.nonzero().flatten()


@dataclass(frozen=True)
class Policy:
    fn: Callable
    uses_influence: bool
    description: str


POLICIES: dict[str, Policy] = {
    "topi-mix": Policy(_mix, True,
                       "influence density marks what the target copies from (relevant blocks): those tokens are kept "
                       "first, spread by an influence budget; the slots left go to the strongest other tokens"),
    "topi-budget": Policy(_budget, True,
                          "influence mass budgets the slots per reference and per region (the grid halved level "
                          "by level down to 2x2 cells), spread evenly inside every cell"),
    "topi": Policy(_topi, True, "the paper's top-k by influence"),
    "topi-cov": Policy(_coverage, True,
                       "every 2x2 cell keeps its size share by influence, the rest to the top influence"),
    "uniform": Policy(_uniform, False, "even 2-D subsampling of every reference, slots in proportion to its size"),
    "dither": Policy(_dither, False,
                     "ordered (Bayer) dither of every reference, slots in proportion to its size"),
    "random": Policy(_random, False, "uniformly random tokens (seeded)"),
}

# The default must hold on copy-like edits (every reference token is a source: coverage) and on relevance edits
# (several references, or a canvas used in part: what the target does not copy from is ranked, not covered), on
# models it was not tuned on, calibrated or not (docs/benchmarks.md, section 2).
DEFAULT_POLICY = "topi-mix"

RENAMED = {"topi-dither": "dither"}


def check_policy(name: str) -> str:
    if name in POLICIES:
        return name
    if name in RENAMED:
        raise TopiError(f"policy {name!r} was renamed to {RENAMED[name]!r} (it never used influence beyond "
                        f"dropping the weakest tokens); the default is now {DEFAULT_POLICY!r}: pass --policy "
                        f"{DEFAULT_POLICY} or --policy {RENAMED[name]}")
    raise TopiError(f"unknown policy {name!r}: choose one of {', '.join(POLICIES)}")


def policy_help() -> str:
    return "; ".join(f"{n}: {p.description}" + (" (default)" if n == DEFAULT_POLICY else "")
                     for n, p in POLICIES.items())


def select_tokens(influence: torch.Tensor, k: int, policy: str = DEFAULT_POLICY, grids=(),
                  seed: int = 0) -> torch.Tensor:
    """k kept context indices, sorted ascending int64 (all of them when k >= Nc)."""
    influence = influence.detach().flatten().float().cpu()
    n = influence.numel()
    fn = POLICIES[check_policy(policy)].fn
    grids = normalize_grids(grids, n)
    if k >= n:
        return torch.arange(n)
    if k <= 0:
        raise TopiError(f"keep count {k} is not positive: keep at least one context token")
    gen = torch.Generator().manual_seed(seed)
    idx = fn(influence, k, grids, gen).long().flatten().sort().values
    if idx.numel() != k or (idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all())):
        raise RuntimeError(f"policy {policy} returned {idx.numel()} indices for keep {k} (or duplicates)")
    return idx


@dataclass(frozen=True)
class Selector:
    """Turns an anchor step's influence into kept indices: one ratio, or tau with compiled buckets."""

    num_ctx: int
    ratio: float = 0.0
    tau: float | None = None
    buckets: tuple[float, ...] = ()
    policy: str = DEFAULT_POLICY
    grids: Grids = ()
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "grids", normalize_grids(self.grids, self.num_ctx))
        object.__setattr__(self, "buckets", tuple(float(b) for b in self.buckets))
        if self.tau is not None:
            check_tau(self.tau)
            if not self.buckets:
                raise TopiError("--tau needs --ratio-buckets: the kept count is rounded up to a compiled bucket")
            check_bucket_keeps(self.buckets, self.num_ctx)
        else:
            validate_ratio(self.ratio)
        check_policy(self.policy)

    def bucket_keeps(self) -> list[tuple[float, int]]:
        return [(r, keep_count(r, self.num_ctx)) for r in self.buckets]

    def choose(self, influence: torch.Tensor | None) -> tuple[float, int]:
        """(ratio, keep) to use after this anchor; ratio 0 / keep Nc means unpruned."""
        if self.tau is None:
            return self.ratio, keep_count(self.ratio, self.num_ctx)
        need = tau_keep_count(influence, self.tau)
        fits = [(r, k) for r, k in self.bucket_keeps() if k >= need]
        if not fits:
            return 0.0, self.num_ctx
        return min(fits, key=lambda rk: rk[1])

    def select(self, influence: torch.Tensor, step: int = 0):
        """(keep_idx sorted int64, or None for unpruned; ratio; keep)."""
        ratio, keep = self.choose(influence)
        if keep >= self.num_ctx:
            return None, 0.0, self.num_ctx
        idx = select_tokens(influence, keep, self.policy, self.grids, self.seed + step)
        if self.tau is not None:
            idx = ensure_mass(influence.detach().flatten().cpu(), idx, self.tau).sort().values
        return idx, ratio, keep
