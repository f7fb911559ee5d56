"""The FLUX.2 family (models/flux2.py): its ToPi forward against the unmodified diffusers Flux2Transformer2DModel
called as Flux2Pipeline calls it, the gather at L0 in double and single blocks, ONNX Runtime against torch, the
drop-in inside a real Flux2Pipeline, and the CLI with three references."""
import json
import warnings

import pytest
import torch

from conftest import run_cli
from topi_export.plan import Layout

GRIDS = {1: ((4, 4),), 2: ((4, 4), (3, 5)), 3: ((4, 4), (3, 5), (2, 4))}


@pytest.fixture(scope="module")
def session():
    from topi_export import open_session

    return open_session(model="tiny-flux2")


@pytest.fixture(scope="module")
def fresh():
    """An unmodified diffusers model (default processors) with the same seeded weights."""
    from topi_export.models import build_builtin

    return build_builtin("tiny-flux2").eval()


def _inputs(family, refs, seed=0, target=(4, 4)):
    data = family.synthetic_inputs(Layout(6, target, GRIDS[refs]), seed)
    data.scalars["guidance"] = 3.5
    return data


def _pipeline_loop(family, model, data, steps):
    """The reference: Flux2Pipeline's loop with unmodified transformer calls (pipeline_call semantics)."""
    sched = family.make_scheduler(steps, data.layout)
    latents = data.initial_noise(0)
    with torch.no_grad():
        for t in sched.timesteps:
            v = family.pipeline_call(model, latents, data.reference_latents, (t / 1000).reshape(1).float(), data)
            latents = sched.step(v, t, latents, return_dict=False)[0]
    return latents


@pytest.mark.parametrize("refs", [1, 2, 3])
def test_ratio_zero_loop_equals_unmodified_model(session, fresh, refs):
    from topi_export import denoise

    family = session.family
    data = _inputs(family, refs)
    ref = _pipeline_loop(family, fresh, data, 4)
    full = denoise(session.engine, family, data, steps=4, mode="full", update_interval=2)
    topi = denoise(session.engine, family, data, steps=4, selector=session.selector(data, ratio=0.0),
                   update_interval=2)
    torch.testing.assert_close(full.latents, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(topi.latents, ref, rtol=0, atol=1e-5)
    assert [r.kind for r in topi.schedule][:1] == ["anchor"]


def test_klein_config_without_guidance_equals_unmodified_model():
    """Klein checkpoints embed no guidance: no guidance graph input, and the call ignores the pipeline's value."""
    import diffusers

    from topi_export.models.flux2 import Flux2, tiny_config

    config = dict(tiny_config(), guidance_embeds=False)
    torch.manual_seed(1)
    model = diffusers.Flux2Transformer2DModel(**config)
    reference = diffusers.Flux2Transformer2DModel(**config)
    reference.load_state_dict(model.state_dict())
    family = Flux2(dict(model.config), model)
    assert family.guidance == "none" and "guidance" not in [t.name for t in family.graph_inputs()]
    data = _inputs(family, 2)
    x, t = data.initial_noise(0), torch.tensor([0.6])
    with torch.no_grad():
        v, _ = family.forward(x, data.reference_latents, t, family.conditioning(data))
        r = family.pipeline_call(reference, x, data.reference_latents, t, data)
    torch.testing.assert_close(v, r, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prune_start", [1, 2, 4])  # double block, first single block, later single block
def test_keep_all_pruning_equals_full_forward(session, prune_start):
    family = session.family
    data = _inputs(family, 3)
    cond = family.conditioning(data)
    x, ctx, t = data.initial_noise(1), data.reference_latents, torch.tensor([0.8])
    with torch.no_grad():
        full, _ = family.forward(x, ctx, t, cond)
        kept, influence = family.forward(x, ctx, t, cond, keep_idx=torch.arange(data.layout.num_ctx),
                                         prune_start=prune_start, influence_layers=(1, 3))
    torch.testing.assert_close(kept, full, rtol=0, atol=1e-6)
    assert influence.shape == (1, data.layout.num_ctx) and torch.isfinite(influence).all()


def test_gather_at_layer_zero_equals_model_on_kept_tokens(session, fresh):
    """Pruning from layer 0 = the unmodified model on only the kept context tokens, with their own ids."""
    from topi_export.models.flux2 import flux2_ids

    family = session.family
    data = _inputs(family, 3)
    layout, nx = data.layout, data.layout.num_target
    keep = torch.tensor([0, 3, 4, 9, 17, 18, 25, 30, 38])
    x, t = data.initial_noise(2), torch.tensor([0.5])
    txt_ids, img_ids = flux2_ids(layout)
    kept_ids = torch.cat([img_ids[:nx], img_ids[nx:][keep]])
    with torch.no_grad():
        pruned, _ = family.forward(x, data.reference_latents, t, family.conditioning(data), keep_idx=keep,
                                   prune_start=0)
        ref = fresh(hidden_states=torch.cat([x, data.reference_latents[:, keep]], dim=1), timestep=t,
                    guidance=torch.tensor([3.5]), encoder_hidden_states=data.tensors["prompt_embeds"], txt_ids=txt_ids[None],
                    img_ids=kept_ids[None], return_dict=False)[0][:, :nx]
    torch.testing.assert_close(pruned, ref, rtol=0, atol=1e-5)


def _manual_pruned(model, data, x, t, keep, prune_start):
    """The unmodified diffusers blocks run by hand, dropping context tokens before `prune_start`: double blocks cut
    the image stream [X | C] at Nx, single blocks the joint sequence [T | X | C] at T + Nx."""
    from topi_export.models.flux2 import flux2_ids

    nt, nx = data.layout.text_tokens, data.layout.num_target
    txt_ids, img_ids = flux2_ids(data.layout)
    rope = [torch.cat(p) for p in zip(model.pos_embed(txt_ids), model.pos_embed(img_ids))]
    temb = model.time_guidance_embed(t * 1000, torch.tensor([3.5]) * 1000)
    hs = model.x_embedder(torch.cat([x, data.reference_latents], dim=1))
    enc = model.context_embedder(data.tensors["prompt_embeds"])

    def cut(table, at, dim):
        return torch.cat([table.narrow(dim, 0, at), table.narrow(dim, at, table.shape[dim] - at).index_select(dim, keep)],
                         dim)

    for i, block in enumerate(model.transformer_blocks):
        if i == prune_start:
            hs, rope = cut(hs, nx, 1), [cut(r, nt + nx, 0) for r in rope]
        enc, hs = block(hs, enc, model.double_stream_modulation_img(temb), model.double_stream_modulation_txt(temb),
                        tuple(rope))
    hs = torch.cat([enc, hs], dim=1)
    for i, block in enumerate(model.single_transformer_blocks, start=len(model.transformer_blocks)):
        if i == prune_start:
            hs, rope = cut(hs, nt + nx, 1), [cut(r, nt + nx, 0) for r in rope]
        hs = block(hs, None, model.single_stream_modulation(temb), tuple(rope))
    return model.proj_out(model.norm_out(hs[:, nt:nt + nx], temb))


@pytest.mark.parametrize("prune_start", [1, 2, 5])
def test_gather_in_double_and_single_blocks(session, fresh, prune_start):
    family = session.family
    data = _inputs(family, 3)
    keep = torch.tensor([1, 2, 8, 16, 20, 21, 33, 37])
    x, t = data.initial_noise(3), torch.tensor([0.4])
    with torch.no_grad():
        pruned, _ = family.forward(x, data.reference_latents, t, family.conditioning(data), keep_idx=keep,
                                   prune_start=prune_start)
        ref = _manual_pruned(fresh, data, x, t, keep, prune_start)
    torch.testing.assert_close(pruned, ref, rtol=0, atol=1e-5)


def test_scheduler_follows_flux2_pipeline(session):
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    layout = Layout(6, (8, 6), ((4, 4),))
    sched = session.family.make_scheduler(5, layout)
    assert len(sched.timesteps) == 5 and float(sched.sigmas[0]) == 1.0
    custom = session.family.make_scheduler(5, layout, {"num_train_timesteps": 1000, "use_dynamic_shifting": True,
                                                       "time_shift_type": "linear"})
    assert not torch.equal(custom.sigmas, sched.sigmas)  # a pipeline folder's config is used, mu still applied
    mu = compute_empirical_mu(48, 5)
    s = torch.linspace(1, 1 / 5, 5).double()
    torch.testing.assert_close(sched.sigmas[:-1].double(), torch.exp(torch.tensor(mu)) /
                               (torch.exp(torch.tensor(mu)) + (1 / s - 1)), rtol=0, atol=1e-6)


def test_copied_empirical_mu_equals_the_pipelines():
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu as theirs

    from topi_export.models.sampling import compute_empirical_mu

    for seq in (16, 256, 1024, 4096, 4300, 4301, 16384):
        for steps in (1, 4, 28, 50):
            assert compute_empirical_mu(seq, steps) == theirs(seq, steps)


def test_parse_call_reads_layout_from_ids(session):
    from topi_export.errors import TopiError
    from topi_export.models.flux2 import flux2_ids

    family = session.family
    layout = Layout(6, (4, 3), ((2, 5), (4, 4), (1, 3)))
    txt_ids, img_ids = flux2_ids(layout)
    hidden = torch.randn(1, layout.num_target + layout.num_ctx, 16)
    kwargs = dict(hidden_states=hidden, timestep=torch.tensor([0.3]), guidance=torch.tensor([2.0]),
                  encoder_hidden_states=torch.randn(1, 6, 32), txt_ids=txt_ids[None], img_ids=img_ids[None])
    latents, timestep, data = family.parse_call(kwargs)
    assert data.layout == layout and data.scalars["guidance"] == 2.0
    assert torch.equal(latents, hidden[:, :12]) and torch.equal(data.reference_latents, hidden[:, 12:])
    no_refs = dict(kwargs, hidden_states=hidden[:, :12], img_ids=img_ids[None, :12])
    with pytest.raises(TopiError, match="reference images"):
        family.parse_call(no_refs)
    with pytest.raises(TopiError, match="KV cache"):
        family.parse_call(dict(kwargs, kv_cache_mode="cached"))
    with pytest.raises(TopiError, match="no guidance"):  # tiny-flux2 embeds guidance; diffusers would skip it
        family.parse_call(dict(kwargs, guidance=None))


@pytest.fixture(scope="module")
def ort_dir(tmp_path_factory):
    from topi_export import build_engines

    out = tmp_path_factory.mktemp("flux2") / "tiny-flux2-ort"
    return build_engines(model="tiny-flux2", layouts=(Layout(6, (4, 4), GRIDS[3]),), buckets=(0.3, 0.5),
                         dense=False, engine_dir=out, echo=lambda s: None)


def test_onnxruntime_equals_torch_with_three_references(ort_dir):
    from topi_export import denoise, open_session
    from topi_export.runtime.loop import rel_l2

    ort = open_session(engine_dir=ort_dir, update_interval=2)
    torch_s = open_session(engine_dir=ort_dir, backend="torch", update_interval=2)
    data = _inputs(ort.family, 3, seed=4)
    results = [denoise(s.engine, s.family, data, steps=5, selector=s.selector(data, ratio=0.5), update_interval=2)
               for s in (ort, torch_s)]
    assert [r.graph for r in results[0].schedule] == ["anchor", "pruned", "anchor", "pruned", "anchor"]
    assert results[0].schedule[1].keep_per_reference == results[1].schedule[1].keep_per_reference
    assert rel_l2(results[0].latents, results[1].latents) <= 1e-4


def _tiny_vae():
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    return AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                              block_out_channels=(4, 4, 4, 4), layers_per_block=1, latent_channels=4,
                              norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False).eval()


def test_dropin_in_real_flux2_pipeline_equals_run_loop(session):
    """Flux2Pipeline (tiny VAE, prompt_embeds given) with the ToPi drop-in, two references of different sizes."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from PIL import Image

    from topi_export import Inputs, TopiTransformer, denoise
    from topi_export.models.flux2 import SCHEDULER

    tr = TopiTransformer(model="tiny-flux2", ratio=0.5, update_interval=3)
    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=_tiny_vae(), text_encoder=None,
                         tokenizer=None, transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    seen = {}
    encode = pipe.prepare_image_latents

    def spy(*args, **kwargs):  # records the reference latents the pipeline feeds (the VAE's output)
        seen["refs"] = encode(*args, **kwargs)
        return seen["refs"]

    pipe.prepare_image_latents = spy
    gen = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(h, w, 3, generator=gen) * 255).byte().numpy()) for h, w in ((64, 64),
                                                                                                       (64, 96))]
    prompt = torch.randn(1, 6, 32, generator=gen)
    noise = torch.randn(1, 16, 4, 4, generator=gen)  # the pipeline's unpacked latents [B, C*4, H, W]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pipe(image=images, prompt_embeds=prompt, height=64, width=64, num_inference_steps=6, guidance_scale=3.0,
                   latents=noise, output_type="latent").images
    refs, _ = seen["refs"]
    assert [s.kind for s in tr.schedule] == ["anchor", "pruned", "pruned"] * 2
    layout = Layout(6, (4, 4), ((4, 4), (4, 6)))  # 16 px per token
    data = Inputs(layout, refs[:1].float(), {"prompt_embeds": prompt}, {"guidance": 3.0},
                  noise=noise.flatten(2).transpose(1, 2))
    ref = denoise(session.engine, session.family, data, steps=6, selector=session.selector(data, ratio=0.5),
                  update_interval=3)
    torch.testing.assert_close(out, ref.latents, rtol=0, atol=1e-5)


def test_cli_run_with_three_references_reports_keep_per_reference(tmp_path, capsys, session):
    from topi_export.artifacts.inputs import save_inputs

    data = _inputs(session.family, 3, seed=7)
    data.noise = data.initial_noise(7)
    save_inputs(tmp_path / "in.safetensors", data)
    code, out, err = run_cli(["run", "--model", "tiny-flux2", "--inputs", str(tmp_path / "in.safetensors"),
                              "--steps", "4", "--ratio", "0.5", "--update-interval", "2", "--compare", "-q",
                              "--json", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["family"] == "flux2" and report["layout"]
    assert len(report["schedule"]) == 4
    for entry in report["schedule"]:
        assert len(entry["keep_per_reference"]) == 3
        assert sum(entry["keep_per_reference"]) == entry["keep"]
    assert any(entry["keep"] < data.layout.num_ctx for entry in report["schedule"])


def test_dropin_in_flux2_klein_pipeline_with_true_cfg(tmp_path):
    """Flux2KleinPipeline (no guidance embedding, positive + negative call per step): at ratio 0 the drop-in
    gives exactly the unmodified transformer's result, and at ratio 0.5 it plans from the positive branch."""
    import diffusers
    from PIL import Image

    from topi_export import TopiTransformer
    from topi_export.models.flux2 import SCHEDULER, tiny_config

    torch.manual_seed(3)
    model = diffusers.Flux2Transformer2DModel(**dict(tiny_config(), guidance_embeds=False)).eval()
    model.save_pretrained(tmp_path / "klein", safe_serialization=True)
    vae = _tiny_vae()
    gen = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(64, w, 3, generator=gen) * 255).byte().numpy()) for w in (64, 96)]
    prompt, negative = torch.randn(1, 6, 32, generator=gen), torch.randn(1, 6, 32, generator=gen)
    noise = torch.randn(1, 16, 4, 4, generator=gen)

    def generate(transformer):
        pipe = diffusers.Flux2KleinPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae,
                                            text_encoder=None, tokenizer=None, transformer=transformer,
                                            is_distilled=False)
        pipe.set_progress_bar_config(disable=True)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            return pipe(image=images, prompt_embeds=prompt, negative_prompt_embeds=negative, height=64, width=64,
                        num_inference_steps=6, guidance_scale=4.0, latents=noise, output_type="latent").images

    reference = generate(model)
    torch.testing.assert_close(generate(TopiTransformer(model=str(tmp_path / "klein"), ratio=0.0)), reference,
                               rtol=0, atol=1e-5)
    pruned = TopiTransformer(model=str(tmp_path / "klein"), ratio=0.5, update_interval=3)
    out = generate(pruned)
    assert [s.kind for s in pruned.schedule] == ["anchor", "pruned", "pruned"] * 2  # one record per step
    assert {s.keep for s in pruned.schedule if s.kind == "pruned"} == {20}
    assert torch.isfinite(out).all() and not torch.equal(out, reference)
