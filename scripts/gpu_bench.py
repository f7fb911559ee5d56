"""GPU step timings of the PyTorch CUDA path (bf16, SDPA) at FLUX.1 Kontext width.

Model: diffusers FluxTransformer2DModel, 24 heads x 128 dims, reduced depth (2 double + 4 single blocks),
random seeded weights. Shapes: 512 text + 64x64 target + 64x64 reference tokens (1024x1024 Kontext).
Times (CUDA events, median): full step, pruned steps per ratio, anchor step with the materialised
(chunked PyTorch) influence vs the fused Triton kernel, and a 28-step loop (dT = 10) at ratio 0.5 vs
unpruned. Also the FLOP-predicted speedup of each pruned step. Usage:

    python3 scripts/gpu_bench.py --json gpu_bench.json          # on a CUDA GPU
    python3 scripts/gpu_bench.py --tiny --device cpu            # logic check on CPU
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from topi_export.method import keep_count  # noqa: E402
from topi_export.method.cost import step_flops  # noqa: E402
from topi_export.method.defaults import scaled_defaults  # noqa: E402
from topi_export.models import FluxKontextAdapter, Layout, kontext_ids  # noqa: E402
from topi_export.runtime.loop import make_scheduler  # noqa: E402


def timer(device):
    if device == "cuda":
        def run(fn, reps, warmup=3):
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            return statistics.median(times)
    else:
        def run(fn, reps, warmup=1):
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1000)
            return statistics.median(times)
    return run


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="small shapes for a CPU logic check")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from diffusers import FluxTransformer2DModel

    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    if args.tiny:
        cfg = dict(in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=16, num_attention_heads=2,
                   joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
        layout = Layout(8, (8, 8), (8, 8))
    else:
        cfg = dict(in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128, num_attention_heads=24,
                   joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                   axes_dims_rope=(16, 56, 56))
        layout = Layout(512, (64, 64), (64, 64))
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**cfg).to(dev, dtype).eval()
    adapter = FluxKontextAdapter(model)
    s = scaled_defaults(adapter.num_layers)
    pivotal, l0 = tuple(s["pivotal_layers"]), s["prune_start"]
    g = torch.Generator().manual_seed(0)
    txt, img = kontext_ids(layout)
    hid = torch.randn(1, layout.num_target + layout.num_ctx, cfg["in_channels"], generator=g).to(dev, dtype)
    enc = torch.randn(1, layout.text_tokens, cfg["joint_attention_dim"], generator=g).to(dev, dtype)
    pooled = torch.randn(1, cfg["pooled_projection_dim"], generator=g).to(dev, dtype)
    t = torch.tensor([0.7], device=dev, dtype=dtype)
    guid = torch.tensor([2.5], device=dev, dtype=dtype)
    txt, img = txt.to(dev), img.to(dev)
    nx = layout.num_target
    run = timer(dev)

    def fwd(latents=None, **kw):
        h = hid if latents is None else torch.cat([latents, hid[:, nx:]], 1)
        return adapter.forward(h, enc, pooled, t, img, txt, guid, num_target=nx, **kw)

    results = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
               "dtype": str(dtype), "config": cfg, "layout": layout.describe(), "pivotal_layers": list(pivotal),
               "prune_start": l0, "steps_ms": {}}
    with torch.inference_mode():
        full_ms = run(lambda: fwd(), args.reps)
        results["steps_ms"]["full"] = full_ms
        depth, width = cfg["num_layers"] + cfg["num_single_layers"], cfg["num_attention_heads"] * cfg["attention_head_dim"]
        f_full = step_flops(layout, layout.num_ctx, depth, l0, width)
        results["pruned"] = []
        for ratio in (0.3, 0.5):
            keep = keep_count(ratio, layout.num_ctx)
            idx = torch.randperm(layout.num_ctx, generator=g)[:keep].sort().values.to(dev)
            ms = run(lambda: fwd(keep_idx=idx, prune_layer=l0), args.reps)
            f = step_flops(layout, keep, depth, l0, width)
            results["pruned"].append({"ratio": ratio, "keep": keep, "ms": ms, "speedup": full_ms / ms,
                                      "flop_speedup": f_full / f, "efficiency": (full_ms / ms) / (f_full / f)})
        anchor_ref = run(lambda: fwd(influence_layers=pivotal), args.reps)
        v_ref, i_ref = fwd(influence_layers=pivotal)
        results["steps_ms"]["anchor_materialised"] = anchor_ref
        if dev == "cuda":
            from plugins.torch_kernels import register_torch_cuda_kernels

            register_torch_cuda_kernels()
            anchor_fused = run(lambda: fwd(influence_layers=pivotal), args.reps)
            v_f, i_f = fwd(influence_layers=pivotal)
            rel = float((i_f.float() - i_ref.float()).norm() / i_ref.float().norm())
            results["steps_ms"]["anchor_fused"] = anchor_fused
            results["fused_vs_materialised_influence_rel_l2"] = rel
            if not math.isfinite(rel) or rel > 2e-2:
                raise SystemExit(f"fused influence differs from the reference: rel L2 {rel}")
            anchor_ms = anchor_fused
        else:
            anchor_ms = anchor_ref
        results["influence_overhead"] = anchor_ms / full_ms - 1

        # 28-step loops (dT = 10): unpruned vs ToPi at ratio 0.5 (top-k by influence)
        def loop(ratio):
            sched = make_scheduler(28, nx)
            lat = torch.randn(1, nx, cfg["in_channels"], generator=torch.Generator().manual_seed(1)).to(dev, dtype)
            keep_idx = None
            for i, ts in enumerate(sched.timesteps):
                tt = (ts / 1000).reshape(1).to(dev, dtype)
                h = torch.cat([lat, hid[:, nx:]], 1)
                kw = dict(num_target=nx)
                if ratio and i % 10 == 0:
                    v, infl = adapter.forward(h, enc, pooled, tt, img, txt, guid, influence_layers=pivotal, **kw)
                    keep_idx = infl[0].float().topk(keep_count(ratio, layout.num_ctx)).indices.sort().values
                elif ratio:
                    v, _ = adapter.forward(h, enc, pooled, tt, img, txt, guid, keep_idx=keep_idx, prune_layer=l0, **kw)
                else:
                    v, _ = adapter.forward(h, enc, pooled, tt, img, txt, guid, **kw)
                lat = sched.step(v.float(), ts, lat.float(), return_dict=False)[0].to(dtype)
            return lat

        e2e_full = run(lambda: loop(0.0), 3, warmup=1)
        e2e_topi = run(lambda: loop(0.5), 3, warmup=1)
        a, b = loop(0.0).float(), loop(0.5).float()
        rng = float(a.max() - a.min())
        results["e2e_28_steps_ms"] = {"full": e2e_full, "topi_0.5": e2e_topi, "speedup": e2e_full / e2e_topi,
                                      "psnr_db_vs_full": 10 * math.log10(rng ** 2 / float(((a - b) ** 2).mean()))}
    print(json.dumps(results, indent=2))
    print(f"\n{results['device']}  {results['layout']}  {dtype}")
    print(f"full step           {full_ms:9.2f} ms")
    for r in results["pruned"]:
        print(f"pruned r={r['ratio']} k={r['keep']:5d} {r['ms']:9.2f} ms  speedup {r['speedup']:.2f}x "
              f"(FLOP model {r['flop_speedup']:.2f}x, efficiency {r['efficiency']:.0%})")
    for k, v in results["steps_ms"].items():
        if k.startswith("anchor"):
            print(f"{k:19} {v:9.2f} ms  ({v / full_ms - 1:+.1%} vs full)")
    e = results["e2e_28_steps_ms"]
    print(f"28 steps dT=10 r=0.5 {e['topi_0.5']:.1f} ms vs {e['full']:.1f} ms: {e['speedup']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
