"""The pruning residual (runtime/steps.py; docs/design.md, "Pruning residual"): each anchor also runs the kept set on
its own input, and the pruned steps until the next anchor add (unpruned - pruned) of that anchor. Engine calls,
the arithmetic, off and ratio 0 unchanged, every family, a trained model brought closer to the dense run, the
drop-in in a real pipeline, the CLI (run, bench) and the Triton request option."""
import json

import numpy as np
import pytest
import torch

from conftest import run_cli
from topi_export.errors import BadInput
from topi_export.plan import Layout

KONTEXT = Layout(8, (4, 4), ((4, 4),))


def _recording(engine):
    """Wrap the engine's graph calls: every call's name, and its velocity output."""
    calls = []
    for name in ("anchor", "full", "pruned", "dense"):
        method = getattr(engine, name)

        def recorded(*a, _m=method, _n=name, **k):
            out = _m(*a, **k)
            calls.append((_n, (out[0] if isinstance(out, tuple) else out).clone()))
            return out
        setattr(engine, name, recorded)
    return calls


def test_pruned_steps_add_the_anchors_difference():
    """10 steps, anchors at 0, 4, 8: each anchor runs the anchor graph then the pruned graph on the same input;
    every pruned step's velocity is its own pruned call plus (anchor - pruned) of its window's anchor. The last
    anchor's window (8, 9) has a pruned step, so it measures too; with step 9 reused it would not."""
    from topi_export import denoise, open_session

    s = open_session(model="tiny-kontext", update_interval=4)
    data = s.family.synthetic_inputs(KONTEXT, 1)
    sel = s.selector(data, ratio=0.5)
    calls = _recording(s.engine)
    seen = []
    out = s.denoise(data, steps=10, selector=sel, pruning_residual=True)
    assert [n for n, _ in calls] == ["anchor", "pruned", "pruned", "pruned", "pruned",
                                     "anchor", "pruned", "pruned", "pruned", "pruned", "anchor", "pruned", "pruned"]
    assert [r.residual for r in out.schedule] == [True, None, None, None, True, None, None, None, True, None]
    assert sum(r.engine_calls for r in out.schedule) == 13

    # the arithmetic, step by step, from the recorded calls (the family's guidance is distilled: guide = identity)
    seen.clear()
    calls.clear()
    denoise(s.engine, s.family, data, steps=10, selector=sel, update_interval=4, pruning_residual=True,
            on_step=lambda step, sigma, v: seen.append(v.clone()))
    outputs = iter(v for _, v in calls)
    for step, velocity in enumerate(seen):
        if step % 4 == 0:
            full, pruned = next(outputs), next(outputs)
            residual = full - pruned
            torch.testing.assert_close(velocity, full.float(), rtol=0, atol=0)
        else:
            torch.testing.assert_close(velocity, (next(outputs) + residual).float(), rtol=0, atol=0)

    # a window with nothing pruned measures nothing: steps 9 reused (and 5, 6, 7 too: reuse never plans an anchor)
    from topi_export.plan.reuse import ReusePlan

    plan = s.reuse_plan(data, steps=10, reuse=1, update_interval=4)
    bare = ReusePlan(**{**plan.__dict__, "steps": (9,)})
    calls.clear()
    out = s.denoise(data, steps=10, selector=sel, pruning_residual=True, reuse=bare)
    assert [r.residual for r in out.schedule if r.kind == "anchor"] == [True, True, None]
    assert sum(r.engine_calls for r in out.schedule) == len(calls) == 11


def test_off_and_ratio_zero_are_unchanged():
    from topi_export import open_session

    s = open_session(model="tiny-kontext", update_interval=4)
    data = s.family.synthetic_inputs(KONTEXT, 2)
    sel = s.selector(data, ratio=0.5)
    base = s.denoise(data, steps=8, selector=sel)
    off = s.denoise(data, steps=8, selector=sel, pruning_residual=False)
    assert torch.equal(base.latents, off.latents) and all(r.residual is None for r in off.schedule)
    on = s.denoise(data, steps=8, selector=sel, pruning_residual=True)
    assert not torch.equal(on.latents, base.latents)  # applied
    keep_all = s.selector(data, ratio=0.0)
    plain, with_residual = (s.denoise(data, steps=8, selector=keep_all, pruning_residual=r) for r in (False, True))
    assert torch.equal(plain.latents, with_residual.latents)  # every token kept: nothing to correct, no extra call
    assert [r.residual for r in with_residual.schedule if r.kind == "anchor"] == [False, False]
    assert sum(r.engine_calls for r in with_residual.schedule) == 8


@pytest.mark.parametrize("model, layout", [
    ("tiny-flux2", Layout(6, (4, 4), ((4, 4), (2, 4)))),
    ("tiny-qwen-edit", Layout(6, (4, 4), ((4, 4), (4, 4)))),  # true CFG: both branches in one batched call
])
def test_every_family_with_reuse_and_the_reference_kv_reuse(model, layout):
    """The residual composes with step reuse and with approximate reference K/V reuse (the anchors extract, the
    residual runs the kept set over the cache just recorded)."""
    from topi_export import open_session

    s = open_session(model=model, update_interval=4)
    data = s.family.synthetic_inputs(layout, 1)
    sel = s.selector(data, ratio=0.5)
    plan = s.reuse_plan(data, steps=10, reuse=2, update_interval=4)
    plain = s.denoise(data, steps=10, selector=sel, reuse=plan)
    on = s.denoise(data, steps=10, selector=sel, reuse=plan, pruning_residual=True)
    assert sum(r.engine_calls for r in on.schedule) == sum(r.engine_calls for r in plain.schedule) + 3
    assert not torch.equal(on.latents, plain.latents) and torch.isfinite(on.latents).all()


def test_reference_kv_reuse_runs_the_kept_set_over_the_cache():
    from topi_export import open_session

    s = open_session(model="tiny-flux2", update_interval=4)
    data = s.family.synthetic_inputs(Layout(6, (4, 4), ((4, 4), (2, 4))), 1)
    sel = s.selector(data, ratio=0.5)
    engine = s.engine
    cached = []
    method = engine.cached

    def recorded(x, t, keep=None, **k):
        cached.append(keep is not None)
        return method(x, t, keep, **k)
    engine.cached = recorded
    out = s.denoise(data, steps=10, selector=sel, ref_kv="reuse", pruning_residual=True)
    assert [r.graph for r in out.schedule][:5] == ["extract", "kv-pruned", "kv-pruned", "kv-pruned", "extract"]
    assert [r.residual for r in out.schedule if r.graph == "extract"] == [True, True, True]
    assert cached.count(True) == 7 + 3  # 7 pruned cached steps, 3 residuals over the cache


def test_the_residual_brings_a_trained_copy_model_closer_to_the_dense_run():
    """kontext-digits (copy-like: pruning half the reference loses content every pruned step), one held-out
    sample, 28 steps, ratio 0.5: the residual raises the PSNR against the dense run by more than 6 dB."""
    from topi_export import open_session
    from topi_export.artifacts import inputs as I
    from topi_export.runtime.loop import psnr

    s = open_session(model="kontext-digits")
    data = s.load_inputs(str(I.sample_files(s.source)[4]))
    sel = s.selector(data, ratio=0.5, policy="topi-mix")
    dense = s.denoise(data, steps=28, mode="dense").latents
    off, on = (psnr(s.denoise(data, steps=28, selector=sel, pruning_residual=r).latents, dense) for r in (False, True))
    assert on > off + 6, (off, on)


def test_dropin_in_the_real_kontext_pipeline_equals_run():
    pytest.importorskip("transformers", reason="FluxKontextPipeline needs transformers")
    from test_diffusers_dropin import _pipeline_latents

    from topi_export import TopiTransformer, open_session

    tr = TopiTransformer(model="tiny-kontext", ratio=0.5, update_interval=4, reuse=2, steps=8, pruning_residual=True)
    data = tr.family.synthetic_inputs(KONTEXT, 0)
    latents = _pipeline_latents(tr, data, 8)
    assert [r.residual for r in tr.schedule if r.kind == "anchor"] == [True, True]
    s = open_session(model="tiny-kontext", update_interval=4)
    ref = s.denoise(data, steps=8, selector=s.selector(data, ratio=0.5), pruning_residual=True,
                    reuse=s.reuse_plan(data, steps=8, reuse=2, update_interval=4))
    torch.testing.assert_close(latents, ref.latents, rtol=0, atol=1e-6)


def test_run_and_bench_flags(tmp_path, capsys):
    code, out, err = run_cli(["run", "--model", "tiny-kontext", "--ratio", "0.5", "--steps", "8", "--reuse", "off",
                              "--pruning-residual", "on", "-q", "--json", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["pruning_residual"] is True and report["computed_steps"] == 8 and report["engine_calls"] == 9
    assert "1 anchors measured the pruning residual" in out  # anchor 0 only: 8 steps, dT 10
    code, _, err = run_cli(["run", "--model", "tiny-kontext", "--pruning-residual", "yes", "-q"], capsys)
    assert code == 2 and "--pruning-residual" in err and len(err.strip().splitlines()) == 1

    code, _, err = run_cli(["bench", "--model", "tiny-kontext", "--ratio-buckets", "0.5", "--steps", "8",
                            "--samples", "1", "--repeats", "0", "--reuse", "off", "--pruning-residual", "off,on",
                            "--policies", "topi-mix", "--no-default-policy",
                            "-q", "--json", str(tmp_path / "b.json")], capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "b.json").read_text())["results"]
    assert sorted(r["pruning_residual"] for r in rows) == [False, True]
    assert rows[0]["psnr_db"] != rows[1]["psnr_db"]
    assert "off (0), pruning residual" in (tmp_path / "b.md").read_text()
    bad = tmp_path / "bad.json"
    code, _, err = run_cli(["bench", "--model", "tiny-kontext", "--pruning-residual", "maybe", "-q", "--json",
                            str(bad)], capsys)
    assert code == 2 and "error: --pruning-residual 'maybe'" in err and not bad.exists()


def test_flop_model_counts_the_extra_calls():
    """28 steps, dT 10, 12 reused: 3 anchors (full), 13 pruned steps, and with the residual 3 more pruned calls."""
    from topi_export.method.cost import predicted_end_to_end, step_flops

    layout = Layout(128, (32, 32), ((32, 32),))
    full, pruned = step_flops(layout, layout.num_ctx, 6, 1, 256), step_flops(layout, 512, 6, 1, 256)
    args = (layout, 512, 6, 1, 256, 28, 10)
    assert predicted_end_to_end(*args, reused=12) == pytest.approx(28 * full / (3 * full + 13 * pruned))
    assert predicted_end_to_end(*args, reused=12, residual=True) == pytest.approx(
        28 * full / (3 * full + 16 * pruned))


def test_triton_request_option():
    from topi_export.serving.triton_engine import request_options

    on = request_options({"pruning_residual": np.array([b"on"], dtype=object)})
    assert on.pruning_residual is True and request_options({}).pruning_residual is False
    with pytest.raises(BadInput, match="request input 'pruning_residual' is 'yes': give on or off"):
        request_options({"pruning_residual": np.array([b"yes"], dtype=object)})
