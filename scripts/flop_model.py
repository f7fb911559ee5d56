"""The FLOP model's end-to-end speedup (topi_export/method/cost.py) at full size: FLUX.1 Kontext [dev] (57 blocks,
width 3072, L0 = 10, 512 text + a 1024x1024 target = 4096 tokens + 4096 tokens per reference), 28 steps, dT = 10,
per prune ratio, reference count and number of reused steps, with the pruning residual or not (one more pruned
call per anchor). A prediction, not a measurement. Usage:

    python scripts/flop_model.py --ratios 0.5,0.7 --references 1,3 --reused 0,8,12,16 [--residual] [--json out.json]
"""
from __future__ import annotations

import argparse
import json


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", default="0.5,0.7")
    ap.add_argument("--references", default="1,3")
    ap.add_argument("--reused", default="0,8,12,16")
    ap.add_argument("--layers", type=int, default=57)
    ap.add_argument("--prune-start", type=int, default=10)
    ap.add_argument("--width", type=int, default=3072)
    ap.add_argument("--text", type=int, default=512)
    ap.add_argument("--grid", type=int, default=64, help="target and reference grid side in tokens")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--update-interval", type=int, default=10)
    ap.add_argument("--residual", action="store_true", help="every anchor also runs the pruned graph")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from topi_export.method.cost import predicted_end_to_end
    from topi_export.plan import Layout, keep_count

    rows = []
    for refs in (int(v) for v in args.references.split(",")):
        layout = Layout(args.text, (args.grid, args.grid), ((args.grid, args.grid),) * refs)
        for ratio in (float(v) for v in args.ratios.split(",")):
            keep = keep_count(ratio, layout.num_ctx)
            for reused in (int(v) for v in args.reused.split(",")):
                s = predicted_end_to_end(layout, keep, args.layers, args.prune_start, args.width, args.steps,
                                         args.update_interval, reused, residual=args.residual)
                rows.append({"references": refs, "ratio": ratio, "reused": reused, "residual": args.residual,
                             "speedup": s})
                print(f"{refs} reference(s), ratio {ratio:g}, {reused:2d} of {args.steps} steps reused: "
                      f"{s:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
