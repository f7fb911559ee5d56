"""Per-graph, per-bucket comparison of built engines against the PyTorch reference (``topi-export check``).
Works for every backend through the StepEngine interface."""
from __future__ import annotations

import torch

from topi_export.runtime.loop import rel_l2

TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}


def compare_engines(engine, reference, data, buckets, *, seed=0, trials=2):
    """Rows of {graph, bucket, keep, output, max_abs, rel_l2} for anchor, full and each bucket's pruned graph."""
    gen = torch.Generator().manual_seed(seed)
    nc = data.layout.num_ctx
    rows = []
    engine.bind(data)
    reference.bind(data)
    with torch.inference_mode():
        for trial in range(trials):
            latents = torch.randn(1, data.layout.num_target, data.reference_latents.shape[-1], generator=gen)
            t = torch.rand(1, generator=gen) * 0.9 + 0.05
            got_v, got_i = engine.anchor(latents, t)
            ref_v, ref_i = reference.anchor(latents, t)
            rows.append(_row("anchor", None, nc, "velocity", got_v, ref_v))
            rows.append(_row("anchor", None, nc, "influence", got_i, ref_i))
            rows.append(_row("full", None, nc, "velocity", engine.full(latents, t), reference.full(latents, t)))
            for b in buckets:
                keep_idx = torch.randperm(nc, generator=gen)[:b["keep"]].sort().values
                rows.append(_row("pruned", b["ratio"], b["keep"], "velocity", engine.pruned(latents, t, keep_idx),
                                 reference.pruned(latents, t, keep_idx)))
    return _worst(rows)


def _row(graph, bucket, keep, output, got, ref):
    got, ref = got.detach().float().cpu(), ref.detach().float().cpu()
    return {"graph": graph, "bucket": bucket, "keep": keep, "output": output,
            "max_abs": float((got - ref).abs().max()), "rel_l2": rel_l2(got, ref),
            "finite": bool(torch.isfinite(got).all())}


def _worst(rows):
    """Keep the worst trial of each (graph, bucket, output)."""
    out = {}
    for r in rows:
        key = (r["graph"], r["bucket"], r["output"])
        if key not in out or r["rel_l2"] > out[key]["rel_l2"] or not r["finite"]:
            out[key] = r
    return list(out.values())
