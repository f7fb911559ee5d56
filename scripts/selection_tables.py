#!/usr/bin/env python3
"""Markdown tables of `topi-export bench` policy reports (docs/benchmarks.md, section 2): per report, one row per
policy, one column per ratio, "mean (per-sample minimum)" PSNR vs the unpruned run (and, with --truth, vs the ground
truth), then the default policy's targets: mean >= the best influence-free baseline (uniform, dither, random),
mean >= plain top-k - 1 dB, per-sample minimum >= uniform's minimum - 1 dB.

    python scripts/selection_tables.py docs/results/bench_flux2_pick_policies.json ...

A report given as A.json+B.json is the union of the rows of A and B (B's row wins where both measured a policy at a
ratio): reports of the same model, inputs and method setting measured at different times, e.g. a new policy next to
the baselines measured before. Reports of scripts/experiment_selection.py (rows with mean/min) are read too.
"""
from __future__ import annotations

import argparse
import json

BASELINES = ("uniform", "dither", "random")
ORDER = ("topi-mix", "topi-budget", "topi", "topi-cov", "uniform", "dither", "random")


def _bench_row(r) -> dict:
    """A row of scripts/experiment_selection.py as bench writes it."""
    if "psnr_db" in r:
        return r
    return {"policy": r["policy"], "ratio": r["ratio"], "psnr_db": r["mean"], "psnr_db_min": r["min"],
            "psnr_gt_db": r.get("gt_mean"), "psnr_gt_db_min": r.get("gt_min")}


def rows_of(report):
    out = {}
    for r in report["results"]:
        if "tau" in r or (r.get("reuse") not in (None, "off", "default")):
            continue
        out[(r["policy"], r["ratio"])] = _bench_row(r)
    return out


def load(spec: str) -> dict:
    """One report, or the union of several joined by '+' (the same model and method setting; later rows win)."""
    from topi_export.method.selection import DEFAULT_POLICY

    reports = [json.load(open(path)) for path in spec.split("+")]
    first = reports[0]
    for other in reports[1:]:
        for key in ("pivotal_layers", "prune_start", "update_interval"):
            if other["method"][key] != first["method"][key]:
                raise SystemExit(f"error: {spec}: the reports differ in {key}; join only reports of one setting")
    rows = {}
    for rep in reports:
        rows.update(rows_of(rep))
    return dict(first, results=list(rows.values()), default_policy=DEFAULT_POLICY, sources=spec.split("+"))


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
        if (d, r) not in rows or ("topi", r) not in rows or ("uniform", r) not in rows:
            lines.append(f"| {r:g} | - | - | - |")  # the default, top-k or uniform not measured here
            continue
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
        report = load(path)
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
