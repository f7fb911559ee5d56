"""Selection, tau rounding, policies and the temporal schedule (model-agnostic)."""
import pytest
import torch

from topi_export.errors import TopiError
from topi_export.method import POLICIES, Selector, keep_count, make_plan, parse_buckets, select_tokens, tau_keep_count


def test_keep_count_rounds_up():
    assert keep_count(0.5, 64) == 32
    assert keep_count(0.3, 10) == 7
    assert keep_count(0.3, 64) == 45  # ceil(44.8)
    assert keep_count(0.0, 64) == 64


@pytest.mark.parametrize("text", ["0.5,0.3", "0.3,0.3", "0,0.5", "1.0", "0.3,abc", ""])
def test_bad_buckets_are_refused(text):
    with pytest.raises(TopiError):
        parse_buckets(text)


def test_buckets_parse():
    assert parse_buckets("0.3, 0.5") == (0.3, 0.5)


def test_tau_rounding_never_keeps_fewer_than_tau_asks():
    gen = torch.Generator().manual_seed(0)
    buckets = (0.2, 0.4, 0.6, 0.8)
    for trial in range(200):
        n = int(torch.randint(8, 200, (1,), generator=gen))
        infl = torch.rand(n, generator=gen) ** 4
        tau = float(torch.rand(1, generator=gen)) * 0.99 + 0.01
        need = tau_keep_count(infl, tau)
        top = infl.sort(descending=True).values
        assert top[:need].sum() >= tau * infl.sum() - 1e-6
        assert need == 1 or top[:need - 1].sum() < tau * infl.sum()
        for policy in POLICIES:  # the kept COUNT never falls below what tau asks, whatever the policy
            idx, ratio, keep = Selector(n, tau=tau, buckets=buckets, policy=policy).select(infl)
            assert keep >= need and (idx is None or len(idx) == keep)
        idx, ratio, keep = Selector(n, tau=tau, buckets=buckets, policy="topi").select(infl)
        if idx is not None:  # top-k also keeps at least tau of the influence mass
            assert keep == keep_count(ratio, n) and ratio in buckets
            assert infl[idx].sum() >= tau * infl.sum() - 1e-6
            # the smallest bucket that fits: the next larger ratio would keep too few
            larger = [r for r in buckets if r > ratio]
            if larger:
                assert keep_count(min(larger), n) < need


def test_tau_without_fitting_bucket_runs_unpruned():
    infl = torch.ones(100)
    idx, ratio, keep = Selector(100, tau=0.95, buckets=(0.3, 0.5)).select(infl)
    assert idx is None and keep == 100 and ratio == 0.0


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_policies_return_sorted_unique_indices_of_the_right_count(policy):
    infl = torch.rand(64, generator=torch.Generator().manual_seed(1))
    idx = select_tokens(infl, 24, policy, grids=((8, 8),), seed=3)
    assert len(idx) == 24 and idx.unique().numel() == 24
    assert torch.equal(idx, idx.sort().values) and idx.dtype == torch.int64


def test_topi_policy_keeps_the_top_influence():
    infl = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2])
    assert select_tokens(infl, 2, "topi").tolist() == [1, 3]


def test_coverage_policy_keeps_every_cell():
    # all the influence sits in one corner: top-k leaves holes, the coverage policy does not
    infl = torch.zeros(8, 8)
    infl[:4, :4] = torch.rand(4, 4) + 1
    idx = select_tokens(infl.flatten(), 32, "topi-cov", grids=((8, 8),))
    cells = {(int(i) // 8 // 2, int(i) % 8 // 2) for i in idx}
    assert len(cells) == 16


def test_schedule_anchors():
    plan = make_plan(28, 10)
    assert [p.step for p in plan if p.kind == "anchor"] == [0, 10, 20]
    assert all(p.anchor == p.step - p.step % 10 for p in plan)
    assert [p.kind for p in make_plan(3, 1)] == ["anchor"] * 3
    with pytest.raises(TopiError):
        make_plan(10, 0)
    with pytest.raises(TopiError):
        make_plan(0, 10)


def test_temporal_controller_plans_anchors_and_reuses_the_kept_set():
    from topi_export.method.schedule import TemporalController

    c = TemporalController(Selector(8, ratio=0.5, grids=((2, 4),)), 3, 8)
    assert c.plan(0).kind == "anchor"
    with pytest.raises(TopiError):
        c.observe(0, torch.ones(7))  # influence of another context size
    info = c.observe(0, torch.arange(8.0))
    assert info["selected_keep"] == 4 and 0 < info["kept_influence"] <= 1
    p1, p2 = c.plan(1), c.plan(2)
    assert p1.kind == p2.kind == "pruned" and torch.equal(p1.keep_idx, p2.keep_idx) and p1.keep == 4
    assert c.plan(3).kind == "anchor"
    assert TemporalController(None, 3, 8).plan(1).kind == "full"


@pytest.mark.parametrize("ratio", [-0.1, 1.0, float("nan")])
def test_ratio_outside_range_is_refused(ratio):
    with pytest.raises(TopiError):
        Selector(10, ratio=ratio)


def test_default_policy_is_a_registered_influence_policy():
    from topi_export.method.selection import DEFAULT_POLICY

    assert DEFAULT_POLICY in POLICIES and POLICIES[DEFAULT_POLICY].uses_influence
