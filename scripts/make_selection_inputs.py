#!/usr/bin/env python3
"""Extra inputs for the selection-policy experiments (docs/benchmarks.md, section 2), made for the two shipped models
from their own held-out images (no training, no other model):

  flux2-pick-16    flux2-pick requests at 16x16 tokens per image (the size it was trained at; its shipped samples
                   are 24x24): relevance between references
  kd-canvas-wide   kontext-digits requests whose reference is a 16x32 canvas: the request's reference on the left,
                   a distractor crop of the same held-out images on the right. The model copies the reference token
                   at the target token's position, so the right half is irrelevant: relevance inside one reference
  kd-canvas-tall   the same with a 32x16 canvas, the distractor below
  kd-24            kontext-digits requests at 24x24 tokens (a copy-like edit at another scale)

    python scripts/make_selection_inputs.py --out /tmp/sel/inputs     # 8 files per set, OUT/<set>/sample_<i>.safetensors
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

SCRIPTS = Path(__file__).resolve().parent


def _script(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _grid_cat(a: torch.Tensor, b: torch.Tensor, grid, axis: int) -> torch.Tensor:
    """Two packed token grids [B, h*w, C] side by side (axis 1: width) or stacked (axis 0: height), raster order."""
    h, w = grid
    ga, gb = a.reshape(a.shape[0], h, w, -1), b.reshape(b.shape[0], h, w, -1)
    return torch.cat([ga, gb], dim=1 + axis).reshape(a.shape[0], -1, a.shape[-1]).contiguous()


def kontext_sets(out: Path, n: int) -> None:
    tk = _script("train_kontext")
    from topi_export.models.kontext_digits import EDITS

    cond = tk.Conditioning()
    for name, crop in (("kd-canvas", 32), ("kd-24", 48)):
        levels = [tk.pyramid(tk.load_image(i), crop) for i in tk.HELDOUT_IMAGES]
        rng = np.random.default_rng(tk.EVAL_SEED)
        edit = torch.tensor([i % len(EDITS) for i in range(n)])
        x0, ref = tk.make_batch(rng, levels, edit.tolist(), crop)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(tk.EVAL_SEED))
        prompt, pooled = cond(edit)
        grid = (crop // 2, crop // 2)
        gs = f"{grid[0]}x{grid[1]}"
        if name == "kd-24":
            variants = [("kd-24", ref, gs)]
        else:
            _, distract = tk.make_batch(np.random.default_rng(tk.EVAL_SEED + 1), levels, [0] * n, crop)
            variants = [("kd-canvas-wide", _grid_cat(ref, distract, grid, 1), f"{grid[0]}x{2 * grid[1]}"),
                        ("kd-canvas-tall", _grid_cat(ref, distract, grid, 0), f"{2 * grid[0]}x{grid[1]}")]
        for set_name, refs, ref_grid in variants:
            d = out / set_name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                save_file({"reference_latents": refs[i:i + 1], "prompt_embeds": prompt[i:i + 1].contiguous(),
                           "pooled_prompt_embeds": pooled[i:i + 1].contiguous(), "noise": noise[i:i + 1].contiguous(),
                           "guidance": torch.tensor([2.5]), "target_latents": x0[i:i + 1].contiguous()},
                          str(d / f"sample_{i}.safetensors"),
                          metadata={"target_grid": gs, "reference_grid": ref_grid, "edit": EDITS[int(edit[i])]})


def flux2_set(out: Path, n: int) -> None:
    mr = _script("train_multiref")
    from topi_export.models.flux2_pick import EDITS, NUM_REFERENCES

    crop = 32
    levels = [mr.tk.pyramid(mr.tk.load_image(i), crop) for i in mr.HELDOUT_IMAGES]
    sel, edit, x0, ref, prompt, noise = mr.held_out_set(levels, torch.arange(len(EDITS)), n, crop)
    gs = f"{crop // 2}x{crop // 2}"
    d = out / "flux2-pick-16"
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        save_file({"reference_latents": ref[i:i + 1].contiguous(), "prompt_embeds": prompt[i:i + 1].contiguous(),
                   "noise": noise[i:i + 1].contiguous(), "target_latents": x0[i:i + 1].contiguous()},
                  str(d / f"sample_{i}.safetensors"),
                  metadata={"target_grid": gs, "reference_grids": ",".join([gs] * NUM_REFERENCES),
                            "selected_reference": str(int(sel[i])), "edit": EDITS[int(edit[i])]})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--count", type=int, default=8)
    args = p.parse_args(argv)
    kontext_sets(args.out, args.count)
    flux2_set(args.out, args.count)
    for d in sorted(args.out.iterdir()):
        print(d, len(list(d.glob("*.safetensors"))))


if __name__ == "__main__":
    main()
