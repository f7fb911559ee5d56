"""Helpers for ``flux2-pick``: the small, really-trained multi-reference FLUX.2-layout model shipped under
``topi_export/assets/flux2-pick`` (trained by ``scripts/train_multiref.py``).

The task is a relevance edit: three reference crops from different photos, the conditioning names ONE of
them and an edit, and the target is that edit of that reference. Two thirds of the context is irrelevant
to every request, which is where context-token pruning pays.

Latents are packed RGB + luma crops exactly like ``kontext-digits`` (see ``kontext_digits.rgb_to_latents``):
a 32x32 px crop is a 16x16 grid of 16-channel tokens. Position ids follow ``Flux2Pipeline``: 4-D
(T, H, W, L); the target has T = 0, reference i has T = 10 + 10 * i, text token l is (0, 0, 0, l).
This module is torch + numpy only (no diffusers, no scikit-image).
"""
from __future__ import annotations

import torch

from topi_export.models.kontext_digits import parse_grid, rgb_to_latents, unpack

# Order matters (it seeds the embeddings), so only ever append.
EDITS = ("identity", "invert", "swap_rb", "shift_down", "shift_right")
SHIFT_TOKENS = 2  # the pans move the content by this many tokens (2 px per token)
NUM_REFERENCES = 3
TEXT_TOKENS = 8  # prompt_embeds [1, TEXT_TOKENS, TEXT_DIM]
TEXT_DIM = 64
LATENT_CHANNELS = 4  # R, G, B, luma
REF_T_SCALE = 10  # Flux2Pipeline._prepare_image_ids: reference i has T = scale + scale * i
EMBED_SEED = 20251126  # fixed: the embeddings do not depend on the training seed


def model_config() -> dict:
    """Flux2Transformer2DModel config of flux2-pick (2 double + 4 single blocks, 4 heads x 32, width 128)."""
    return dict(patch_size=1, in_channels=LATENT_CHANNELS * 4, num_layers=2, num_single_layers=4,
                attention_head_dim=32, num_attention_heads=4, joint_attention_dim=TEXT_DIM, mlp_ratio=3.0,
                axes_dims_rope=(8, 8, 8, 8), rope_theta=2000, guidance_embeds=False)


def pick_conditioning(reference: int, edit: str) -> torch.Tensor:
    """prompt_embeds [1, TEXT_TOKENS, TEXT_DIM] of "apply ``edit`` to reference ``reference``": fixed seeded
    random vectors; the first half of the tokens names the reference, the second half the edit (a shared
    reference-index embedding makes the choice of reference easy to learn)."""
    if not 0 <= reference < NUM_REFERENCES:
        raise ValueError(f"reference {reference} not in [0, {NUM_REFERENCES})")
    half = TEXT_TOKENS // 2
    g = torch.Generator().manual_seed(EMBED_SEED + reference)
    ref_part = torch.randn(1, half, TEXT_DIM, generator=g)
    g = torch.Generator().manual_seed(EMBED_SEED + 1000 + EDITS.index(edit))
    edit_part = torch.randn(1, TEXT_TOKENS - half, TEXT_DIM, generator=g)
    return torch.cat([ref_part, edit_part], dim=1)


# ------------------------------------------------------------------------------------------- position ids
def target_ids(grid) -> torch.Tensor:
    """[H*W, 4] ids of the target (Flux2Pipeline._prepare_latent_ids): (0, h, w, 0) in raster order."""
    gh, gw = parse_grid(grid)
    return torch.cartesian_prod(torch.arange(1), torch.arange(gh), torch.arange(gw), torch.arange(1))


def reference_ids(grids) -> torch.Tensor:
    """[sum H*W, 4] ids of the references (Flux2Pipeline._prepare_image_ids): reference i has T = 10 + 10 i."""
    out = []
    for i, grid in enumerate(grids):
        gh, gw = parse_grid(grid)
        t = torch.tensor([REF_T_SCALE + REF_T_SCALE * i])
        out.append(torch.cartesian_prod(t, torch.arange(gh), torch.arange(gw), torch.arange(1)))
    return torch.cat(out)


def text_ids(n: int = TEXT_TOKENS) -> torch.Tensor:
    """[n, 4] text ids (Flux2Pipeline._prepare_text_ids): (0, 0, 0, l)."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(n))


def image_ids(target_grid, reference_grids) -> torch.Tensor:
    """img_ids of the full sequence [target | ref_0 | ref_1 | ...]."""
    return torch.cat([target_ids(target_grid), reference_ids(reference_grids)])


def reference_slices(reference_grids) -> list[slice]:
    """Where each reference's tokens sit inside ``reference_latents`` (the references concatenated)."""
    out, start = [], 0
    for grid in reference_grids:
        gh, gw = parse_grid(grid)
        out.append(slice(start, start + gh * gw))
        start += gh * gw
    return out


# ------------------------------------------------------------------------------------------- edits
def edit_rgb(rgb: torch.Tensor, edit: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(edited [B, 3, H, W], defined mask [1, 1, H, W]) of RGB in [-1, 1]. The pans move content down /
    right by SHIFT_TOKENS tokens; the rows / columns they pan in are not in the reference (mask 0)."""
    mask = torch.ones(1, 1, *rgb.shape[-2:])
    m = 2 * SHIFT_TOKENS
    if edit == "identity":
        out = rgb.clone()
    elif edit == "invert":
        out = -rgb
    elif edit == "swap_rb":
        out = rgb.flip(1)
    elif edit == "shift_down":
        out = torch.zeros_like(rgb)
        out[..., m:, :] = rgb[..., :-m, :]
        mask[..., :m, :] = 0
    elif edit == "shift_right":
        out = torch.zeros_like(rgb)
        out[..., :, m:] = rgb[..., :, :-m]
        mask[..., :, :m] = 0
    else:
        raise ValueError(f"unknown edit {edit!r}; known: {', '.join(EDITS)}")
    return out, mask


def edit_latents(reference: torch.Tensor, edit: str, grid) -> tuple[torch.Tensor, torch.Tensor]:
    """The target latents the edit makes of one reference's latents [B, N, 16], and a [1, N, 16] mask of the
    entries it defines (0 where a pan brings in content from outside the reference)."""
    rgb = unpack(reference, grid)[:, :3]
    out, mask = edit_rgb(rgb, edit)
    return rgb_to_latents(out), rgb_to_latents(mask.expand(1, 3, -1, -1)).ne(0).float()
