"""Benchmark and check the Triton kernels of topi_export/kernels/ on a CUDA GPU at FLUX.1 Kontext width.

    python3 scripts/gpu_kernels_bench.py --json bench.json

Influence at 1024x1024 Kontext shapes (24 heads x 128 dims, 512 text + 4096 target + 4096 context
tokens, S = 8704), bf16: the two-pass Triton kernel, its single-launch AOT variant, the chunked
PyTorch reference (topi_export.ops.reference.influence_score) and a full-softmax PyTorch version.
Accuracy: vs the float64 oracle on a smaller shape and vs the fp32 reference at full shape.
token_gather vs torch.index_select. Exits non-zero on any mismatch.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# bf16 output rounding is 2^-8 relative; everything else is fp32 accumulation
TOLERANCE = {"bfloat16": 1e-2, "float16": 2e-3, "float32": 1e-5}
FLUX = dict(heads=24, head_dim=128, text=512, target=4096, context=4096)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def check(name: str, err: float, tol: float, failures: list) -> dict:
    ok = math.isfinite(err) and err <= tol
    if not ok:
        failures.append(f"{name}: relative error {err:.3g} > {tol:.3g}")
    return {"check": name, "rel_err": err, "tol": tol, "ok": ok}


def format_table(rows: list) -> str:
    """rows: dicts with name, ms and optional note; speedups are relative to the first row."""
    base = rows[0]["ms"] if rows else None
    lines = [f"{'case':<48} {'ms':>10} {'vs first':>9}  note", "-" * 80]
    for r in rows:
        ratio = f"{base / r['ms']:.3g}x" if base and r["ms"] else "-"
        lines.append(f"{r['name']:<48} {r['ms']:>10.3f} {ratio:>9}  {r.get('note', '')}")
    return "\n".join(lines)


def full_softmax_influence(q, k, v):
    """The formula with the whole [B,H,Nx,S] probability matrix in fp32 (no chunking)."""
    p = torch.softmax(q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    nc = v.shape[2]
    return (p[..., -nc:].mean(dim=2) * v.float().norm(dim=-1)).sum(dim=1).to(q.dtype)


def make_inputs(b, h, nx, s, nc, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda n: (torch.randn(b, h, n, d, device="cuda", generator=g) * 1.5).to(dtype)  # noqa: E731
    return mk(nx), mk(s), mk(nc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True, help="where to write the results")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(TOLERANCE))
    ap.add_argument("--skip-fused", action="store_true", help="skip timing the (slow) single-launch AOT kernel")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_kernels_bench: needs a CUDA GPU", file=sys.stderr)
        return 2

    import triton
    from triton.testing import do_bench

    from topi_export.kernels import triton_kernels as tk
    from topi_export.ops import reference

    bench = lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
    dtype = getattr(torch, args.dtype)
    tol = TOLERANCE[args.dtype]
    h, d = FLUX["heads"], FLUX["head_dim"]
    nx, nc = FLUX["target"], FLUX["context"]
    s = FLUX["text"] + nx + nc
    failures, checks, rows = [], [], []

    # accuracy vs the float64 oracle on a smaller shape with the same layout (1/8 of each part)
    q, k, v = make_inputs(1, h, nx // 8, s // 8, nc // 8, d, dtype, seed=1)
    oracle = reference.influence_score_materialized(q, k, v)
    checks.append(check("two-pass vs float64 oracle (1/8 shape)", rel_err(tk.influence_score(q, k, v), oracle), tol, failures))
    checks.append(check("single-launch vs float64 oracle (1/8 shape)", rel_err(tk.influence_score_aot(q, k, v), oracle), tol, failures))

    # full 1024x1024 Kontext shape
    q, k, v = make_inputs(1, h, nx, s, nc, d, dtype)
    ref32 = reference.influence_score(q.float(), k.float(), v.float())
    out = tk.influence_score(q, k, v)
    checks.append(check("two-pass vs fp32 reference (full shape)", rel_err(out, ref32), tol, failures))
    configs = {"default": {}, "M64": dict(BLOCK_M=64), "C128": dict(BLOCK_C=128), "N128": dict(BLOCK_N=128)}
    timings = {}
    for cname, cfg in configs.items():
        try:
            err = rel_err(tk.influence_score(q, k, v, **cfg), ref32)
            checks.append(check(f"two-pass[{cname}] vs fp32 reference", err, tol, failures))
            timings[cname] = bench(lambda: tk.influence_score(q, k, v, **cfg))
        except Exception as e:  # a tiling that does not fit this GPU is reported, not fatal
            timings[cname] = float("nan")
            print(f"config {cname} failed: {type(e).__name__}: {e}", file=sys.stderr)
    best = min((c for c in timings if math.isfinite(timings[c])), key=timings.get)
    rows.append({"name": f"influence triton two-pass [{best}]", "ms": timings[best],
                 "note": ", ".join(f"{c}={t:.3f}" for c, t in timings.items())})
    if not args.skip_fused:
        checks.append(check("single-launch vs fp32 reference (full shape)", rel_err(tk.influence_score_aot(q, k, v), ref32), tol, failures))
        rows.append({"name": "influence triton single-launch (AOT kernel)", "ms": do_bench(
            lambda: tk.influence_score_aot(q, k, v), warmup=1, rep=1, return_mode="median"), "note": "TensorRT AOT path"})
    rows.append({"name": "influence torch reference (chunked, fp32)", "ms": bench(lambda: reference.influence_score(q, k, v))})
    checks.append(check("full-softmax torch vs fp32 reference", rel_err(full_softmax_influence(q, k, v), ref32), tol, failures))
    rows.append({"name": "influence torch full softmax (fp32)", "ms": bench(lambda: full_softmax_influence(q, k, v))})
    del q, k, v, ref32, out
    torch.cuda.empty_cache()

    # token_gather: context hidden states [1, 4096, 3072] and the joint sequence [1, 8704, 3072]
    gather_rows = []
    for n, keep in ((nc, nc // 2), (s, s - nc // 2)):
        x = torch.randn(1, n, h * d, device="cuda", dtype=dtype)
        idx = torch.randperm(n, device="cuda")[:keep].sort().values
        if not torch.equal(tk.token_gather(x, idx), x.index_select(1, idx)):
            failures.append(f"token_gather mismatch for N={n}, K={keep}")
        t_tr = bench(lambda: tk.token_gather(x, idx))
        t_th = bench(lambda: x.index_select(1, idx))
        gather_rows += [{"name": f"token_gather triton N={n} K={keep}", "ms": t_tr},
                        {"name": f"torch.index_select N={n} K={keep}", "ms": t_th}]

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "dtype": args.dtype, "shape": dict(FLUX, S=s, B=1), "checks": checks,
              "influence_ms": rows, "gather_ms": gather_rows, "failures": failures}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"device: {result['device']}  dtype: {args.dtype}  B=1 H={h} D={d} Nx={nx} S={s} Nc={nc}")
    for c in checks:
        print(f"  [{'ok' if c['ok'] else 'FAIL'}] {c['check']}: {c['rel_err']:.2e} (tol {c['tol']:.0e})")
    print(format_table(rows))
    print(format_table(gather_rows))
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
