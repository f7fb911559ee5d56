"""``topi-export bench``: speed and fidelity per ratio bucket and selection policy."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from topi_export.commands.common import (ManyValues, atomic_write_bytes, device_options, model_option, output_files,
                                         quiet_option, seed_option, show_progress, steps_option, strict_json)


def parse_ratios(text: str) -> tuple:
    """Like --ratio-buckets, but 0 (no pruning: a sanity row) is allowed."""
    from topi_export.errors import TopiError
    from topi_export.method import validate_ratio

    try:
        values = [validate_ratio(float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        raise TopiError(f"bad --ratio-buckets {text!r}: give comma-separated fractions, e.g. 0.3,0.5")
    if not values or len(set(values)) != len(values):
        raise TopiError(f"--ratio-buckets {text!r} must list distinct ratios, e.g. 0.3,0.5")
    return tuple(sorted(values))


@click.command("bench")
@model_option
@click.option("--inputs", cls=ManyValues, type=click.Path(dir_okay=False),
              help="Inputs files (repeatable, or several after one --inputs). Default: the model's samples, "
                   "else one synthetic input.")
@click.option("--ratio-buckets", default="0.3,0.5", show_default=True, help="Ratios to measure.")
@click.option("--policies", default="topi,uniform,dither,random", show_default=True,
              help="Selection policies to compare; the default policy is always added unless --no-default-policy.")
@click.option("--no-default-policy", is_flag=True, help="Do not add the default policy to --policies.")
@click.option("--calibration", type=click.Path(dir_okay=False), default=None,
              help="Calibration profile of the model (a user's own calibrated model); 'none': the family's "
                   "default setting, ignoring a shipped profile (an uncalibrated user).")
@click.option("--backend", default=None,
              help="Backend to measure (default: the PyTorch reference, which needs no build); a backend that builds "
                   "uses --engine-dir, built there first when missing.")
@click.option("--engine-dir", type=click.Path(file_okay=False), default=None,
              help="onnxruntime: use/keep the engines here (built if missing).")
@steps_option
@click.option("--update-interval", "update_intervals", default="10", show_default=True,
              help="dT; several (e.g. 5,10) sweep it.")
@click.option("--tau", "taus", default="", help="Also sweep adaptive tau values, e.g. 0.5,0.7 (buckets = ratios).")
@click.option("--reuse", "reuses", default=None,
              help="Step-reuse settings to sweep, e.g. off,auto,4,8,12 (default: the model's default only).")
@click.option("--reuse-order", type=click.IntRange(0, 1), default=0, show_default=True,
              help="Reused steps take the last velocity (0) or extrapolate from the last two (1).")
@click.option("--pruning-residual", "residuals", default="off", show_default=True,
              help="Pruning residual settings to sweep: off, on or off,on (`run --pruning-residual`).")
@click.option("--target-grid", default=None, help="Synthetic input grid HxW when no --inputs (e.g. 32x32).")
@click.option("--ref-grids", default=None, help="Synthetic input reference grids HxW,HxW (default: the target grid).")
@click.option("--text-tokens", type=click.IntRange(1, 4096), default=8, show_default=True,
              help="Synthetic input text tokens.")
@click.option("--samples", type=click.IntRange(1, 10_000), default=None, help="Use at most N inputs.")
@click.option("--repeats", type=click.IntRange(0, 100), default=3, show_default=True,
              help="Timed runs of each setting and of the baseline, interleaved; the fastest of each is reported with "
                   "the range of the pairwise speedups. 0: fidelity only (no speed columns).")
@seed_option
@click.option("--json", "json_path", type=click.Path(dir_okay=False), required=True, help="Report JSON.")
@click.option("--md", "md_path", type=click.Path(dir_okay=False), default=None, help="Markdown table (default: next to JSON).")
@click.option("--png", "png_path", type=click.Path(dir_okay=False), default=None, help="Plot (default: next to JSON).")
@device_options
@quiet_option
def cmd(model, inputs, ratio_buckets, policies, no_default_policy, calibration, backend, engine_dir, steps,
        update_intervals, taus, reuses, reuse_order, residuals, target_grid, ref_grids, text_tokens, samples, repeats,
        seed, json_path, md_path, png_path, device, dtype, quiet):
    """Benchmark speed and fidelity of every ratio and policy against the unpruned run."""
    from topi_export.progress import progress_bar

    from topi_export.bench import BenchConfig, markdown_table, plot, run_bench, timestamp
    from topi_export.errors import TopiError
    from topi_export.method.selection import DEFAULT_POLICY, check_policy
    from topi_export.plan import Layout, parse_grid, parse_grids
    from topi_export.artifacts import inputs as I
    from topi_export.runtime.session import open_session

    ratios = parse_ratios(ratio_buckets)
    pols = [check_policy(p.strip()) for p in policies.split(",") if p.strip()]
    if not no_default_policy and DEFAULT_POLICY not in pols:
        pols.insert(0, DEFAULT_POLICY)
    if not pols:
        raise TopiError("--policies is empty: name at least one policy")
    try:
        dts = tuple(int(v) for v in update_intervals.split(",") if v.strip())
        tau_list = tuple(float(v) for v in taus.split(",") if v.strip())
    except ValueError:
        raise TopiError("--update-interval and --tau take comma-separated numbers, e.g. 5,10 and 0.5,0.7")
    if not dts or any(not 1 <= d <= 1000 for d in dts):
        raise TopiError(f"--update-interval {update_intervals!r}: give values in 1..1000")
    if any(not 0 < t <= 1 for t in tau_list):
        raise TopiError(f"--tau {taus!r}: each value must be in (0, 1]")
    from topi_export.plan.limits import RESIDUAL_CHOICES

    named = [v.strip() for v in residuals.split(",") if v.strip()]
    if not named or any(v not in RESIDUAL_CHOICES for v in named):
        raise TopiError(f"--pruning-residual {residuals!r}: give off, on or off,on")
    residual_list = tuple(dict.fromkeys(RESIDUAL_CHOICES[v] for v in named))
    from topi_export.backends import get_backend, model_backend

    backend = backend or model_backend()
    builds = get_backend(backend).BACKEND.builds
    if builds and (device != "cpu" or dtype != "fp32"):
        raise TopiError(f"--device/--dtype apply to --backend {model_backend()} ({backend} engines run where they were "
                        f"built for)")
    md_path = md_path or str(Path(json_path).with_suffix(".md"))
    png_path = png_path or str(Path(json_path).with_suffix(".png"))
    output_files([json_path, md_path, png_path], protected=list(inputs) + [model, calibration, engine_dir])
    torch_session = open_session(model=model, calibration=calibration, device=device, dtype=dtype)
    family = torch_session.family
    files = list(inputs)
    if files:
        data = [I.load_inputs(f, family) for f in files]
    else:
        found = I.sample_files(torch_session.source) if target_grid is None else []
        if found:
            data = [I.load_inputs(f, family) for f in found]
        else:
            grid = parse_grid(target_grid, "--target-grid") if target_grid else (8, 8)
            refs = parse_grids(ref_grids, "--ref-grids") if ref_grids else (grid,)
            data = [family.synthetic_inputs(Layout(text_tokens, grid, refs), seed)]
    data = data[:samples] if samples else data
    if len({d.layout for d in data}) != 1:
        raise TopiError("bench inputs have different shapes: give files of one layout")
    session = torch_session
    if builds:
        from topi_export.builder import build_engines

        out = Path(engine_dir) if engine_dir else (Path("engines") / f"bench-{Path(torch_session.source).name}-"
                                                  f"{data[0].layout.describe()}-{backend}")
        if out.exists() and not (out / "manifest.json").exists():
            raise TopiError(f"--engine-dir {out} exists but is not an engine directory: remove it or name another "
                            f"(bench builds the engines there when the directory is missing)")
        if not (out / "manifest.json").exists():
            build_engines(model=model, layouts=(data[0].layout,), ratio_buckets=[r for r in ratios if r > 0] or "0.5",
                          calibration=calibration, engine_dir=str(out), backend=backend,
                          echo=lambda s: click.echo(s, err=True))
        session = open_session(engine_dir=out, model=model)
    from topi_export.method.reuse import parse_reuse

    reuse_specs = tuple(dict.fromkeys(parse_reuse(v) for v in reuses.split(",") if v.strip())) if reuses else (None,)
    cfg = BenchConfig(ratios, tuple(pols), steps, dts, tau_list, seed, repeats, dim=family.width, reuses=reuse_specs,
                      reuse_order=reuse_order, residuals=residual_list)
    total = len(data) * len(dts) * len(pols) * (len(ratios) + len(tau_list)) * len(reuse_specs) * len(residual_list)
    with progress_bar(total, "bench", show_progress(quiet), unit="run") as bar:
        report = run_bench(session, data, cfg, progress=lambda: bar.update(1))
    report["created"] = timestamp()
    report["command"] = "topi-export " + " ".join(sys.argv[1:]) if sys.argv and "topi-export" in sys.argv[0] else None
    atomic_write_bytes(json_path, (json.dumps(strict_json(report), indent=2, allow_nan=False) + "\n").encode())
    table = markdown_table(report)
    atomic_write_bytes(md_path, (table + "\n").encode())
    plot(report, png_path)
    click.echo(table)
    from topi_export.runtime.compare import NOISY_SPREAD

    if repeats == 1:
        click.echo("note: speed from one run of each setting and of the baseline: use --repeats 3 or more for "
                   "numbers to trust", err=True)
    noisy = [r for r in report["results"] if r.get("speedup_spread") and
             r["speedup_spread"][1] > NOISY_SPREAD * r["speedup_spread"][0]]
    if repeats > 1 and noisy:
        click.echo(f"note: {len(noisy)} setting(s) have pairwise speedups more than {NOISY_SPREAD:.1f}x apart (the "
                   f"machine was busy): rerun, or raise --repeats", err=True)
    click.echo(f"default policy: {report['default_policy']}; best measured at ratio {max(ratios):g}: "
               f"{report['best_policy']}")
    click.echo(f"report -> {json_path}, {md_path}, {png_path}")
