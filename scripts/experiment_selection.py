#!/usr/bin/env python3
"""Selection-policy experiments (docs/benchmarks.md, section 2): PSNR of the final latents against the unpruned run
(and the ground truth) for every (policy, ratio) on a model's samples, calibrated or not, like ``topi-export bench
--backend torch`` but with the unpruned runs cached across invocations and the anchors' influence vectors saved
(``--dump``), so that candidate rules can be compared offline and then measured end to end.

    python scripts/experiment_selection.py --model kontext-digits --calibration none --ratios 0.3,0.5,0.7 \
        --policies topi,uniform,topi-budget --json /tmp/sel/kd_none.json

``--extra FILE.py`` imports a file that may add candidate policies to ``topi_export.method.selection.POLICIES``.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import time
from pathlib import Path

import torch


def load_extra(path):
    spec = importlib.util.spec_from_file_location("extra_policies", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--calibration", default=None, help="profile path, 'none', or omitted (shipped profile)")
    p.add_argument("--inputs", nargs="*", default=None, help="inputs files (default: the model's samples)")
    p.add_argument("--ratios", default="0.3,0.5,0.7")
    p.add_argument("--policies", default="topi-budget,topi,uniform,random")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--update-interval", type=int, default=10)
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--extra", default=None, help="a Python file registering candidate policies")
    p.add_argument("--cache", default="/tmp/sel/cache", help="directory of cached unpruned runs")
    p.add_argument("--dump", default=None, help="save every anchor's influence here (torch .pt)")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from topi_export.method import selection as S
    from topi_export.artifacts import inputs as I
    from topi_export.runtime.loop import psnr
    from topi_export.runtime.session import open_session

    if args.extra:
        load_extra(args.extra)
    session = open_session(model=args.model, calibration=args.calibration)
    files = args.inputs or [str(f) for f in I.sample_files(session.source)]
    files = files[:args.samples] if args.samples else files
    ratios = [float(r) for r in args.ratios.split(",")]
    policies = [S.check_policy(x.strip()) for x in args.policies.split(",") if x.strip()]
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    dumps = []
    rows = {}
    t0 = time.time()
    for i, f in enumerate(files):
        data = I.load_inputs(f, session.family)
        key = hashlib.sha256(f"{session.identity.weights_hash}|{Path(f).resolve()}|{args.steps}".encode()).hexdigest()[:16]
        cpath = cache / f"{key}.pt"
        if cpath.exists():
            dense = torch.load(cpath)
        else:
            dense = session.denoise(data, steps=args.steps, mode="dense").latents
            torch.save(dense, cpath)
        truth = data.target_latents
        for policy in policies:
            for ratio in ratios:
                sel = session.selector(data, ratio=ratio, policy=policy)
                seen = []
                orig = sel.select

                def select(influence, step=0, _orig=orig, _seen=seen):
                    _seen.append((step, influence.clone()))
                    return _orig(influence, step)

                object.__setattr__(sel, "select", select)
                res = session.denoise(data, steps=args.steps, selector=sel, update_interval=args.update_interval)
                row = rows.setdefault((policy, ratio), {"policy": policy, "ratio": ratio, "psnr": [], "psnr_gt": []})
                row["psnr"].append(psnr(res.latents, dense))
                if truth is not None:
                    row["psnr_gt"].append(psnr(res.latents, truth))
                if args.dump:
                    dumps.append({"sample": i, "file": f, "policy": policy, "ratio": ratio,
                                  "grids": data.layout.ref_grids,
                                  "anchors": [(s, v) for s, v in seen], "kept": res.kept})
        print(f"sample {i} done ({time.time() - t0:.0f} s)", flush=True)
    out = []
    for row in rows.values():
        r = dict(row)
        r["mean"] = sum(r["psnr"]) / len(r["psnr"])
        r["min"] = min(r["psnr"])
        if r["psnr_gt"]:
            r["gt_mean"] = sum(r["psnr_gt"]) / len(r["psnr_gt"])
            r["gt_min"] = min(r["psnr_gt"])
        out.append(r)
    report = {"model": args.model, "calibration": args.calibration, "method": session.settings.to_json(),
              "steps": args.steps, "update_interval": args.update_interval, "files": files, "results": out}
    Path(args.json).write_text(json.dumps(report, indent=1, allow_nan=True))
    if args.dump:
        torch.save(dumps, args.dump)
    for ratio in ratios:
        line = [f"{ratio}:"]
        for r in sorted((r for r in out if r["ratio"] == ratio), key=lambda r: -r["mean"]):
            line.append(f"{r['policy']} {r['mean']:.2f} ({r['min']:.2f})")
        print("  ".join(line))


if __name__ == "__main__":
    main()
