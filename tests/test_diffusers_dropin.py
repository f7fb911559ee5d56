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

    from topi_export.runtime.loop import SCHEDULER_CONFIG

    pipe = FluxKontextPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=None,
                               text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                               transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    pipe.latent_channels = transformer.config.in_channels // 4  # no VAE: pass packed-able latents directly
    h, w = data.layout.ref_grid
    th, tw = data.layout.target_grid
    px = 16  # pixels per token with the pipeline's default vae_scale_factor (8) and 2x2 packing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pipe(image=_unpack(data.reference_latents, h, w), prompt_embeds=data.prompt_embeds,
                   pooled_prompt_embeds=data.pooled_prompt_embeds, height=th * px, width=tw * px,
                   max_area=th * px * tw * px, num_inference_steps=steps, guidance_scale=2.5,
                   latents=data.initial_noise(0), output_type="latent", _auto_resize=False)
    return out.images


def test_dropin_torch_in_real_pipeline_equals_run_loop():
    from topi_export import TopiKontextTransformer, denoise, open_session, synthetic_inputs

    tr = TopiKontextTransformer(model="tiny-kontext", ratio=0.5, update_interval=3)
    data = synthetic_inputs(tr.session.adapter, 0, (4, 4))
    latents = _pipeline_latents(tr, data, 6)
    assert [s["kind"] for s in tr.schedule] == ["anchor", "pruned", "pruned"] * 2
    s = open_session(model="tiny-kontext", update_interval=3)
    ref = denoise(s.engine, data, steps=6, selector=s.selector(data, ratio=0.5), update_interval=3)
    torch.testing.assert_close(latents, ref.latents, rtol=0, atol=1e-6)


def test_dropin_with_onnxruntime_engines(ort_engine_dir):
    from topi_export import TopiKontextTransformer, denoise, open_session
    from topi_export.runtime.inputs import synthetic_inputs
    from topi_export.runtime.loop import rel_l2
    from topi_export.runtime.session import _Dims

    tr = TopiKontextTransformer(ort_engine_dir, ratio=0.3, update_interval=2)
    data = synthetic_inputs(_Dims(tr.session.model_info), 5, (8, 8))
    latents = _pipeline_latents(tr, data, 4)
    assert {s["keep"] for s in tr.schedule} == {45}
    s = open_session(engine_dir=ort_engine_dir, update_interval=2)
    ref = denoise(s.engine, data, steps=4, selector=s.selector(data, ratio=0.3), update_interval=2)
    assert rel_l2(latents, ref.latents) < 1e-6
