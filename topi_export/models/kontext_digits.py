"""Helpers for ``kontext-digits``: the small, really-trained in-context FLUX.1 Kontext-layout model
shipped under ``topi_export/assets/kontext-digits`` (trained by ``scripts/train_kontext.py``).

Its "latents" are not VAE latents: they are RGB image crops in [-1, 1] plus a luma channel (4 channels),
packed 2x2 per token exactly like Flux's ``_pack_latents`` (token channel = c * 4 + dy * 2 + dx), so a
32x32 px crop is a 16x16 token grid of 16 channels. This module is torch + numpy only (no diffusers, no
scikit-image), so the demo and the tests can import it cheaply.
"""
from __future__ import annotations

import numpy as np
import torch

# The edits the model was trained on; the conditioning names the edit. Order matters (it seeds the
# per-edit embeddings), so only ever append.
EDITS = ("identity", "invert", "swap_rb", "shift_down", "shift_right")
SHIFT_TOKENS = 2  # shift_down / shift_right move the content by this many tokens (2 px per token)
TEXT_TOKENS = 8  # prompt_embeds [1, TEXT_TOKENS, TEXT_DIM]
TEXT_DIM = 64
POOLED_DIM = 32
LATENT_CHANNELS = 4  # R, G, B, luma
EMBED_SEED = 20240607  # fixed: the edit embeddings do not depend on the training seed


def model_config() -> dict:
    """FluxTransformer2DModel config of kontext-digits (2 double + 4 single blocks, 4 heads x 32)."""
    return dict(patch_size=1, in_channels=LATENT_CHANNELS * 4, num_layers=2, num_single_layers=4,
                attention_head_dim=32, num_attention_heads=4, joint_attention_dim=TEXT_DIM,
                pooled_projection_dim=POOLED_DIM, guidance_embeds=True, axes_dims_rope=(4, 14, 14))


def edit_conditioning(edit: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [1, T, D], pooled_prompt_embeds [1, P]) of an edit: fixed seeded random vectors."""
    idx = EDITS.index(edit)
    g = torch.Generator().manual_seed(EMBED_SEED + idx)
    prompt = torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=g)
    pooled = torch.randn(1, POOLED_DIM, generator=g)
    return prompt, pooled


def pack(pixels: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), C*4], identical to FluxPipeline._pack_latents."""
    b, c, h, w = pixels.shape
    x = pixels.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(latents: torch.Tensor, grid: tuple[int, int] | str) -> torch.Tensor:
    """Inverse of ``pack``: [B, N, C*4] (or [N, C*4]) -> [B, C, 2*gh, 2*gw]."""
    gh, gw = parse_grid(grid)
    if latents.dim() == 2:
        latents = latents[None]
    b, n, c4 = latents.shape
    if n != gh * gw:
        raise ValueError(f"{n} tokens do not fill a {gh}x{gw} grid")
    x = latents.reshape(b, gh, gw, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, gh * 2, gw * 2)


def parse_grid(grid) -> tuple[int, int]:
    if isinstance(grid, str):
        h, w = grid.lower().split("x")
        return int(h), int(w)
    return int(grid[0]), int(grid[1])


def luma(rgb: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W] (BT.601 weights; works in [-1, 1] since they sum to 1)."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=rgb.dtype).view(1, 3, 1, 1)
    return (rgb * w).sum(1, keepdim=True)


def rgb_to_latents(rgb: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> packed latents [B, HW/4, 16] (RGB + luma)."""
    return pack(torch.cat([rgb, luma(rgb)], dim=1))


def latents_to_image(latents: torch.Tensor, grid) -> np.ndarray:
    """Packed latents ([1, N, 16] or [N, 16]) on a token grid (``(h, w)`` or ``"16x16"``) -> an
    (2h)x(2w)x3 uint8 image (the RGB channels; the luma channel is dropped)."""
    x = unpack(latents.detach().float().cpu(), grid)[0, :3]
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 0).numpy()


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample PSNR (dB) of the RGB channels of packed latents [B, N, 16], images scaled to [0, 1]."""
    mse = mse_rgb(pred, target)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def mse_rgb(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE of the RGB channels (images in [0, 1]) of packed latents [B, N, 16]."""
    rgb = slice(0, 3 * 4)  # token channels c*4 + k for c in R, G, B
    p = (pred[..., rgb].clamp(-1, 1) + 1) / 2
    t = (target[..., rgb].clamp(-1, 1) + 1) / 2
    return (p - t).pow(2).flatten(1).mean(1)
