"""DESIGN §4 invariants for the PyTorch reference on the real diffusers FluxTransformer2DModel."""
import pytest
import torch

from topi_export.models import Layout, kontext_ids
from topi_export.ops import influence_score, influence_score_materialized, token_gather


def _inputs(adapter, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    txt, img = kontext_ids(layout)
    return dict(hidden_states=torch.randn(1, layout.num_target + layout.num_ctx, adapter.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, layout.text_tokens, adapter.text_dim, generator=g),
                pooled_projections=torch.randn(1, adapter.pooled_dim, generator=g),
                timestep=torch.tensor([0.7]), img_ids=img, txt_ids=txt, guidance=torch.tensor([2.5]))


def _fwd(adapter, kw, layout, **extra):
    with torch.no_grad():
        return adapter.forward(*kw.values(), num_target=layout.num_target, **extra)


LAYOUT = Layout(8, (4, 6), (6, 4))


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

    ref_model = build_builtin().eval()  # same seed, default diffusers processors
    kw = _inputs(tiny.adapter, LAYOUT)
    with torch.no_grad():
        ref = ref_model(**kw, return_dict=False)[0][:, :LAYOUT.num_target]
    v, infl = _fwd(tiny.adapter, kw, LAYOUT, influence_layers=(1, 3))
    torch.testing.assert_close(v, ref, rtol=0, atol=1e-5)
    assert infl.shape == (1, LAYOUT.num_ctx)


def test_ratio_zero_denoising_equals_unmodified_diffusers_loop(tiny, tiny_settings):
    """The whole Kontext loop at ratio 0 vs the same loop over the untouched diffusers model."""
    from topi_export.backends.torch import TorchEngine
    from topi_export.method import Selector
    from topi_export.models import build_builtin
    from topi_export.runtime.inputs import synthetic_inputs
    from topi_export.runtime.loop import denoise, make_scheduler

    data = synthetic_inputs(tiny.adapter, 1, (4, 4))
    topi = denoise(TorchEngine(tiny.adapter, tiny_settings), data, steps=6, selector=Selector(16, ratio=0.0),
                   update_interval=2)
    ref_model = build_builtin().eval()
    txt, img = kontext_ids(data.layout)
    latents = data.initial_noise(0)
    sched = make_scheduler(6, 16)
    with torch.no_grad():
        for t in sched.timesteps:
            out = ref_model(hidden_states=torch.cat([latents, data.reference_latents], 1),
                            encoder_hidden_states=data.prompt_embeds, pooled_projections=data.pooled_prompt_embeds,
                            timestep=(t / 1000).reshape(1), img_ids=img, txt_ids=txt, guidance=torch.tensor([2.5]),
                            return_dict=False)[0][:, :16]
            latents = sched.step(out, t, latents, return_dict=False)[0]
    torch.testing.assert_close(topi.latents, latents, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prune_layer", [0, 1, 2, 4])  # double-stream (0, 1) and single-stream (2, 4)
def test_keep_all_pruned_forward_equals_full(tiny, prune_layer):
    kw = _inputs(tiny.adapter, LAYOUT)
    full, _ = _fwd(tiny.adapter, kw, LAYOUT)
    pruned, _ = _fwd(tiny.adapter, kw, LAYOUT, keep_idx=torch.arange(LAYOUT.num_ctx), prune_layer=prune_layer)
    torch.testing.assert_close(pruned, full, rtol=0, atol=1e-6)


@pytest.mark.parametrize("num_double,num_single", [(2, 1), (0, 2)])
def test_gather_at_first_layer_equals_running_on_the_kept_tokens(num_double, num_single):
    """With L0 = 0 the pruned forward must equal a plain forward on only the kept reference tokens with
    their own ids: this checks that hidden states AND RoPE rows are gathered, for L0 in a double-stream
    block and (with no double blocks) in a single-stream block."""
    from diffusers import FluxTransformer2DModel

    from topi_export.models import FluxKontextAdapter, tiny_config

    torch.manual_seed(0)
    cfg = {**tiny_config(), "num_layers": num_double, "num_single_layers": num_single}
    adapter = FluxKontextAdapter(FluxTransformer2DModel(**cfg))
    kw = _inputs(adapter, LAYOUT)
    keep = torch.tensor([0, 3, 5, 6, 11, 17, 23])
    pruned, _ = _fwd(adapter, kw, LAYOUT, keep_idx=keep, prune_layer=0)
    nx = LAYOUT.num_target
    direct = dict(kw)
    direct["hidden_states"] = torch.cat([kw["hidden_states"][:, :nx], kw["hidden_states"][:, nx:][:, keep]], 1)
    direct["img_ids"] = torch.cat([kw["img_ids"][:nx], kw["img_ids"][nx:][keep]], 0)
    expect, _ = _fwd(adapter, direct, LAYOUT)
    torch.testing.assert_close(pruned, expect, rtol=0, atol=1e-5)
    shuffled_ids = dict(direct)
    shuffled_ids["img_ids"] = torch.cat([kw["img_ids"][:nx], kw["img_ids"][nx:][:len(keep)]], 0)
    wrong, _ = _fwd(adapter, shuffled_ids, LAYOUT)
    assert (wrong - expect).abs().max() > 1e-4  # RoPE rows matter: the check above can fail


def test_influence_equals_direct_materialised_computation(tiny, monkeypatch):
    """Record the q/k/v each pivotal layer passes to the op and recompute the formula in float64."""
    import topi_export.models.flux_kontext as fk

    seen = []

    def recording(q, k, v):
        seen.append((q.clone(), k.clone(), v.clone()))
        return influence_score(q, k, v)

    monkeypatch.setattr(fk, "influence_score", recording)
    kw = _inputs(tiny.adapter, LAYOUT)
    _, infl = _fwd(tiny.adapter, kw, LAYOUT, influence_layers=(0, 2, 5))
    assert len(seen) == 3
    t, nx, nc = LAYOUT.text_tokens, LAYOUT.num_target, LAYOUT.num_ctx
    for q, k, v in seen:
        assert q.shape[2] == nx and k.shape[2] == t + nx + nc and v.shape[2] == nc
    expect = sum(influence_score_materialized(q, k, v) for q, k, v in seen)
    torch.testing.assert_close(infl.double(), expect, rtol=1e-5, atol=1e-7)
    # the recorded queries are the target rows of the joint sequence [T | X | C]
    q, k, _ = seen[0]
    assert not torch.equal(q, k[:, :, :nx])


def test_pruned_run_differs_but_stays_close(tiny, tiny_settings):
    from topi_export.backends.torch import TorchEngine
    from topi_export.method import Selector
    from topi_export.runtime.inputs import synthetic_inputs
    from topi_export.runtime.loop import denoise, psnr

    data = synthetic_inputs(tiny.adapter, 0, (6, 6))
    eng = TorchEngine(tiny.adapter, tiny_settings)
    full = denoise(eng, data, steps=8)
    topi = denoise(eng, data, steps=8, selector=Selector(36, ratio=0.5, grid=(6, 6)), update_interval=4)
    assert [r["kind"] for r in topi.schedule] == ["anchor"] + ["pruned"] * 3 + ["anchor"] + ["pruned"] * 3
    assert all(r["keep"] == 18 for r in topi.schedule)
    assert not torch.equal(full.latents, topi.latents)
    assert psnr(topi.latents, full.latents) > 20
