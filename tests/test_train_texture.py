"""scripts/train_texture.py, the kontext-texture edits and the shipped asset: a 3-step run writes a loadable FLUX.1
Kontext model, a log, a card, held-out and calibration samples, deterministically; the random edits are the
documented deterministic part plus zero-mean detail of the documented strength and band; the shipped samples hold
the documented tensors; the shipped model draws detail instead of predicting the mean."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

import topi_export
from topi_export.models import kontext_texture as kt
from topi_export.models.kontext_digits import psnr, rgb_to_latents, unpack

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_texture.py"
ASSET = Path(topi_export.__file__).resolve().parent / "assets" / "kontext-texture"
HELDOUT = {"astronaut", "coffee", "chelsea"}
TEXTURE_EDITS = ("smooth", "grain", "texture", "color_grain")  # kontext-texture's (kt.EDITS also has kontext-mottle's)


def _module(name="train_texture"):
    pytest.importorskip("skimage")
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(mod, out: Path, *extra):
    threads = torch.get_num_threads()
    try:
        return mod.main(["--steps", "3", "--crop", "16", "--low-res-crop", "8", "--low-res-frac", "0.5", "--batch", "2",
                         "--out", str(out), "--eval-count", "4", "--eval-steps", "2", "--num-samples", "4",
                         "--num-calibration", "2", "--log-every", "1", "--val-every", "2", *extra])
    finally:
        torch.set_num_threads(threads)


def _detail(data) -> torch.Tensor:
    """target minus its conditional mean, RGB [1, 3, H, W]."""
    grid = data.layout.target_grid
    mean = kt.mean_latents(data.reference_latents, data.meta["edit"], grid)
    return unpack(data.target_latents - mean, grid)[:, :3]


def _check_sample(data, grid: int):
    n = grid * grid
    assert data.reference_latents.shape == (1, n, 16) and data.target_latents.shape == (1, n, 16)
    assert data.noise.shape == (1, n, 16) and data.scalars["guidance"] == 2.5
    assert data.layout.target_grid == (grid, grid) and data.layout.ref_grids == ((grid, grid),)
    prompt, pooled = kt.texture_conditioning(data.meta["edit"])
    assert torch.equal(data.tensors["prompt_embeds"], prompt) and torch.equal(data.tensors["pooled_prompt_embeds"], pooled)
    detail = _detail(data)
    if data.meta["edit"] in kt.RANDOM_EDITS:
        lo, hi = kt.AMPLITUDE[data.meta["edit"]]
        assert lo * 0.8 < float(detail.std()) < hi * 1.2
        mono = torch.allclose(detail[:, 0], detail[:, 2], atol=1e-5)
        assert mono == (data.meta["edit"] in ("grain", "texture"))
    else:
        assert float(detail.abs().max()) < 1e-5


def test_train_script_writes_loadable_model(tmp_path):
    from topi_export.models import load_model
    from topi_export.artifacts.inputs import load_inputs

    mod = _module()
    out = tmp_path / "model"
    result = _run(mod, out)
    assert mod.DEFAULT_EDITS == TEXTURE_EDITS
    assert result["steps"] == 3 and set(result["per_group"]) == set(TEXTURE_EDITS) | {"random edits", "all"}
    loaded = load_model(out)
    assert loaded.family.name == "flux-kontext" and loaded.adapter.num_layers == 6
    log = (out / "train_log.txt").read_text()
    assert "step 3 loss" in log and "detail-model" in log
    assert json.loads(log.split("RESULT ", 1)[1])["steps"] == 3
    card = (out / "MODEL_CARD.md").read_text()
    assert "held-out" in card.lower() and "--steps 3" in card and "cond. mean" in card
    for folder, count in (("samples", 4), ("calibration_samples", 2)):
        files = sorted((out / folder).glob("sample_*.safetensors"))
        assert len(files) == count
        for path in files:
            data = load_inputs(path, loaded.family)
            _check_sample(data, 8)
            used = set(data.meta["photos"].split(","))
            assert used == HELDOUT if folder == "samples" else not used & HELDOUT
    edits = [load_inputs(p, loaded.family).meta["edit"] for p in sorted((out / "samples").glob("*.safetensors"))]
    assert edits == list(TEXTURE_EDITS)

    out2 = tmp_path / "again"
    _run(mod, out2)
    assert load_model(out2).weights_hash == loaded.weights_hash

    weights = (out / "diffusion_pytorch_model.safetensors").read_bytes()
    threads = torch.get_num_threads()
    try:
        again = mod.main(["--eval-only", "--out", str(out), "--eval-count", "4", "--eval-steps", "2",
                          "--num-samples", "4", "--num-calibration", "2"])
    finally:
        torch.set_num_threads(threads)
    assert again["per_group"] == result["per_group"]  # same model, same held-out set: the same numbers
    assert (out / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    assert (out / "train_log.txt").read_text() == log


def test_random_edits_are_mean_plus_zero_mean_detail():
    rgb = torch.rand(1, 3, 32, 32) * 2 - 1
    gen = torch.Generator().manual_seed(0)
    for edit in kt.RANDOM_EDITS:
        draws = torch.cat([kt.edit_rgb(rgb, edit, gen) for _ in range(200)])
        mean = kt.coarse_rgb(rgb, edit)
        detail = draws - mean
        assert not torch.allclose(draws[0], draws[1])  # random
        assert float(detail.mean(0).abs().mean()) < 0.05  # zero mean: the conditional mean is the coarse part
        lo, hi = kt.AMPLITUDE[edit]
        stds = detail.flatten(1).std(1)
        assert lo * 0.8 < float(stds.min()) and float(stds.max()) < hi * 1.2  # per-draw amplitude in range
        assert float(stds.std()) > 0.02  # ... and random per draw
    # Deterministic edits draw nothing and equal their mean.
    state = gen.get_state()
    assert torch.equal(kt.edit_rgb(rgb, "smooth", gen), kt.gaussian_blur(rgb, kt.SMOOTH_SIGMA))
    assert torch.equal(gen.get_state(), state)
    assert torch.equal(kt.mean_latents(rgb_to_latents(rgb), "grain", (16, 16)),
                       rgb_to_latents(kt.coarse_rgb(rgb, "grain")))


def test_texture_is_band_limited():
    """The texture's power lies in the documented frequency band (a filter bug would spread it)."""
    gen = torch.Generator().manual_seed(1)
    power, total = 0.0, 0.0
    lo, hi = kt.TEXTURE_FREQUENCY
    f = torch.sqrt(torch.fft.fftfreq(64)[:, None] ** 2 + torch.fft.fftfreq(64)[None, :] ** 2)
    band = (f > lo - 3 * kt.TEXTURE_BANDWIDTH) & (f < hi + 3 * kt.TEXTURE_BANDWIDTH)
    for _ in range(20):
        field = kt.band_pass_field(64, 64, gen)[0, 0]
        assert abs(float(field.std()) - 1) < 1e-3
        p = torch.fft.fft2(field).abs() ** 2
        power += float(p[band].sum())
        total += float(p.sum())
    assert power / total > 0.9


def test_gaussian_blur_preserves_constants_and_smooths():
    x = torch.full((1, 3, 16, 16), 0.3)
    assert torch.allclose(kt.gaussian_blur(x, 1.5), x, atol=1e-6)
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 2.0 - 1
    assert float(kt.gaussian_blur(checker.expand(1, 1, 16, 16), 1.5).abs().max()) < 0.05
    assert math.isclose(float(kt.token_mean(checker.expand(1, 1, 16, 16)).abs().max()), 0.0, abs_tol=1e-6)


def check_shipped_asset(asset: Path, name: str, edits, check_sample):
    """A trained asset of scripts/train_texture.py: a built-in that loads, its card, log and preview, 8 held-out
    samples of every edit (held-out photos only) and 4 calibration samples (training photos only)."""
    from topi_export.models import builtin_names, load_model
    from topi_export.artifacts.inputs import load_inputs

    assert (asset / "config.json").exists(), f"{asset} is missing: run scripts/train_texture.py"
    assert name in builtin_names()
    loaded = load_model(name)
    assert loaded.family.name == "flux-kontext" and loaded.adapter.num_layers == 6
    for f in ("MODEL_CARD.md", "train_log.txt", "preview.png"):
        assert (asset / f).exists(), f
    assert (asset / "MODEL_CARD.md").read_text().startswith(f"# {name}\n")
    samples = sorted((asset / "samples").glob("sample_*.safetensors"))
    assert len(samples) == 8
    seen = []
    for path in samples:
        data = load_inputs(path, loaded.family)
        check_sample(data, 16)
        assert set(data.meta["photos"].split(",")) == HELDOUT
        seen.append(data.meta["edit"])
    assert set(seen) == set(edits)
    calibration = sorted((asset / "calibration_samples").glob("sample_*.safetensors"))
    assert len(calibration) == 4
    for path in calibration:
        data = load_inputs(path, loaded.family)
        check_sample(data, 16)
        assert not set(data.meta["photos"].split(",")) & HELDOUT


def test_shipped_asset_loads_and_samples_are_documented():
    check_shipped_asset(ASSET, "kontext-texture", TEXTURE_EDITS, _check_sample)


def test_shipped_model_draws_detail():
    """A held-out ``grain`` sample through the runtime's 28-step loop: the generation keeps the coarse structure
    (close to the truth once both are blurred) and adds grain of about the right strength, not the mean."""
    from topi_export import open_session

    session = open_session(model="kontext-texture")
    data = session.load_inputs(ASSET / "samples" / "sample_1.safetensors")
    assert data.meta["edit"] == "grain"
    grid = data.layout.target_grid
    out = session.denoise(data, steps=28, mode="full").latents
    coarse = float(psnr(kt.lowpass_latents(out, grid), kt.lowpass_latents(data.target_latents, grid)))
    mean = kt.mean_latents(data.reference_latents, "grain", grid)
    strength = float(unpack(out - mean, grid)[:, :3].std())
    assert coarse > 25, coarse
    lo, hi = kt.AMPLITUDE["grain"]
    assert 0.5 * lo < strength < 1.5 * hi, strength
