"""Pictures: a PNG strip for a run (every reference with its kept tokens, pruned tokens dimmed, at the last anchor |
the baseline result | the ToPi result | the ground truth when the inputs carry it; each panel titled; latents decoded
by a pipeline's VAE when one is given, else shown through their first three channels), the strip of `edit
--compare` (the reference images | the unmodified pipeline's image | ToPi's) and the calibration plot (per-layer
context sensitivity)."""
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


MIN_PANEL, MAX_PANEL = 192, 512  # panel heights of a strip, in pixels


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def titled_strip(panels) -> bytes:
    """PNG bytes of PIL images side by side at one height (small ones enlarged without smoothing, so tokens stay
    visible), each under its title. panels: [(image, title)]."""
    import io

    from PIL import Image, ImageDraw

    height = max(MIN_PANEL, min(MAX_PANEL, max(img.height for img, _ in panels)))
    scaled = []
    for img, title in panels:
        width = max(1, round(img.width * height / img.height))
        method = Image.Resampling.NEAREST if height >= img.height else Image.Resampling.LANCZOS
        scaled.append((img.convert("RGB").resize((width, height), method), title))
    size = max(11, height // 20)
    font, bar, gap = _font(size), size + 10, 6
    canvas = Image.new("RGB", (sum(i.width for i, _ in scaled) + gap * (len(scaled) - 1), height + bar), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for img, title in scaled:
        canvas.paste(img, (x, bar))
        draw.text((x + 3, 4), title, fill=(0, 0, 0), font=font)
        x += img.width + gap
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def _dim(image, mask_grid, pixels_per_token: int):
    """A reference image with its pruned tokens dimmed (mask_grid: [H, W] of 1 = kept)."""
    from PIL import Image

    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    m = np.kron(mask_grid, np.ones((pixels_per_token, pixels_per_token)))[:arr.shape[0], :arr.shape[1]]
    arr = arr * (0.25 + 0.75 * m[..., None])
    return Image.fromarray((arr * 255).round().astype(np.uint8))


def _kept_mask(layout, kept) -> np.ndarray:
    mask = np.zeros(layout.num_ctx, dtype=np.float32)
    if kept is None:
        mask[:] = 1.0
    else:
        mask[np.asarray(kept.cpu() if hasattr(kept, "cpu") else kept, dtype=np.int64)] = 1.0
    return mask


def _kept_title(i: int, mask: np.ndarray, off: int, n: int, kept) -> str:
    if kept is None:
        return f"reference {i + 1}: all {n} tokens"
    return f"reference {i + 1}: kept {int(mask[off:off + n].sum())}/{n}"


def save_strip(path, inputs, baseline, topi, kept, scale: int = 8, *, decode=None, baseline_name: str = "dense",
               titles: bool = True) -> None:
    """The run strip: references (pruned tokens of the last anchor dimmed) | baseline | ToPi | ground truth.
    decode: latents [1, N, C], grid -> PIL image (a pipeline's VAE); None shows the first three latent channels."""
    from PIL import Image

    from topi_export.fsutil import atomic_write_bytes

    layout = inputs.layout
    mask = _kept_mask(layout, kept)
    shown = [topi, baseline] + ([inputs.target_latents] if inputs.target_latents is not None else [])
    both = torch.cat([t.float() for t in shown], dim=1)  # one normalisation for every result, so differences show
    lo, hi = float(both.min()), float(both.max())

    def picture(latents, grid, norm=True):
        if decode is not None:
            return decode(latents, grid)
        rgb = latents_to_rgb(latents, grid, *((lo, hi) if norm else (None, None)))
        return Image.fromarray((rgb * 255).round().astype(np.uint8))

    panels = []
    for i, (ref, grid, off) in enumerate(zip(inputs.references(), layout.ref_grids, layout.ref_offsets())):
        img = picture(ref, grid, norm=False)
        panels.append((_dim(img, mask[off:off + grid[0] * grid[1]].reshape(grid), img.height // grid[0]),
                       _kept_title(i, mask, off, grid[0] * grid[1], kept)))
    panels += [(picture(baseline, layout.target_grid), baseline_name), (picture(topi, layout.target_grid), "ToPi")]
    if inputs.target_latents is not None:
        panels.append((picture(inputs.target_latents, layout.target_grid), "ground truth"))
    if titles:
        atomic_write_bytes(path, titled_strip(panels))
        return
    import io

    buf = io.BytesIO()
    Image.fromarray(np.concatenate([np.asarray(p) for p, _ in panels], axis=1)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def edit_strip(path, request, shape, dense, topi, kept) -> None:
    """`edit --compare`: each reference as the pipeline sized it (pruned tokens of the last anchor dimmed) |
    the unmodified pipeline's image | ToPi's."""
    from topi_export.fsutil import atomic_write_bytes

    layout = shape.layout
    mask = _kept_mask(layout, kept)
    panels = []
    for i, (img, px, grid, off) in enumerate(zip(request.images, shape.refs_px, layout.ref_grids,
                                                 layout.ref_offsets())):
        n = grid[0] * grid[1]
        sized = img.convert("RGB").resize(tuple(px))
        panels.append((_dim(sized, mask[off:off + n].reshape(grid), shape.pixels_per_token),
                       _kept_title(i, mask, off, n, kept)))
    panels += [(dense, "dense (unmodified pipeline)"), (topi, "ToPi")]
    atomic_write_bytes(path, titled_strip(panels))


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
