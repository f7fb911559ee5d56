"""How the step-reuse budget or threshold (method/reuse.py) trades computed steps for fidelity on a model: for each
budget in dB (a rollout criterion, profiles from schema 4) or threshold (a schema-3 velocity criterion), and max run
length, the steps `auto` reuses and the PSNR of the final latents against the run without reuse
(same ratio, policy and noise) and against the ground truth, mean and per-sample minimum. PyTorch backend, the
model's shipped samples and calibration profile (which must hold a reuse criterion). Usage:

    python scripts/reuse_threshold_sweep.py --model flux2-pick --budgets 35,40,45,50 --json out.json
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--calibration", default=None, help="profile with a reuse criterion (default: the shipped one)")
    ap.add_argument("--thresholds", default="0.05,0.1,0.2,0.3", help="velocity criterion (schema 3)")
    ap.add_argument("--budgets", default="35,40,45,50", help="rollout criterion: PSNR budgets in dB")
    ap.add_argument("--max-consecutive", default="2")
    ap.add_argument("--orders", default="0,1")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from topi_export import open_session
    from topi_export.artifacts.inputs import load_inputs, sample_files
    from topi_export.method.reuse import budget_error, plan_reuse
    from topi_export.runtime.loop import psnr, schedule_sigmas

    s = open_session(model=args.model, calibration=args.calibration)
    crit = s.settings.reuse
    if crit is None:
        raise SystemExit(f"{args.model}: its profile holds no reuse criterion: run topi-export calibrate on it")
    data = [load_inputs(f, s.family) for f in sample_files(args.model)[:args.samples]]
    dt = s.settings.update_interval
    rows = []
    base = []
    for d in data:
        sel = s.selector(d, ratio=args.ratio)
        base.append(s.denoise(d, steps=args.steps, selector=sel))
    for order in (int(v) for v in args.orders.split(",")):
        for k in (int(v) for v in args.max_consecutive.split(",")):
            rollout = crit.measure == "rollout"
            for th in (float(v) for v in (args.budgets if rollout else args.thresholds).split(",")):
                c = replace(crit, threshold=budget_error(th) if rollout else th, max_consecutive=k)
                ps, pg, reused = [], [], []
                for d, b in zip(data, base):
                    sigmas = schedule_sigmas(s.family, args.steps, d.layout, s.scheduler_config)
                    plan = plan_reuse("auto", order, sigmas, range(0, args.steps, dt), c, source="sweep")
                    out = s.denoise(d, steps=args.steps, selector=s.selector(d, ratio=args.ratio), reuse=plan)
                    ps.append(psnr(out.latents, b.latents))
                    if d.target_latents is not None:
                        pg.append(psnr(out.latents, d.target_latents))
                    reused.append(len(plan.steps))
                row = {"order": order, "budget_db" if rollout else "threshold": th, "max_consecutive": k, "reused": sum(reused) / len(reused),
                       "psnr_vs_no_reuse": sum(ps) / len(ps), "psnr_vs_no_reuse_min": min(ps),
                       "psnr_vs_truth": sum(pg) / len(pg) if pg else None, "psnr_vs_truth_min": min(pg) if pg else None}
                rows.append(row)
                print(json.dumps(row), flush=True)
    truth = [psnr(b.latents, d.target_latents) for d, b in zip(data, base) if d.target_latents is not None]
    out = {"model": args.model, "ratio": args.ratio, "steps": args.steps, "samples": len(data),
           "no_reuse_vs_truth": sum(truth) / len(truth) if truth else None, "rows": rows}
    print(json.dumps({"no_reuse_vs_truth": out["no_reuse_vs_truth"]}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
