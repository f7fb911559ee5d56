"""Speed and fidelity per ratio bucket and selection policy (``topi-export bench``).

For every inputs file: one unpruned run (same noise) is the reference; every (ratio, policy) runs the
ToPi schedule. Fidelity: PSNR / relative L2 of the final latents vs the unpruned run (and vs
``target_latents`` when the file has them). Speed: end-to-end loop time and median step times."""
from __future__ import annotations

import math
import platform
import statistics
import time
from dataclasses import dataclass, field

from topi_export.method.selection import DEFAULT_POLICY, POLICIES


@dataclass
class BenchConfig:
    ratios: tuple
    policies: tuple
    steps: int = 28
    update_intervals: tuple = (10,)
    taus: tuple = ()
    seed: int = 0
    repeats: int = 1
    dim: int | None = None  # model width, for the FLOP-predicted speedups
    reuses: tuple = (None,)  # step-reuse specs to sweep: None (the model's default), "off", "auto", N
    reuse_order: int = 0
    residuals: tuple = (False,)  # pruning residual settings to sweep (runtime/steps.py)


@dataclass
class Row:
    policy: str
    ratio: float
    update_interval: int
    tau: float | None = None
    reuse: object = None  # the reuse spec asked for (None: the model's default)
    reused: list = field(default_factory=list)  # reused steps per sample
    reuse_mode: str = "off"
    pruning_residual: bool = False
    psnr: list = field(default_factory=list)
    rel: list = field(default_factory=list)
    psnr_gt: list = field(default_factory=list)
    times: list = field(default_factory=list)
    full_times: list = field(default_factory=list)
    anchor_ms: list = field(default_factory=list)
    pruned_ms: list = field(default_factory=list)
    keeps: list = field(default_factory=list)
    kept_influence: list = field(default_factory=list)
    spreads: list = field(default_factory=list)  # (lowest, highest) pairwise speedup per sample

    def summary(self) -> dict:
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        finite = [p for p in self.psnr if math.isfinite(p)]
        timed = bool(self.times)
        out = {"policy": self.policy, "ratio": self.ratio, "update_interval": self.update_interval,
               "reuse": self.reuse if self.reuse is not None else "default", "reuse_mode": self.reuse_mode,
               "reused_steps": mean(self.reused), "pruning_residual": self.pruning_residual,
               "psnr_db": mean(finite) if len(finite) == len(self.psnr) else math.inf, "psnr_db_min": min(self.psnr),
               "rel_l2": mean(self.rel), "speedup": sum(self.full_times) / sum(self.times) if timed else None,
               "speedup_spread": [min(lo for lo, _ in self.spreads), max(hi for _, hi in self.spreads)] if timed
               else None, "time_s": mean(self.times), "full_time_s": mean(self.full_times),
               "anchor_step_ms": statistics.median(self.anchor_ms) if self.anchor_ms else None,
               "pruned_step_ms": statistics.median(self.pruned_ms) if self.pruned_ms else None,
               "keep": sorted(set(self.keeps)), "psnr_db_per_sample": list(self.psnr),
               "kept_influence": mean(self.kept_influence)}
        if self.tau is not None:
            out["tau"] = self.tau
        if self.psnr_gt:
            out["psnr_gt_db"] = mean(self.psnr_gt)
            out["psnr_gt_db_min"] = min(self.psnr_gt)
            out["psnr_gt_db_per_sample"] = list(self.psnr_gt)
        return out


def _steps_ms(schedule, graph):
    return [r.time_s * 1000 for r in schedule if r.graph == graph]


def run_bench(session, inputs_list, cfg: BenchConfig, progress=None) -> dict:
    """Every (policy, ratio | tau, dT) against the dense baseline (the plain model at the same backend and
    precision; the in-engine unpruned step where an engine directory has no dense graph). Speed: each setting and
    the baseline run interleaved, ``cfg.repeats`` times each (runtime/compare.py); ``repeats`` 0 measures fidelity
    only (one run of each)."""
    from topi_export.runtime.compare import compare
    from topi_export.runtime.loop import psnr, rel_l2

    rows: dict[tuple, Row] = {}
    full_steps, baseline = [], {"psnr_gt": [], "times": []}
    base_mode = session.baseline_mode()
    warmed = False
    for data in inputs_list:
        if not warmed:
            for ratio in cfg.ratios:
                session.warmup(data, session.selector(data, ratio=ratio, policy="topi", seed=cfg.seed), dense=True)
            warmed = True
        full = session.denoise(data, steps=cfg.steps, seed=cfg.seed, mode=base_mode)
        full_steps += _steps_ms(full.schedule, base_mode)
        if data.target_latents is not None:
            baseline["psnr_gt"].append(psnr(full.latents, data.target_latents))
        modes = [(p, r, None, dt, ru, rs) for rs in cfg.residuals for ru in cfg.reuses for dt in cfg.update_intervals
                 for r in cfg.ratios for p in cfg.policies]
        modes += [(p, 0.0, tau, dt, ru, rs) for rs in cfg.residuals for ru in cfg.reuses for dt in cfg.update_intervals
                  for tau in cfg.taus for p in cfg.policies]
        for policy, ratio, tau, dt, ru, rs in modes:
            sel = session.selector(data, ratio=None if tau is not None else ratio, tau=tau,
                                   ratio_buckets=",".join(str(r) for r in cfg.ratios if r > 0) if tau is not None else None,
                                   policy=policy, seed=cfg.seed)
            row = rows.setdefault((policy, ratio, tau, dt, ru, rs),
                                  Row(policy, ratio, dt, tau, ru, pruning_residual=rs))
            plan = session.reuse_plan(data, steps=cfg.steps, reuse=ru, order=cfg.reuse_order, update_interval=dt)
            row.reused.append(len(plan.steps))
            row.reuse_mode = plan.mode
            if cfg.repeats > 0:
                c = compare(session, data, steps=cfg.steps, seed=cfg.seed, selector=sel, update_interval=dt,
                            repeats=cfg.repeats, reuse=plan, pruning_residual=rs)
                best = c.topi
                row.times.append(min(c.topi_times))
                row.full_times.append(min(c.baseline_times))
                row.spreads.append(c.spread)
                baseline["times"].append(min(c.baseline_times))
            else:
                best = session.denoise(data, steps=cfg.steps, seed=cfg.seed, selector=sel, update_interval=dt,
                                       reuse=plan, pruning_residual=rs)
            row.psnr.append(psnr(best.latents, full.latents))
            row.rel.append(rel_l2(best.latents, full.latents))
            row.anchor_ms += _steps_ms(best.schedule, "anchor")
            row.pruned_ms += _steps_ms(best.schedule, "pruned")
            row.keeps += [r.keep for r in best.schedule if r.kind == "pruned"]
            row.kept_influence += [r.kept_influence for r in best.schedule if r.kept_influence is not None]
            if data.target_latents is not None:
                row.psnr_gt.append(psnr(best.latents, data.target_latents))
            if progress:
                progress()
    results = [r.summary() for r in rows.values()]
    full_ms = statistics.median(full_steps)
    if cfg.dim:
        from topi_export.method.cost import predicted_end_to_end, predicted_speedup

        layout = inputs_list[0].layout
        for r in results:
            if r["pruned_step_ms"] and len(r["keep"]) == 1:
                r["flop_speedup"] = predicted_speedup(layout, r["keep"][0], session.identity.num_layers,
                                                      session.settings.prune_start, cfg.dim)
                r["flop_e2e_speedup"] = predicted_end_to_end(layout, r["keep"][0], session.identity.num_layers,
                                                             session.settings.prune_start, cfg.dim, cfg.steps,
                                                             r["update_interval"], round(r.get("reused_steps") or 0),
                                                             residual=r["pruning_residual"])
                r["step_speedup"] = full_ms / r["pruned_step_ms"]
                r["step_efficiency"] = r["step_speedup"] / r["flop_speedup"]
            if r["anchor_step_ms"]:
                r["influence_overhead"] = r["anchor_step_ms"] / full_ms - 1
    base = {"policy": "none", "mode": base_mode, "ratio": 0.0, "psnr_db": math.inf, "psnr_db_min": math.inf,
            "rel_l2": 0.0, "speedup": 1.0, "full_step_ms": full_ms,
            "time_s": sum(baseline["times"]) / len(baseline["times"]) if baseline["times"] else None}
    if baseline["psnr_gt"]:
        base["psnr_gt_db"] = sum(baseline["psnr_gt"]) / len(baseline["psnr_gt"])
        base["psnr_gt_db_min"] = min(baseline["psnr_gt"])
        base["psnr_gt_db_per_sample"] = list(baseline["psnr_gt"])
    best = best_policy(results)
    return {"default_policy": DEFAULT_POLICY, "best_policy": best, "baseline": base, "results": results,
            "steps": cfg.steps, "repeats": cfg.repeats, "inputs": [d.source for d in inputs_list],
            "backend": session.engine.name, "model": session.source, "family": session.family.name,
            "layout": inputs_list[0].layout.to_json(), "method": session.settings.to_json(),
            "policies_use_influence": {p: POLICIES[p].uses_influence for p in cfg.policies}, "machine": machine()}


def best_policy(results) -> str | None:
    """The policy with the highest mean PSNR at the largest common ratio (equal keep count)."""
    fixed = [r for r in results if "tau" not in r]
    if not fixed:
        return None
    top = max(r["ratio"] for r in fixed)
    return max((r for r in fixed if r["ratio"] == top), key=lambda r: r["psnr_db"])["policy"]


def machine() -> dict:
    import os

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version()}


def _mean_min(mean, low) -> str:
    """'mean (per-sample minimum)' in dB; '-' where not measured."""
    if mean is None:
        return "-"
    return f"{mean:.2f} ({low:.2f})" if low is not None else f"{mean:.2f}"


def markdown_table(report) -> str:
    """One row per (policy, ratio | tau, dT): PSNR vs the unpruned run and, when the inputs carry ground truth, vs the
    truth, each as the mean over the inputs with the per-sample minimum in brackets."""
    gt = any("psnr_gt_db" in r for r in report["results"])
    head = ("| policy | ratio | dT | reuse (steps) | keep | PSNR vs unpruned [dB]: mean (min) | rel. L2 | speedup "
            "(pairwise range) | pruned step [ms] |")
    head += " PSNR vs truth [dB]: mean (min) |" if gt else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    b = report["baseline"]
    lines.append(f"| {b['mode']} (baseline) | 0 | - | off | all | - | - | 1.00x | {b['full_step_ms']:.1f} |"
                 + (f" {_mean_min(b.get('psnr_gt_db'), b.get('psnr_gt_db_min'))} |" if gt else ""))
    for r in sorted(report["results"], key=lambda r: (r.get("tau") is not None, r["ratio"], r["policy"],
                                                      str(r.get("reuse")), bool(r.get("pruning_residual")))):
        name = r["policy"] + (f" tau={r['tau']}" if "tau" in r else "")
        pruned = f"{r['pruned_step_ms']:.1f}" if r["pruned_step_ms"] else "-"
        speed = (f"{r['speedup']:.2f}x ({r['speedup_spread'][0]:.2f}-{r['speedup_spread'][1]:.2f})"
                 if r.get("speedup") is not None else "-")
        reuse = f"{r.get('reuse', 'default')} ({r.get('reused_steps') or 0:g})"
        reuse += ", pruning residual" if r.get("pruning_residual") else ""
        line = (f"| {name} | {r['ratio'] if 'tau' not in r else '-'} | {r['update_interval']} | {reuse} | "
                f"{'/'.join(map(str, r['keep']))} | "
                f"{_mean_min(r['psnr_db'], r['psnr_db_min'])} | {r['rel_l2']:.2e} | {speed} | {pruned} |")
        if gt:
            line += f" {_mean_min(r.get('psnr_gt_db'), r.get('psnr_gt_db_min'))} |"
        lines.append(line)
    return "\n".join(lines)


def plot(report, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    key = lambda r: str(r.get("reuse", "default")) + (", residual" if r.get("pruning_residual") else "")  # noqa: E731
    series = sorted({(r["policy"], key(r)) for r in report["results"] if "tau" not in r})
    for policy, reuse in series:
        pts = sorted((r["speedup"] or 1.0, r["psnr_db"], r["ratio"]) for r in report["results"]
                     if r["policy"] == policy and key(r) == reuse and "tau" not in r)
        label = policy if len({s for _, s in series}) == 1 else f"{policy}, reuse {reuse}"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        for s, q, r in pts:
            ax.annotate(f"{r:g}", (s, q), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(f"end-to-end speedup vs {report['baseline']['mode']}")
    ax.set_ylabel("PSNR vs unpruned [dB]")
    ax.set_title(f"{report['model']} on {report['backend']}, {report['steps']} steps")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def timestamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
