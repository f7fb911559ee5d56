"""A PNG strip for a run: every reference with its kept tokens (pruned tokens dimmed, last anchor) | the
baseline result | the ToPi result. Latents are shown through their first three channels."""
from __future__ import annotations

import numpy as np
import torch


def latents_to_rgb(latents: torch.Tensor, grid, lo=None, hi=None) -> np.ndarray:
    """Packed 2x2 latents [1, N, 4c] -> (2H)x(2W)x3 float in [0,1] (channels < 4: one value per token)."""
    h, w = grid
    c = latents.shape[-1]
    x = latents[0].float()
    if c % 4 == 0:
        x = x.reshape(h, w, -1, 2, 2).permute(2, 0, 3, 1, 4).reshape(-1, 2 * h, 2 * w)
    else:
        x = x.reshape(h, w, c).permute(2, 0, 1).repeat_interleave(2, 1).repeat_interleave(2, 2)
    rgb = x[:3] if x.shape[0] >= 3 else x[:1].repeat(3, 1, 1)
    lo = float(rgb.min()) if lo is None else lo
    hi = float(rgb.max()) if hi is None else hi
    return ((rgb - lo) / max(hi - lo, 1e-6)).clamp(0, 1).permute(1, 2, 0).numpy()


def save_strip(path, inputs, baseline, topi, kept, scale: int = 8) -> None:
    from PIL import Image

    from topi_export.fsutil import atomic_write_bytes

    layout = inputs.layout
    mask = np.zeros(layout.num_ctx, dtype=np.float32)
    mask[kept if kept is not None else slice(None)] = 1.0
    panels = []
    for ref, grid, off in zip(inputs.references(), layout.ref_grids, layout.ref_offsets()):
        rgb = latents_to_rgb(ref, grid)
        m = np.kron(mask[off:off + grid[0] * grid[1]].reshape(grid), np.ones((2, 2)))
        panels.append(rgb * (0.25 + 0.75 * m[..., None]))  # pruned tokens dimmed
    both = torch.cat([baseline, topi], dim=1)  # one normalisation for both results, so differences show
    lo, hi = float(both.min()), float(both.max())
    panels += [latents_to_rgb(baseline, layout.target_grid, lo, hi), latents_to_rgb(topi, layout.target_grid, lo, hi)]
    height = max(p.shape[0] for p in panels)
    row = []
    for p in panels:
        row += [np.concatenate([p, np.ones((height - p.shape[0], p.shape[1], 3))], axis=0), np.ones((height, 1, 3))]
    img = (np.concatenate(row[:-1], axis=1) * 255).astype(np.uint8)
    img = np.kron(img, np.ones((scale, scale, 1), dtype=np.uint8))
    import io

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
