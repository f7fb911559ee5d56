"""``topi-export calibrate``: measure per-layer context sensitivity, write a calibration profile + plot."""
from __future__ import annotations

import os
from pathlib import Path

import click

from topi_export.commands.common import ManyValues, model_option, quiet_option, show_progress
from topi_export.errors import TopiError


def _parse_timesteps(text: str) -> list[float]:
    from topi_export.method.calibration import check_timesteps

    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise TopiError(f"bad --timesteps {text!r}: write comma-separated noise levels in (0, 1], e.g. 0.9,0.6,0.3")
    return check_timesteps(values)


def _table(result: dict, rows: int) -> str:
    mean, std, names = result.mean, result.std, result.layer_names
    pivotal = set(result.pivotal_layers)
    lines = [("rank", "layer", "block", "sensitivity", "")]
    for rank, layer in enumerate(result.ranking[:rows], 1):
        lines.append((str(rank), str(layer), names[layer], f"{mean[layer]:.4f} +- {std[layer]:.4f}",
                      "pivotal" if layer in pivotal else ""))
    widths = [max(len(r[i]) for r in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in lines)


@click.command("calibrate")
@model_option
@click.option("--inputs", "inputs", cls=ManyValues, type=click.Path(dir_okay=False),
              help="Calibration inputs .safetensors (repeatable: several files form the set). "
                   "Default: a seeded synthetic set.")
@click.option("--samples", type=click.IntRange(1, 10_000), default=None,
              help="Synthetic set size when no --inputs (1..10000).  [default: 4]")
@click.option("--grid", default="8x8", show_default=True, help="Target token grid HxW of the synthetic set.")
@click.option("--ref-grid", default=None, help="Reference token grids HxW[,HxW...] of the synthetic set (several: "
                                               "several references). Default: --grid.")
@click.option("--text-tokens", type=click.IntRange(1, 4096), default=8, show_default=True,
              help="Text tokens of the synthetic set (1..4096, as build).")
@click.option("--timesteps", default="0.9,0.6,0.3", show_default=True,
              help="Noise levels t in (0, 1] at which x_t = (1-t) x0 + t noise is probed.")
@click.option("--top-k", type=click.IntRange(1, 10_000), default=3, show_default=True,
              help="Number of pivotal layers.")
@click.option("--update-interval", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="Update interval dT written to the profile (not measured; published: 10).")
@click.option("--reuse-steps", type=click.IntRange(0, 1000), default=28, show_default=True,
              help="Also measure the step-reuse criterion on full runs of this many steps (0: do not).")
@click.option("--reuse-measure", type=click.Choice(["rollout", "velocity"]), default="rollout", show_default=True,
              help="How reuse errors are measured: rollout (each step reused alone, the run finished, its final "
                   "latents compared; about steps^2 extra model calls per sample) or velocity (the relative "
                   "velocity change between steps, no extra calls: the schema-3 criterion).")
@click.option("--reuse-budget", type=click.FloatRange(10, 200), default=None,
              help="rollout: the PSNR in dB that auto keeps against the same run without reuse, predicted "
                   "(method/reuse.py).  [default: 40]")
@click.option("--reuse-aggregate", type=click.Choice(["worst", "mean"]), default=None,
              help="rollout: each step's error from the worst calibration sample (the budget holds for every "
                   "sample) or from their mean (the average sample).  [default: worst]")
@click.option("--reuse-threshold", type=click.FloatRange(0, 10), default=None,
              help="velocity: accumulated relative velocity change a run of reused steps may reach.  [default: 0.1]")
@click.option("--reuse-max-consecutive", type=click.IntRange(1, 100), default=None,
              help="Longest run of reused steps.  [default: 2]")
@click.option("--seed", type=click.IntRange(0, (1 << 63) - 1), default=0, show_default=True,
              help="Seed of the synthetic set and the noise.")
@click.option("--out", required=True, type=click.Path(), help="Profile JSON to write, e.g. calibration/NAME.json "
                                                              "(the plot goes next to it, same stem, .png).")
@quiet_option
def cmd(model, inputs, samples, grid, ref_grid, text_tokens, timesteps, top_k, update_interval, reuse_steps,
        reuse_measure, reuse_budget, reuse_aggregate, reuse_threshold, reuse_max_consecutive, seed, out, quiet):
    """Measure each layer's context sensitivity; write the profile (pivotal layers, L0, dT) and a plot."""
    from topi_export.artifacts.settings import describe_set, write_profile
    from topi_export.method.calibration import calibrate
    from topi_export.runtime.visualize import plot_profile
    from topi_export.commands.common import output_files
    from topi_export.models import load_model, scheduler_config_for
    from topi_export.plan import Layout, parse_grid, parse_grids
    from topi_export.artifacts.inputs import load_inputs

    out = Path(out)
    if os.path.isdir(out):  # not Path.is_dir: it raises on a name too long (ENAMETOOLONG)
        raise TopiError(f"--out {out} is a directory: pass a file such as {out / 'profile.json'}")
    if out.suffix.lower() != ".json":
        raise TopiError(f"--out {out} must end in .json (the plot is written next to it as .png)")
    output_files([out, out.with_suffix(".png")], protected=list(inputs) + [model])
    ts = _parse_timesteps(timesteps)
    if reuse_measure == "rollout" and reuse_threshold is not None:
        raise TopiError("--reuse-threshold is the velocity measure's: with --reuse-measure rollout give "
                        "--reuse-budget DB (the PSNR auto keeps, e.g. 40)")
    if reuse_measure == "velocity" and reuse_budget is not None:
        raise TopiError("--reuse-budget is the rollout measure's: with --reuse-measure velocity give "
                        "--reuse-threshold")
    if reuse_measure == "velocity" and reuse_aggregate is not None:
        raise TopiError("--reuse-aggregate is the rollout measure's: drop it, or use --reuse-measure rollout")
    if inputs and samples is not None:
        raise TopiError("give either --inputs (a calibration set from files) or --samples (a synthetic set), not both")
    n_samples = 4 if samples is None else samples
    if text_tokens < 1:
        raise TopiError(f"--text-tokens {text_tokens} must be >= 1")
    target_grid = parse_grid(grid, "--grid")
    reference_grids = parse_grids(ref_grid, "--ref-grid") if ref_grid else (target_grid,)
    loaded = load_model(model)
    adapter = loaded.family
    if not 1 <= top_k <= adapter.num_layers:
        raise TopiError(f"--top-k {top_k} is outside 1..{adapter.num_layers} (the model has {adapter.num_layers} "
                        f"layers)")
    if inputs:
        data = [load_inputs(p, adapter) for p in inputs]
    else:
        layout = Layout(text_tokens, target_grid, reference_grids)
        adapter.check_layout(layout)
        data = [adapter.synthetic_inputs(layout, seed + i) for i in range(n_samples)]
    identity = loaded.identity()
    groups = " + ".join(f"{end - start} {name}" for name, start, end in adapter.layer_groups())
    click.echo(f"calibrating {identity.source} ({adapter.num_layers} layers: {groups}) on {len(data)} sample(s) x "
               f"{len(ts)} timestep(s)")
    result = calibrate(adapter, data, ts, top_k=top_k, progress=show_progress(quiet), seed=seed,
                       update_interval=update_interval)
    if reuse_steps:
        from dataclasses import replace

        from topi_export.runtime.loop import measure_reuse

        how = "each step reused alone, finished to the end" if reuse_measure == "rollout" else "velocity changes"
        click.echo(f"measuring step-reuse errors on {len(data)} full run(s) of {reuse_steps} steps ({how})")
        result = replace(result, reuse=measure_reuse(adapter, data, reuse_steps, seed=seed,
                                                     scheduler_config=scheduler_config_for(model) if model else None,
                                                     measure=reuse_measure, budget_db=reuse_budget,
                                                     aggregate=reuse_aggregate,
                                                     threshold=reuse_threshold,
                                                     max_consecutive=reuse_max_consecutive,
                                                     progress=show_progress(quiet)))
    argv = ["topi-export calibrate", "--model", str(identity.source)]
    if inputs:
        argv += [a for p in inputs for a in ("--inputs", str(p))]
    else:
        argv += ["--samples", str(n_samples), "--grid", grid, "--text-tokens", str(text_tokens)]
        argv += ["--ref-grid", ref_grid] if ref_grid else []
    argv += ["--timesteps", ",".join(f"{t:g}" for t in ts), "--top-k", str(top_k), "--update-interval",
             str(update_interval), "--reuse-steps", str(reuse_steps), "--reuse-measure", reuse_measure,
             "--seed", str(seed), "--out", str(out)]
    argv += ["--reuse-budget", f"{reuse_budget:g}"] if reuse_budget is not None else []
    argv += ["--reuse-aggregate", reuse_aggregate] if reuse_aggregate is not None else []
    argv += ["--reuse-threshold", f"{reuse_threshold:g}"] if reuse_threshold is not None else []
    argv += ["--reuse-max-consecutive", str(reuse_max_consecutive)] if reuse_max_consecutive is not None else []
    write_profile(out, result, identity, describe_set(data, ts, files=list(inputs), seed=seed),
                  command=" ".join(argv))
    png = out.with_suffix(".png")
    plot_profile(png, result, title=f"{identity.source}: context sensitivity ({len(data)} samples x "
                                    f"{len(ts)} timesteps)")
    click.echo(_table(result, min(adapter.num_layers, max(5, top_k))))
    click.echo(f"pivotal layers {result.pivotal_layers}, prune start L0 = {result.prune_start}, "
               f"update interval dT = {result.update_interval} ({result.forward_passes} forward passes, "
               f"{result.elapsed_s:.1f} s)")
    if result.reuse is not None:
        from topi_export.method.reuse import plan_reuse

        sigmas, crit = result.reuse.sigmas, result.reuse
        auto = plan_reuse("auto", 0, sigmas, range(0, len(sigmas), update_interval), crit, source=str(out))
        click.echo(f"step reuse: at {len(sigmas)} steps and dT = {update_interval}, auto reuses {len(auto.steps)} "
                   f"steps {list(auto.steps)} ({auto.why.split(': ', 1)[-1]})")
    click.echo(f"profile -> {out}")
    click.echo(f"plot -> {png}")
