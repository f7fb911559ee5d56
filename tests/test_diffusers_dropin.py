"""The drop-in transformer inside diffusers' real FluxKontextPipeline equals `run`'s loop."""
import warnings

import pytest
import torch

pytest.importorskip("transformers", reason="FluxKontextPipeline needs transformers (pip install 'topi-export[dev]')")


def _unpack(x, h, w):
    b, n, c = x.shape
    return x.view(b, h, w, c // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c // 4, h * 2, w * 2)


def _pipeline_latents(transformer, data, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

    from topi_export.models.flux_kontext import SCHEDULER

    pipe = FluxKontextPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=None,
                               text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                               transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    pipe.latent_channels = transformer.config.in_channels // 4  # no VAE: pass packed-able latents directly
    h, w = data.layout.ref_grids[0]
    th, tw = data.layout.target_grid
    px = 16  # pixels per token with the pipeline's default vae_scale_factor (8) and 2x2 packing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pipe(image=_unpack(data.reference_latents, h, w), prompt_embeds=data.tensors["prompt_embeds"],
                   pooled_prompt_embeds=data.tensors["pooled_prompt_embeds"], height=th * px, width=tw * px,
                   max_area=th * px * tw * px, num_inference_steps=steps, guidance_scale=2.5,
                   latents=data.initial_noise(0), output_type="latent", _auto_resize=False)
    return out.images


def test_dropin_torch_in_real_pipeline_equals_run_loop():
    from topi_export import Layout, TopiTransformer, open_session

    tr = TopiTransformer(model="tiny-kontext", ratio=0.5, update_interval=3)
    data = tr.family.synthetic_inputs(Layout(8, (4, 4), ((4, 4),)), 0)
    latents = _pipeline_latents(tr, data, 6)
    assert [s.kind for s in tr.schedule] == ["anchor", "pruned", "pruned"] * 2
    s = open_session(model="tiny-kontext", update_interval=3)
    ref = s.denoise(data, steps=6, selector=s.selector(data, ratio=0.5))
    torch.testing.assert_close(latents, ref.latents, rtol=0, atol=1e-6)
    # a second generation restarts the schedule (the timestep goes up again)
    _pipeline_latents(tr, data, 6)
    assert len(tr.schedule) == 6


def test_dropin_with_onnxruntime_engines(ort_engine_dir):
    from topi_export import Layout, TopiTransformer, open_session
    from topi_export.runtime.loop import rel_l2

    tr = TopiTransformer(ort_engine_dir, ratio=0.3, update_interval=2)
    data = tr.family.synthetic_inputs(Layout(8, (8, 8), ((8, 8),)), 5)
    latents = _pipeline_latents(tr, data, 4)
    assert {s.keep for s in tr.schedule if s.kind == "pruned"} == {45}
    s = open_session(engine_dir=ort_engine_dir, update_interval=2)
    ref = s.denoise(data, steps=4, selector=s.selector(data, ratio=0.3))
    assert rel_l2(latents, ref.latents) < 1e-6
