"""Pictures: a PNG strip for a run (every reference with its kept tokens, pruned tokens dimmed, at the last anchor |
the baseline result | the ToPi result; latents shown through their first three channels) and the calibration plot
(per-layer context sensitivity)."""
from __future__ import annotations

import io

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


def plot_profile(path_png, result, title: str | None = None) -> None:
    """Bar per layer (mean sensitivity, std error bars), pivotal layers highlighted, L0 marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from topi_export.fsutil import atomic_write_bytes

    mean, std = result.mean, result.std
    n = len(mean)
    pivotal = set(result.pivotal_layers)
    l0 = result.prune_start
    groups = result.layer_groups or [["layer", 0, n]]
    fig = Figure(figsize=(max(6.0, 0.18 * n + 2), 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    from matplotlib.patches import Patch

    palette = ["tab:blue", "tab:cyan", "tab:green", "tab:olive"]
    colors = [palette[next(gi for gi, g in enumerate(groups) if g[1] <= layer < g[2]) % len(palette)]
              for layer in range(n)]
    bars = ax.bar(range(n), mean, yerr=std, color=colors, capsize=2 if n <= 60 else 0, error_kw={"elinewidth": 0.8})
    for layer, bar in enumerate(bars):
        if layer in pivotal:  # highlighted, stream colour kept
            bar.set_edgecolor("tab:red")
            bar.set_linewidth(2)
            bar.set_hatch("//")
    l0_line = ax.axvline(l0 - 0.5, color="black", linestyle="--", linewidth=1,
                         label=f"prune start L0 = {l0} (layers < L0 see all context)")
    for g in groups[1:]:
        ax.axvline(g[1] - 0.5, color="grey", linestyle=":", linewidth=0.8)
    ymax = max((m + s for m, s in zip(mean, std)), default=0.0)
    ax.set_ylim(0, 1.45 * ymax if ymax > 0 else 1.0)  # headroom for the legend
    ax.legend(handles=[Patch(color=palette[gi % len(palette)], label=g[0]) for gi, g in enumerate(groups)] + [
                       Patch(facecolor="white", edgecolor="tab:red", hatch="//", linewidth=2,
                             label=f"pivotal {sorted(pivotal)}"), l0_line], fontsize=7, loc="upper right", ncol=2)
    ax.set_xlabel("layer")
    ax.set_ylabel("context sensitivity (rel. L2)")
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_title(title or f"context sensitivity, {result.num_samples} samples x "
                          f"{len(result.timesteps)} timesteps; dT = {result.update_interval}",
                 fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path_png, buf.getvalue())
