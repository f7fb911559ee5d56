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


def predicted_end_to_end(layout, keep: int, num_layers: int, prune_start: int, dim: int, steps: int,
                         update_interval: int, reused: int = 0) -> float:
    """Dense loop FLOPs over ToPi loop FLOPs: anchors every update_interval steps run the full sequence (their
    influence scoring, ~2 Nx Nc d per pivotal layer, is left out: it is small next to a layer), ``reused`` steps
    (never anchors) cost nothing, the rest run pruned."""
    anchors = len(range(0, steps, update_interval))
    full = step_flops(layout, layout.num_ctx, num_layers, prune_start, dim)
    pruned = step_flops(layout, keep, num_layers, prune_start, dim)
    return steps * full / (anchors * full + (steps - anchors - reused) * pruned)
