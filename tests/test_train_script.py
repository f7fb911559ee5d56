"""scripts/train_kontext.py: a 3-step run writes a loadable model, a log, a model card and sample files,
and is deterministic."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("skimage")
pytest.importorskip("diffusers")

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_kontext.py"


@pytest.fixture(scope="module")
def train_module():
    spec = importlib.util.spec_from_file_location("train_kontext", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(mod, out: Path):
    threads = torch.get_num_threads()
    try:
        return mod.main(["--steps", "3", "--crop", "16", "--batch", "2", "--out", str(out), "--eval-count", "3",
                         "--eval-steps", "2", "--num-samples", "2", "--log-every", "1", "--val-every", "2"])
    finally:
        torch.set_num_threads(threads)


def test_train_script_writes_loadable_model(train_module, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from topi_export.models import load_model
    from topi_export.models.kontext_digits import EDITS, latents_to_image

    out = tmp_path / "model"
    result = _run(train_module, out)
    assert result["steps"] == 3

    loaded = load_model(out)
    assert loaded.adapter.num_layers == 6 and loaded.adapter.in_channels == 16
    assert (out / "diffusion_pytorch_model.safetensors").stat().st_size <= 10_000_000

    log = (out / "train_log.txt").read_text()
    assert "step 3 loss" in log and "RESULT" in log
    assert json.loads(log.split("RESULT ", 1)[1])["steps"] == 3
    card = (out / "MODEL_CARD.md").read_text()
    assert "held-out" in card.lower() and "--steps 3" in card

    for i in range(2):
        path = out / "samples" / f"sample_{i}.safetensors"
        t = load_file(path)
        assert t["reference_latents"].shape == (1, 64, 16) and t["target_latents"].shape == (1, 64, 16)
        assert t["noise"].shape == (1, 64, 16) and t["guidance"].shape == (1,)
        assert t["prompt_embeds"].shape[0] == 1 and t["pooled_prompt_embeds"].dim() == 2
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        assert meta["target_grid"] == "8x8" and meta["reference_grid"] == "8x8" and meta["edit"] in EDITS
        img = latents_to_image(t["target_latents"], meta["target_grid"])
        assert img.shape == (16, 16, 3) and img.dtype.name == "uint8"

    # Same seed and step count -> the same weights.
    out2 = tmp_path / "again"
    _run(train_module, out2)
    assert load_model(out2).weights_hash == loaded.weights_hash


def test_latents_roundtrip():
    from topi_export.models.kontext_digits import pack, rgb_to_latents, unpack

    rgb = torch.rand(2, 3, 8, 6) * 2 - 1
    lat = rgb_to_latents(rgb)
    assert lat.shape == (2, 12, 16)
    back = unpack(lat, (4, 3))
    assert torch.equal(back[:, :3], rgb)
    # Flux's _pack_latents layout: token channel = c * 4 + dy * 2 + dx.
    assert torch.equal(pack(rgb)[0, 0, 1 * 4 + 1 * 2 + 0], rgb[0, 1, 1, 0])
