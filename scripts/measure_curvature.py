#!/usr/bin/env python3
"""How curved are a model's sampling trajectories? Step reuse (no pruning) against the normal run.

For each model and each of its shipped held-out samples (``topi_export.artifacts.inputs.sample_files``), with the
project's own runtime (``open_session``, ``session.denoise`` at ratio 0: every computed step unpruned):

- the normal N-step run (every step computes the velocity), and runs that REUSE the previous step's velocity
  (zero order, no model call) at the steps of each ``--reuse`` pattern (default: every other step between steps
  3 and 26, i.e. at 3, 5, ..., 25 and, second pattern, at 4, 6, ..., 26; 16 of 28 steps computed); the PSNR of
  each reuse run's final latents against the normal run's, as ``run --compare`` computes it
  (``runtime.loop.psnr``: range of the reference run squared over the MSE, all latent channels). A straight flow
  (constant velocity along the trajectory) loses nothing to reuse; a curved one does.

Reused steps are the runtime's own ``reuse`` step kind (zero order). ``--reuse auto`` adds a column with each
model's calibrated ``auto`` plan (its profile's criterion at these steps, dT = 10), the steps it chose and the PSNR it
predicted next to the one measured; ``--reuse auto:DB`` the plan its criterion makes under a budget of DB dB. Where a
sample has its ground truth (``target_latents``), every run's PSNR against the truth is measured too. Prints the
tables and writes JSON.

    python scripts/measure_curvature.py                   # kontext-digits, flux2-pick, kontext-canvas, kontext-texture
    python scripts/measure_curvature.py --models kontext-texture --per-sample
    python scripts/measure_curvature.py --reuse 3-25:2 --reuse 4-26:2 --reuse auto
    python scripts/measure_curvature.py --reuse auto:40 --reuse auto:45 --reuse auto:50 --reuse auto:55
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = ("kontext-digits", "flux2-pick", "kontext-canvas", "kontext-texture")
DEFAULT_JSON = REPO / "docs" / "results" / "curvature.json"
# 3: PSNR against the ground truth and auto under a budget; 2: reused steps are the runtime's reuse step kind (1: the
# script's own loop)
SCHEMA = "topi-curvature/3"
# Every other step between steps 3 and 26 reuses its predecessor's velocity (16 of 28 computed); the two ways to
# place that: reuse at the odd steps 3..25 or at the even steps 4..26 (the latter also reuses at step 26, where
# the velocity changes fast on every model).
DEFAULT_REUSE = ("3-25:2", "4-26:2")


def parse_steps(text: str, steps: int) -> list[int]:
    """'4-26:2' (start-end inclusive, every k-th) or '4,6,8' -> sorted step indices in [1, steps)."""
    out = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            span, _, every = part.partition(":")
            a, b = (int(v) for v in span.split("-"))
            out.update(range(a, b + 1, int(every or 1)))
        else:
            out.add(int(part))
    bad = [s for s in out if not 1 <= s < steps]
    if bad:
        raise SystemExit(f"--reuse {text!r}: steps {bad} are outside 1..{steps - 1} (step 0 has no velocity to reuse)")
    return sorted(out)


def trajectory(session, data, steps: int, reuse=(), seed: int = 0):
    """Final latents of one unpruned generation through the session's engine (``denoise`` in mode "full"); the
    steps in ``reuse`` take the previous computed velocity (the runtime's zero-order reuse step, no model call)."""
    from topi_export.plan.reuse import OFF, ReusePlan

    plan = ReusePlan("count", 0, tuple(sorted(reuse)), "pattern", "measure_curvature pattern") if reuse else OFF
    # ratio 0 keeps every context token (the ToPi schedule unpruned, its controller plans the reuse steps); one anchor
    return session.denoise(data, steps=steps, seed=seed, selector=session.selector(data, ratio=0.0), update_interval=steps,
                           reuse=plan).latents


def auto_plan(session, data, steps: int, budget_db: float):
    """The plan ``auto`` makes with the model's rollout criterion under a budget of ``budget_db`` dB."""
    from dataclasses import replace

    from topi_export.method.reuse import budget_error, plan_reuse
    from topi_export.runtime.loop import schedule_sigmas

    crit = session.settings.reuse
    if crit is None or crit.measure != "rollout":
        raise SystemExit(f"--reuse auto:{budget_db:g}: the model's profile has no rollout criterion")
    sigmas = schedule_sigmas(session.family, steps, data.layout, session.scheduler_config)
    anchors = range(0, steps, session.settings.update_interval)
    return plan_reuse("auto", 0, sigmas, anchors, replace(crit, threshold=budget_error(budget_db)),
                      source=f"budget {budget_db:g} dB")


def auto_by_budget(session, data, steps: int, budgets) -> dict:
    """How many steps ``auto`` reuses under each budget (dB) with the model's rollout criterion, and the PSNR it
    predicts: the plan only, nothing is run."""
    crit = session.settings.reuse
    if crit is None or crit.measure != "rollout":
        return {}
    out = {}
    for b in budgets:
        plan = auto_plan(session, data, steps, b)
        out[f"{b:g}"] = {"reused": len(plan.steps), "predicted_db": None if plan.predicted_db is None
                         else round(plan.predicted_db, 2)}
    return out


def measure_model(name: str, steps: int, patterns: dict, limit: int | None, log=print, budgets=(),
                  calibration: str | None = None) -> dict:
    """Every held-out sample of a built-in model: the normal run, one reuse run per pattern (name -> steps).
    ``calibration``: a profile to use instead of the shipped one (a model folder has none)."""
    from topi_export import open_session
    from topi_export.artifacts.inputs import sample_files
    from topi_export.runtime.loop import psnr

    session = open_session(model=name, **({"calibration": calibration} if calibration else {}))
    # A built-in trained model's shipped samples, or a model folder's samples/ (a training script's output).
    files = sample_files(name) or sorted(Path(name).glob("samples/sample_*.safetensors"),
                                         key=lambda p: int(p.stem.split("_")[-1]))
    files = files[:limit] if limit else files
    if not files:
        raise SystemExit(f"{name} has no held-out samples: pass a trained built-in model or a folder with samples/")
    budgeted = [k for k, v in patterns.items() if isinstance(v, str) and v.startswith("auto:")]
    per_sample = []
    t0 = time.time()
    for path in files:
        data = session.load_inputs(path)
        normal = trajectory(session, data, steps)
        auto = session.reuse_plan(data, steps=steps, reuse="auto") if "auto" in patterns.values() else None
        plans = {k: auto_plan(session, data, steps, float(patterns[k][5:])) for k in budgeted}
        runs = {k: trajectory(session, data, steps, auto.steps if reuse == "auto" else
                              plans[k].steps if k in plans else reuse)[0] for k, reuse in patterns.items()}
        ps = {k: round(psnr(x, normal), 3) for k, x in runs.items()}
        truth = data.target_latents
        gt = ({"normal": round(psnr(normal, truth), 3), **{k: round(psnr(x, truth), 3) for k, x in runs.items()}}
              if truth is not None else None)
        per_sample.append({"file": path.name, "edit": data.meta.get("edit"), "reuse_psnr": ps,
                           **({"truth_psnr": gt} if gt is not None else {}),
                           **({"auto": auto.to_json()} if auto is not None else {}),
                           **({"plans": {k: p.to_json() for k, p in plans.items()}} if plans else {})})
        log(f"  {name} {path.name}{' (' + data.meta['edit'] + ')' if data.meta.get('edit') else ''}: reuse PSNR "
            f"{', '.join(f'{v:.2f} dB ({k})' for k, v in ps.items())}")

    def stats(vals, prefix):
        return {f"{prefix}_mean": round(sum(vals) / len(vals), 3), f"{prefix}_min": round(min(vals), 3)}

    def summary(rows):
        out = {"samples": len(rows)}
        with_truth = [s for s in rows if "truth_psnr" in s]
        for k in patterns:
            out[k] = stats([s["reuse_psnr"][k] for s in rows], "reuse_psnr")
            if with_truth:
                out[k].update(stats([s["truth_psnr"][k] for s in with_truth], "truth_psnr"))
            if k in budgeted:
                out[k]["reused"] = sorted({len(s["plans"][k]["steps"]) for s in rows})
                out[k]["predicted_db"] = rows[0]["plans"][k].get("predicted_db")
        if with_truth:
            out["normal"] = stats([s["truth_psnr"]["normal"] for s in with_truth], "truth_psnr")
        return out

    by_edit = {}
    for s in per_sample:
        if s["edit"] is not None:
            by_edit.setdefault(s["edit"], []).append(s)
    return {"family": session.family.name, "layout": data.layout.to_json(), **summary(per_sample),
            **({"auto_by_budget": auto_by_budget(session, data, steps, budgets)} if budgets else {}),
            "per_edit": {e: summary(v) for e, v in by_edit.items()},
            "per_sample": per_sample, "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help="comma-separated built-in model names or model folders with samples/")
    p.add_argument("--steps", type=int, default=28, help="denoising steps (the pipelines' default: 28)")
    p.add_argument("--reuse", action="append", default=None,
                   help="steps that reuse the previous velocity, 'a-b:k' (a to b, every k-th) or a list; repeatable,\n"
                        f"one column each (default: {' and '.join(DEFAULT_REUSE)})")
    p.add_argument("--samples", type=int, default=None, help="use only the first N held-out samples of each model")
    p.add_argument("--budgets", default="", help="also list how many steps auto reuses under these budgets in dB\n"
                                                 "(a rollout criterion's plan, nothing run), e.g. 40,45,50,55")
    p.add_argument("--calibration", default=None,
                   help="calibration profile for every model (default: each model's shipped one); a model folder\n"
                        "has none, so its auto plan needs this")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the results ('' = nowhere)")
    p.add_argument("--per-sample", action="store_true", help="print every sample's numbers")
    p.add_argument("--update", action="store_true",
                   help="keep the other models of an existing --json file (measured with the same steps and reuse\n"
                        "patterns; each model entry records the command that measured it)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    patterns = {}
    for text in args.reuse or DEFAULT_REUSE:
        if text.strip().lower() == "auto":
            patterns["reuse auto"] = "auto"
            continue
        if text.strip().lower().startswith("auto:"):
            try:
                budget = float(text.strip()[5:])
            except ValueError:
                raise SystemExit(f"--reuse {text!r}: write auto:DB, e.g. auto:45") from None
            patterns[f"reuse auto {budget:g} dB"] = f"auto:{budget:g}"
            continue
        steps = parse_steps(text, args.steps)
        patterns[f"reuse {_span(steps)}"] = steps
    cmd = "python scripts/measure_curvature.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    results = {}
    if args.update and args.json and Path(args.json).exists():
        old = json.loads(Path(args.json).read_text())
        same = old.get("schema") == SCHEMA and old.get("steps") == args.steps and {k: v["reuse_steps"] for k, v in old.get("patterns", {}).items()} == patterns
        if not same:
            raise SystemExit(f"--update: {args.json} was measured with other steps or reuse patterns: measure every model")
        results = {k: v for k, v in old.get("models", {}).items() if k not in models}
    for name in models:
        results[name] = {"command": cmd, **measure_model(name, args.steps, patterns, args.samples,
                                                          log=print if args.per_sample else (lambda *_: None),
                                                          budgets=budgets, calibration=args.calibration)}
    print(f"PSNR (dB) of the final latents of a run that reuses the previous step's velocity at the listed steps "
          f"(of {args.steps}) vs the normal run (runtime.loop.psnr)")
    cols = list(patterns)
    for k in cols:
        if patterns[k] == "auto":
            print(f"  {k}: each model's calibrated plan (steps and predicted PSNR below)")
        elif isinstance(patterns[k], str):
            print(f"  {k}: the calibrated plan under that budget (steps below)")
        else:
            print(f"  {k}: {args.steps - len(patterns[k])} of {args.steps} steps computed")
    print(f"{'model / edit':<19} {'samples':>7} " + " ".join(f"{'mean':>7} {'min':>7}" for _ in cols))
    print(f"{'':<27} " + " ".join(f"{k[6:]:>15}" for k in cols))

    def line(label, r):
        return (f"{label:<19} {r['samples']:>7} " + " ".join(f"{r[k]['reuse_psnr_mean']:>7.2f} {r[k]['reuse_psnr_min']:>7.2f}"
                                                          for k in cols))

    for name, r in results.items():
        print(line(name, r))
        for edit, e in r["per_edit"].items():
            print(line("  " + edit, e))
    truthful = {n: r for n, r in results.items() if "normal" in r}
    if truthful:
        print("PSNR (dB) of the same runs against the ground truth (the normal run first)")

        def gt_line(label, r):
            return (f"{label:<19} {r['normal']['truth_psnr_mean']:>7.2f} {r['normal']['truth_psnr_min']:>7.2f} "
                    + " ".join(f"{r[k]['truth_psnr_mean']:>7.2f} {r[k]['truth_psnr_min']:>7.2f}" for k in cols))

        for name, r in truthful.items():
            print(gt_line(name, r))
            for edit, e in r["per_edit"].items():
                print(gt_line("  " + edit, e))
    for name, r in results.items():
        for k in cols:
            if isinstance(patterns[k], str) and patterns[k].startswith("auto:"):
                print(f"{name}: {k[6:]}: {'/'.join(map(str, r[k]['reused']))} steps reused, predicted "
                      f"{r[k]['predicted_db']} dB")
    for name, r in results.items():
        if r.get("auto_by_budget"):
            print(f"{name}: auto under budget " + ", ".join(f"{b} dB: {v['reused']} steps" for b, v in
                                                           r["auto_by_budget"].items()))
        autos = [s["auto"] for s in r.get("per_sample", ()) if "auto" in s]
        if autos:
            counts = sorted({len(a["steps"]) for a in autos})
            pred = [a.get("predicted_db") for a in autos if a.get("predicted_db") is not None]
            print(f"{name}: auto reuses {'/'.join(map(str, counts))} steps {autos[0]['steps']}"
                  + (f", predicted {min(pred):.2f}-{max(pred):.2f} dB" if pred else "")
                  + f" ({autos[0]['why']})")
    out = {"schema": SCHEMA, "steps": args.steps,
           "patterns": {k: {"reuse_steps": v, "computed_steps": None if isinstance(v, str) else args.steps - len(v)}
                        for k, v in patterns.items()},
           "psnr": "runtime.loop.psnr: 10 log10(range(normal)^2 / mean((reuse - normal)^2)) over the final latents",
           "truth_psnr": "runtime.loop.psnr of each run (and the normal one) against the sample's target_latents",
           "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                       "threads": args.threads},
           "models": results}
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")
    return out


def _span(steps) -> str:
    if len(steps) > 2 and all(b - a == steps[1] - steps[0] for a, b in zip(steps, steps[1:])):
        return f"{steps[0]}, {steps[1]}, ..., {steps[-1]}"
    return ", ".join(map(str, steps))


if __name__ == "__main__":
    main()
