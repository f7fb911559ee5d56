"""Candidate selection rules measured while choosing topi-mix (docs/benchmarks.md, section 2). Load them with
``python scripts/experiment_selection.py --extra scripts/selection_candidates.py --policies k-g05,...``; each is
registered into ``topi_export.method.selection.POLICIES`` under the name its report uses:

  k-g05, k-g2      topi-budget with the quadtree children weighing size * density^gamma (0.5, 2) instead of mass
  k-cell4          topi-budget following influence down to 4x4 cells instead of 2x2
  v1-25            topi-budget, then the slots it put on irrelevant tokens (block relevance < 0.25, blocks of side
                   round(sqrt(hw / 16))) re-placed on the strongest irrelevant tokens of the same reference
  v2-25            relevant tokens first (same relevance), spread by topi-budget; the rest top-k ("relevant first")
"""
import torch

from topi_export.method import selection as S
from topi_export.method.selection import Policy, _offsets


def _tempered(gamma):
    def fn(influence, k, grids, gen):
        return S._per_reference(influence.double().clamp_min(0), k, grids,
                                lambda w, q, g: S._quadtree_keep(w, q, g, S.BUDGET_CELL, gamma))
    return fn


def _cell(cell):
    def fn(influence, k, grids, gen):
        return S._per_reference(influence.double().clamp_min(0), k, grids,
                                lambda w, q, g: S._quadtree_keep(w, q, g, cell))
    return fn


def _block_ids(grid):
    h, w = grid
    side = max(2, round((h * w / 16) ** 0.5))
    return (torch.arange(h).repeat_interleave(w) // side) * ((w + side - 1) // side) + torch.arange(w).repeat(h) // side


def _relevance(w, grids):
    offs = _offsets(grids)
    dens = torch.empty_like(w)
    for a, b, g in zip(offs, offs[1:], grids):
        ids = _block_ids(g)
        m = torch.zeros(int(ids.max()) + 1, dtype=torch.float64).index_add_(0, ids, w[a:b])
        dens[a:b] = (m / torch.bincount(ids).double())[ids]
    return dens / max(float((w * dens).sum() / w.sum().clamp_min(1e-300)), 1e-300)


def _rank_irrelevant(theta):
    def fn(influence, k, grids, gen):
        w = influence.double().clamp_min(0)
        idx = S._budget(w, k, grids, gen)
        if w.sum() <= 0:
            return idx
        rel = _relevance(w, grids) >= theta
        kept = torch.zeros(w.numel(), dtype=torch.bool)
        kept[idx] = True
        offs = _offsets(grids)
        for a, b in zip(offs, offs[1:]):
            irr = (~rel[a:b]).nonzero().flatten() + a
            c = int(kept[irr].sum())
            kept[irr] = False
            if c:
                kept[irr[w[irr].topk(c).indices]] = True
        return kept.nonzero().flatten()
    return fn


def _relevant_first(theta):
    def fn(influence, k, grids, gen):
        w = influence.double().clamp_min(0)
        if w.sum() <= 0:
            return S._budget(w, k, grids, gen)
        rel = _relevance(w, grids) >= theta
        n_rel = int(rel.sum())
        kept = torch.zeros(w.numel(), dtype=torch.bool)
        if k >= n_rel:
            kept[rel] = True
            if k > n_rel:
                kept[torch.where(rel, torch.full_like(w, -1.0), w).topk(k - n_rel).indices] = True
        else:
            kept[S._budget(torch.where(rel, w, torch.zeros_like(w)), k, grids, gen)] = True
        return kept.nonzero().flatten()
    return fn


CANDIDATES = {"k-g05": _tempered(0.5), "k-g2": _tempered(2.0), "k-cell4": _cell(4),
              "v1-25": _rank_irrelevant(0.25), "v2-25": _relevant_first(0.25)}
for name, fn in CANDIDATES.items():
    S.POLICIES[name] = Policy(fn, True, f"candidate {name} (scripts/selection_candidates.py)")
