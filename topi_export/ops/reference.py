"""Reference semantics of the ``topi`` ops, registered as torch.library custom ops.

influence_score(q_target, k, v_ctx, key_mask=None) -> [B, Nc]
    q_target [B, H, Nx, D]: target-token queries (after QK-norm and RoPE)
    k        [B, H, S, D]:  all keys of the joint sequence; the LAST Nc keys are the context keys
    v_ctx    [B, H, Nc, D]: context-token values
    key_mask [B, S] or [1, S], optional: 0 = a key the model masks out (Qwen's text padding), else attended
    I_j = sum_h ||v_j^h||_2 * mean_i softmax_i(q_i K^T / sqrt(D))[S - Nc + j]
    the softmax over the attended keys only, as in the model's own attention: a masked key takes no probability
    (a masked context key has influence 0)

    exported to ONNX as query_lse (per-query log-sum-exp) + context_influence (topi_export/ops/onnx.py)

token_gather(x, keep_idx) -> x[:, keep_idx]   (x [B, N, C], keep_idx int64 [K])
"""
from __future__ import annotations

import math

import torch

# Queries are processed in chunks so at most [B, H, chunk, S] attention probabilities are live (here and in
# the ONNX function bodies).
QUERY_CHUNK = 1024


def _masked_out(key_mask, s: int):
    """[B or 1, 1, 1, S] bool, True where the key is masked out; None without a mask."""
    if key_mask is None:
        return None
    if key_mask.dim() != 2 or key_mask.shape[1] != s:
        raise ValueError(f"key_mask must be [B, S] with S = {s} keys, got {tuple(key_mask.shape)}")
    return (key_mask == 0)[:, None, None, :]


@torch.library.custom_op("topi::influence_score", mutates_args=())
def influence_score(q_target: torch.Tensor, k: torch.Tensor, v_ctx: torch.Tensor,
                    key_mask: torch.Tensor | None = None) -> torch.Tensor:
    nx, nc = q_target.shape[2], v_ctx.shape[2]
    scale = 1.0 / math.sqrt(q_target.shape[-1])
    kt = k.float().transpose(-1, -2)
    masked = _masked_out(key_mask, k.shape[2])
    col = q_target.new_zeros(q_target.shape[0], q_target.shape[1], nc, dtype=torch.float32)
    for start in range(0, nx, QUERY_CHUNK):
        logits = q_target[:, :, start:start + QUERY_CHUNK].float() @ kt * scale
        if masked is not None:
            logits = logits.masked_fill(masked, -math.inf)
        col += logits.softmax(dim=-1)[..., -nc:].sum(dim=2)
    vnorm = v_ctx.float().norm(dim=-1)
    return (col / nx * vnorm).sum(dim=1).to(q_target.dtype)


@influence_score.register_fake
def _(q_target, k, v_ctx, key_mask=None):
    return q_target.new_empty(q_target.shape[0], v_ctx.shape[2])


@torch.library.custom_op("topi::token_gather", mutates_args=())
def token_gather(x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    return x.index_select(1, keep_idx).clone()


@token_gather.register_fake
def _(x, keep_idx):
    return x.new_empty(x.shape[0], keep_idx.shape[0], *x.shape[2:])


def influence_score_materialized(q_target, k, v_ctx, key_mask=None):
    """The formula with the full attention matrix in float64: the test oracle."""
    d = q_target.shape[-1]
    logits = q_target.double() @ k.double().transpose(-1, -2) / math.sqrt(d)
    masked = _masked_out(key_mask, k.shape[2])
    if masked is not None:
        logits = logits.masked_fill(masked, -math.inf)
    p = torch.softmax(logits, dim=-1)
    nc = v_ctx.shape[2]
    attn_to_ctx = p[..., -nc:].mean(dim=2)  # [B, H, Nc]
    return (attn_to_ctx * v_ctx.double().norm(dim=-1)).sum(dim=1)
