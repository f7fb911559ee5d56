"""OpenAI Triton kernels for the ``topi`` ops (see ``topi_export/ops/reference.py`` for the meaning).

influence_score(q_target [B,H,Nx,D], k [B,H,S,D], v_ctx [B,H,Nc,D]) -> [B,Nc]
    I_j = sum_h ||v_j^h||_2 * mean_i softmax_i(q_i K^T / sqrt(D))[S - Nc + j]
  = context_influence(q_target, k, v_ctx, query_lse(q_target, k)), the two ``topi`` ONNX nodes
  (``topi_export/ops/onnx.py``):
query_lse(q_target, k) -> lse [B,H,Nx] float32
    base-e log-sum-exp of each target query's logits q.k/sqrt(D) over all S keys
context_influence(q_target, k, v_ctx, lse) -> [B,Nc] (dtype of q_target)
    sum_h ||v_j^h|| * (1/Nx) sum_i exp(q_i.k_j/sqrt(D) - lse_i) over the last Nc keys j
token_gather(x [B,N,C], keep_idx int64 [K]) -> x[:, keep_idx]

The influence launchers take an optional ``key_mask`` [B,S] float (0 = a key the model masks out, e.g. Qwen's text
padding): a masked key takes no probability (it is left out of the lse; a masked context key has influence 0), as
in the torch op and the ONNX bodies. Without it the kernels are the unmasked ones (the mask pointer is a constexpr
None, so their parameter lists, the TensorRT calling convention, do not change).

The attention matrix is never materialised:
  ``_query_lse_kernel``          one program per (query tile, b*h): online log-sum-exp over key tiles.
  ``_context_influence_kernel``  one program per (context tile, b): loops over heads and query tiles,
                                 reading the lse (no recomputation), sums over heads in registers and
                                 writes the output in the input dtype. One launch, no workspace: what
                                 the TensorRT AOT plugin runs.
  ``_colsum_kernel`` + ``_head_sum_kernel``  the same column sums with one program per (context tile,
                                 b*h) and an fp32 [B,H,Nc] workspace summed over heads by a second launch
                                 (more programs when B and Nc are small).
Each kernel's parameters are ordered (inputs, int32 scalars, outputs), TensorRT's AOT calling convention.

Everything accumulates in fp32 (softmax in base 2 inside the kernels; the lse crosses kernels in base e, as
the ONNX contract says). fp32 inputs use IEEE fp32 dots (not TF32) so the result matches the fp32 reference
to ~1e-6. All launchers also run on CPU tensors with TRITON_INTERPRET=1 (set it before triton is imported).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_LOG2E = tl.constexpr(LOG2E)  # kernels convert the base-e lse to base 2 and back
_LN2 = tl.constexpr(LN2)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_TL_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------- helpers
@triton.jit
def _dot_t(a, b, DOT_PREC: tl.constexpr):
    """a @ b^T in fp32. "ieee" upcasts first: exact for 16-bit inputs, and the interpreter's
    numpy dot mishandles bf16 (it multiplies the raw bits)."""
    if DOT_PREC == "ieee":
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, tl.trans(b), input_precision=DOT_PREC)


@triton.jit
def _tile_lse(q, k_base, mask_base, S, qk_scale, offs_d, D: tl.constexpr, BLOCK_N: tl.constexpr,
              DOT_PREC: tl.constexpr):
    """Base-2 log-sum-exp of each row of q [BLOCK_M, D] against keys k_base[0:S, :], leaving out the keys whose
    mask_base[0:S] is 0 (mask_base None: every key)."""
    m = tl.full([q.shape[0]], float("-inf"), tl.float32)
    l = tl.zeros([q.shape[0]], tl.float32)
    for start in range(0, S, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        kmask = offs_n < S
        if mask_base is not None:
            kmask = kmask & (tl.load(mask_base + offs_n, mask=kmask, other=0.0) != 0)
        k = tl.load(k_base + offs_n[:, None] * D + offs_d[None, :], mask=kmask[:, None], other=0.0)
        s = _dot_t(q, k, DOT_PREC) * qk_scale
        s = tl.where(kmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        # a tile of masked keys only leaves m at -inf: subtract 0 there instead (exp2(-inf - -inf) is NaN)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp2(m - m_ref) + tl.sum(tl.exp2(s - m_ref[:, None]), 1)
        m = m_new
    return m + tl.log2(l)


@triton.jit
def _tile_colsum(q, lse, kc, qk_scale, DOT_PREC: tl.constexpr):
    """sum over rows i of exp(q_i.k_j*scale - lse_i) for each key row j of kc [BLOCK_N, D]."""
    s = _dot_t(q, kc, DOT_PREC) * qk_scale
    return tl.sum(tl.exp2(s - lse[:, None]), 0)


@triton.jit
def _ctx_tile(K, V, bh, S, NC, offs_n, offs_d, D: tl.constexpr):
    """Context keys of this tile (the last NC keys) and their value L2 norms."""
    nmask = offs_n < NC
    kc = tl.load(K + bh * S * D + (S - NC + offs_n)[:, None] * D + offs_d[None, :],
                 mask=nmask[:, None], other=0.0)
    v = tl.load(V + bh * NC * D + offs_n[:, None] * D + offs_d[None, :],
                mask=nmask[:, None], other=0.0).to(tl.float32)
    return kc, tl.sqrt(tl.sum(v * v, 1))


@triton.jit
def _ctx_keep(MASK, b, S, NC, offs_n):
    """1.0 for the context keys of this tile that the key mask [B, S] keeps, 0.0 for masked ones (MASK None: 1)."""
    keep = tl.full(offs_n.shape, 1.0, tl.float32)
    if MASK is not None:
        m = tl.load(MASK + b * S + S - NC + offs_n, mask=offs_n < NC, other=0.0)
        keep = tl.where(m != 0, keep, 0.0)
    return keep


@triton.jit
def _colsum_over_queries(Q, LSE, kc, bh, NX, qk_scale, offs_d, D: tl.constexpr, BLOCK_M: tl.constexpr,
                         DOT_PREC: tl.constexpr):
    """sum_i exp(q_i.k_j/sqrt(D) - lse_i) over all target queries of head bh, for each row j of kc."""
    acc = tl.zeros([kc.shape[0]], tl.float32)
    for start in range(0, NX, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        mmask = offs_m < NX
        q = tl.load(Q + bh * NX * D + offs_m[:, None] * D + offs_d[None, :], mask=mmask[:, None], other=0.0)
        # padded query rows get lse=+inf, so they contribute exp2(-inf) = 0
        lse = tl.load(LSE + bh * NX + offs_m, mask=mmask, other=float("inf")) * _LOG2E
        acc += _tile_colsum(q, lse, kc, qk_scale, DOT_PREC)
    return acc


# ----------------------------------------------------------------------------------------- kernels
@triton.jit
def _query_lse_kernel(Q, K, NX, S, LSE, QK_SCALE: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    mmask = offs_m < NX
    q = tl.load(Q + bh * NX * D + offs_m[:, None] * D + offs_d[None, :], mask=mmask[:, None], other=0.0)
    lse = _tile_lse(q, K + bh * S * D, None, S, QK_SCALE, offs_d, D, BLOCK_N, DOT_PREC)
    tl.store(LSE + bh * NX + offs_m, lse * _LN2, mask=mmask)


@triton.jit
def _query_lse_masked_kernel(Q, K, MASK, H, NX, S, LSE, QK_SCALE: tl.constexpr, D: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """_query_lse_kernel with a key mask [B, S]; H finds the batch row b = bh // H of the mask."""
    bh = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    mmask = offs_m < NX
    q = tl.load(Q + bh * NX * D + offs_m[:, None] * D + offs_d[None, :], mask=mmask[:, None], other=0.0)
    lse = _tile_lse(q, K + bh * S * D, MASK + (bh // H) * S, S, QK_SCALE, offs_d, D, BLOCK_N, DOT_PREC)
    tl.store(LSE + bh * NX + offs_m, lse * _LN2, mask=mmask)


@triton.jit
def _context_influence_kernel(Q, K, V, LSE, MASK, H, NX, S, NC, OUT, QK_SCALE: tl.constexpr, D: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, DOT_PREC: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, D)
    total = tl.zeros([BLOCK_C], tl.float32)
    for h in range(H):
        bh = b * H + h
        kc, vnorm = _ctx_tile(K, V, bh, S, NC, offs_n, offs_d, D)
        total += _colsum_over_queries(Q, LSE, kc, bh, NX, QK_SCALE, offs_d, D, BLOCK_M, DOT_PREC) * vnorm
    total = total * _ctx_keep(MASK, b, S, NC, offs_n)
    tl.store(OUT + b * NC + offs_n, (total / NX).to(OUT.dtype.element_ty), mask=offs_n < NC)


@triton.jit
def _colsum_kernel(Q, K, V, LSE, NX, S, NC, PART, QK_SCALE: tl.constexpr, D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, DOT_PREC: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, D)
    kc, vnorm = _ctx_tile(K, V, bh, S, NC, offs_n, offs_d, D)
    acc = _colsum_over_queries(Q, LSE, kc, bh, NX, QK_SCALE, offs_d, D, BLOCK_M, DOT_PREC)
    tl.store(PART + bh * NC + offs_n, acc * vnorm / NX, mask=offs_n < NC)


@triton.jit
def _head_sum_kernel(PART, MASK, H, S, NC, OUT, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NC
    acc = tl.zeros([BLOCK], tl.float32)
    for h in range(H):
        acc += tl.load(PART + (b * H + h) * NC + offs, mask=mask, other=0.0)
    acc = acc * _ctx_keep(MASK, b, S, NC, offs)
    tl.store(OUT + b * NC + offs, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _token_gather_kernel(X, IDX, N, C, KEEP, Y, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    kmask = offs_k < KEEP
    idx = tl.load(IDX + offs_k, mask=kmask, other=0)
    # out-of-range indices write zeros instead of reading outside x (a kernel cannot raise)
    valid = kmask & (idx >= 0) & (idx < N)
    cmask = offs_c[None, :] < C
    x = tl.load(X + (b * N + idx)[:, None] * C + offs_c[None, :], mask=valid[:, None] & cmask, other=0.0)
    tl.store(Y + (b * KEEP + offs_k)[:, None] * C + offs_c[None, :], x, mask=kmask[:, None] & cmask)


# ----------------------------------------------------------------------------------------- configs
def _dot_precision(dtype: torch.dtype, interpret: bool | None = None) -> str:
    # TF32 would cost ~1e-3 relative error on fp32 inputs; 16-bit tensor-core dots are exact products
    # with fp32 accumulation. The interpreter upcasts bf16 (see _dot_t).
    interpret = interpreting() if interpret is None else interpret
    return "ieee" if dtype == torch.float32 or (interpret and dtype == torch.bfloat16) else "tf32"


def influence_config(d: int, dtype: torch.dtype, interpret: bool | None = None) -> dict:
    """Tile sizes and launch options. The interpreter is fastest with few, large tiles."""
    if interpret if interpret is not None else interpreting():
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_C=32, num_warps=4, num_stages=1, split_heads=False)
    # measured on an H200 at FLUX width (24 x 128, bf16): BLOCK_M=128 is ~20% faster than 64
    wide = d >= 128 or dtype == torch.float32
    return dict(BLOCK_M=128 if d >= 128 and dtype != torch.float32 else 64, BLOCK_N=64 if wide else 128,
                BLOCK_C=64, num_warps=4 if d <= 64 else 8, num_stages=2 if wide else 3, split_heads=True)


GATHER_CONFIG = dict(BLOCK_K=8, BLOCK_C=512, num_warps=4)


def _key_mask(key_mask, b, s, device):
    """The key mask as the kernels read it: float32 [B, S] contiguous (a [1, S] mask is broadcast), or None."""
    if key_mask is None:
        return None
    if key_mask.dim() != 2 or key_mask.shape[1] != s or key_mask.shape[0] not in (1, b):
        raise ValueError(f"key_mask must be [B, S] = {(b, s)} (or [1, S]), got {tuple(key_mask.shape)}")
    if key_mask.device != device:
        raise ValueError("key_mask and q_target must be on the same device")
    return key_mask.to(torch.float32).expand(b, s).contiguous()


def _check_influence_inputs(q_target, k, v_ctx=None, lse=None):
    """Shapes (b, h, nx, s, nc, d); v_ctx / lse are checked when given."""
    if q_target.dim() != 4 or k.dim() != 4 or (v_ctx is not None and v_ctx.dim() != 4):
        raise ValueError("influence expects 4-D q_target [B,H,Nx,D], k [B,H,S,D], v_ctx [B,H,Nc,D]")
    b, h, nx, d = q_target.shape
    s = k.shape[2]
    nc = v_ctx.shape[2] if v_ctx is not None else 0
    if tuple(k.shape) != (b, h, s, d) or (v_ctx is not None and tuple(v_ctx.shape) != (b, h, nc, d)):
        shapes = ", ".join(str(tuple(t.shape)) for t in (q_target, k, v_ctx) if t is not None)
        raise ValueError(f"shape mismatch: q, k, v = {shapes}")
    if nc > s:
        raise ValueError(f"Nc={nc} context keys but only S={s} keys")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {d} not in {SUPPORTED_HEAD_DIMS}")
    if q_target.dtype not in _TL_NAMES or any(t is not None and t.dtype != q_target.dtype for t in (k, v_ctx)):
        raise TypeError(f"dtypes must match and be fp32/fp16/bf16, got {q_target.dtype}, {k.dtype}"
                        + (f", {v_ctx.dtype}" if v_ctx is not None else ""))
    if lse is not None:
        if tuple(lse.shape) != (b, h, nx) or lse.dtype != torch.float32:
            raise ValueError(f"lse must be float32 [B,H,Nx] = {(b, h, nx)}, got {lse.dtype} {tuple(lse.shape)}")
        if lse.device != q_target.device:
            raise ValueError("lse and q_target must be on the same device")
    if not interpreting() and not q_target.is_cuda:
        raise RuntimeError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    return b, h, nx, s, nc, d


def _launch_options(cfg):
    return dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


# ----------------------------------------------------------------------------------------- launchers
def query_lse(q_target: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None = None,
              out: torch.Tensor | None = None, **overrides) -> torch.Tensor:
    """Base-e log-sum-exp of each target query's logits over all S keys (those key_mask keeps): float32
    [B, H, Nx]."""
    b, h, nx, s, _, d = _check_influence_inputs(q_target, k)
    key_mask = _key_mask(key_mask, b, s, q_target.device)
    lse = out if out is not None else torch.empty(b, h, nx, device=q_target.device, dtype=torch.float32)
    if lse.numel() == 0:
        return lse
    if s == 0:
        return lse.fill_(float("-inf"))
    cfg = {**influence_config(d, q_target.dtype), **overrides}
    consts = dict(QK_SCALE=LOG2E / math.sqrt(d), D=d, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                  DOT_PREC=_dot_precision(q_target.dtype), **_launch_options(cfg))
    grid = (triton.cdiv(nx, cfg["BLOCK_M"]), b * h)
    if key_mask is None:
        _query_lse_kernel[grid](q_target.contiguous(), k.contiguous(), nx, s, lse, **consts)
    else:
        _query_lse_masked_kernel[grid](q_target.contiguous(), k.contiguous(), key_mask, h, nx, s, lse, **consts)
    return lse


def context_influence(q_target: torch.Tensor, k: torch.Tensor, v_ctx: torch.Tensor, lse: torch.Tensor,
                      key_mask: torch.Tensor | None = None, out: torch.Tensor | None = None,
                      split_heads: bool | None = None, **overrides) -> torch.Tensor:
    """Influence of the last Nc keys given ``query_lse``'s output (computed with the same key_mask); [B, Nc] in the
    input dtype. A masked context key has influence 0.

    split_heads=False: ONE launch (``_context_influence_kernel``, the TensorRT AOT kernel); True: one program
    per (context tile, head) into an fp32 workspace, then a head-sum launch; None: ``influence_config``'s choice."""
    b, h, nx, s, nc, d = _check_influence_inputs(q_target, k, v_ctx, lse)
    key_mask = _key_mask(key_mask, b, s, q_target.device)
    out = out if out is not None else torch.empty(b, nc, device=q_target.device, dtype=q_target.dtype)
    if out.numel() == 0:
        return out
    if nx == 0 or h == 0:
        return out.zero_()
    cfg = {**influence_config(d, q_target.dtype), **overrides}
    split = cfg["split_heads"] if split_heads is None else split_heads
    q, k, v, lse = q_target.contiguous(), k.contiguous(), v_ctx.contiguous(), lse.contiguous()
    consts = dict(QK_SCALE=LOG2E / math.sqrt(d), D=d, BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"],
                  DOT_PREC=_dot_precision(q.dtype), **_launch_options(cfg))
    if not split:
        _context_influence_kernel[(triton.cdiv(nc, cfg["BLOCK_C"]), b)](q, k, v, lse, key_mask, h, nx, s, nc, out,
                                                                         **consts)
        return out
    part = torch.empty(b * h * nc, device=q.device, dtype=torch.float32)
    _colsum_kernel[(triton.cdiv(nc, cfg["BLOCK_C"]), b * h)](q, k, v, lse, nx, s, nc, part, **consts)
    _head_sum_kernel[(triton.cdiv(nc, 1024), b)](part, key_mask, h, s, nc, out, BLOCK=1024)
    return out


def influence_score(q_target: torch.Tensor, k: torch.Tensor, v_ctx: torch.Tensor,
                    key_mask: torch.Tensor | None = None, **overrides) -> torch.Tensor:
    """query_lse then context_influence (the CUDA kernel of the torch op); [B, Nc] in the input dtype."""
    _check_influence_inputs(q_target, k, v_ctx)
    lse = query_lse(q_target, k, key_mask, **overrides)
    return context_influence(q_target, k, v_ctx, lse, key_mask, **overrides)


def influence_score_aot(q_target: torch.Tensor, k: torch.Tensor, v_ctx: torch.Tensor,
                        key_mask: torch.Tensor | None = None, **overrides) -> torch.Tensor:
    """What a TensorRT engine with the AOT plugins runs: the two single-launch kernels."""
    return influence_score(q_target, k, v_ctx, key_mask, **{**overrides, "split_heads": False})


# Older name, still used by scripts/gpu_kernels_bench.py ("single-launch ... TensorRT AOT path").


def token_gather(x: torch.Tensor, keep_idx: torch.Tensor, **overrides) -> torch.Tensor:
    """x[:, keep_idx] for x [B, N, C] and int64 keep_idx [K]. Out-of-range indices give zero rows."""
    if x.dim() != 3 or keep_idx.dim() != 1:
        raise ValueError("token_gather expects x [B,N,C] and keep_idx [K]")
    if keep_idx.dtype != torch.int64:
        raise TypeError(f"keep_idx must be int64, got {keep_idx.dtype}")
    if keep_idx.device != x.device:
        raise ValueError("x and keep_idx must be on the same device")
    if not interpreting() and not x.is_cuda:
        raise RuntimeError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    b, n, c = x.shape
    kk = keep_idx.shape[0]
    y = torch.empty(b, kk, c, device=x.device, dtype=x.dtype)
    if y.numel() == 0:
        return y
    cfg = {**GATHER_CONFIG, **overrides}
    grid = (triton.cdiv(c, cfg["BLOCK_C"]), triton.cdiv(kk, cfg["BLOCK_K"]), b)
    _token_gather_kernel[grid](x.contiguous(), keep_idx.contiguous(), n, c, kk, y,
                               BLOCK_K=cfg["BLOCK_K"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"])
    return y


# ----------------------------------------------------------------------------------------- AOT
# TensorRT launches AOT kernels itself, passing (inputs, int32 scalars, outputs) and padding Triton's
# hidden scratch pointers with null. It does not raise the 48 KiB dynamic shared-memory limit, so
# the first tiling that fits is used.
AOT_SHARED_LIMIT = 48 * 1024
AOT_KERNELS = ("query_lse", "context_influence", "token_gather")
_AOT_LSE_TILES = ((64, 64), (64, 32), (32, 32), (16, 16))  # BLOCK_M, BLOCK_N
_AOT_CONTEXT_TILES = ((64, 32), (32, 32), (16, 16))  # BLOCK_M, BLOCK_C


def _aot_candidates(kernel, dtype_name, head_dim, masked=False):
    """(kernel fn, signature, [(constexprs, options)]) in order of preference. masked: the influence kernels
    with the key_mask input (after the other inputs: the TensorRT plugins' input order)."""
    ptr = f"*{dtype_name}"
    if kernel == "token_gather":
        return _token_gather_kernel, dict(X=ptr, IDX="*i64", N="i32", C="i32", KEEP="i32", Y=ptr), [
            (dict(BLOCK_K=GATHER_CONFIG["BLOCK_K"], BLOCK_C=GATHER_CONFIG["BLOCK_C"]),
             dict(num_warps=GATHER_CONFIG["num_warps"], num_stages=1))]
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {head_dim} not in {SUPPORTED_HEAD_DIMS}")
    common = dict(QK_SCALE=LOG2E / math.sqrt(head_dim), D=head_dim, DOT_PREC="ieee" if dtype_name == "fp32" else "tf32")
    options = dict(num_warps=8 if head_dim >= 128 else 4, num_stages=2)
    if kernel == "query_lse" and masked:
        signature = dict(Q=ptr, K=ptr, MASK="*fp32", H="i32", NX="i32", S="i32", LSE="*fp32")
        return _query_lse_masked_kernel, signature, [
            (dict(common, BLOCK_M=m, BLOCK_N=n), options) for m, n in _AOT_LSE_TILES]
    if kernel == "query_lse":
        return _query_lse_kernel, dict(Q=ptr, K=ptr, NX="i32", S="i32", LSE="*fp32"), [
            (dict(common, BLOCK_M=m, BLOCK_N=n), options) for m, n in _AOT_LSE_TILES]
    if kernel == "context_influence":
        mask = dict(MASK="*fp32") if masked else {}
        signature = dict(Q=ptr, K=ptr, V=ptr, LSE="*fp32", **mask, H="i32", NX="i32", S="i32", NC="i32", OUT=ptr)
        extra = {} if masked else dict(MASK=None)  # constexpr None: no mask parameter in the PTX
        return _context_influence_kernel, signature, [
            (dict(common, **extra, BLOCK_M=m, BLOCK_C=c), options) for m, c in _AOT_CONTEXT_TILES]
    raise ValueError(f"unknown kernel {kernel!r}; known: {', '.join(AOT_KERNELS)}")


def compile_aot(kernel: str, dtype_name: str, head_dim: int | None = None, target=None, masked: bool = False) -> dict:
    """Compile one kernel to PTX for the TensorRT AOT plugin (TensorRT itself is not needed).

    kernel: one of ``AOT_KERNELS``; dtype_name: "fp32" | "fp16" | "bf16" (data dtype; the lse is fp32);
    target: a ``triton.backends.compiler.GPUTarget`` (None = the current GPU); masked: the variant with the
    key_mask input (query_lse, context_influence).
    Returns name, ptx, block_x (threads per block), shared (bytes), signature and the constexprs.
    """
    if interpreting():
        raise RuntimeError("compile_aot needs the Triton compiler: unset TRITON_INTERPRET")
    if dtype_name not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"unsupported dtype {dtype_name}")
    fn, signature, candidates = _aot_candidates(kernel, dtype_name, head_dim, masked)
    for consts, options in candidates:
        src = triton.compiler.ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in consts}},
                                        constexprs=consts)
        compiled = triton.compile(src, target=target, options=options)
        md = compiled.metadata
        for attr in ("global_scratch_size", "profile_scratch_size"):
            if getattr(md, attr, 0):
                raise RuntimeError(f"{kernel}: kernel needs Triton {attr}={getattr(md, attr)}, "
                                   "which a TensorRT AOT plugin cannot provide")
        if md.shared <= AOT_SHARED_LIMIT:
            return dict(name=md.name, ptx=compiled.asm["ptx"], block_x=md.num_warps * 32, shared=md.shared,
                        signature=signature, **consts)
    raise RuntimeError(f"{kernel}: no tiling fits in {AOT_SHARED_LIMIT} B of shared memory")
