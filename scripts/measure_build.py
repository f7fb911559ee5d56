"""Build cost at FLUX.1 width: peak RAM, time and engine-directory bytes against the weight bytes.

Saves a diffusers FluxTransformer2DModel at FLUX.1 width (24 heads x 128, joint 4096, pooled 768) with reduced
depth (default 1 double + 2 single blocks, 0.69 B parameters) and seeded random weights, in the precision of the
build, then runs `topi-export build` on it in a child process and reports the child's peak resident memory
(ru_maxrss), the wall time, and the bytes of the engine directory, each against the weight bytes at the build
precision. Usage:

    python scripts/measure_build.py --backend onnxruntime --precision fp32 --json build_ort.json
    python scripts/measure_build.py --backend tensorrt-rtx --precision bf16 --json build_rtx.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

WIDTH = dict(patch_size=1, in_channels=64, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
             pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def save_model(path: Path, double: int, single: int, precision: str) -> int:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**WIDTH, num_layers=double, num_single_layers=single)
    model = torch.nn.Module.to(model, DTYPES[precision])
    model.save_pretrained(path, safe_serialization=True)
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    return n


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--target-grid", default="16x16")
    ap.add_argument("--text-tokens", default="32")
    ap.add_argument("--json", default=None)
    ap.add_argument("--workdir", default=None, help="where the model and engines go (default: a temporary dir)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="measure-build-"))
    model_dir = work / "model"
    weight_bytes = save_model(model_dir, args.double, args.single, args.precision)
    engine_dir = work / "engines"
    cmd = [sys.executable, "-m", "topi_export.cli", "build", "--model", str(model_dir), "--backend", args.backend,
           "--precision", args.precision, "--ratio-buckets", "0.5", "--target-grid", args.target_grid,
           "--text-tokens", args.text_tokens, "--engine-dir", str(engine_dir), "--force"]
    if args.backend == "tensorrt-rtx":
        cmd += ["--compute-capability", "SM89"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kB on Linux
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(proc.returncode)
    engine_bytes = dir_bytes(engine_dir)
    report = {"backend": args.backend, "precision": args.precision, "layers": [args.double, args.single],
              "weight_bytes": weight_bytes, "peak_rss_bytes": peak, "peak_over_weights": peak / weight_bytes,
              "engine_dir_bytes": engine_bytes, "engine_dir_over_weights": engine_bytes / weight_bytes,
              "build_s": wall, "cpus": os.cpu_count(), "command": " ".join(cmd[2:]),
              "files": {str(p.relative_to(engine_dir)): p.stat().st_size for p in sorted(engine_dir.rglob("*"))
                        if p.is_file()}}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
