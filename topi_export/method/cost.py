"""FLOP model of one denoising step: what the token counts predict for a pruned step's speedup."""
from __future__ import annotations


def step_flops(layout, keep: int, num_layers: int, prune_start: int, dim: int) -> float:
    """2 * multiply-adds per block: linear layers 12 d^2 per token (q, k, v, out + 4x MLP, both block
    types) and attention 2 S^2 d (QK^T and PV); layers >= prune_start see only `keep` context tokens."""
    total = 0.0
    for layer in range(num_layers):
        ctx = layout.num_ctx if layer < prune_start else keep
        s = layout.text_tokens + layout.num_target + ctx
        total += 2 * (12 * dim * dim * s + 2 * s * s * dim)
    return total


def predicted_speedup(layout, keep: int, num_layers: int, prune_start: int, dim: int) -> float:
    full = step_flops(layout, layout.num_ctx, num_layers, prune_start, dim)
    return full / step_flops(layout, keep, num_layers, prune_start, dim)
