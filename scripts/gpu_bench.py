"""GPU step timings of the PyTorch CUDA path (bf16, SDPA, fused Triton influence kernels) at FULL FLUX.1 Kontext
size: diffusers FluxTransformer2DModel with the [dev] config (19 double + 38 single blocks, 24 heads x 128, 11.9 B
parameters), random weights (normal, std 0.02; norms 1), 1024x1024 target with 1 and 3 references of 1024x1024
(512 text + 4096 target + 4096 per reference tokens), the published ToPi setting (pivotal {13, 18, 31}, L0 = 10).

Per layout: the dense step (the plain model), the anchor step (velocity + influence), pruned steps at ratios 0.5
and 0.7 (CUDA events, median of --reps after warm-up), the FLOP model's prediction, and the end-to-end speedup of
a 28-step schedule with dT = 10 (3 anchors + 25 pruned steps vs 28 dense steps) computed from those step times.

    python3 scripts/gpu_bench.py --json gpu_bench.json          # on a CUDA GPU with >= 40 GB
    python3 scripts/gpu_bench.py --tiny --device cpu            # logic check on CPU
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from topi_export.method.cost import predicted_end_to_end, predicted_speedup  # noqa: E402
from topi_export.models.flux_kontext import FluxKontext, tiny_config  # noqa: E402
from topi_export.plan import Layout, keep_count  # noqa: E402

KONTEXT_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                   num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                   axes_dims_rope=(16, 56, 56))


def timer(device):
    def run(fn, reps, warmup=1):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if device == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1000)
        return statistics.median(times)
    return run


def make_model(config, device, dtype):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return torch.nn.Module.to(model, dtype).eval().requires_grad_(False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny config and shapes (logic check)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--refs", default="1,3")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = tiny_config() if args.tiny else KONTEXT_DEV
    t0 = time.perf_counter()
    model = make_model(config, device, dtype)
    family = FluxKontext(config, model)
    if device == "cuda":
        from topi_export.backends.torch import use_cuda_kernels

        kernels = use_cuda_kernels()
    else:
        kernels = False
    n_params = sum(p.numel() for p in model.parameters())
    settings = family.default_settings()
    grid, text = ((8, 8), 8) if args.tiny else ((64, 64), 512)
    run = timer(device)
    report = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
              "dtype": str(dtype).replace("torch.", ""), "fused_kernels": kernels, "params": n_params,
              "config": config, "settings": settings.to_json(), "init_s": time.perf_counter() - t0, "layouts": []}
    print(f"model {n_params / 1e9:.2f} B params on {report['device']} ({report['init_s']:.1f} s)", flush=True)
    for n_refs in (int(v) for v in args.refs.split(",")):
        layout = Layout(text, grid, (grid,) * n_refs)
        data = family.synthetic_inputs(layout, 0)
        cond = {k: v.to(device) for k, v in family.conditioning(data).items()}
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(1, layout.num_target, family.in_channels, generator=gen).to(device, dtype)
        ctx = data.reference_latents.to(device, dtype)
        t = torch.tensor([0.7], device=device)
        nc, nx = layout.num_ctx, layout.num_target
        all_q = torch.arange(nx, device=device)

        def step(**kw):
            with torch.inference_mode():
                return family.forward(x, ctx, t, cond, **kw)

        row = {"layout": layout.describe(), "references": n_refs, "tokens": layout.num_tokens}
        row["dense_ms"] = run(lambda: step(), args.reps)
        row["anchor_ms"] = run(lambda: step(score_idx=all_q, influence_layers=settings.pivotal_layers), args.reps)
        _, infl = step(score_idx=all_q, influence_layers=settings.pivotal_layers)
        row["influence_finite"] = bool(torch.isfinite(infl).all())
        row["pruned"] = []
        for ratio in (0.5, 0.7):
            keep = keep_count(ratio, nc)
            idx = infl[0].float().topk(keep).indices.sort().values
            ms = run(lambda: step(keep_idx=idx, prune_start=settings.prune_start), args.reps)
            flop = predicted_speedup(layout, keep, family.num_layers, settings.prune_start, family.width)
            e2e = (28 * row["dense_ms"]) / (3 * row["anchor_ms"] + 25 * ms)
            e2e_flop = predicted_end_to_end(layout, keep, family.num_layers, settings.prune_start, family.width, 28, 10)
            row["pruned"].append({"ratio": ratio, "keep": keep, "ms": ms, "step_speedup": row["dense_ms"] / ms,
                                  "flop_step_speedup": flop, "e2e_28_steps_dT10": e2e, "flop_e2e": e2e_flop})
        row["influence_overhead"] = row["anchor_ms"] / row["dense_ms"] - 1
        if device == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        report["layouts"].append(row)
        print(json.dumps(row), flush=True)
    print(f"{'layout':34} {'dense':>8} {'anchor':>8} {'r0.5':>8} {'r0.7':>8} {'e2e0.5':>7} {'e2e0.7':>7}")
    for r in report["layouts"]:
        p5, p7 = r["pruned"]
        print(f"{r['layout']:34} {r['dense_ms']:8.1f} {r['anchor_ms']:8.1f} {p5['ms']:8.1f} {p7['ms']:8.1f} "
              f"{p5['e2e_28_steps_dT10']:6.2f}x {p7['e2e_28_steps_dT10']:6.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
