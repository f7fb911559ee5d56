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
                         update_interval: int, reused: int = 0, residual: bool = False) -> float:
    """Dense loop FLOPs over ToPi loop FLOPs: anchors every update_interval steps run the full sequence (their
    influence scoring, ~2 Nx Nc d per pivotal layer, is left out: it is small next to a layer), ``reused`` steps
    (never anchors) cost nothing, the rest run pruned; with the pruning ``residual`` each anchor also runs pruned."""
    anchors = len(range(0, steps, update_interval))
    full = step_flops(layout, layout.num_ctx, num_layers, prune_start, dim)
    pruned = step_flops(layout, keep, num_layers, prune_start, dim)
    calls = steps - anchors - reused + (anchors if residual else 0)
    return steps * full / (anchors * full + calls * pruned)


# --- reference K/V cache (docs/design.md, "Reference K/V cache") ----------------------------------------------
def kv_step_flops(layout, keep: int, num_layers: int, prune_start: int, dim: int) -> float:
    """A cached step: only the T + Nx text and target tokens run (linear layers and queries); each layer attends
    to their keys plus the cached context keys, Nc before prune_start and `keep` from there on."""
    q = layout.text_tokens + layout.num_target
    total = 0.0
    for layer in range(num_layers):
        keys = q + (layout.num_ctx if layer < prune_start else keep)
        total += 2 * (12 * dim * dim * q + 2 * q * keys * dim)
    return total


def predicted_kv_end_to_end(layout, keep: int, num_layers: int, prune_start: int, dim: int, steps: int,
                            update_interval: int, mode: str = "exact", reused: int = 0) -> dict:
    """Dense loop FLOPs over the cached loops' FLOPs: {"cache": unpruned cached loop, "cache_topi": cached loop with
    ToPi at `keep`, "topi_vs_cache": the two against each other}. Steps that extract (step 0 for "exact", every
    anchor for "reuse") are counted as dense steps (an exact model's reference queries see only reference keys, so
    its step 0 costs a little less); an exact model's later anchors are cached steps over every cached key;
    ``reused`` steps (never anchors) cost nothing in the ToPi loop."""
    dense = step_flops(layout, layout.num_ctx, num_layers, prune_start, dim)
    cached = kv_step_flops(layout, layout.num_ctx, num_layers, prune_start, dim)
    pruned = kv_step_flops(layout, keep, num_layers, prune_start, dim)
    anchors = list(range(0, steps, update_interval))
    if mode == "exact":
        cache = dense + (steps - 1) * cached
        topi = dense + (len(anchors) - 1) * cached + (steps - len(anchors) - reused) * pruned
    else:
        cache = len(anchors) * dense + (steps - len(anchors)) * cached
        topi = len(anchors) * dense + (steps - len(anchors) - reused) * pruned
    total = steps * dense
    return {"cache": total / cache, "cache_topi": total / topi, "topi_vs_cache": cache / topi}


def kv_cache_bytes(num_layers: int, heads: int, head_dim: int, tokens: int, bytes_per_value: int = 2,
                   batch: int = 1) -> int:
    """Bytes of the reference K/V cache: keys and values of every layer for `tokens` context tokens."""
    return num_layers * 2 * batch * heads * head_dim * tokens * bytes_per_value
