"""Step reuse in the temporal plan (method/reuse.py, runtime/steps.py): the rule, the calibrated criterion, no engine
call on a reused step, reuse off unchanged, the CLI, the profile schema, and the drop-in in a real pipeline."""
import json
import math

import pytest
import torch

from conftest import run_cli
from topi_export.errors import BadInput
from topi_export.method.reuse import (extrapolate, measure_criterion, parse_reuse, plan_reuse, predicted_errors)
from topi_export.plan import Layout


def _sigmas(n):
    return [1 - i / n for i in range(n)]


def test_parse_and_validate():
    assert parse_reuse("off") == "off" and parse_reuse("AUTO") == "auto" and parse_reuse("8") == 8
    assert parse_reuse("0") == "off"
    for bad in ("-1", "x", "1.5"):
        with pytest.raises(BadInput):
            parse_reuse(bad)
    with pytest.raises(BadInput, match="only 22 of the 28 steps can be reused"):
        plan_reuse(23, 0, _sigmas(28), range(0, 28, 10), None)
    with pytest.raises(BadInput, match="--reuse-order"):
        plan_reuse(2, 2, _sigmas(28), (), None)
    with pytest.raises(BadInput, match="needs a step-reuse criterion"):
        plan_reuse("auto", 0, _sigmas(28), (), None)


def test_count_without_a_criterion_spreads_over_the_middle_never_anchors_or_ends():
    for n in (0, 1, 5, 12, 20):
        plan = plan_reuse(n, 0, _sigmas(28), range(0, 28, 10), None)
        assert len(plan.steps) == n == len(set(plan.steps))
        assert not set(plan.steps) & {0, 1, 10, 20, 26, 27}
        if n > 1:
            gaps = [b - a for a, b in zip(plan.steps, plan.steps[1:])]
            assert max(gaps) - min(gaps) <= 3  # spread, not bunched
    assert plan_reuse(None, 0, _sigmas(28), (), None).steps == ()  # no criterion: default off
    assert "default off" in plan_reuse(None, 0, _sigmas(28), (), None).why


def _trajectories(curvature, n=28, samples=2):
    """Velocities along a schedule: a fixed direction plus `curvature` times a direction rotating with sigma."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(samples):
        a, b, c = (torch.randn(1, 16, 4, generator=g) for _ in range(3))
        s = _sigmas(n)
        out.append([a + curvature * (torch.cos(torch.tensor(6.0 * si)) * b + torch.sin(torch.tensor(6.0 * si)) * c)
                    for si in s])
    return out


def test_criterion_reuses_fewer_steps_on_curved_trajectories():
    sig = _sigmas(28)
    straight = measure_criterion(_trajectories(0.05), sig, threshold=0.3)
    curved = measure_criterion(_trajectories(1.0), sig, threshold=0.3)
    assert max(straight.density) < min(d for d in curved.density[1:])
    anchors = range(0, 28, 10)
    a_straight = plan_reuse("auto", 0, sig, anchors, straight, measured=True, source="s")
    a_curved = plan_reuse("auto", 0, sig, anchors, curved, measured=True, source="c")
    assert len(a_curved.steps) < len(a_straight.steps)
    # runs of reused steps respect the criterion's limit, never anchors or the protected ends
    for plan in (a_straight, a_curved):
        assert not set(plan.steps) & {0, 1, 10, 20, 26, 27}
        run = longest = 0
        for s in range(28):
            run = run + 1 if s in plan.steps else 0
            longest = max(longest, run)
        assert longest <= 2
    # N picks the lowest predicted errors
    errs = predicted_errors(curved, sig, 0)
    pick = plan_reuse(3, 0, sig, anchors, curved, measured=True, source="c")
    others = [e for s, e in enumerate(errs) if s not in pick.steps and s not in {0, 1, 10, 20, 26, 27}]
    assert max(errs[s] for s in pick.steps) <= min(others)


def test_first_order_reuse_is_exact_on_a_linear_trajectory():
    sig = _sigmas(10)
    a, b = torch.randn(1, 4, 4), torch.randn(1, 4, 4)
    v = [a + s * b for s in sig]
    assert torch.allclose(extrapolate([(sig[3], v[3]), (sig[4], v[4])], sig[5], 1), v[5], atol=1e-6)
    assert torch.equal(extrapolate([(sig[3], v[3]), (sig[4], v[4])], sig[5], 0), v[4])
    crit = measure_criterion([v], sig)
    assert max(crit.density_order1[2:]) < 1e-5 < min(crit.density[1:])


def _count_calls(engine):
    calls = {"anchor": 0, "full": 0, "pruned": 0, "dense": 0}
    for name in calls:
        method = getattr(engine, name)

        def counted(*a, _m=method, _n=name, **k):
            calls[_n] += 1
            return _m(*a, **k)
        setattr(engine, name, counted)
    return calls


@pytest.mark.parametrize("model, layout", [
    ("tiny-kontext", Layout(8, (4, 4), ((4, 4),))),
    ("tiny-flux2", Layout(6, (4, 4), ((4, 4), (2, 4)))),
    ("tiny-qwen-edit", Layout(6, (4, 4), ((4, 4), (4, 4)))),
])
def test_reused_steps_call_no_engine_and_off_is_unchanged(model, layout):
    from topi_export import open_session

    s = open_session(model=model, update_interval=4)
    data = s.family.synthetic_inputs(layout, 1)
    sel = s.selector(data, ratio=0.5)
    base = s.denoise(data, steps=10, selector=sel)
    off = s.denoise(data, steps=10, selector=sel, reuse=s.reuse_plan(data, steps=10, reuse="off"))
    assert torch.equal(base.latents, off.latents)  # reuse off: the same computation
    plan = s.reuse_plan(data, steps=10, reuse=3)
    calls = _count_calls(s.engine)
    out = s.denoise(data, steps=10, selector=sel, reuse=plan)
    assert sum(calls.values()) == 10 - 3 and calls["anchor"] == 3  # anchors 0, 4, 8 are never reused
    kinds = [r.kind for r in out.schedule]
    assert [i for i, k in enumerate(kinds) if k == "reuse"] == list(plan.steps)
    for r in out.schedule:
        if r.kind == "reuse":
            assert r.reuses == max(i for i in range(r.step) if i not in plan.steps) and r.graph == "none"
            assert r.to_json()["reuses"] == r.reuses and r.keep == 0
    assert not torch.equal(out.latents, base.latents) and torch.isfinite(out.latents).all()


def test_run_cli_reports_reuse_and_refuses_bad_values(tmp_path, capsys):
    code, out, err = run_cli(["run", "--model", "tiny-kontext", "--steps", "10", "--update-interval", "5",
                              "--reuse", "3", "--reuse-order", "1", "-q", "--json", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["reuse"]["mode"] == "count" and rep["reuse"]["order"] == 1 and len(rep["reuse"]["steps"]) == 3
    assert rep["computed_steps"] == 7 == sum(r["kind"] != "reuse" for r in rep["schedule"])
    assert "3 of 10 steps reuse" in out and "7 computed" in out
    for args, needle in ((["--reuse", "9"], "can be reused"), (["--reuse", "-2"], "cannot be negative"),
                         (["--reuse", "lots"], "give off, auto or a number"), (["--reuse", "auto"],
                                                                                 "needs a step-reuse criterion")):
        code, _, err = run_cli(["run", "--model", "tiny-kontext", "--steps", "10", "--update-interval", "5", "-q",
                                *args], capsys)
        assert code == 2 and needle in err and err.count("error:") == 1, err
    code, _, err = run_cli(["run", "--model", "tiny-kontext", "--reuse-order", "2", "-q"], capsys)
    assert code == 2 and "--reuse-order" in err


def test_profile_round_trip_old_profiles_read_and_default_auto(tmp_path):
    from topi_export import open_session
    from topi_export.artifacts.settings import describe_set, write_profile
    from topi_export.method.calibration import calibrate
    from topi_export.models import load_model
    from topi_export.plan.profile import read_profile
    from topi_export.resources import resource
    from topi_export.runtime.loop import measure_reuse

    loaded = load_model("tiny-kontext")
    samples = [loaded.family.synthetic_inputs(Layout(4, (4, 4), ((4, 4),)), i) for i in range(2)]
    result = calibrate(loaded.family, samples, (0.5,), top_k=1)
    from dataclasses import replace

    crit = measure_reuse(loaded.family, samples, 12)
    assert len(crit.sigmas) == 12 and crit.samples == 2 and crit.sigmas[0] == pytest.approx(1.0)
    assert crit.measure == "rollout" and crit.threshold == pytest.approx(0.01)  # 40 dB
    write_profile(tmp_path / "p.json", replace(result, reuse=crit), loaded.identity(), describe_set(samples, (0.5,)))
    raw = json.loads((tmp_path / "p.json").read_text())
    assert raw["schema"] == "topi-calibration/5" and "rollout" in raw["rules"]["reuse"]
    assert raw["reuse"]["aggregate"] == "worst" == crit.aggregate
    back = read_profile(tmp_path / "p.json")
    assert back.reuse == crit and back.settings().reuse == crit
    # schema 4: a rollout criterion without "aggregate" reads as the mean over its samples
    v4 = dict(raw, schema="topi-calibration/4", reuse={k: v for k, v in raw["reuse"].items() if k != "aggregate"})
    (tmp_path / "v4.json").write_text(json.dumps(v4))
    back4 = read_profile(tmp_path / "v4.json").reuse
    assert back4.aggregate == "mean" and back4.density == crit.density and "the mean" in plan_reuse(
        "auto", 0, back4.sigmas, (0,), back4).why
    old = read_profile(resource("calibration", "tiny-kontext.json"))  # schema 1: no criterion
    assert old.reuse is None
    # schema 3: a velocity criterion without "measure" still reads, and keeps its own rule
    vel = measure_reuse(loaded.family, samples, 12, measure="velocity")
    v3 = dict(raw, schema="topi-calibration/3", reuse={k: v for k, v in vel.to_json().items() if k != "measure"})
    (tmp_path / "v3.json").write_text(json.dumps(v3))
    back3 = read_profile(tmp_path / "v3.json")
    assert back3.reuse == vel and back3.reuse.measure == "velocity"
    assert "accumulated predicted error" in plan_reuse("auto", 0, vel.sigmas, (0,), vel).why
    # measured on this model: reuse is on by default (auto), and the report says why
    s = open_session(model="tiny-kontext", calibration=str(tmp_path / "p.json"), update_interval=4)
    data = s.family.synthetic_inputs(Layout(4, (4, 4), ((4, 4),)), 0)
    plan = s.reuse_plan(data, steps=12)
    assert plan.mode == "auto" and "measured this model" in plan.why and str(tmp_path / "p.json") in plan.why
    # the engines carry the criterion: a build from this profile runs auto from its engine directory
    assert json.loads(json.dumps(s.settings.to_json()))["reuse"]["threshold"] == crit.threshold


def test_dropin_with_reuse_in_the_real_kontext_pipeline_equals_run():
    pytest.importorskip("transformers", reason="FluxKontextPipeline needs transformers")
    from test_diffusers_dropin import _pipeline_latents

    from topi_export import Layout as L
    from topi_export import TopiTransformer, open_session

    for order in (0, 1):
        tr = TopiTransformer(model="tiny-kontext", ratio=0.5, update_interval=4, reuse=2, reuse_order=order, steps=8)
        data = tr.family.synthetic_inputs(L(8, (4, 4), ((4, 4),)), 0)
        calls = _count_calls(tr.session.engine)
        latents = _pipeline_latents(tr, data, 8)
        assert [s.kind for s in tr.schedule].count("reuse") == 2 and sum(calls.values()) == 6
        s = open_session(model="tiny-kontext", update_interval=4)
        ref = s.denoise(data, steps=8, selector=s.selector(data, ratio=0.5),
                        reuse=s.reuse_plan(data, steps=8, reuse=2, order=order, update_interval=4))
        torch.testing.assert_close(latents, ref.latents, rtol=0, atol=1e-6)
    with pytest.raises(BadInput, match="needs steps="):
        TopiTransformer(model="tiny-kontext", reuse=2)


def _rollout_rows(scale, n=28, samples=2):
    """Rollout errors that grow toward the end of the schedule, times ``scale`` (a more curved model: larger)."""
    g = torch.Generator().manual_seed(1)
    return [[0.0] + [scale * 1e-4 * (1 + 3 * i / n) * (1 + 0.2 * float(torch.rand(1, generator=g)))
                     for i in range(1, n)] for _ in range(samples)]


def _rollout_criterion(scale, n=28, samples=2, rows=None, aggregate="worst"):
    from topi_export.method.reuse import rollout_criterion

    rows = _rollout_rows(scale, n, samples) if rows is None else rows
    return rollout_criterion(rows, [[2 * e for e in r] for r in rows], _sigmas(n), aggregate=aggregate)


def test_rollout_criterion_keeps_the_budget_and_reuses_fewer_steps_when_errors_are_larger():
    from dataclasses import replace

    from topi_export.method.reuse import budget_error, plan_cost

    sig, anchors = _sigmas(28), range(0, 28, 10)
    straight, curved = _rollout_criterion(1.0), _rollout_criterion(30.0)
    # on the schedule it was measured on, the prediction of a single step is the measured error (the worst sample's;
    # with aggregate mean, the mean of the samples)
    errs = predicted_errors(straight, sig, 0)
    rows = _rollout_rows(1.0)
    assert errs[5] == pytest.approx(max(rows[0][5], rows[1][5]), rel=1e-9)
    mean = predicted_errors(_rollout_criterion(1.0, aggregate="mean"), sig, 0)
    assert mean[5] == pytest.approx((rows[0][5] + rows[1][5]) / 2, rel=1e-9)
    # a run's k-th step carries the run's errors so far
    assert plan_cost([3, 4], errs) == pytest.approx(2 * errs[3] + errs[4])
    assert plan_cost([3, 5], errs) == pytest.approx(errs[3] + errs[5])
    a_straight = plan_reuse("auto", 0, sig, anchors, straight, measured=True, source="s")
    a_curved = plan_reuse("auto", 0, sig, anchors, curved, measured=True, source="c")
    assert len(a_curved.steps) < len(a_straight.steps)
    for crit, plan in ((straight, a_straight), (curved, a_curved)):
        e = predicted_errors(crit, sig, 0)
        assert plan_cost(plan.steps, e) <= crit.threshold == pytest.approx(budget_error(40))
        assert plan.predicted_db == pytest.approx(-20 * math.log10(plan_cost(plan.steps, e)))
        assert "budget 40.0 dB" in plan.why and not set(plan.steps) & {0, 1, 10, 20, 26, 27}
        assert _longest(plan.steps) <= 2
    # a looser budget never reuses fewer steps; order 1 uses its own (here larger) errors
    loose = plan_reuse("auto", 0, sig, anchors, replace(curved, threshold=budget_error(30)), source="c")
    assert len(loose.steps) >= len(a_curved.steps)
    assert len(plan_reuse("auto", 1, sig, anchors, curved, source="c").steps) <= len(a_curved.steps)
    # reuse N on a rollout criterion reports its predicted cost too
    assert plan_reuse(4, 0, sig, anchors, curved, source="c").predicted_db is not None


def test_worst_aggregate_keeps_every_calibration_sample_within_the_budget():
    """One calibration sample whose edit is curved (errors 6x the others' in the middle of the schedule): planned on
    the mean it falls under the budget; planned on the worst sample (the default) every sample keeps it."""
    from topi_export.method.reuse import plan_cost

    sig, anchors = _sigmas(28), range(0, 28, 10)
    rows = _rollout_rows(1.0, samples=4)
    rows[2] = [e * (6.0 if 6 <= i <= 18 else 1.0) for i, e in enumerate(rows[2])]
    worst, mean = _rollout_criterion(0, rows=rows), _rollout_criterion(0, rows=rows, aggregate="mean")
    p_worst = plan_reuse("auto", 0, sig, anchors, worst, source="w")
    p_mean = plan_reuse("auto", 0, sig, anchors, mean, source="m")
    assert len(p_worst.steps) < len(p_mean.steps) and "worst calibration sample" in p_worst.why
    own = [predicted_errors(_rollout_criterion(0, rows=[r]), sig, 0) for r in rows]
    assert all(plan_cost(p_worst.steps, e) <= worst.threshold for e in own)
    assert plan_cost(p_mean.steps, own[2]) > mean.threshold  # the mean let the curved sample past the budget
    assert p_worst.predicted_db <= min(-20 * math.log10(plan_cost(p_worst.steps, e)) for e in own) + 1e-9


def _longest(steps):
    run = longest = 0
    for s in range(max(steps, default=0) + 1):
        run = run + 1 if s in steps else 0
        longest = max(longest, run)
    return longest


@pytest.mark.parametrize("model, layout, kv", [
    ("tiny-kontext", Layout(4, (4, 4), ((4, 4),)), False),
    ("tiny-flux2", Layout(4, (4, 4), ((4, 4),)), True),
])
def test_rollout_measure_resumes_the_full_run_exactly(model, layout, kv):
    """The rollouts finish a run from the full run's own latents at some step: with the velocity not reused that
    must give the full run's final latents (an exact K/V model re-extracts its cache where it resumes)."""
    from topi_export.backends import get_backend, model_backend
    from topi_export.backends.base import EngineSource
    from topi_export.models import load_model
    from topi_export.runtime.loop import denoise, measure_reuse

    fam = load_model(model, kv_model=kv).family
    data = fam.synthetic_inputs(layout, 0)
    engine = get_backend(model_backend()).open_engine(EngineSource(None, fam, fam.default_settings()))
    seen = []
    full = denoise(engine, fam, data, steps=8, seed=0, mode="full", on_step=lambda *a: seen.append(a[2]))
    sched = fam.make_scheduler(8, data.layout)
    sig = [float(v) for v in sched.sigmas]
    x = data.initial_noise(0).float()
    for k in range(5):
        x = x + (sig[k + 1] - sig[k]) * seen[k].float()
    resumed = denoise(engine, fam, data, steps=8, seed=0, mode="full", start=(5, x))
    torch.testing.assert_close(resumed.latents, full.latents, rtol=0, atol=1e-5)
    assert [r.step for r in resumed.schedule] == [5, 6, 7]
    with pytest.raises(Exception, match="only a baseline run"):
        denoise(engine, fam, data, steps=8, selector=object(), mode="topi", start=(5, x))
    crit = measure_reuse(fam, [data], 8)
    assert crit.measure == "rollout" and all(math.isfinite(d) and d >= 0 for d in crit.density)
    assert max(crit.density[1:]) > 0  # reusing a step of a random model changes its output


def test_calibrate_cli_reuse_measure_options(tmp_path, capsys):
    base = ["calibrate", "--model", "tiny-kontext", "--samples", "1", "--grid", "4x4", "--text-tokens", "4",
            "--reuse-steps", "6", "-q"]
    code, out, _ = run_cli([*base, "--reuse-budget", "50", "--out", str(tmp_path / "r.json")], capsys)
    raw = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and raw["reuse"]["measure"] == "rollout" and raw["reuse"]["threshold"] == pytest.approx(10 ** -2.5)
    assert "--reuse-budget 50" in raw["command"] and "budget 50.0 dB" in out
    code, out, _ = run_cli([*base, "--reuse-measure", "velocity", "--out", str(tmp_path / "v.json")], capsys)
    assert code == 0 and json.loads((tmp_path / "v.json").read_text())["reuse"]["measure"] == "velocity"
    code, out, _ = run_cli([*base, "--reuse-aggregate", "mean", "--out", str(tmp_path / "m.json")], capsys)
    raw = json.loads((tmp_path / "m.json").read_text())
    assert code == 0 and raw["reuse"]["aggregate"] == "mean" and "--reuse-aggregate mean" in raw["command"]
    for args, needle in ((["--reuse-threshold", "0.1"], "--reuse-threshold is the velocity measure's"),
                         (["--reuse-measure", "velocity", "--reuse-budget", "40"], "--reuse-budget is the rollout"),
                         (["--reuse-measure", "velocity", "--reuse-aggregate", "worst"],
                          "--reuse-aggregate is the rollout")):
        code, _, err = run_cli([*base, *args, "--out", str(tmp_path / "x.json")], capsys)
        assert code == 2 and needle in err and err.count("error:") == 1 and not (tmp_path / "x.json").exists()


def test_rollout_auto_takes_the_most_steps_within_the_budget():
    """Exhaustive check on a short schedule: no plan with more reused steps fits the budget, and among plans of the
    chosen size none is cheaper."""
    import itertools
    from dataclasses import replace

    from topi_export.method.reuse import budget_error, eligible_steps, plan_cost

    sig = _sigmas(12)
    anchors = (0, 6)
    for scale, budget_db in ((1.0, 60), (30.0, 50), (300.0, 40), (1.0, 80)):
        crit = replace(_rollout_criterion(scale, n=12), threshold=budget_error(budget_db))
        errs = predicted_errors(crit, sig, 0)
        plan = plan_reuse("auto", 0, sig, anchors, crit, source="t")
        elig = eligible_steps(12, anchors)
        best = max((len(c) for k in range(len(elig) + 1) for c in itertools.combinations(elig, k)
                    if _longest(c) <= 2 and plan_cost(c, errs) <= crit.threshold), default=0)
        assert len(plan.steps) == best
        same = [plan_cost(c, errs) for c in itertools.combinations(elig, best)
                if _longest(c) <= 2 and plan_cost(c, errs) <= crit.threshold]
        assert plan_cost(plan.steps, errs) == pytest.approx(min(same))
