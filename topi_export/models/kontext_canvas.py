"""Helpers for ``kontext-canvas``: a small, really-trained FLUX.1 Kontext-layout model shipped under
``topi_export/assets/kontext-canvas`` (trained by ``scripts/train_canvas.py``).

The task puts the relevance INSIDE one reference: the reference is a "canvas" of two crops of different photos
side by side (a 16x32 token grid = two 16x16 halves), the conditioning names ONE half and an edit, and the target
(16x16 tokens) is that edit of that half. Half of the reference is irrelevant to every request, and which half
depends on the instruction. The model is held out from the tuning of the token-selection policy.

Latents are packed RGB + luma crops exactly like ``kontext-digits`` (``kontext_digits.rgb_to_latents``); the canvas
is packed as one image, so its tokens are in raster order over the whole 16x32 grid. The edits are flux2-pick's
(``flux2_pick.edit_latents``). This module is torch only (no diffusers, no scikit-image).
"""
from __future__ import annotations

import torch

from topi_export.models.flux2_pick import EDITS, edit_latents
from topi_export.models.kontext_digits import POOLED_DIM, TEXT_DIM, TEXT_TOKENS, model_config, parse_grid

HALVES = ("left", "right")  # order matters (it seeds the embeddings)
EMBED_SEED = 20251208  # fixed: the embeddings do not depend on the training seed
__all__ = ["EDITS", "HALVES", "TEXT_TOKENS", "TEXT_DIM", "POOLED_DIM", "model_config", "canvas_conditioning",
           "canvas_grid", "half_columns", "half_latents", "edit_of_half"]


def canvas_conditioning(half: int | str, edit: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [1, TEXT_TOKENS, TEXT_DIM], pooled_prompt_embeds [1, POOLED_DIM]) of "apply ``edit`` to the
    ``half`` half of the canvas": fixed seeded random vectors. The first half of the text tokens and of the pooled
    vector name the half (shared by all edits), the second halves name the edit (shared by both halves)."""
    h = HALVES.index(half) if isinstance(half, str) else int(half)
    if not 0 <= h < len(HALVES):
        raise ValueError(f"half {half!r} not in {HALVES}")
    nt, npool = TEXT_TOKENS // 2, POOLED_DIM // 2
    g = torch.Generator().manual_seed(EMBED_SEED + h)
    half_text, half_pool = torch.randn(1, nt, TEXT_DIM, generator=g), torch.randn(1, npool, generator=g)
    g = torch.Generator().manual_seed(EMBED_SEED + 1000 + EDITS.index(edit))
    edit_text = torch.randn(1, TEXT_TOKENS - nt, TEXT_DIM, generator=g)
    edit_pool = torch.randn(1, POOLED_DIM - npool, generator=g)
    return torch.cat([half_text, edit_text], dim=1), torch.cat([half_pool, edit_pool], dim=1)


def canvas_grid(half_grid) -> tuple[int, int]:
    """The canvas token grid of two halves of ``half_grid`` side by side."""
    gh, gw = parse_grid(half_grid)
    return gh, 2 * gw


def half_columns(grid, half: int | str) -> slice:
    """The token columns of one half of a canvas grid (H x 2W)."""
    h = HALVES.index(half) if isinstance(half, str) else int(half)
    gh, gw = parse_grid(grid)
    if gw % 2:
        raise ValueError(f"canvas grid {gh}x{gw} has an odd width")
    return slice(0, gw // 2) if h == 0 else slice(gw // 2, gw)


def half_latents(reference: torch.Tensor, grid, half: int | str) -> torch.Tensor:
    """The tokens [B, H*W/2, C] of one half of canvas latents [B, H*W, C] (raster order over the H x W canvas)."""
    gh, gw = parse_grid(grid)
    b, n, c = reference.shape
    if n != gh * gw:
        raise ValueError(f"{n} tokens do not fill a {gh}x{gw} canvas")
    return reference.reshape(b, gh, gw, c)[:, :, half_columns(grid, half)].reshape(b, gh * gw // 2, c)


def edit_of_half(reference: torch.Tensor, grid, half: int | str, edit: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(target latents [B, N/2, C], mask [1, N/2, C] of the entries the edit defines) that ``edit`` makes of one half
    of the canvas: the ground truth up to the rows / columns a pan brings in from outside the crop."""
    gh, gw = parse_grid(grid)
    return edit_latents(half_latents(reference, grid, half), edit, (gh, gw // 2))
