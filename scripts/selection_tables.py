#!/usr/bin/env python3
"""Markdown tables of `topi-export bench` policy reports (docs/benchmarks.md, section 2): per report, one row per
policy, one column per ratio, "mean (per-sample minimum)" PSNR vs the unpruned run (and, with --truth, vs the ground
truth), then the default policy's targets: mean >= the best influence-free baseline (uniform, dither, random),
mean >= plain top-k - 1 dB, per-sample minimum >= uniform's minimum - 1 dB.

    python scripts/selection_tables.py docs/results/bench_flux2_pick_policies.json ...
"""
from __future__ import annotations

import argparse
import json

BASELINES = ("uniform", "dither", "random")
ORDER = ("topi-mix", "topi-budget", "topi", "topi-cov", "uniform", "dither", "random")


def rows_of(report):
    out = {}
    for r in report["results"]:
        if "tau" in r:
            continue
        out[(r["policy"], r["ratio"])] = r
    return out


def table(report, truth=False) -> str:
    rows = rows_of(report)
    ratios = sorted({ratio for _, ratio in rows})
    pols = [p for p in ORDER if any((p, r) in rows for r in ratios)]
    pols += sorted({p for p, _ in rows} - set(pols))
    key, low = ("psnr_gt_db", "psnr_gt_db_min") if truth else ("psnr_db", "psnr_db_min")
    best = {r: max(rows[(p, r)][key] for p in pols if (p, r) in rows) for r in ratios}
    head = "| policy | " + " | ".join(f"ratio {r:g}" for r in ratios) + " |"
    lines = [head, "|" + "---|" * (len(ratios) + 1)]
    for p in pols:
        cells = []
        for r in ratios:
            x = rows.get((p, r))
            if x is None:
                cells.append("-")
                continue
            text = f"{x[key]:.2f} ({x[low]:.2f})"
            cells.append(f"**{text}**" if x[key] == best[r] else text)
        name = f"`{p}`" + (" (default)" if p == report["default_policy"] else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(report) -> str:
    rows = rows_of(report)
    d = report["default_policy"]
    ratios = sorted({ratio for _, ratio in rows})
    lines = ["| ratio | mean vs best influence-free | mean vs top-k - 1 dB | min vs uniform min - 1 dB |",
             "|---|---|---|---|"]
    for r in ratios:
        m = rows[(d, r)]
        base = max((rows[(b, r)] for b in BASELINES if (b, r) in rows), key=lambda x: x["psnr_db"])
        top = rows[("topi", r)]
        uni = rows[("uniform", r)]
        c1 = m["psnr_db"] >= base["psnr_db"]
        c2 = m["psnr_db"] >= top["psnr_db"] - 1
        c3 = m["psnr_db_min"] >= uni["psnr_db_min"] - 1
        lines.append(f"| {r:g} | {m['psnr_db']:.2f} vs {base['psnr_db']:.2f} ({base['policy']}): "
                     f"{'met' if c1 else '**missed**'} ({m['psnr_db'] - base['psnr_db']:+.2f}) | "
                     f"{m['psnr_db']:.2f} vs {top['psnr_db']:.2f}: {'met' if c2 else '**missed**'} "
                     f"({m['psnr_db'] - top['psnr_db']:+.2f}) | {m['psnr_db_min']:.2f} vs {uni['psnr_db_min']:.2f}: "
                     f"{'met' if c3 else '**missed**'} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reports", nargs="+")
    p.add_argument("--truth", action="store_true", help="also the tables vs the ground truth")
    args = p.parse_args(argv)
    for path in args.reports:
        report = json.load(open(path))
        print(f"### {path}: {report['model']}, method {report['method']['source']}\n")
        print(table(report))
        if args.truth:
            print("\nvs truth:\n")
            print(table(report, truth=True))
        print("\ntargets of the default policy:\n")
        print(targets(report))
        print()


if __name__ == "__main__":
    main()
