"""Reference K/V cache (docs/design.md, "Reference K/V cache"): a FLUX.2 [klein] KV model against the unmodified
diffusers transformer called as Flux2KleinKVPipeline calls it, cached steps against the unpruned cache, ONNX
Runtime against torch through whole runs, the drop-in in a real Flux2KleinKVPipeline, the Triton loop model, and
approximate reuse (any family) against the full run."""
import json
import warnings

import pytest
import torch

from conftest import run_cli
from topi_export.plan import Layout

GRIDS = {1: ((4, 4),), 2: ((4, 4), (3, 5)), 3: ((4, 4), (3, 5), (2, 4))}
LAYOUT3 = Layout(6, (4, 4), GRIDS[3])
PIPE_LAYOUT = Layout(6, (4, 4), ((4, 4), (4, 6), (5, 4)))  # what the pipeline makes of 64x64, 64x96, 80x64 px


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def klein_kv(tmp_path_factory):
    """A tiny FLUX.2 [klein] KV pipeline folder (model_index.json names Flux2KleinKVPipeline; no guidance
    embedding, as klein) with seeded weights."""
    import diffusers

    from topi_export.models.flux2 import tiny_config

    root = tmp_path_factory.mktemp("klein-kv") / "klein-kv"
    torch.manual_seed(5)
    model = diffusers.Flux2Transformer2DModel(**dict(tiny_config(), guidance_embeds=False)).eval()
    model.save_pretrained(root / "transformer", safe_serialization=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinKVPipeline"}))
    return root


@pytest.fixture(scope="module")
def kv_session(klein_kv):
    from topi_export import open_session

    return open_session(model=str(klein_kv))


@pytest.fixture(scope="module")
def reference(klein_kv):
    """The unmodified transformer with the processors Flux2KleinKVPipeline installs."""
    import diffusers
    from diffusers.models.transformers.transformer_flux2 import (Flux2KVAttnProcessor,
                                                                 Flux2KVParallelSelfAttnProcessor)

    model = diffusers.Flux2Transformer2DModel.from_pretrained(klein_kv / "transformer").eval()
    for block in model.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in model.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    return model


def _kv_pipeline_loop(family, model, data, steps):
    """Flux2KleinKVPipeline's loop: step 0 extracts the cache, every later step passes it back."""
    sched = family.make_scheduler(steps, data.layout)
    latents, cache = data.initial_noise(0), None
    with torch.no_grad():
        for t in sched.timesteps:
            v, cache = family.kv_pipeline_call(model, latents, data.reference_latents, (t / 1000).reshape(1), data,
                                               cache)
            latents = sched.step(v, t, latents, return_dict=False)[0]
    return latents


# --- exact: FLUX.2 [klein] KV -------------------------------------------------------------------------------
def test_pipeline_folder_makes_a_kv_model_and_other_families_refuse_it(kv_session, tmp_path, capsys):
    from topi_export.errors import BadInput
    from topi_export.models import load_model

    assert kv_session.family.kv_model and kv_session.ref_kv == "exact"
    assert not load_model("tiny-flux2").family.kv_model
    with pytest.raises(BadInput, match="no models trained with a reference K/V cache"):
        load_model("tiny-kontext", kv_model=True)
    with pytest.raises(BadInput, match="cache is exact"):
        kv_session.check_ref_kv("reuse")
    code, _, err = run_cli(["build", "--model", "tiny-qwen-edit", "--kv-cache", "--engine-dir",
                            str(tmp_path / "e")], capsys)
    assert code == 2 and "--kv-cache" in err and not (tmp_path / "e").exists()


@pytest.mark.parametrize("refs", [1, 2, 3])
def test_ratio_zero_equals_the_kv_pipelines_transformer_calls(kv_session, reference, refs):
    from topi_export import denoise

    family = kv_session.family
    data = family.synthetic_inputs(Layout(6, (4, 4), GRIDS[refs]), seed=refs)
    want = _kv_pipeline_loop(family, reference, data, 5)
    topi = denoise(kv_session.engine, family, data, steps=5, selector=kv_session.selector(data, ratio=0.0),
                   update_interval=2, ref_kv="exact")
    cached = denoise(kv_session.engine, family, data, steps=5, mode="full", ref_kv="exact")
    dense = denoise(kv_session.engine, family, data, steps=5, mode="dense")  # references recomputed every step
    assert [r.graph for r in topi.schedule] == ["extract", "kv-full", "kv-anchor", "kv-full", "kv-anchor"]
    assert [r.graph for r in cached.schedule] == ["extract"] + ["kv-full"] * 4
    for result in (topi, cached, dense):
        assert _rel(result.latents, want) <= 1e-5
    # the cache: keys and values of every layer, every reference token, float32
    f = family
    assert topi.cache_bytes == f.num_layers * 2 * f.heads * f.head_dim * data.layout.num_ctx * 4


def test_cached_steps_keep_all_equal_the_unpruned_cache_and_prune_to_the_kept_set(kv_session):
    family = kv_session.family
    data = family.synthetic_inputs(LAYOUT3, seed=3)
    cond = family.conditioning(data)
    x, t = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([0.6])
    pivotal = kv_session.settings.pivotal_layers
    with torch.no_grad():
        v_extract, i_extract, kv = family.forward(x, data.reference_latents, t, cond, influence_layers=pivotal,
                                                  record_kv=True)
        v_cached, i_cached = family.forward(x, None, t, cond, ref_kv=kv, influence_layers=pivotal)
        # an anchor of a KV model re-scores on the cached keys: the same influence as the step that made them
        torch.testing.assert_close(v_cached, v_extract, rtol=0, atol=1e-5)
        torch.testing.assert_close(i_cached, i_extract, rtol=1e-5, atol=1e-7)
        every = torch.arange(LAYOUT3.num_ctx)
        for start in (0, 2, family.num_layers - 1):
            v_all, _ = family.forward(x, None, t, cond, ref_kv=kv, keep_idx=every, prune_start=start)
            torch.testing.assert_close(v_all, v_cached, rtol=0, atol=1e-6)
        # pruned from layer 0: exactly a cache that holds only the kept tokens
        keep = torch.tensor([0, 3, 7, 16, 20, 31, 38])
        v_pruned, _ = family.forward(x, None, t, cond, ref_kv=kv, keep_idx=keep, prune_start=0)
        v_small, _ = family.forward(x, None, t, cond, ref_kv=kv[:, :, :, :, keep])
        torch.testing.assert_close(v_pruned, v_small, rtol=0, atol=1e-6)
        assert not torch.allclose(v_pruned, v_cached, atol=1e-4)


def test_controller_plans_the_cache_steps():
    from topi_export.method import Selector
    from topi_export.method.schedule import TemporalController

    def kinds(ref_kv, selector, steps=7, dt=3):
        c = TemporalController(selector, dt, 10, ref_kv=ref_kv)
        out = []
        for s in range(steps):
            plan = c.plan(s)
            if plan.kind in ("extract", "kv-anchor") and selector is not None:
                c.observe(s, torch.arange(10.0))
            out.append(plan.kind)
        return out

    sel = Selector(10, ratio=0.5, policy="topi")
    assert kinds("exact", sel) == ["extract", "kv-pruned", "kv-pruned", "kv-anchor", "kv-pruned", "kv-pruned",
                                   "kv-anchor"]
    assert kinds("exact", None) == ["extract"] + ["kv-full"] * 6
    assert kinds("reuse", sel) == ["extract", "kv-pruned", "kv-pruned"] * 2 + ["extract"]
    assert kinds("reuse", None) == ["extract", "kv-full", "kv-full"] * 2 + ["extract"]
    assert TemporalController(None, 3, 10, baseline="dense", ref_kv="exact").plan(1).kind == "dense"


def test_flop_model_and_cache_bytes():
    """The issue's FLOP model at FLUX.1 width (57 blocks, 512 text + 4096 target + 4096 per reference, 28 steps,
    L0 10, dT 10): the cache alone 1.83x with one reference, cache + ToPi at 0.7 1.99x; klein 9B's cache."""
    from topi_export.method.cost import kv_cache_bytes, predicted_kv_end_to_end
    from topi_export.plan import keep_count

    lay = Layout(512, (64, 64), ((64, 64),))
    p = predicted_kv_end_to_end(lay, keep_count(0.7, lay.num_ctx), 57, 10, 3072, 28, 10)
    assert round(p["cache"], 2) == 1.83 and round(p["cache_topi"], 2) == 1.98
    assert kv_cache_bytes(32, 32, 128, 4096) == 2 << 30  # 8 double + 24 single blocks, 32 x 128, bf16: 2 GiB


# --- engines -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ort_kv(klein_kv, tmp_path_factory):
    from topi_export import build_engines

    root = tmp_path_factory.mktemp("kv-engines")
    out = build_engines(model=str(klein_kv), layouts=(LAYOUT3, PIPE_LAYOUT), buckets=(0.3, 0.5),
                        engine_dir=root / "ort", onnx_dir=root / "onnx", echo=lambda s: None)
    return out, root


def test_kv_engine_directory_holds_extract_cached_and_dense(ort_kv):
    from topi_export.artifacts.manifest import read_manifest

    m = read_manifest(ort_kv[0])
    assert m.ref_kv == "exact" and sorted(m.graphs) == ["cached", "dense", "extract"]
    cached = m.graphs["cached"]
    assert [t.name for t in cached.inputs][:5] == ["latents", "timestep", "ref_kv", "keep_idx", "score_idx"]
    assert cached.input("ref_kv").dims == (6, 2, "B", 2, "Nc", 16)
    assert [t.name for t in m.graphs["extract"].outputs] == ["velocity", "ref_kv", "influence"]
    assert m.weights["file"] == "onnx/weights.data"  # one weights file for the three graphs


def test_onnxruntime_equals_torch_through_a_run_with_three_references(ort_kv, kv_session):
    from topi_export import denoise, open_session

    ort = open_session(engine_dir=ort_kv[0], update_interval=3)
    data = ort.family.synthetic_inputs(LAYOUT3, seed=9)
    runs = [denoise(s.engine, s.family, data, steps=7, selector=s.selector(data, ratio=0.5), update_interval=3,
                    ref_kv="exact") for s in (ort, kv_session)]
    assert [r.graph for r in runs[0].schedule] == ["extract", "kv-pruned", "kv-pruned", "kv-anchor", "kv-pruned",
                                                   "kv-pruned", "kv-anchor"]
    assert [r.keep_per_reference for r in runs[0].schedule] == [r.keep_per_reference for r in runs[1].schedule]
    assert _rel(runs[0].latents, runs[1].latents) <= 1e-4
    assert runs[0].cache_bytes == runs[1].cache_bytes > 0


def test_run_compare_reports_both_baselines_and_the_cache(ort_kv, tmp_path, capsys):
    code, out, err = run_cli(["run", "--engine-dir", str(ort_kv[0]), "--ratio", "0.5", "--steps", "4",
                              "--update-interval", "2", "--compare", "--repeats", "1", "-q",
                              "--json", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert set(r["time_s"]) == {"topi", "dense", "kv-cache"} and r["baseline"] == "dense"
    # reported, not judged: speed lives in benchmarks
    assert isinstance(r["speedup_vs_kv_cache"], float) and len(r["speedup_vs_kv_cache_spread"]) == 2
    assert r["ref_kv"]["mode"] == "exact" and r["ref_kv"]["exact"] is True
    assert r["ref_kv"]["cache_bytes"] == 6 * 2 * 2 * 16 * LAYOUT3.num_ctx * 4
    assert sum(r["ref_kv"]["cache_bytes_per_reference"]) == r["ref_kv"]["cache_bytes"]
    assert r["psnr_db"] > 40 and "KV cache, unpruned" in out
    code, _, err = run_cli(["run", "--engine-dir", str(ort_kv[0]), "--ref-kv", "reuse", "-q"], capsys)
    assert code == 2 and "cache is exact" in err


@pytest.mark.parametrize("reuse, residual, graphs", [
    (None, False, ["extract", "kv-pruned", "kv-pruned", "kv-anchor", "kv-pruned", "kv-pruned", "kv-anchor"]),
    (2, False, ["extract", "kv-pruned", "none", "kv-anchor", "none", "kv-pruned", "kv-anchor"]),
    (None, True, ["extract", "kv-pruned", "kv-pruned", "kv-anchor", "kv-pruned", "kv-pruned", "kv-anchor"])])
def test_dropin_in_a_real_flux2_klein_kv_pipeline_equals_run(ort_kv, reuse, residual, graphs):
    """Flux2KleinKVPipeline (tiny VAE, no text encoder, prompt embeddings given) built with the drop-in as its
    transformer: the extract call starts the generation, the cached calls pass back the token; same latents as
    `run`; clearing the token frees the engine's cache. With step reuse, the reused steps' cached calls call no
    engine and the cache stays as the extract call left it. With the pruning residual, the anchors (the extract
    call and the kv-anchors) also run the kept set over the cache."""
    import diffusers
    from PIL import Image

    from test_flux2 import _tiny_vae
    from topi_export import Inputs, TopiTransformer, denoise
    from topi_export.models.flux2 import SCHEDULER

    tr = TopiTransformer(ort_kv[0], ratio=0.5, update_interval=3, reuse=reuse,
                         steps=7 if reuse or residual else None, pruning_residual=residual)
    pipe = diffusers.Flux2KleinKVPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER),
                                          vae=_tiny_vae(), text_encoder=None, tokenizer=None, transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    seen = {}
    encode = pipe.prepare_image_latents

    def spy(*args, **kwargs):
        seen["refs"] = encode(*args, **kwargs)
        return seen["refs"]

    pipe.prepare_image_latents = spy
    seen_steps = []

    def on_step(pipe, i, t, kw):  # the packed latents after each step, and the cache the engine holds then
        seen_steps.append((kw["latents"].clone(), tr.session.engine.state_bytes()))
        return {}

    gen = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(h, w, 3, generator=gen) * 255).byte().numpy())
              for h, w in ((64, 64), (64, 96), (80, 64))]  # 4x4, 4x6, 5x4 tokens (the pipeline needs >= 64 px)
    prompt = torch.randn(1, 6, 32, generator=gen)
    noise = torch.randn(1, 16, 4, 4, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe(image=images, prompt_embeds=prompt, height=64, width=64, num_inference_steps=7, latents=noise,
             output_type="latent", callback_on_step_end=on_step)
    assert [s.graph for s in tr.schedule] == graphs
    held = [b for _, b in seen_steps]
    assert min(held[:-1]) == held[0] > 0 and tr.session.engine.state_bytes() == 0  # held, then freed by clear()
    refs, _ = seen["refs"]
    data = Inputs(PIPE_LAYOUT, refs[:1].float(), {"prompt_embeds": prompt}, noise=noise.flatten(2).transpose(1, 2))
    session = tr.session
    plan = session.reuse_plan(data, steps=7, reuse=reuse or "off", update_interval=3)
    want = denoise(session.engine, session.family, data, steps=7, selector=session.selector(data, ratio=0.5),
                   update_interval=3, reuse=plan, pruning_residual=residual)
    assert [r.graph for r in want.schedule] == graphs
    assert [r.residual for r in tr.schedule] == [r.residual for r in want.schedule] == [
        (True if residual else None) if g in ("extract", "kv-anchor") and i < 6 else None
        for i, g in enumerate(graphs)]
    assert _rel(seen_steps[-1][0], want.latents) <= 1e-5


def test_step_reuse_leaves_the_cache_valid(kv_session):
    """Step reuse (a `reuse` step calls nothing) on a KV model: the reused steps take the last velocity, the cache
    recorded at step 0 stays, and the anchors after reused steps, which attend to every cached key, equal the dense
    model at the same latents; the cache's size does not change."""
    from topi_export import denoise

    s = kv_session
    data = s.family.synthetic_inputs(LAYOUT3, seed=3)
    plan = s.reuse_plan(data, steps=7, reuse=2, update_interval=3)
    assert plan.steps == (2, 4)
    sched = s.family.make_scheduler(7, data.layout)
    seen, x = [], data.initial_noise(0)

    def on_step(step, sigma, velocity):  # follow the loop's latents with a second scheduler
        nonlocal x
        seen.append((x.clone(), sigma, velocity.clone()))
        x = sched.step(velocity, sched.timesteps[step], x, return_dict=False)[0]

    run = denoise(s.engine, s.family, data, steps=7, selector=s.selector(data, ratio=0.5), update_interval=3,
                  reuse=plan, on_step=on_step)
    assert [r.graph for r in run.schedule] == ["extract", "kv-pruned", "none", "kv-anchor", "none", "kv-pruned",
                                               "kv-anchor"]
    torch.testing.assert_close(x, run.latents, rtol=0, atol=0)
    assert torch.equal(seen[2][2], seen[1][2]) and torch.equal(seen[4][2], seen[3][2])  # order 0: the last one
    s.engine.bind(s.family.conditioning(data, data.layout), data.reference_latents, data.layout)
    with torch.no_grad():
        for step in (3, 6):
            latents, sigma, velocity = seen[step]
            assert _rel(velocity, s.engine.dense(latents, torch.tensor([sigma]))) <= 1e-5
    plain = denoise(s.engine, s.family, data, steps=7, selector=s.selector(data, ratio=0.5), update_interval=3)
    assert run.cache_bytes == plain.cache_bytes > 0


def test_run_with_step_reuse_and_the_cache(ort_kv, ort_reuse, tmp_path, capsys):
    """`run --reuse N` composes with both reference K/V modes: reused steps call nothing, the others are cache
    steps; the report counts the computed steps and keeps the cache's bytes and both baselines."""
    code, out, err = run_cli(["run", "--engine-dir", str(ort_kv[0]), "--ratio", "0.5", "--steps", "7",
                              "--update-interval", "3", "--reuse", "2", "--compare", "--repeats", "1", "-q",
                              "--json", str(tmp_path / "exact.json")], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "exact.json").read_text())
    assert [e["kind"] for e in r["schedule"]] == ["extract", "kv-pruned", "reuse", "kv-anchor", "reuse",
                                                  "kv-pruned", "kv-anchor"]
    assert r["reuse"]["steps"] == [2, 4] and r["computed_steps"] == 5
    assert r["ref_kv"]["exact"] is True and r["ref_kv"]["cache_bytes"] == 6 * 2 * 2 * 16 * LAYOUT3.num_ctx * 4
    assert set(r["time_s"]) == {"topi", "dense", "kv-cache"} and "speedup_vs_kv_cache" in r
    assert "5 computed" in out
    code, out, err = run_cli(["run", "--engine-dir", str(ort_reuse), "--ref-kv", "reuse", "--ratio", "0.5",
                              "--steps", "7", "--update-interval", "3", "--reuse", "2", "-q",
                              "--json", str(tmp_path / "approx.json")], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "approx.json").read_text())
    assert [e["kind"] for e in r["schedule"]] == ["extract", "kv-pruned", "reuse", "extract", "reuse",
                                                  "kv-pruned", "extract"]
    assert r["ref_kv"]["exact"] is False and r["computed_steps"] == 5


def test_triton_loop_model_keeps_the_cache_between_its_engine_calls(ort_kv, kv_session):
    """The Triton loop model's TritonEngine (ONNX Runtime standing in for Triton's engine models): the extract
    model runs once, every later call takes the cache back from the loop model; same latents as the engines."""
    import numpy as np

    from topi_export import denoise, open_session
    from topi_export.backends.onnxruntime import load_session
    from topi_export.serving.triton_engine import TritonEngine, model_names

    ort = open_session(engine_dir=ort_kv[0], update_interval=3)
    m = ort.manifest
    sessions, calls = {}, []

    def infer(model, inputs, outputs):
        kind = model.split("_", 1)[1]
        calls.append((kind, sorted(inputs)))
        sess = sessions.setdefault(kind, load_session(m.file(m.graphs[kind].file), prefer_gpu=False))
        return dict(zip(outputs, sess.run(outputs, {k: np.asarray(v) for k, v in inputs.items()})))

    engine = TritonEngine(infer, m, model_names("topi", m.graphs))
    data = ort.family.synthetic_inputs(LAYOUT3, seed=2)
    got = denoise(engine, ort.family, data, steps=5, selector=ort.selector(data, ratio=0.3), update_interval=3,
                  ref_kv="exact")
    want = denoise(ort.engine, ort.family, data, steps=5, selector=ort.selector(data, ratio=0.3),
                   update_interval=3, ref_kv="exact")
    torch.testing.assert_close(got.latents, want.latents, rtol=0, atol=1e-6)
    assert [k for k, _ in calls] == ["extract"] + ["cached"] * 4
    assert all("ref_kv" in names and "context" not in names for k, names in calls if k == "cached")


@pytest.mark.tensorrt_rtx
def test_tensorrt_rtx_builds_kv_engines_with_cache_profiles(ort_kv, klein_kv):
    """TensorRT-RTX, ahead of time: extract.engine (one profile per layout) and cached.engine (anchor + one per
    bucket), the K/V input's shape fixed by the layout in every profile, read back from TensorRT."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx not installed (pip install tensorrt-rtx-cu13)")
    from topi_export import build_engines
    from topi_export.artifacts.manifest import read_manifest
    from topi_export.backends.tensorrt.common import BUILD_LOG

    root = ort_kv[1]
    out = build_engines(model=str(klein_kv), layouts=(LAYOUT3, PIPE_LAYOUT), buckets=(0.3, 0.5),
                        backend="tensorrt-rtx", dense=True, engine_dir=root / "rtx", onnx_dir=root / "onnx",
                        echo=lambda s: None)
    m = read_manifest(out)
    assert m.ref_kv == "exact" and sorted(m.graphs) == ["cached", "dense", "extract"]
    assert {g.file for g in m.graphs.values()} == {"extract.engine", "cached.engine", "dense.engine"}
    lines = [ln for ln in (out / BUILD_LOG).read_text().splitlines() if "TOPI: profiles " in ln]
    profiles = {ln.split("]")[0].strip("["): json.loads(ln.split("TOPI: profiles ", 1)[1]) for ln in lines}
    cached, extract = profiles["cached"], profiles["extract"]
    assert len(cached) == len(m.profiles) == 6 and len(extract) == len(m.layouts) == 2
    for prof, p in zip(cached, m.profiles):
        lay = m.layouts[p.layout]
        assert prof["ref_kv"] == [[6, 2, 1, 2, lay.num_ctx, 16]] * 3  # the layout's whole cache, every profile
        assert prof["keep_idx"] == [[p.keep]] * 3
        assert prof["score_idx"] == ([[1], [16], [16]] if p.ratio == 0 else [[1]] * 3)
    for prof, lay in zip(extract, m.layouts):
        assert prof["context"] == [[1, lay.num_ctx, 16]] * 3 and prof["score_idx"] == [[1], [16], [16]]


# --- approximate reuse, any family ----------------------------------------------------------------------------
@pytest.mark.parametrize("name, layout", [("tiny-kontext", Layout(8, (4, 4), ((4, 4),))),
                                          ("tiny-flux2", LAYOUT3),
                                          ("tiny-qwen-edit", Layout(8, (4, 4), ((4, 4), (2, 3))))])
def test_reuse_with_an_anchor_every_step_equals_the_full_run(name, layout):
    """Approximate reuse is exact where nothing drifts: an anchor every step, and a cached step at the very
    latents and timestep its K/V were recorded at (true CFG: each branch's own K/V)."""
    from topi_export import denoise, open_session

    s = open_session(model=name)
    family = s.family
    data = family.synthetic_inputs(layout, seed=4)
    if "negative_prompt_embeds" in data.tensors:
        data.scalars["true_cfg_scale"] = 4.0
    full = denoise(s.engine, family, data, steps=4, mode="full")
    reuse = denoise(s.engine, family, data, steps=4, selector=s.selector(data, ratio=0.5), update_interval=1,
                    ref_kv="reuse")
    assert [r.graph for r in reuse.schedule] == ["extract"] * 4
    torch.testing.assert_close(reuse.latents, full.latents, rtol=0, atol=1e-5)
    b = family.branches(data)
    cond = family.conditioning(data)
    x, t = torch.randn(b, layout.num_target, family.in_channels), torch.full((b,), 0.4)
    with torch.no_grad():
        ctx = data.reference_latents.expand(b, -1, -1)
        v_full, _ = family.forward(x, ctx, t, cond)
        _, _, kv = family.forward(x, ctx, t, cond, record_kv=True)
        v_cached, _ = family.forward(x, None, t, cond, ref_kv=kv)
    assert kv.shape == (family.num_layers, 2, b, family.heads, layout.num_ctx, family.head_dim)
    torch.testing.assert_close(v_cached, v_full, rtol=0, atol=1e-5)
    # between anchors the cache is stale: reuse then differs from the full run (it is approximate)
    stale = denoise(s.engine, family, data, steps=4, selector=s.selector(data, ratio=0.0), update_interval=2,
                    ref_kv="reuse")
    assert [r.graph for r in stale.schedule] == ["extract", "kv-full"] * 2
    assert not torch.allclose(stale.latents, full.latents, atol=1e-4)


@pytest.fixture(scope="module")
def ort_reuse(tmp_path_factory):
    from topi_export import build_engines

    out = tmp_path_factory.mktemp("reuse") / "ort"
    return build_engines(model="tiny-kontext", layouts=(Layout(8, (4, 4), ((4, 4),)),), buckets=(0.5,),
                         dense=False, ref_kv="reuse", engine_dir=out, echo=lambda s: None)


def test_onnxruntime_reuse_equals_torch_and_is_labelled_approximate(ort_reuse, tmp_path, capsys):
    from topi_export import denoise, open_session

    ort = open_session(engine_dir=ort_reuse, update_interval=3)
    ref = open_session(engine_dir=ort_reuse, backend="torch", update_interval=3)
    assert ort.manifest.ref_kv == "reuse" and sorted(ort.manifest.graphs) == ["cached", "extract", "topi"]
    data = ort.family.synthetic_inputs(ort.manifest.layout, seed=1)
    runs = [denoise(s.engine, s.family, data, steps=7, selector=s.selector(data, ratio=0.5), update_interval=3,
                    ref_kv="reuse") for s in (ort, ref)]
    assert [r.graph for r in runs[0].schedule] == ["extract", "kv-pruned", "kv-pruned"] * 2 + ["extract"]
    assert _rel(runs[0].latents, runs[1].latents) <= 1e-4
    code, out, err = run_cli(["run", "--engine-dir", str(ort_reuse), "--ref-kv", "reuse", "--steps", "4",
                              "--update-interval", "2", "-q", "--json", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["ref_kv"]["mode"] == "reuse" and r["ref_kv"]["exact"] is False and "approximate" in out
    assert "speedup_vs_kv_cache" not in r


def test_reuse_needs_its_graphs(ort_engine_dir, capsys):
    code, _, err = run_cli(["run", "--engine-dir", str(ort_engine_dir), "--ref-kv", "reuse", "-q"], capsys)
    assert code == 2 and "build --ref-kv reuse" in err


def test_manifest_needs_the_cache_graphs(ort_kv, tmp_path):
    from topi_export.errors import TopiError
    from topi_export.plan import Manifest
    from topi_export.plan.manifest import manifest_digest

    doc = json.loads((ort_kv[0] / "manifest.json").read_text())
    del doc["graphs"]["cached"]
    doc["manifest_sha256"] = manifest_digest(doc)
    with pytest.raises(TopiError, match="no 'cached' graph"):
        Manifest.from_json(doc, "manifest.json")


def test_check_and_triton_repository_cover_the_cache_graphs(ort_kv, klein_kv, tmp_path, capsys):
    code, out, err = run_cli(["check", "--engine-dir", str(ort_kv[0]), "--model", str(klein_kv),
                              "--json", str(tmp_path / "c.json")], capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    seen = {(r["graph"], r["output"]) for r in rows}
    assert {("extract", "velocity"), ("extract", "influence"), ("extract", "ref_kv"), ("kv-anchor", "influence"),
            ("kv-pruned", "velocity"), ("dense", "velocity")} <= seen and all(r["pass"] for r in rows)
    code, out, err = run_cli(["triton", "--engine-dir", str(ort_kv[0]), "--out", str(tmp_path / "repo"), "--kind",
                              "cpu"], capsys)
    assert code == 0, err
    loop = (tmp_path / "repo" / "topi_loop" / "config.pbtxt").read_text()
    assert "topi_extract" in loop and "topi_cached" in loop and '"ref_kv"' in loop
    assert (tmp_path / "repo" / "topi_cached" / "1" / "model.onnx").exists()
    assert not (tmp_path / "repo" / "topi_topi").exists()
