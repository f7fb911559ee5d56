"""Experiment (not shipped): mass-preserving attention on top of a selection policy.

Each pruned context token is assigned to its nearest kept token of the same reference (grid distance); in the
pruned layers every kept key then counts n_j times in the softmax (n_j = the tokens it stands for), i.e. its
logits get a log(n_j) bias, as proportional attention in token merging. Measured here exactly, by repeating the
kept keys/values n_j times inside the attention hook (PyTorch path only; it restores the key count, so it shows the
fidelity, not the speed). Shipping it would add a key-bias input to the topi graph and every backend.

    python3 scripts/experiment_merge_bias.py --model kontext-digits --ratio 0.5
    python3 scripts/experiment_merge_bias.py --model flux2-pick --ratio 0.5
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import topi_export.models.base as base  # noqa: E402
from topi_export.artifacts.inputs import load_inputs, sample_files  # noqa: E402
from topi_export.runtime.loop import psnr  # noqa: E402
from topi_export.runtime.session import open_session  # noqa: E402

STATE = {"counts": None}
_hook_call = base.AttentionHook.__call__


def hook_call(self, q, k, v):
    q, k, v = _hook_call(self, q, k, v)
    counts = STATE["counts"]
    x_end = self.n_text + self.n_target
    if counts is not None and k.shape[2] - x_end == counts.numel():  # a pruned layer: repeat kept keys n_j times
        k = torch.cat([k[:, :, :x_end], k[:, :, x_end:].repeat_interleave(counts, dim=2)], dim=2)
        v = torch.cat([v[:, :, :x_end], v[:, :, x_end:].repeat_interleave(counts, dim=2)], dim=2)
    return q, k, v


def merge_counts(keep_idx, grids):
    """n_j: how many context tokens (itself included) each kept token stands for, per reference."""
    counts = torch.zeros(len(keep_idx), dtype=torch.long)
    start = 0
    for h, w in grids:
        n = h * w
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        pos = torch.stack([yy.flatten(), xx.flatten()], 1).float()
        mine = ((keep_idx >= start) & (keep_idx < start + n)).nonzero().flatten()
        if len(mine):
            nearest = torch.cdist(pos, pos[keep_idx[mine] - start]).argmin(1)
            counts[mine] += torch.bincount(nearest, minlength=len(mine))
        start += n
    return counts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="kontext-digits")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--policies", default="topi-budget,topi,uniform,random")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    base.AttentionHook.__call__ = hook_call
    session = open_session(model=args.model)
    files = sample_files(args.model)
    data = [load_inputs(f, session.family) for f in files]
    fulls = [session.denoise(d, steps=args.steps, mode="dense") for d in data]
    engine = session.engine
    plain_pruned = type(engine).pruned

    def pruned(self, latents, timestep, keep_idx):
        STATE["counts"] = merge_counts(keep_idx, self.layout.ref_grids) if STATE.get("merge") else None
        try:
            return plain_pruned(self, latents, timestep, keep_idx)
        finally:
            STATE["counts"] = None

    type(engine).pruned = pruned
    rows = []
    print("policy       merge  PSNR vs unpruned (min)  PSNR vs truth")
    for policy in args.policies.split(","):
        for merge in (False, True):
            STATE["merge"] = merge
            ps, gt = [], []
            for d, full in zip(data, fulls):
                r = session.denoise(d, steps=args.steps, selector=session.selector(d, ratio=args.ratio, policy=policy))
                ps.append(psnr(r.latents, full.latents))
                gt.append(psnr(r.latents, d.target_latents))
            rows.append({"policy": policy, "merge": merge, "psnr_db": sum(ps) / len(ps), "psnr_db_min": min(ps),
                         "psnr_truth_db": sum(gt) / len(gt)})
            print(f"{policy:12} {str(merge):6} {rows[-1]['psnr_db']:6.2f} ({min(ps):5.2f})          "
                  f"{rows[-1]['psnr_truth_db']:6.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "ratio": args.ratio, "samples": len(data),
                                               "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
