"""Selection policies on several references: contract, budgets, spread, and tau's influence-mass guarantee."""
import dataclasses

import pytest
import torch

from topi_export.errors import TopiError
from topi_export.method.selection import (DEFAULT_POLICY, MIX_RELEVANCE, POLICIES, Selector, check_bucket_keeps,
                                          keep_count, keep_per_reference, kept_mass, parse_buckets, relevance,
                                          select_tokens, tau_keep_count)

BUDGET = "topi-budget"
GRID_CASES = [((16, 16),), ((1, 37),), ((5, 9),), ((12, 20), (7, 3), (16, 16)), ((1, 1), (9, 6))]


def _n(grids):
    return sum(h * w for h, w in grids)


def _kept_grid(idx, grid, offset=0):
    h, w = grid
    mask = torch.zeros(h * w, dtype=torch.bool)
    local = idx[(idx >= offset) & (idx < offset + h * w)] - offset
    mask[local] = True
    return mask.reshape(h, w)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_policy_is_deterministic_exact_sorted_unique_in_range(policy):
    gen = torch.Generator().manual_seed(0)
    for grids in GRID_CASES:
        n = _n(grids)
        infl = torch.rand(n, generator=gen) ** 3
        for k in sorted({1, 2, n // 3, n // 2, n - 1}):
            if k < 1:
                continue
            idx = select_tokens(infl, k, policy, grids, seed=5)
            assert idx.dtype == torch.int64 and idx.numel() == k
            assert idx.unique().numel() == k and torch.equal(idx, idx.sort().values)
            assert int(idx.min()) >= 0 and int(idx.max()) < n
            assert torch.equal(idx, select_tokens(infl.clone(), k, policy, grids, seed=5))
            assert sum(keep_per_reference(idx, grids)) == k
        assert torch.equal(select_tokens(infl, n, policy, grids), torch.arange(n))


def test_topi_is_the_plain_top_k():
    infl = torch.rand(300, generator=torch.Generator().manual_seed(2))
    idx = select_tokens(infl, 77, "topi", ((10, 30),))
    assert torch.equal(idx, infl.topk(77).indices.sort().values)
    assert select_tokens(torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2]), 2, "topi").tolist() == [1, 3]


@pytest.mark.parametrize("policy", ["uniform", "dither"])
def test_influence_free_baselines_split_by_reference_size(policy):
    grids = ((16, 16), (8, 8), (4, 8))  # 256 + 64 + 32 = 352 tokens
    infl = torch.zeros(352)
    infl[256:] = 1.0  # all the influence in the small references: the baselines do not care
    assert keep_per_reference(select_tokens(infl, 176, policy, grids), grids) == [128, 32, 16]


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_registry_flag_matches_whether_influence_changes_the_output(policy):
    grids = ((12, 12), (6, 10))
    n = _n(grids)
    gen = torch.Generator().manual_seed(3)
    a, b = torch.rand(n, generator=gen) ** 4, torch.rand(n, generator=gen) ** 4
    b[:144] *= 0.05  # most of b's mass in the second reference
    same = torch.equal(select_tokens(a, 90, policy, grids, seed=1), select_tokens(b, 90, policy, grids, seed=1))
    assert same == (not POLICIES[policy].uses_influence)
    assert POLICIES[policy].description


def test_dither_ignores_influence():
    gen = torch.Generator().manual_seed(4)
    a, b = torch.rand(256, generator=gen), torch.rand(256, generator=gen) ** 6
    assert torch.equal(select_tokens(a, 100, "dither", ((16, 16),)), select_tokens(b, 100, "dither", ((16, 16),)))


def test_influence_changes_the_budget_policy():
    left = torch.ones(16, 16)
    left[:, :8] = 4.0
    right = left.flip(1)
    a = select_tokens(left.flatten(), 96, BUDGET, ((16, 16),))
    b = select_tokens(right.flatten(), 96, BUDGET, ((16, 16),))
    assert not torch.equal(a, b)
    ka, kb = _kept_grid(a, (16, 16)), _kept_grid(b, (16, 16))
    # 4x the influence density -> 4/5 of the slots (each left quadrant 38.4 -> 38), on whichever side it is
    assert int(ka[:, :8].sum()) == 76 and int(kb[:, 8:].sum()) == 76


def test_budget_spreads_evenly_when_influence_is_flat():
    idx = select_tokens(torch.ones(256), 128, BUDGET, ((16, 16),))
    cells = _kept_grid(idx, (16, 16)).reshape(8, 2, 8, 2).sum((1, 3))
    assert (cells == 2).all()
    # nearly flat (noise 1e-3): every 2x2 cell still keeps tokens
    noisy = 1 + 1e-3 * torch.rand(256, generator=torch.Generator().manual_seed(5))
    cells = _kept_grid(select_tokens(noisy, 128, BUDGET, ((16, 16),)), (16, 16)).reshape(8, 2, 8, 2)
    assert (cells.sum((1, 3)) >= 1).all()
    # flat influence is exactly the 2-D uniform policy, on any grids
    grids = ((12, 20), (7, 3))
    for k in (40, 131, 200):
        flat = torch.full((_n(grids),), 0.7)
        assert torch.equal(select_tokens(flat, k, BUDGET, grids), select_tokens(flat, k, "uniform", grids))


def test_budget_keeps_the_reference_that_holds_the_mass():
    grids = ((8, 8), (16, 16), (4, 12))
    n = _n(grids)
    infl = torch.zeros(n)
    infl[64:320] = torch.rand(256, generator=torch.Generator().manual_seed(6)) + 0.5
    assert keep_per_reference(select_tokens(infl, 100, BUDGET, grids), grids) == [0, 100, 0]
    infl[:64] = 1e-5  # (nearly) all the mass: all the slots
    infl[320:] = 1e-5
    assert keep_per_reference(select_tokens(infl, 100, BUDGET, grids), grids)[1] >= 99
    # more slots than that reference holds: it keeps everything, the rest goes to the others
    counts = keep_per_reference(select_tokens(infl, 300, BUDGET, grids), grids)
    assert counts[1] == 256 and sum(counts) == 300


def test_budget_splits_references_and_regions_by_mass():
    grids = ((8, 8), (4, 4))
    infl = torch.cat([torch.full((64,), 3 / 64), torch.full((16,), 1 / 16)])  # mass 3 : 1
    assert keep_per_reference(select_tokens(infl, 40, BUDGET, grids), grids) == [30, 10]
    # a canvas of which a quadrant is used (10x the influence density): the budget follows the mass
    canvas = torch.ones(16, 16)
    canvas[:8, 8:] = 10.0
    for policy, expected in (("uniform", 16), (BUDGET, 49)):  # 64 * 640 / 832 = 49.2
        kept = _kept_grid(select_tokens(canvas.flatten(), 64, policy, ((16, 16),)), (16, 16))
        assert int(kept[:8, 8:].sum()) == expected
    # the rest of the canvas is not abandoned: every 8x8 quadrant keeps tokens
    kept = _kept_grid(select_tokens(canvas.flatten(), 64, BUDGET, ((16, 16),)), (16, 16))
    assert (kept.reshape(2, 8, 2, 8).sum((1, 3)) >= 4).all()


def test_uniform_spreads_rows_and_columns():
    for ratio, per_line in ((0.5, 8), (0.75, None)):
        kept = _kept_grid(select_tokens(torch.rand(256), keep_count(ratio, 256), "uniform", ((16, 16),)), (16, 16))
        assert not kept.all(0).any() and not kept.all(1).any()  # no whole column or row
        if per_line:
            assert (kept.sum(0) == per_line).all() and (kept.sum(1) == per_line).all()
        else:  # one token per 2x2 cell: a lattice over 8 rows x 8 columns
            assert (kept.reshape(8, 2, 8, 2).sum((1, 3)) == 1).all()
            assert int(kept.any(1).sum()) == 8 and int(kept.any(0).sum()) == 8
    kept = _kept_grid(select_tokens(torch.rand(240), 120, "uniform", ((12, 20),)), (12, 20))
    assert kept.any(1).all() and kept.any(0).all()
    assert not kept.all(0).any() and not kept.all(1).any()
    assert (kept.reshape(6, 2, 10, 2).sum((1, 3)) == 2).all()


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_tau_keeps_tau_of_the_influence_mass_whatever_the_policy(policy):
    gen = torch.Generator().manual_seed(7)
    grid_sets = [((16, 16),), ((9, 14),), ((12, 20), (7, 3), (10, 10)), ((1, 50), (6, 6)), ((3, 40), (8, 5))]
    bucket_sets = [(0.3, 0.5), (0.2, 0.4, 0.6, 0.8), (0.5,)]
    for trial in range(24):
        grids = grid_sets[trial % len(grid_sets)]
        n = _n(grids)
        kind = trial % 4
        if kind == 0:  # heavy tail
            infl = torch.rand(n, generator=gen) ** 8
        elif kind == 1:  # (nearly) flat
            infl = 1 + 1e-3 * torch.rand(n, generator=gen)
        elif kind == 2:  # log-normal
            infl = torch.exp(2 * torch.randn(n, generator=gen))
        else:  # most mass in the last reference, spatially clustered
            infl = 0.01 * torch.rand(n, generator=gen)
            h, w = grids[-1]
            infl[n - h * w: n - h * w // 2] += torch.rand(h * w // 2, generator=gen)
        tau = float(torch.rand(1, generator=gen)) * 0.9 + 0.05
        buckets = bucket_sets[trial % len(bucket_sets)]
        sel = Selector(n, tau=tau, buckets=buckets, policy=policy, grids=grids, seed=trial)
        idx, ratio, keep = sel.select(infl, step=trial)
        need = tau_keep_count(infl, tau)
        fits = [k for _, k in sel.bucket_keeps() if k >= need]
        if idx is None:
            assert not fits and keep == n
            continue
        assert keep == min(fits) and keep == keep_count(ratio, n) and ratio in buckets  # rounded UP to a bucket
        assert idx.numel() == keep and idx.unique().numel() == keep and torch.equal(idx, idx.sort().values)
        assert kept_mass(infl, idx) >= tau - 1e-9


def test_tau_repair_leaves_a_placement_that_already_holds_tau_alone():
    infl = torch.ones(256)
    infl[:8] = 3.0
    sel = Selector(256, tau=0.2, buckets=(0.5,), policy="uniform", grids=((16, 16),))
    idx, _, keep = sel.select(infl)
    assert keep == 128 and torch.equal(idx, select_tokens(infl, 128, "uniform", ((16, 16),)))


def test_kept_mass():
    infl = torch.tensor([1.0, -2.0, 3.0, 0.0])
    assert kept_mass(infl, torch.tensor([2])) == pytest.approx(0.75)
    assert kept_mass(infl, torch.tensor([1, 3])) == 0.0
    assert kept_mass(torch.zeros(5), torch.tensor([0])) == 1.0
    assert keep_per_reference(torch.tensor([0, 3, 4, 9]), ((2, 2), (1, 6))) == [2, 2]


def test_old_policy_name_is_refused_with_the_new_names():
    for call in (lambda: select_tokens(torch.rand(16), 8, "topi-dither"),
                 lambda: Selector(16, ratio=0.5, policy="topi-dither")):
        with pytest.raises(TopiError, match="renamed to 'dither'") as err:
            call()
        assert DEFAULT_POLICY in str(err.value)
    with pytest.raises(TopiError, match="choose one of") as err:
        select_tokens(torch.rand(16), 8, "topk")
    assert all(name in str(err.value) for name in POLICIES)


def test_buckets_with_the_same_keep_count_are_refused():
    with pytest.raises(TopiError, match="0.3 and 0.31"):
        parse_buckets("0.3,0.31", num_ctx=10)
    assert parse_buckets("0.3,0.31") == (0.3, 0.31)  # without a context size nothing collapses yet
    assert parse_buckets("0.3,0.5", num_ctx=10) == (0.3, 0.5)
    with pytest.raises(TopiError, match="both keep 7 of 10"):
        check_bucket_keeps((0.3, 0.31), 10)
    with pytest.raises(TopiError):
        Selector(10, tau=0.5, buckets=(0.3, 0.31))


def test_selector_grids_and_modes():
    sel = Selector(40)
    assert sel.grids == ((1, 40),) and sel.policy == DEFAULT_POLICY
    with pytest.raises(dataclasses.FrozenInstanceError):
        sel.ratio = 0.5
    assert Selector(40, grids=((4, 5), (4, 5))).grids == ((4, 5), (4, 5))
    with pytest.raises(TopiError, match="hold 39 tokens"):
        Selector(40, grids=((4, 5), (19, 1)))
    assert sel.select(torch.rand(40)) == (None, 0.0, 40)
    idx, ratio, keep = Selector(40, ratio=0.5, grids=((4, 5), (4, 5))).select(torch.rand(40))
    assert (ratio, keep) == (0.5, 20) and idx.dtype == torch.int64
    assert Selector(40, ratio=0.5).choose(None) == (0.5, 20)
    # tau: no bucket keeps enough -> unpruned
    assert Selector(100, tau=0.95, buckets=(0.3, 0.5)).select(torch.ones(100)) == (None, 0.0, 100)
    # the random policy varies with the anchor step, deterministically
    rnd = Selector(64, ratio=0.5, policy="random", grids=((8, 8),))
    infl = torch.rand(64)
    assert torch.equal(rnd.select(infl, 10)[0], rnd.select(infl, 10)[0])
    assert not torch.equal(rnd.select(infl, 0)[0], rnd.select(infl, 10)[0])


# --- topi-mix (the default): cover what the target copies from, rank the rest ---------------------------
MIX = "topi-mix"


def test_the_default_is_topi_mix():
    assert DEFAULT_POLICY == MIX and POLICIES[MIX].uses_influence
    assert Selector(64).policy == MIX


def test_relevance_is_block_density_over_the_mass_weighted_mean():
    grids = ((8, 8), (4, 12))  # blocks of 2x2 (8x8) and 2x2 (4x12: sqrt(48/16) = 1.7 -> 2)
    w = torch.ones(112)
    w[64:] = 0.1  # the second reference: a tenth of the density
    x = relevance(w, grids)
    star = (64 * 1.0 + 48 * 0.1 * 0.1) / (64 + 48 * 0.1)  # mass-weighted mean density
    torch.testing.assert_close(x[:64], torch.full((64,), 1 / star, dtype=torch.float64))
    torch.testing.assert_close(x[64:], torch.full((48,), 0.1 / star, dtype=torch.float64))
    assert float((w.double() * x).sum() / w.sum()) == pytest.approx(1.0)
    assert torch.equal(relevance(torch.zeros(112), grids), torch.ones(112, dtype=torch.float64))


def test_mix_keeps_the_relevant_reference_whole_then_the_strongest_others():
    grids = ((8, 8), (12, 10), (6, 6))  # 64 + 120 + 36, non-square
    gen = torch.Generator().manual_seed(11)
    infl = 0.02 * torch.rand(220, generator=gen)  # the target only glances at references 0 and 2
    infl[64:184] = 0.5 + torch.rand(120, generator=gen)  # it copies from reference 1
    idx = select_tokens(infl, 150, MIX, grids)
    assert keep_per_reference(idx, grids)[1] == 120
    others = torch.cat([torch.arange(64), torch.arange(184, 220)])
    strongest = others[infl[others].topk(30).indices].sort().values
    assert torch.equal(idx[(idx < 64) | (idx >= 184)], strongest)  # the rest: plain top-k of the others
    # fewer slots than the relevant reference holds: every slot in it, spread like the uniform policy when flat
    infl[64:184] = 1.0
    idx = select_tokens(infl, 60, MIX, grids)
    assert keep_per_reference(idx, grids) == [0, 60, 0]
    assert torch.equal(idx - 64, select_tokens(torch.ones(120), 60, "uniform", ((12, 10),)))


def test_mix_finds_the_relevant_part_of_one_reference():
    """A 16x32 canvas whose left half the target copies from: the left half is kept first (spread when it cannot be
    kept whole), the right half gets the strongest of its tokens."""
    canvas = torch.full((16, 32), 0.2)  # a fifth of the density: the target only glances at the right half
    canvas[:, 16:] += 0.05 * torch.rand(16, 16, generator=torch.Generator().manual_seed(12))
    canvas[:, :16] = 1.0
    infl = canvas.flatten()
    kept = _kept_grid(select_tokens(infl, 256 + 40, MIX, ((16, 32),)), (16, 32))
    assert kept[:, :16].all() and int(kept[:, 16:].sum()) == 40
    right = canvas[:, 16:].flatten()
    assert torch.equal(kept[:, 16:].flatten().nonzero().flatten(), right.topk(40).indices.sort().values)
    kept = _kept_grid(select_tokens(infl, 64, MIX, ((16, 32),)), (16, 32))
    assert not kept[:, 16:].any()
    assert (kept[:, :16].reshape(8, 2, 8, 2).sum((1, 3)) == 1).all()  # one token per 2x2 cell of the left half
    # the plain budget splits by mass instead and leaves holes in the half the target copies from
    assert not _kept_grid(select_tokens(infl, 256 + 40, BUDGET, ((16, 32),)), (16, 32))[:, :16].all()


def test_mix_covers_a_copy_like_reference_and_follows_its_influence_gently():
    """Influence that varies only moderately (a copy-like edit: every token is some target token's source) marks no
    block irrelevant: every 2x2 cell keeps a token at half, and denser regions get more slots, but fewer than the
    plain budget gives them."""
    dens = torch.ones(16, 16)
    dens[:8] = 2.0  # the top half has twice the density
    infl = (dens * (1 + 0.1 * torch.rand(16, 16, generator=torch.Generator().manual_seed(13)))).flatten()
    assert float(relevance(infl, ((16, 16),)).min()) >= MIX_RELEVANCE
    kept = {p: _kept_grid(select_tokens(infl, 128, p, ((16, 16),)), (16, 16)) for p in (MIX, BUDGET, "uniform")}
    assert (kept[MIX].reshape(8, 2, 8, 2).sum((1, 3)) >= 1).all()
    top = {p: int(k[:8].sum()) for p, k in kept.items()}
    assert top["uniform"] == 64 < top[MIX] < top[BUDGET]  # sqrt(2): 128 * 1.41 / 2.41 = 75; by mass 85
    assert abs(top[MIX] - 75) <= 2  # noise of 10% moves a slot or two


def test_mix_threshold_switches_a_reference_from_ranked_to_covered():
    """Two 8x8 references, the second flat at x times the first's density. Below the threshold (relevance 0.295 at
    x = 0.25) the second is only glanced at: the first is kept whole and the second gets its 16 strongest tokens.
    Above it (0.36 at x = 0.3) both are relevant and the 80 slots are split by mass (80 * 0.3 / 1.3 = 18.5)."""
    grids = ((8, 8), (8, 8))
    noise = 1 + 0.01 * torch.rand(64, generator=torch.Generator().manual_seed(3))
    kept = {}
    for x in (0.25, 0.3):
        w = torch.cat([torch.ones(64), x * noise])
        rel = relevance(w, grids)[64:]
        assert (rel < MIX_RELEVANCE).all() if x == 0.25 else (rel >= MIX_RELEVANCE).all()
        kept[x] = select_tokens(w, 80, MIX, grids)
    assert keep_per_reference(kept[0.25], grids) == [64, 16]
    assert torch.equal(kept[0.25][64:] - 64, noise.topk(16).indices.sort().values)
    assert keep_per_reference(kept[0.3], grids) == [61, 19]


@pytest.mark.parametrize("grids", [((16, 16),), ((9, 14), (4, 4)), ((1, 50),), ((3, 40), (8, 5), (10, 10))],
                         ids=lambda g: "+".join(f"{h}x{w}" for h, w in g))
def test_mix_on_one_and_several_references_and_odd_grids(grids):
    n = _n(grids)
    gen = torch.Generator().manual_seed(n)
    for infl in (torch.rand(n, generator=gen) ** 6, torch.zeros(n), torch.ones(n)):
        for k in sorted({1, n // 4, n // 2, n - 1}):
            idx = select_tokens(infl, k, MIX, grids)
            assert idx.numel() == k and torch.equal(idx, idx.unique())
            assert torch.equal(idx, select_tokens(infl, k, MIX, grids, seed=99))  # no randomness
    # no influence at all: the uniform spread
    assert torch.equal(select_tokens(torch.zeros(n), n // 2, MIX, grids), select_tokens(torch.zeros(n), n // 2,
                                                                                     "uniform", grids))


def test_cli_default_policy_on_three_odd_references(tmp_path, capsys):
    """`run` with the default policy on three non-square references: the report names topi-mix, every anchor keeps
    exactly the bucket's count (split over the references), and --tau keeps at least tau of the influence."""
    import json

    from conftest import run_cli
    from topi_export import Layout, load_model, save_inputs

    fam = load_model("tiny-flux2").family
    grids = ((6, 5), (4, 4), (3, 7))  # 30 + 16 + 21 = 67 context tokens
    inputs = tmp_path / "in.safetensors"
    save_inputs(inputs, fam.synthetic_inputs(Layout(4, (4, 6), grids), 3))
    base = ["run", "--model", "tiny-flux2", "--inputs", str(inputs), "--steps", "5", "--update-interval", "2", "-q"]
    code, _, err = run_cli(base + ["--ratio", "0.5", "--json", str(tmp_path / "a.json")], capsys)
    assert code == 0, err
    rep = json.loads((tmp_path / "a.json").read_text())
    assert rep["selection"]["policy"] == MIX == DEFAULT_POLICY
    anchors = [r for r in rep["schedule"] if r["kind"] == "anchor"]
    assert len(anchors) == 3
    for r in anchors:
        assert r["selected_keep"] == keep_count(0.5, 67) == sum(r["selected_per_reference"])
        assert all(0 <= c <= h * w for c, (h, w) in zip(r["selected_per_reference"], grids))
    assert all(r["keep"] == 34 for r in rep["schedule"] if r["kind"] == "pruned")
    code, _, err = run_cli(base + ["--tau", "0.6", "--ratio-buckets", "0.3,0.5", "--json", str(tmp_path / "t.json")],
                           capsys)
    assert code == 0, err
    anchors = [r for r in json.loads((tmp_path / "t.json").read_text())["schedule"] if r["kind"] == "anchor"]
    for r in anchors:
        assert r["kept_influence"] >= 0.6 - 1e-9 and r["selected_keep"] in (keep_count(0.3, 67), 34, 67)
    code, _, err = run_cli(base + ["--policy", "topi-dither"], capsys)
    assert code == 2 and "renamed to 'dither'" in err and MIX in err
