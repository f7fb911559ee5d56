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
    idx = select_tokens(infl, 24, policy, grid=(8, 8), seed=3)
    assert len(idx) == 24 and idx.unique().numel() == 24
    assert torch.equal(idx, idx.sort().values) and idx.dtype == torch.int64


def test_topi_policy_keeps_the_top_influence():
    infl = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2])
    assert select_tokens(infl, 2, "topi").tolist() == [1, 3]


def test_coverage_policy_keeps_every_cell():
    # all the influence sits in one corner: top-k leaves holes, the coverage policy does not
    infl = torch.zeros(8, 8)
    infl[:4, :4] = torch.rand(4, 4) + 1
    idx = select_tokens(infl.flatten(), 32, "topi-cov", grid=(8, 8))
    cells = {(int(i) // 8 // 2, int(i) % 8 // 2) for i in idx}
    assert len(cells) == 16


def test_schedule_anchors():
    plan = make_plan(28, 10)
    assert [p.step for p in plan if p.kind == "anchor"] == [0, 10, 20]
    assert all(p.anchor == p.step - p.step % 10 for p in plan)
    assert [p.kind for p in make_plan(3, 1)] == ["anchor"] * 3
    with pytest.raises(TopiError):
        make_plan(10, 0)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, float("nan")])
def test_ratio_outside_range_is_refused(ratio):
    with pytest.raises(TopiError):
        Selector(10, ratio=ratio)


def test_dither_policy_drops_weak_tokens_first_then_spreads_evenly():
    infl = torch.ones(8, 8)
    infl[:, 6:] = 0.01  # two weak columns (e.g. shifted out of the target): dropped first
    idx = select_tokens(infl.flatten(), 32, "topi-dither", grid=(8, 8))
    kept = torch.zeros(64, dtype=torch.bool)
    kept[idx] = True
    kept = kept.reshape(8, 8)
    assert not kept[:, 6:].any()
    # the other 16 removals are spread: every 2x2 cell of the strong part keeps 2 or 3 tokens
    cells = kept[:, :6].reshape(4, 2, 3, 2).sum(dim=(1, 3))
    assert cells.min() >= 2 and cells.max() <= 3


def test_default_policy_is_a_registered_influence_policy():
    from topi_export.method import DEFAULT_POLICY

    assert DEFAULT_POLICY in POLICIES and DEFAULT_POLICY.startswith("topi")
