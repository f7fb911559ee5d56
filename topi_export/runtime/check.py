"""Per-step comparison of built engines against the PyTorch reference (``topi-export check``): anchor (velocity
and influence), the unpruned step, every bucket's pruned step at every built layout, and the dense baseline.
Works for every backend through the StepEngine interface."""
from __future__ import annotations

import torch

from topi_export.plan.results import CheckRow
from topi_export.runtime.loop import rel_l2

TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}


def compare_engines(session, reference, data_per_layout, *, seed=0, trials=2):
    """CheckRows (plan/results.py), the worst trial of each (layout, graph, bucket, output)."""
    gen = torch.Generator().manual_seed(seed)
    m = session.manifest
    rows = []
    for li, data in enumerate(data_per_layout):
        family = session.family
        cond = family.conditioning(data, data.layout)
        b = family.branches(data)
        for engine in (session.engine, reference.engine):
            engine.bind(cond, data.reference_latents, data.layout)
        nc, name = data.layout.num_ctx, data.layout.describe()
        with torch.inference_mode():
            for _ in range(trials):
                x = torch.randn(1, data.layout.num_target, data.channels, generator=gen).expand(b, -1, -1).contiguous()
                t = (torch.rand(1, generator=gen) * 0.9 + 0.05).expand(b).contiguous()
                got_v, got_i = session.engine.anchor(x, t)
                ref_v, ref_i = reference.engine.anchor(x, t)
                rows.append(_row(name, "anchor", None, nc, "velocity", got_v, ref_v))
                rows.append(_row(name, "anchor", None, nc, "influence", got_i, ref_i))
                rows.append(_row(name, "full", None, nc, "velocity", session.engine.full(x, t),
                                 reference.engine.full(x, t)))
                for p in m.profiles:
                    if p.layout != li or p.ratio == 0:
                        continue
                    idx = torch.randperm(nc, generator=gen)[:p.keep].sort().values
                    rows.append(_row(name, "pruned", p.ratio, p.keep, "velocity", session.engine.pruned(x, t, idx),
                                     reference.engine.pruned(x, t, idx)))
                if session.engine.has_dense:
                    rows.append(_row(name, "dense", None, nc, "velocity", session.engine.dense(x, t),
                                     reference.engine.dense(x, t)))
    return _worst(rows)


def _row(layout, graph, bucket, keep, output, got, ref):
    got, ref = got.detach().float().cpu(), ref.detach().float().cpu()
    return CheckRow(layout, graph, bucket, keep, output, float((got - ref).abs().max()), rel_l2(got, ref),
                    bool(torch.isfinite(got).all()))


def _worst(rows):
    out = {}
    for r in rows:
        key = (r.layout, r.graph, r.bucket, r.output)
        if key not in out or r.rel_l2 > out[key].rel_l2 or not r.finite:
            out[key] = r
    return list(out.values())
