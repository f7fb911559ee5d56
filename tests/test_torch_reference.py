"""The invariants of docs/design.md ("Tests") for the PyTorch reference on FLUX.1 Kontext (FluxTransformer2DModel)."""
import pytest
import torch

from topi_export.models.flux_kontext import FluxKontext, kontext_ids, tiny_config
from topi_export.ops import influence_score, influence_score_materialized, token_gather
from topi_export.plan import Layout

LAYOUT = Layout(8, (4, 6), ((6, 4),))


def _feed(family, layout, seed=0):
    data = family.synthetic_inputs(layout, seed)
    g = torch.Generator().manual_seed(seed + 100)
    latents = torch.randn(1, layout.num_target, family.in_channels, generator=g)
    return data, latents, data.reference_latents, torch.tensor([0.7]), family.conditioning(data)


def _fwd(family, feed, **kw):
    _, latents, context, t, cond = feed
    with torch.no_grad():
        return family.forward(latents, context, t, cond, **kw)


def test_ops_match_the_materialised_formula():
    g = torch.Generator().manual_seed(0)
    for b, h, nx, nc, t, d in [(1, 2, 5, 7, 3, 8), (2, 3, 33, 17, 4, 16), (1, 1, 1, 1, 0, 4)]:
        q = torch.randn(b, h, nx, d, generator=g)
        k = torch.randn(b, h, t + nx + nc, d, generator=g)
        v = torch.randn(b, h, nc, d, generator=g)
        torch.testing.assert_close(influence_score(q, k, v).double(), influence_score_materialized(q, k, v),
                                   rtol=1e-5, atol=1e-6)
    x = torch.randn(2, 9, 3, generator=g)
    idx = torch.tensor([0, 4, 8])
    assert torch.equal(token_gather(x, idx), x[:, idx])


def test_ratio_zero_forward_equals_unmodified_diffusers(tiny):
    from topi_export.models import build_builtin

    ref_model = build_builtin("tiny-kontext").eval()  # same seed, default diffusers processors
    feed = _feed(tiny.family, LAYOUT)
    data, latents, context, t, _ = feed
    with torch.no_grad():
        ref = tiny.family.pipeline_call(ref_model, latents, context, t, data)
    v, infl = _fwd(tiny.family, feed, influence_layers=(1, 3))
    torch.testing.assert_close(v, ref, rtol=0, atol=1e-5)
    assert infl.shape == (1, LAYOUT.num_ctx)


def test_ratio_zero_denoising_equals_unmodified_diffusers_loop(tiny, tiny_settings):
    """The whole Kontext loop at ratio 0 vs FluxKontextPipeline's loop over the untouched diffusers model."""
    from topi_export.backends.torch import TorchEngine
    from topi_export.method.selection import Selector
    from topi_export.models import build_builtin
    from topi_export.runtime.loop import denoise

    fam = tiny.family
    data = fam.synthetic_inputs(Layout(8, (4, 4), ((4, 4),)), 1)
    eng = TorchEngine(fam, tiny_settings)
    topi = denoise(eng, fam, data, steps=6, selector=Selector(16, ratio=0.0), update_interval=2)
    full = denoise(eng, fam, data, steps=6, mode="full")
    dense = denoise(eng, fam, data, steps=6, mode="dense")
    ref_model = build_builtin("tiny-kontext").eval()
    txt, img = kontext_ids(data.layout)
    latents = data.initial_noise(0)
    sched = fam.make_scheduler(6, data.layout)
    with torch.no_grad():
        for t in sched.timesteps:  # written out as FluxKontextPipeline.__call__ does it
            out = ref_model(hidden_states=torch.cat([latents, data.reference_latents], 1),
                            encoder_hidden_states=data.tensors["prompt_embeds"], pooled_projections=data.tensors["pooled_prompt_embeds"],
                            timestep=(t / 1000).expand(1), img_ids=img, txt_ids=txt, guidance=torch.full([1], 2.5),
                            return_dict=False)[0][:, :16]
            latents = sched.step(out, t, latents, return_dict=False)[0]
    for got in (topi, full, dense):
        torch.testing.assert_close(got.latents, latents, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prune_start", [0, 1, 2, 4])  # double-stream (0, 1) and single-stream (2, 4)
def test_keep_all_pruned_forward_equals_full(tiny, prune_start):
    feed = _feed(tiny.family, LAYOUT)
    full, _ = _fwd(tiny.family, feed)
    pruned, _ = _fwd(tiny.family, feed, keep_idx=torch.arange(LAYOUT.num_ctx), prune_start=prune_start)
    torch.testing.assert_close(pruned, full, rtol=0, atol=1e-6)


@pytest.mark.parametrize("num_double,num_single", [(2, 1), (0, 2)])
def test_gather_at_first_layer_equals_running_on_the_kept_tokens(num_double, num_single):
    """With L0 = 0 the pruned forward must equal a plain forward on only the kept reference tokens with their
    own positions: hidden states AND rotary rows are gathered, for L0 in a double-stream block and (with no double
    blocks) in a single-stream block."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    cfg = {**tiny_config(), "num_layers": num_double, "num_single_layers": num_single}
    fam = FluxKontext(cfg, FluxTransformer2DModel(**cfg))
    feed = _feed(fam, LAYOUT)
    data, latents, context, t, cond = feed
    keep = torch.tensor([0, 3, 5, 6, 11, 17, 23])
    pruned, _ = _fwd(fam, feed, keep_idx=keep, prune_start=0)
    txt, img = kontext_ids(LAYOUT)
    nx = LAYOUT.num_target
    ids = torch.cat([txt, img[:nx], img[nx:][keep]], 0)
    from topi_export.models.flux_kontext import rope_tables

    direct = dict(cond)
    direct["rope_cos"], direct["rope_sin"] = rope_tables(fam.config["axes_dims_rope"], ids)
    with torch.no_grad():
        expect, _ = fam.forward(latents, context[:, keep], t, direct)
    torch.testing.assert_close(pruned, expect, rtol=0, atol=1e-5)
    wrong = dict(cond)
    wrong["rope_cos"], wrong["rope_sin"] = (x[:LAYOUT.text_tokens + nx + len(keep)] for x in
                                            (cond["rope_cos"], cond["rope_sin"]))
    with torch.no_grad():
        bad, _ = fam.forward(latents, context[:, keep], t, wrong)
    assert (bad - expect).abs().max() > 1e-4  # rotary rows matter: the check above can fail


def test_influence_equals_direct_materialised_computation(tiny, monkeypatch):
    """Record the q/k/v each pivotal layer passes to the op and recompute the formula in float64."""
    import topi_export.models.base as base

    seen = []

    def recording(q, k, v, key_mask=None):
        assert key_mask is None  # FLUX.1 Kontext masks no key
        seen.append((q.clone(), k.clone(), v.clone()))
        return influence_score(q, k, v)

    monkeypatch.setattr(base, "influence_score", recording)
    feed = _feed(tiny.family, LAYOUT)
    _, infl = _fwd(tiny.family, feed, influence_layers=(0, 2, 5))
    assert len(seen) == 3
    t, nx, nc = LAYOUT.text_tokens, LAYOUT.num_target, LAYOUT.num_ctx
    for q, k, v in seen:
        assert q.shape[2] == nx and k.shape[2] == t + nx + nc and v.shape[2] == nc
    expect = sum(influence_score_materialized(q, k, v) for q, k, v in seen)
    torch.testing.assert_close(infl.double(), expect, rtol=1e-5, atol=1e-7)
    q, k, _ = seen[0]
    assert not torch.equal(q, k[:, :, :nx])  # the queries are the target rows of [T | X | C], not the text


def test_scored_queries_subset_and_pivotal_layer_before_l0(tiny, monkeypatch):
    """score_idx restricts the averaged target queries; a pivotal layer before L0 is reduced to keep_idx."""
    feed = _feed(tiny.family, LAYOUT)
    keep = torch.tensor([1, 2, 7, 20])
    _, infl_all = _fwd(tiny.family, feed, influence_layers=(0,))
    _, infl_kept = _fwd(tiny.family, feed, influence_layers=(0,), keep_idx=keep, prune_start=2)
    torch.testing.assert_close(infl_kept, infl_all[:, keep], rtol=0, atol=1e-7)
    _, one = _fwd(tiny.family, feed, influence_layers=(0,), score_idx=torch.tensor([3]))
    assert one.shape == infl_all.shape and not torch.allclose(one, infl_all)


def test_pruned_run_differs_but_stays_close(tiny, tiny_settings):
    from topi_export.backends.torch import TorchEngine
    from topi_export.method.selection import Selector
    from topi_export.runtime.loop import denoise, psnr

    fam = tiny.family
    data = fam.synthetic_inputs(Layout(8, (6, 6), ((6, 6),)), 0)
    eng = TorchEngine(fam, tiny_settings)
    full = denoise(eng, fam, data, steps=8, mode="dense")
    topi = denoise(eng, fam, data, steps=8, selector=Selector(36, ratio=0.5, grids=((6, 6),)), update_interval=4)
    assert [r.kind for r in topi.schedule] == ["anchor"] + ["pruned"] * 3 + ["anchor"] + ["pruned"] * 3
    assert [r.keep for r in topi.schedule] == [36, 18, 18, 18, 36, 18, 18, 18]
    assert all(r.keep_per_reference == (r.keep,) for r in topi.schedule)
    assert all(0 < r.kept_influence <= 1 for r in topi.schedule if r.kind == "anchor")
    assert not torch.equal(full.latents, topi.latents)
    assert psnr(topi.latents, full.latents) > 20


def test_copied_kontext_resolutions_equal_the_pipelines():
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS as theirs

    from topi_export.models.flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    assert list(PREFERRED_KONTEXT_RESOLUTIONS) == list(theirs)
