"""scripts/train_canvas.py and the shipped kontext-canvas asset: a 3-step run writes a loadable FLUX.1 Kontext
model, a log, a card, held-out and calibration samples in the inputs-file format, deterministically; the
canvas helpers cut the right half; the shipped samples hold the documented tensors, their target is the named
edit of the named half, and the shipped model follows the named half."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

import topi_export
from topi_export.models.kontext_canvas import (EDITS, HALVES, POOLED_DIM, TEXT_DIM, TEXT_TOKENS, canvas_conditioning,
                                               edit_of_half, half_latents)
from topi_export.models.kontext_digits import psnr, rgb_to_latents

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_canvas.py"
ASSET = Path(topi_export.__file__).resolve().parent / "assets" / "kontext-canvas"
HELDOUT = {"astronaut", "coffee", "chelsea"}


def _module(name="train_canvas"):
    pytest.importorskip("skimage")
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(mod, out: Path, *extra):
    threads = torch.get_num_threads()
    try:
        return mod.main(["--steps", "3", "--crop", "16", "--low-res-crop", "8", "--low-res-frac", "0.5", "--batch", "2",
                         "--out", str(out), "--eval-count", "3", "--eval-steps", "2", "--num-samples", "2",
                         "--num-calibration", "2", "--log-every", "1", "--val-every", "2", *extra])
    finally:
        torch.set_num_threads(threads)


def _load(path: Path, family):
    from topi_export.artifacts.inputs import load_inputs

    return load_inputs(path, family)


def _check_sample(data, grid: int):
    n = grid * grid
    assert data.reference_latents.shape == (1, 2 * n, 16)
    assert data.tensors["prompt_embeds"].shape == (1, TEXT_TOKENS, TEXT_DIM) and data.tensors["pooled_prompt_embeds"].shape == (1, POOLED_DIM)
    assert data.noise.shape == (1, n, 16) and data.target_latents.shape == (1, n, 16) and data.scalars["guidance"] == 2.5
    assert data.layout.target_grid == (grid, grid) and data.layout.ref_grids == ((grid, 2 * grid),)
    half, edit = data.meta["half"], data.meta["edit"]
    assert half in HALVES and edit in EDITS
    prompt, pooled = canvas_conditioning(half, edit)
    assert torch.equal(data.tensors["prompt_embeds"], prompt) and torch.equal(data.tensors["pooled_prompt_embeds"], pooled)


def _edit_error(data, half) -> float:
    want, mask = edit_of_half(data.reference_latents, data.layout.ref_grids[0], half, data.meta["edit"])
    return float(((data.target_latents - want) * mask).abs().max())


def test_train_script_writes_loadable_model(tmp_path):
    from topi_export.models import load_model

    mod = _module()
    out = tmp_path / "model"
    result = _run(mod, out)
    assert result["steps"] == 3
    loaded = load_model(out)
    assert loaded.family.name == "flux-kontext" and loaded.adapter.num_layers == 6
    log = (out / "train_log.txt").read_text()
    assert "step 3 loss" in log and "vs-other-edit" in log
    assert json.loads(log.split("RESULT ", 1)[1])["steps"] == 3
    card = (out / "MODEL_CARD.md").read_text()
    assert "held-out" in card.lower() and "--steps 3" in card and "8x16" in card
    assert (out / "preview.png").exists()
    for folder, photos in (("samples", HELDOUT), ("calibration_samples", None)):
        files = sorted((out / folder).glob("sample_*.safetensors"))
        assert len(files) == 2
        for path in files:
            data = _load(path, loaded.family)
            _check_sample(data, 8)
            assert _edit_error(data, data.meta["half"]) < 1e-5
            used = set(data.meta["photos"].split(","))
            assert used == photos if photos else not used & HELDOUT  # calibration never touches held-out photos

    # Same seed and step count -> the same weights.
    out2 = tmp_path / "again"
    _run(mod, out2)
    assert load_model(out2).weights_hash == loaded.weights_hash

    # --eval-only: no training, the weights and the training log stay; samples and card are rewritten.
    weights = (out / "diffusion_pytorch_model.safetensors").read_bytes()
    threads = torch.get_num_threads()
    try:
        again = mod.main(["--eval-only", "--out", str(out), "--eval-count", "3", "--eval-steps", "2",
                          "--num-samples", "3", "--num-calibration", "2"])
    finally:
        torch.set_num_threads(threads)
    assert again["steps"] == 3 and (out / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    assert (out / "train_log.txt").read_text() == log and "RESULT " in (out / "eval_log.txt").read_text()
    assert len(list((out / "samples").glob("sample_*.safetensors"))) == 3
    assert "--eval-only" in (out / "MODEL_CARD.md").read_text()


def test_half_latents_cut_the_canvas():
    left, right = torch.rand(1, 3, 8, 10) * 2 - 1, torch.rand(1, 3, 8, 10) * 2 - 1
    canvas = rgb_to_latents(torch.cat([left, right], dim=-1))  # a 4x10 token canvas
    assert torch.equal(half_latents(canvas, (4, 10), "left"), rgb_to_latents(left))
    assert torch.equal(half_latents(canvas, (4, 10), 1), rgb_to_latents(right))
    target, mask = edit_of_half(canvas, (4, 10), "right", "invert")
    assert torch.equal(target, rgb_to_latents(-right)) and bool(mask.all())


def test_conditioning_names_half_and_edit():
    p, q = canvas_conditioning("left", "invert")
    assert torch.equal(p, canvas_conditioning(0, "invert")[0])  # fixed, seeded; names or indices
    assert torch.equal(p[:, :TEXT_TOKENS // 2], canvas_conditioning("left", "identity")[0][:, :TEXT_TOKENS // 2])
    assert not torch.equal(p[:, :TEXT_TOKENS // 2], canvas_conditioning("right", "invert")[0][:, :TEXT_TOKENS // 2])
    assert torch.equal(p[:, TEXT_TOKENS // 2:], canvas_conditioning("right", "invert")[0][:, TEXT_TOKENS // 2:])
    assert torch.equal(q[:, POOLED_DIM // 2:], canvas_conditioning("right", "invert")[1][:, POOLED_DIM // 2:])
    assert not torch.equal(q[:, :POOLED_DIM // 2], canvas_conditioning("right", "invert")[1][:, :POOLED_DIM // 2])


def test_shipped_asset_loads_and_samples_are_documented():
    from topi_export.models import builtin_names, load_model

    assert (ASSET / "config.json").exists(), f"{ASSET} is missing: run scripts/train_canvas.py"
    assert "kontext-canvas" in builtin_names()
    loaded = load_model("kontext-canvas")
    assert loaded.family.name == "flux-kontext" and loaded.adapter.num_layers == 6
    assert sum(p.numel() for p in loaded.family.model.parameters()) > 1_000_000
    for name in ("MODEL_CARD.md", "train_log.txt", "preview.png"):
        assert (ASSET / name).exists(), name
    samples = sorted((ASSET / "samples").glob("sample_*.safetensors"))
    assert len(samples) == 8
    seen = set()
    for path in samples:
        data = _load(path, loaded.family)
        _check_sample(data, 16)
        assert set(data.meta["photos"].split(",")) == HELDOUT
        half = data.meta["half"]
        assert _edit_error(data, half) < 1e-5, path.name
        assert _edit_error(data, "right" if half == "left" else "left") > 0.1, path.name  # the check can fail
        seen.add((half, data.meta["edit"]))
    assert {h for h, _ in seen} == set(HALVES) and {e for _, e in seen} == set(EDITS)
    calibration = sorted((ASSET / "calibration_samples").glob("sample_*.safetensors"))
    assert len(calibration) == 4
    for path in calibration:
        data = _load(path, loaded.family)
        _check_sample(data, 16)
        assert not set(data.meta["photos"].split(",")) & HELDOUT
        assert _edit_error(data, data.meta["half"]) < 1e-5


def test_shipped_model_follows_the_named_half():
    """One held-out sample (the right half named), the 28-step Kontext sampling through the runtime: the generation
    is close to the truth and far from the same edit of the other half."""
    from topi_export import open_session

    session = open_session(model="kontext-canvas")
    path = ASSET / "samples" / "sample_3.safetensors"
    data = session.load_inputs(path)
    assert data.meta["half"] == "right"
    out = session.denoise(data, steps=28, mode="full").latents
    right = float(psnr(out, data.target_latents))
    other = edit_of_half(data.reference_latents, data.layout.ref_grids[0], "left", data.meta["edit"])[0]
    wrong = float(psnr(out, other))
    assert right > 18 and right > wrong + 6, (right, wrong)
