"""OpenAI Triton kernels for the ``topi`` ops (see ``topi_export/ops/reference.py`` for the meaning).

influence_score(q_target [B,H,Nx,D], k [B,H,S,D], v_ctx [B,H,Nc,D]) -> [B,Nc]
    I_j = sum_h ||v_j^h||_2 * mean_i softmax_i(q_i K^T / sqrt(D))[S - Nc + j]
token_gather(x [B,N,C], keep_idx int64 [K]) -> x[:, keep_idx]

The attention matrix is never materialised. Two-pass launcher (``influence_score``):
  1. ``_lse_kernel``      one program per (query tile, b*h): log-sum-exp of each target query over
                          all S keys, online over key tiles.
  2. ``_colsum_kernel``   one program per (context tile, b*h): sum_i exp(q_i.k_j*scale - lse_i) over
                          the target queries, times ||v_j|| / Nx -> fp32 partials [B,H,Nc].
  3. ``_head_sum_kernel`` sums the partials over heads and casts to the input dtype.
``influence_score_fused`` is the same maths in ONE launch (``_influence_fused_kernel``): it is what
the TensorRT AOT plugin embeds, because an AOT plugin runs exactly one kernel with no workspace.
Without a workspace the per-query log-sum-exp cannot be shared between context tiles, so each
program recomputes it: ~Nc/BLOCK_C times the pass-1 work (~100 ms vs ~1 ms at FLUX 1024x1024 on an H200).

Everything accumulates in fp32 (softmax in base 2). fp32 inputs use IEEE fp32 dots (not TF32) so the
result matches the fp32 reference to ~1e-6. All launchers also run on CPU tensors with
TRITON_INTERPRET=1 (set it before triton is imported).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
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
def _tile_lse(q, k_base, S, qk_scale, offs_d, D: tl.constexpr, BLOCK_N: tl.constexpr,
              DOT_PREC: tl.constexpr):
    """Base-2 log-sum-exp of each row of q [BLOCK_M, D] against keys k_base[0:S, :]."""
    m = tl.full([q.shape[0]], float("-inf"), tl.float32)
    l = tl.zeros([q.shape[0]], tl.float32)
    for start in range(0, S, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        kmask = offs_n < S
        k = tl.load(k_base + offs_n[:, None] * D + offs_d[None, :], mask=kmask[:, None], other=0.0)
        s = _dot_t(q, k, DOT_PREC) * qk_scale
        s = tl.where(kmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
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


# ----------------------------------------------------------------------------------------- kernels
@triton.jit
def _lse_kernel(Q, K, LSE, NX, S, qk_scale, D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    mmask = offs_m < NX
    q = tl.load(Q + bh * NX * D + offs_m[:, None] * D + offs_d[None, :], mask=mmask[:, None], other=0.0)
    lse = _tile_lse(q, K + bh * S * D, S, qk_scale, offs_d, D, BLOCK_N, DOT_PREC)
    tl.store(LSE + bh * NX + offs_m, lse, mask=mmask)


@triton.jit
def _colsum_kernel(Q, K, V, LSE, PART, NX, S, NC, qk_scale, D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    kc, vnorm = _ctx_tile(K, V, bh, S, NC, offs_n, offs_d, D)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, NX, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        mmask = offs_m < NX
        q = tl.load(Q + bh * NX * D + offs_m[:, None] * D + offs_d[None, :], mask=mmask[:, None], other=0.0)
        # padded query rows get lse=+inf, so they contribute exp2(-inf) = 0
        lse = tl.load(LSE + bh * NX + offs_m, mask=mmask, other=float("inf"))
        acc += _tile_colsum(q, lse, kc, qk_scale, DOT_PREC)
    tl.store(PART + bh * NC + offs_n, acc * vnorm / NX, mask=offs_n < NC)


@triton.jit
def _head_sum_kernel(PART, OUT, H, NC, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NC
    acc = tl.zeros([BLOCK], tl.float32)
    for h in range(H):
        acc += tl.load(PART + (b * H + h) * NC + offs, mask=mask, other=0.0)
    tl.store(OUT + b * NC + offs, acc.to(OUT.dtype.element_ty), mask=mask)


# Parameter order (inputs, int32 scalars, outputs) is the TensorRT AOT plugin calling convention.
@triton.jit
def _influence_fused_kernel(Q, K, V, H, NX, S, NC, OUT, QK_SCALE: tl.constexpr, D: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                            DOT_PREC: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, D)
    qk_scale = QK_SCALE
    total = tl.zeros([BLOCK_C], tl.float32)
    for h in range(H):
        bh = b * H + h
        kc, vnorm = _ctx_tile(K, V, bh, S, NC, offs_n, offs_d, D)
        acc = tl.zeros([BLOCK_C], tl.float32)
        for start in range(0, NX, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            mmask = offs_m < NX
            q = tl.load(Q + bh * NX * D + offs_m[:, None] * D + offs_d[None, :], mask=mmask[:, None], other=0.0)
            lse = _tile_lse(q, K + bh * S * D, S, qk_scale, offs_d, D, BLOCK_N, DOT_PREC)
            lse = tl.where(mmask, lse, float("inf"))
            acc += _tile_colsum(q, lse, kc, qk_scale, DOT_PREC)
        total += acc * vnorm
    tl.store(OUT + b * NC + offs_n, (total / NX).to(OUT.dtype.element_ty), mask=offs_n < NC)


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
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_C=32, num_warps=4, num_stages=1)
    # measured on an H200 at FLUX width (24 x 128, bf16): BLOCK_M=128 is ~20% faster than 64
    wide = d >= 128 or dtype == torch.float32
    return dict(BLOCK_M=128 if d >= 128 and dtype != torch.float32 else 64, BLOCK_N=64 if wide else 128,
                BLOCK_C=64, num_warps=4 if d <= 64 else 8, num_stages=2 if wide else 3)


GATHER_CONFIG = dict(BLOCK_K=8, BLOCK_C=512, num_warps=4)


def _check_influence_inputs(q_target, k, v_ctx):
    if q_target.dim() != 4 or k.dim() != 4 or v_ctx.dim() != 4:
        raise ValueError("influence_score expects 4-D q_target [B,H,Nx,D], k [B,H,S,D], v_ctx [B,H,Nc,D]")
    b, h, nx, d = q_target.shape
    s, nc = k.shape[2], v_ctx.shape[2]
    if tuple(k.shape) != (b, h, s, d) or tuple(v_ctx.shape) != (b, h, nc, d):
        raise ValueError(f"shape mismatch: q {tuple(q_target.shape)}, k {tuple(k.shape)}, v {tuple(v_ctx.shape)}")
    if nc > s:
        raise ValueError(f"Nc={nc} context keys but only S={s} keys")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {d} not in {SUPPORTED_HEAD_DIMS}")
    if q_target.dtype not in _TL_NAMES or k.dtype != q_target.dtype or v_ctx.dtype != q_target.dtype:
        raise TypeError(f"dtypes must match and be fp32/fp16/bf16, got {q_target.dtype}, {k.dtype}, {v_ctx.dtype}")
    if not interpreting() and not q_target.is_cuda:
        raise RuntimeError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    return b, h, nx, s, nc, d


# ----------------------------------------------------------------------------------------- launchers
def _influence_setup(q_target, k, v_ctx, overrides):
    """Shared by both launchers: input checks, the output tensor and the empty-shape exits (cfg None)."""
    dims = b, h, nx, s, nc, d = _check_influence_inputs(q_target, k, v_ctx)
    out = torch.empty(b, nc, device=q_target.device, dtype=q_target.dtype)
    if nc == 0 or b == 0:
        return dims, out, None
    if nx == 0 or h == 0:
        return dims, out.zero_(), None
    return dims, out, {**influence_config(d, q_target.dtype), **overrides}


def influence_score(q_target: torch.Tensor, k: torch.Tensor, v_ctx: torch.Tensor, **overrides) -> torch.Tensor:
    """Two-pass fused influence score; returns [B, Nc] in the input dtype."""
    (b, h, nx, s, nc, d), out, cfg = _influence_setup(q_target, k, v_ctx, overrides)
    if cfg is None:
        return out
    q, k, v = q_target.contiguous(), k.contiguous(), v_ctx.contiguous()
    qk_scale = LOG2E / math.sqrt(d)
    prec = _dot_precision(q.dtype)
    opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    lse = torch.empty(b * h * nx, device=q.device, dtype=torch.float32)
    _lse_kernel[(triton.cdiv(nx, cfg["BLOCK_M"]), b * h)](
        q, k, lse, nx, s, qk_scale, D=d, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], DOT_PREC=prec, **opts)
    part = torch.empty(b * h * nc, device=q.device, dtype=torch.float32)
    _colsum_kernel[(triton.cdiv(nc, cfg["BLOCK_C"]), b * h)](
        q, k, v, lse, part, nx, s, nc, qk_scale, D=d, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_C"],
        DOT_PREC=prec, **opts)
    _head_sum_kernel[(triton.cdiv(nc, 1024), b)](part, out, h, nc, BLOCK=1024)
    return out


def influence_score_fused(q_target: torch.Tensor, k: torch.Tensor, v_ctx: torch.Tensor, **overrides) -> torch.Tensor:
    """Single-launch variant (the kernel the TensorRT AOT plugin embeds); same result, more work."""
    (b, h, nx, s, nc, d), out, cfg = _influence_setup(q_target, k, v_ctx, overrides)
    if cfg is None:
        return out
    _influence_fused_kernel[(triton.cdiv(nc, cfg["BLOCK_C"]), b)](
        q_target.contiguous(), k.contiguous(), v_ctx.contiguous(), h, nx, s, nc, out,
        QK_SCALE=LOG2E / math.sqrt(d), D=d,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_C=cfg["BLOCK_C"],
        DOT_PREC=_dot_precision(q_target.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


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
_AOT_INFLUENCE_TILES = ((64, 64, 64), (64, 32, 32), (32, 32, 32), (16, 16, 16))  # BLOCK_M, BLOCK_N, BLOCK_C


def compile_aot(kernel: str, dtype_name: str, head_dim: int | None = None, target=None) -> dict:
    """Compile one kernel to PTX for the TensorRT AOT plugin (TensorRT itself is not needed).

    kernel: "influence_score" or "token_gather"; dtype_name: "fp32" | "fp16" | "bf16" (data dtype);
    target: a ``triton.backends.compiler.GPUTarget`` (None = the current GPU).
    Returns name, ptx, block_x (threads per block), shared (bytes), signature and the constexprs.
    """
    if interpreting():
        raise RuntimeError("compile_aot needs the Triton compiler: unset TRITON_INTERPRET")
    if dtype_name not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"unsupported dtype {dtype_name}")
    ptr = f"*{dtype_name}"
    if kernel == "influence_score":
        if head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"head dim {head_dim} not in {SUPPORTED_HEAD_DIMS}")
        signature = dict(Q=ptr, K=ptr, V=ptr, H="i32", NX="i32", S="i32", NC="i32", OUT=ptr)
        prec = "ieee" if dtype_name == "fp32" else "tf32"
        candidates = [(dict(QK_SCALE=LOG2E / math.sqrt(head_dim), D=head_dim, BLOCK_M=m, BLOCK_N=n,
                            BLOCK_C=c, DOT_PREC=prec), dict(num_warps=8 if head_dim >= 128 else 4, num_stages=2))
                      for m, n, c in _AOT_INFLUENCE_TILES]
        fn = _influence_fused_kernel
    elif kernel == "token_gather":
        signature = dict(X=ptr, IDX="*i64", N="i32", C="i32", KEEP="i32", Y=ptr)
        candidates = [(dict(BLOCK_K=GATHER_CONFIG["BLOCK_K"], BLOCK_C=GATHER_CONFIG["BLOCK_C"]),
                       dict(num_warps=GATHER_CONFIG["num_warps"], num_stages=1))]
        fn = _token_gather_kernel
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
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
