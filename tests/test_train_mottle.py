"""kontext-mottle: the ``token_grain`` / ``blob_grain`` edits (the reference plus zero-mean Gaussian colour noise,
constant over 2x2 / 4x4 px blocks, independent per channel, of the documented strength), appending them left
kontext-texture's edits, embeddings and draws unchanged, ``scripts/train_texture.py --edits`` (validation, a 3-step
run with the chosen edits, the card named after ``--out``), and the shipped ``kontext-mottle`` asset (a built-in,
its samples documented and runnable). No step-reuse or curvature numbers here: kontext-mottle is held out."""
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

import topi_export
from topi_export.models import kontext_texture as kt
from topi_export.models.kontext_digits import unpack

ASSETS = Path(topi_export.__file__).resolve().parent / "assets"
ASSET = ASSETS / "kontext-mottle"
MOTTLE_EDITS = ("smooth", "token_grain", "blob_grain")
TEXTURE_EDITS = ("smooth", "grain", "texture", "color_grain")


def _module(name="train_texture_mottle"):
    from test_train_texture import _module as load_script

    return load_script(name)


def _blocks(x: torch.Tensor, b: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, H/b, W/b, b*b]: the pixels of each b x b block."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // b, b, w // b, b).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h // b, w // b, b * b)


# ------------------------------------------------------------------------------------------------ the edits
def test_edits_appended_and_kontext_texture_unchanged():
    assert kt.EDITS[:4] == TEXTURE_EDITS and kt.EDITS[4:] == ("token_grain", "blob_grain")
    assert kt.RANDOM_EDITS[:3] == ("grain", "texture", "color_grain")
    assert set(kt.RANDOM_EDITS) == set(kt.EDITS) - {"smooth"}
    assert {e: kt.AMPLITUDE[e] for e in TEXTURE_EDITS[1:]} == {"grain": (0.15, 0.35), "texture": (0.20, 0.45),
                                                                "color_grain": (0.10, 0.30)}
    assert kt.AMPLITUDE["token_grain"] == (0.35, 0.60) and kt.AMPLITUDE["blob_grain"] == (0.20, 0.35)
    # The seeded draw of grain is the original formula: a ~ U(lo, hi), then a * N(0, 1) per pixel, monochrome.
    gen, ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    lo, hi = kt.AMPLITUDE["grain"]
    a = lo + (hi - lo) * float(torch.rand(1, generator=ref))
    assert torch.equal(kt.detail_rgb("grain", 16, 16, gen), a * torch.randn(1, 1, 16, 16, generator=ref))
    # New embeddings are distinct from the old ones.
    prompts = [kt.texture_conditioning(e)[0] for e in kt.EDITS]
    assert all(not torch.equal(prompts[i], prompts[j]) for i in range(6) for j in range(i))


def test_shipped_kontext_texture_samples_reproduce():
    """The shipped kontext-texture samples are reproduced bit for bit by today's code (embeddings, references, draws
    of the default edits): appending edits changed nothing for it."""
    from topi_export.artifacts.inputs import load_inputs
    from topi_export.models import load_model

    mod = _module()
    folder = ASSETS / "kontext-texture" / "samples"
    files = sorted(folder.glob("sample_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))
    held = [mod.tk.pyramid(mod.tk.load_image(n), 32) for n in mod.HELDOUT_IMAGES]
    edit, x0, ref, noise = mod.request_set(held, len(files), 32, mod.EVAL_SEED)
    cond = mod.Conditioning()
    fam = load_model("kontext-texture").family
    for i, path in enumerate(files):
        data = load_inputs(path, fam)
        assert data.meta["edit"] == TEXTURE_EDITS[int(edit[i])]
        assert torch.equal(data.target_latents, x0[i:i + 1]) and torch.equal(data.reference_latents, ref[i:i + 1])
        assert torch.equal(data.noise, noise[i:i + 1])
        prompt, pooled = cond(edit[i:i + 1])
        assert torch.equal(data.tensors["prompt_embeds"], prompt)
        assert torch.equal(data.tensors["pooled_prompt_embeds"], pooled)


@pytest.mark.parametrize("edit", ["token_grain", "blob_grain"])
def test_block_grain_statistics(edit):
    b = kt.BLOCK[edit]
    assert b == {"token_grain": 2, "blob_grain": 4}[edit]
    rgb = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(kt.coarse_rgb(rgb, edit), rgb)  # the deterministic part is the reference, unchanged
    gen = torch.Generator().manual_seed(3)
    draws = torch.cat([kt.edit_rgb(rgb, edit, gen) for _ in range(300)])
    detail = draws - rgb
    assert detail.shape == (300, 3, 32, 32)
    # Constant over each b x b px block, and not over larger ones (neighbouring blocks differ).
    blocks = _blocks(detail, b)
    assert float((blocks - blocks[..., :1]).abs().max()) < 1e-6  # (rgb + detail) - rgb: float rounding only
    values = blocks[..., 0]  # [300, 3, 32/b, 32/b]: one value per block
    assert float((values[..., 1:, :] - values[..., :-1, :]).abs().min()) > 0
    assert float((values[..., :, 1:] - values[..., :, :-1]).abs().min()) > 0
    # Zero mean: the conditional mean is the reference.
    assert abs(float(values.mean())) < 0.01
    assert float(values.mean(0).abs().max()) < 4 * 0.6 / 300 ** 0.5
    # Per-sample amplitude in the documented range, and random per sample.
    lo, hi = kt.AMPLITUDE[edit]
    stds = detail.flatten(1).std(1)
    assert lo * 0.8 < float(stds.min()) and float(stds.max()) < hi * 1.2
    assert float(stds.std()) > 0.02
    # Independent per colour channel: the channels of one draw differ and are uncorrelated over draws and blocks.
    assert not torch.allclose(detail[:, 0], detail[:, 1])
    z = values / stds[:, None, None, None]
    flat = z.permute(1, 0, 2, 3).reshape(3, -1)
    corr = torch.corrcoef(flat)
    assert float((corr - torch.eye(3)).abs().max()) < 0.05
    # Gaussian given its amplitude (no clamp): kurtosis about 3, values beyond 3 std present.
    kurt = float((flat ** 4).mean() / (flat ** 2).mean() ** 2)
    assert 2.7 < kurt < 3.3, kurt
    assert float(flat.abs().max()) > 3


def test_block_grain_odd_sizes_and_latents():
    """Sizes that are no multiple of the block still get a full-size detail; mean_latents is the reference."""
    gen = torch.Generator().manual_seed(0)
    for edit in ("token_grain", "blob_grain"):
        d = kt.detail_rgb(edit, 10, 14, gen)
        assert d.shape == (1, 3, 10, 14)
    from topi_export.models.kontext_digits import rgb_to_latents

    ref = rgb_to_latents(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert torch.allclose(kt.mean_latents(ref, "blob_grain", (8, 8)), ref, atol=1e-6)


# ------------------------------------------------------------------------------------------------ the script
def test_edits_argument_validation(capsys):
    mod = _module()
    assert mod.parse_args([]).edits == TEXTURE_EDITS
    assert mod.parse_args(["--edits", "smooth, token_grain,blob_grain"]).edits == MOTTLE_EDITS
    for bad, words in (("smooth,bogus", "unknown edit(s) bogus"), ("smooth,smooth", "distinct"), (",", "distinct")):
        with pytest.raises(SystemExit) as exc:
            mod.parse_args(["--edits", bad])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert ": error: argument --edits: " in err[-1] and words in err[-1], err


def test_train_script_with_chosen_edits(tmp_path):
    from topi_export.artifacts.inputs import load_inputs
    from topi_export.models import load_model

    mod = _module()
    out = tmp_path / "kontext-mottle"
    argv = ["--steps", "3", "--crop", "16", "--low-res-crop", "8", "--batch", "2", "--out", str(out),
            "--eval-count", "6", "--eval-steps", "2", "--num-samples", "3", "--num-calibration", "3",
            "--log-every", "1", "--val-every", "2", "--edits", ",".join(MOTTLE_EDITS)]
    threads = torch.get_num_threads()
    try:
        result = mod.main(argv)
        again = mod.main(["--eval-only", "--out", str(out), "--eval-count", "6", "--eval-steps", "2",
                          "--num-samples", "3", "--num-calibration", "3"])
    finally:
        torch.set_num_threads(threads)
    assert set(result["per_group"]) == set(MOTTLE_EDITS) | {"random edits", "all"}
    assert result["per_group"]["random edits"]["n"] == 4
    assert again["per_group"] == result["per_group"]  # --eval-only reads the edits from the training log
    loaded = load_model(out)
    for folder in ("samples", "calibration_samples"):
        files = sorted((out / folder).glob("sample_*.safetensors"))
        edits = [load_inputs(p, loaded.family).meta["edit"] for p in files]
        assert edits == list(MOTTLE_EDITS)
        for path in files:
            data = load_inputs(path, loaded.family)
            prompt, _ = kt.texture_conditioning(data.meta["edit"])
            assert torch.equal(data.tensors["prompt_embeds"], prompt)
    log = (out / "train_log.txt").read_text()
    assert "edits smooth, token_grain, blob_grain" in log
    card = (out / "MODEL_CARD.md").read_text()
    assert card.startswith("# kontext-mottle\n")
    for e in MOTTLE_EDITS:
        assert f"  - `{e}`:" in card and f"| {e} |" in card
    for e in ("grain", "texture", "color_grain"):
        assert f"  - `{e}`:" not in card and f"| {e} |" not in card
    assert "U[0.35, 0.6]" in card and "U[0.2, 0.35]" in card
    assert "--edits smooth,token_grain,blob_grain" in card
    assert "reuse_psnr" not in card and "docs/benchmarks.md section 8" in card  # a pointer, not the numbers


# ------------------------------------------------------------------------------------------------ the asset
def _check_sample(data, grid: int):
    """kontext-texture's sample checks (layout, conditioning, detail strength, per-channel detail), and the
    detail constant over each edit's blocks."""
    from test_train_texture import _check_sample as check_texture_sample, _detail

    check_texture_sample(data, grid)
    if data.meta["edit"] in kt.RANDOM_EDITS:
        blocks = _blocks(_detail(data), kt.BLOCK[data.meta["edit"]])
        assert float((blocks - blocks[..., :1]).abs().max()) < 1e-4  # constant over its blocks (latent round trip)


def test_shipped_asset_loads_and_samples_are_documented():
    from test_train_texture import check_shipped_asset

    check_shipped_asset(ASSET, "kontext-mottle", MOTTLE_EDITS, _check_sample)


def test_shipped_model_runs_its_samples():
    """The built-in through the runtime's full 28-step loop (no step reuse): held-out ``token_grain`` and
    ``blob_grain`` samples keep the reference (blurred, about as close to it as the truth's own draw) and add colour
    noise of about the right strength, not the mean."""
    from topi_export import open_session
    from topi_export.models.kontext_digits import psnr

    session = open_session(model="kontext-mottle")
    for i, edit in ((1, "token_grain"), (2, "blob_grain")):
        data = session.load_inputs(ASSET / "samples" / f"sample_{i}.safetensors")
        assert data.meta["edit"] == edit
        grid = data.layout.target_grid
        out = session.denoise(data, steps=28, mode="full").latents
        assert torch.isfinite(out).all()
        mean = kt.mean_latents(data.reference_latents, edit, grid)
        lp = lambda x: kt.lowpass_latents(x, grid)  # noqa: E731
        coarse, coarse_truth = float(psnr(lp(out), lp(mean))), float(psnr(lp(data.target_latents), lp(mean)))
        assert coarse > coarse_truth - 4, (edit, coarse, coarse_truth)
        strength = float(unpack(out - mean, grid)[:, :3].std())
        lo, hi = kt.AMPLITUDE[edit]
        assert 0.5 * lo < strength < 1.5 * hi, (edit, strength)
