"""A PNG strip for a run: reference | unpruned result | ToPi result | kept-token mask (last anchor)."""
from __future__ import annotations

import numpy as np
import torch


def latents_to_rgb(latents: torch.Tensor, grid, lo=None, hi=None) -> np.ndarray:
    """Packed 2x2 latents [1, N, 4c] -> HxWx3 float in [0,1] from the first three latent channels."""
    h, w = grid
    x = latents[0].float().reshape(h, w, -1, 2, 2).permute(2, 0, 3, 1, 4).reshape(-1, 2 * h, 2 * w)
    rgb = x[:3] if x.shape[0] >= 3 else x[:1].repeat(3, 1, 1)
    lo = float(rgb.min()) if lo is None else lo
    hi = float(rgb.max()) if hi is None else hi
    return ((rgb - lo) / max(hi - lo, 1e-6)).clamp(0, 1).permute(1, 2, 0).numpy()


def save_strip(path, inputs, full, topi, kept, scale: int = 8) -> None:
    from PIL import Image

    ref = latents_to_rgb(inputs.reference_latents, inputs.layout.ref_grid)
    tg = inputs.layout.target_grid
    # one normalisation for both results, so differences are visible
    both = torch.cat([full, topi], dim=1)
    lo, hi = float(both.min()), float(both.max())
    panels = [ref, latents_to_rgb(full, tg, lo, hi), latents_to_rgb(topi, tg, lo, hi)]
    rh, rw = inputs.layout.ref_grid
    mask = np.zeros(rh * rw, dtype=np.float32)
    mask[kept if kept is not None else slice(None)] = 1.0
    mask = np.kron(mask.reshape(rh, rw), np.ones((2, 2)))
    panels.append(ref * (0.25 + 0.75 * mask[..., None]))  # pruned tokens dimmed
    height = max(p.shape[0] for p in panels)
    gap = np.ones((height, 1, 3))
    row = []
    for p in panels:
        pad = np.ones((height - p.shape[0], p.shape[1], 3))
        row += [np.concatenate([p, pad], axis=0), gap]
    img = (np.concatenate(row[:-1], axis=1) * 255).astype(np.uint8)
    img = np.kron(img, np.ones((scale, scale, 1), dtype=np.uint8))
    Image.fromarray(img).save(path)
