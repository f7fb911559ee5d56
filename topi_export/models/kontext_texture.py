"""Helpers for ``kontext-texture``: a small, really-trained FLUX.1 Kontext-layout model shipped under
``topi_export/assets/kontext-texture`` (trained by ``scripts/train_texture.py``) whose sampling trajectories are
curved.

Why: on an edit whose answer is a deterministic function of the reference, the rectified flow is nearly straight
(the x0-prediction is right from the first steps), so reusing a velocity across steps costs almost nothing. Real
edits are not like that: the coarse structure follows the reference, the fine detail is one draw from a continuous
distribution. Three of this model's four edits are like that: the target keeps the reference (or a low-passed
version of it) and adds a RANDOM grain or texture (random amplitude, frequency, orientation, phase per sample), so
the x0-prediction moves during sampling: first the conditional mean, later the committed detail. No discrete modes
(no "flip or not"): a small change of the trajectory changes the detail a little, not into another mode. The
fourth edit is deterministic, the control.

Edits (the conditioning names one; fixed seeded embeddings per edit):

- ``smooth``: target = Gaussian blur (sigma SMOOTH_SIGMA px) of the reference (deterministic);
- ``grain``: each token's 2x2 px replaced by their mean, plus monochrome white grain N(0, a^2) per pixel,
  a ~ U(AMPLITUDE["grain"]) per sample;
- ``texture``: ``smooth`` plus a monochrome random band-pass texture (Gaussian random field: centre frequency,
  orientation and anisotropy random per sample), scaled to std a ~ U(AMPLITUDE["texture"]);
- ``color_grain``: the reference plus white grain drawn independently per colour channel, a ~
  U(AMPLITUDE["color_grain"]);
- ``token_grain``: the reference plus colour noise constant over each token's 2x2 px, drawn independently per colour
  channel, a ~ U(AMPLITUDE["token_grain"]) (``kontext-mottle``);
- ``blob_grain``: the reference plus colour noise constant over 4x4 px blocks (2x2 tokens), independent per channel,
  a ~ U(AMPLITUDE["blob_grain"]) (``kontext-mottle``).

The amplitudes are large enough that the detail is decided in the middle and late part of the 28-step schedule
(a Gaussian component of std a is decided around t / (1 - t) ~ a), where step reuse happens.

``kontext-texture`` trains the first four edits. ``kontext-mottle`` trains ``smooth``, ``token_grain`` and
``blob_grain``: noise constant over blocks of n px is decided around t / (1 - t) ~ a sqrt(n) (a per-pixel std), i.e.
in the MIDDLE of the 28-step schedule (t ~ 0.4 - 0.6), whereas ``grain`` / ``texture`` are decided late (t ~ 0.2 -
0.3), inside the steps step reuse never touches.

Latents are packed RGB + luma crops exactly like ``kontext-digits`` (``kontext_digits.rgb_to_latents``).
This module is torch only (no diffusers, no scikit-image).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from topi_export.models.kontext_digits import (POOLED_DIM, TEXT_DIM, TEXT_TOKENS, model_config, parse_grid,
                                               rgb_to_latents, unpack)

# Order matters (it seeds the embeddings), so only ever append.
EDITS = ("smooth", "grain", "texture", "color_grain", "token_grain", "blob_grain")
RANDOM_EDITS = ("grain", "texture", "color_grain", "token_grain", "blob_grain")
BLOCK = {"token_grain": 2, "blob_grain": 4}  # px: the colour noise of these edits is constant over BLOCK x BLOCK px
SMOOTH_SIGMA = 1.5  # px, the low-pass of ``smooth`` and ``texture``
AMPLITUDE = {"grain": (0.15, 0.35), "texture": (0.20, 0.45), "color_grain": (0.10, 0.30),  # detail std per sample
             "token_grain": (0.35, 0.60), "blob_grain": (0.20, 0.35)}
TEXTURE_FREQUENCY = (0.12, 0.30)  # centre frequency in cycles / px (wavelength 3.3 - 8 px)
TEXTURE_BANDWIDTH = 0.04  # radial std of the band-pass in cycles / px
TEXTURE_ANISOTROPY = (0.0, 3.0)  # concentration of the orientation lobe (0: isotropic)
EVAL_SIGMA = 2.0  # px: "coarse structure" in the evaluation = Gaussian blur with this sigma
EMBED_SEED = 20251209  # fixed: the embeddings do not depend on the training seed
__all__ = ["EDITS", "RANDOM_EDITS", "TEXT_TOKENS", "TEXT_DIM", "POOLED_DIM", "model_config", "texture_conditioning",
           "gaussian_blur", "coarse_rgb", "detail_rgb", "edit_rgb", "edit_latents", "mean_latents", "lowpass_latents"]


def texture_conditioning(edit: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [1, TEXT_TOKENS, TEXT_DIM], pooled_prompt_embeds [1, POOLED_DIM]) of an edit: fixed seeded
    random vectors."""
    g = torch.Generator().manual_seed(EMBED_SEED + EDITS.index(edit))
    prompt = torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=g)
    pooled = torch.randn(1, POOLED_DIM, generator=g)
    return prompt, pooled


def gaussian_blur(rgb: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B, C, H, W], reflect padding (radius ceil(3 sigma), at most H - 1 / W - 1)."""
    b, c, h, w = rgb.shape
    r = min(math.ceil(3 * sigma), h - 1, w - 1)
    x = torch.arange(-r, r + 1, dtype=rgb.dtype)
    k = torch.exp(-x * x / (2 * sigma * sigma))
    k = k / k.sum()
    y = F.pad(rgb.reshape(b * c, 1, h, w), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1))
    y = F.conv2d(y, k.view(1, 1, -1, 1))
    return y.reshape(b, c, h, w)


def token_mean(rgb: torch.Tensor) -> torch.Tensor:
    """Each token's 2x2 px replaced by their mean."""
    return F.interpolate(F.avg_pool2d(rgb, 2), scale_factor=2, mode="nearest")


def coarse_rgb(rgb: torch.Tensor, edit: str) -> torch.Tensor:
    """The deterministic part of an edit of RGB [B, 3, H, W] in [-1, 1]: the target's conditional mean."""
    if edit in ("color_grain", "token_grain", "blob_grain"):
        return rgb.clone()
    if edit in ("smooth", "texture"):
        return gaussian_blur(rgb, SMOOTH_SIGMA)
    if edit == "grain":
        return token_mean(rgb)
    raise ValueError(f"unknown edit {edit!r}; known: {', '.join(EDITS)}")


def _uniform(gen, lo_hi) -> float:
    lo, hi = lo_hi
    return lo + (hi - lo) * float(torch.rand(1, generator=gen))


def band_pass_field(h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """One monochrome Gaussian random field [1, 1, h, w] with unit std: white noise filtered by a radial band-pass
    (random centre frequency) times an orientation lobe (random orientation and concentration). Made on a 2x larger
    periodic field and cropped, so it does not wrap around."""
    f0 = _uniform(gen, TEXTURE_FREQUENCY)
    theta0 = _uniform(gen, (0.0, math.pi))
    kappa = _uniform(gen, TEXTURE_ANISOTROPY)
    noise = torch.randn(2 * h, 2 * w, generator=gen)
    fy = torch.fft.fftfreq(2 * h)[:, None]
    fx = torch.fft.fftfreq(2 * w)[None, :]
    radial = torch.exp(-((fy * fy + fx * fx).sqrt() - f0) ** 2 / (2 * TEXTURE_BANDWIDTH ** 2))
    lobe = torch.exp(kappa * (torch.cos(2 * (torch.atan2(fy, fx) - theta0)) - 1))
    field = torch.fft.ifft2(torch.fft.fft2(noise) * radial * lobe).real
    field = field[h // 2:h // 2 + h, w // 2:w // 2 + w]
    return ((field - field.mean()) / field.std().clamp_min(1e-8))[None, None]


def detail_rgb(edit: str, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """The random part of one sample of an edit: [1, 1, h, w] when monochrome (added to R, G and B alike), [1, 3, h, w]
    for ``color_grain``, ``token_grain`` and ``blob_grain``; zeros for the deterministic edit (no random numbers
    drawn)."""
    if edit == "grain":
        a = _uniform(gen, AMPLITUDE[edit])
        return a * torch.randn(1, 1, h, w, generator=gen)
    if edit == "texture":
        a = _uniform(gen, AMPLITUDE[edit])
        return a * band_pass_field(h, w, gen)
    if edit == "color_grain":
        a = _uniform(gen, AMPLITUDE[edit])
        return a * torch.randn(1, 3, h, w, generator=gen)
    if edit in BLOCK:
        a = _uniform(gen, AMPLITUDE[edit])
        b = BLOCK[edit]
        blocks = torch.randn(1, 3, -(-h // b), -(-w // b), generator=gen)
        return a * blocks.repeat_interleave(b, 2).repeat_interleave(b, 3)[..., :h, :w]
    if edit in EDITS:
        return torch.zeros(1, 1, h, w)
    raise ValueError(f"unknown edit {edit!r}; known: {', '.join(EDITS)}")


def edit_rgb(rgb: torch.Tensor, edits, gen: torch.Generator | None) -> torch.Tensor:
    """Targets [B, 3, H, W] of RGB references [B, 3, H, W]: ``edits`` one name per sample (or one for all); ``gen``
    draws each sample's random detail in order (None: the conditional mean, no detail)."""
    if isinstance(edits, str):
        edits = [edits] * rgb.shape[0]
    out = []
    for i, e in enumerate(edits):
        x = coarse_rgb(rgb[i:i + 1], e)
        if gen is not None:
            x = x + detail_rgb(e, rgb.shape[-2], rgb.shape[-1], gen)
        out.append(x)
    return torch.cat(out)


def edit_latents(reference: torch.Tensor, edits, grid, gen: torch.Generator | None) -> torch.Tensor:
    """Target latents [B, N, 16] of reference latents [B, N, 16] (see ``edit_rgb``)."""
    rgb = unpack(reference, grid)[:, :3]
    return rgb_to_latents(edit_rgb(rgb, edits, gen))


def mean_latents(reference: torch.Tensor, edits, grid) -> torch.Tensor:
    """The conditional mean of the target (the deterministic part, no detail): the best predictor in MSE."""
    return edit_latents(reference, edits, grid, None)


def lowpass_latents(latents: torch.Tensor, grid, sigma: float = EVAL_SIGMA) -> torch.Tensor:
    """Latents with their RGB blurred (the luma recomputed): the coarse structure the evaluation compares."""
    gh, gw = parse_grid(grid)
    return rgb_to_latents(gaussian_blur(unpack(latents, (gh, gw))[:, :3], sigma))
