"""``topi-export bench``: speed and fidelity per ratio bucket and selection policy."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from topi_export.commands.common import (ManyValues, atomic_write_bytes, device_options, model_option, quiet_option,
                                         show_progress, steps_option)


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


def strict_json(obj):
    """Infinite PSNR (identical latents) -> null, so the report is strict JSON."""
    import math

    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [strict_json(v) for v in obj]
    return obj


@click.command("bench")
@model_option
@click.option("--inputs", cls=ManyValues, type=click.Path(dir_okay=False),
              help="Inputs files (repeatable, or several after one --inputs). Default: the model's samples, "
                   "else one synthetic input.")
@click.option("--ratio-buckets", default="0.3,0.5", show_default=True, help="Ratios to measure.")
@click.option("--policies", default="topi,topi-cov,uniform,random", show_default=True, help="Selection policies.")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime"]), default="torch", show_default=True)
@click.option("--engine-dir", type=click.Path(file_okay=False), default=None,
              help="onnxruntime: use/keep the engines here (built if missing).")
@steps_option
@click.option("--update-interval", "update_intervals", default="10", show_default=True,
              help="dT; several (e.g. 5,10) sweep it.")
@click.option("--tau", "taus", default="", help="Also sweep adaptive tau values, e.g. 0.5,0.7 (buckets = ratios).")
@click.option("--target-grid", default=None, help="Synthetic input grid HxW when no --inputs (e.g. 32x32).")
@click.option("--text-tokens", type=int, default=8, show_default=True, help="Synthetic input text tokens.")
@click.option("--samples", type=int, default=None, help="Use at most N inputs.")
@click.option("--repeats", type=int, default=1, show_default=True, help="Runs per setting (fastest kept).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), required=True, help="Report JSON.")
@click.option("--md", "md_path", type=click.Path(dir_okay=False), default=None, help="Markdown table (default: next to JSON).")
@click.option("--png", "png_path", type=click.Path(dir_okay=False), default=None, help="Plot (default: next to JSON).")
@device_options
@quiet_option
def cmd(model, inputs, ratio_buckets, policies, backend, engine_dir, steps, update_intervals, taus, target_grid,
        text_tokens, samples, repeats, seed, json_path, md_path, png_path, device, dtype, quiet):
    """Benchmark speed and fidelity of every ratio and policy against the unpruned run."""
    from tqdm import tqdm

    from topi_export.bench import BenchConfig, markdown_table, plot, run_bench, timestamp
    from topi_export.errors import TopiError
    from topi_export.method import POLICIES
    from topi_export.runtime import inputs as I
    from topi_export.runtime.session import open_session

    ratios = parse_ratios(ratio_buckets)
    pols = tuple(p.strip() for p in policies.split(",") if p.strip())
    for p in pols:
        if p not in POLICIES:
            raise TopiError(f"unknown policy {p!r}: choose from {', '.join(POLICIES)}")
    try:
        dts = tuple(int(v) for v in update_intervals.split(",") if v.strip())
        tau_list = tuple(float(v) for v in taus.split(",") if v.strip())
    except ValueError:
        raise TopiError("--update-interval and --tau take comma-separated numbers, e.g. 5,10 and 0.5,0.7")
    if backend != "torch" and (device != "cpu" or dtype != "fp32"):
        raise TopiError("--device/--dtype apply to --backend torch (ONNX Runtime engines are fp32 on the CPU here)")
    torch_session = open_session(model=model, device=device, dtype=dtype)
    adapter = torch_session.adapter
    files = list(inputs)
    if files:
        data = [I.load_inputs(f, adapter) for f in files]
    else:
        from topi_export.models import BUILTINS

        folder = BUILTINS.get(torch_session.model_info["source"])
        found = sorted((folder / "samples").glob("*.safetensors")) if folder and target_grid is None else []
        if found:
            data = [I.load_inputs(f, adapter) for f in found]
        else:
            grid = I.parse_grid(target_grid, "--target-grid") if target_grid else (8, 8)
            data = [I.synthetic_inputs(adapter, seed, grid, grid, text_tokens)]
    data = data[:samples] if samples else data
    if len({d.layout for d in data}) != 1:
        raise TopiError("bench inputs have different shapes: give files of one layout (engines are per shape)")
    session = torch_session
    if backend == "onnxruntime":
        from topi_export.builder import build_engines
        from topi_export.runtime.manifest import open_engine_session

        out = Path(engine_dir) if engine_dir else Path("engines") / f"bench-{Path(torch_session.model_info['source']).name}-{data[0].layout.describe()}"
        if not (out / "manifest.json").exists():
            build_engines(model=model, layout=data[0].layout, ratio_buckets=[r for r in ratios if r > 0] or "0.5",
                          engine_dir=out,
                          echo=lambda s: click.echo(s, err=True))
        session = open_engine_session(out)
    mc = torch_session.adapter.config
    cfg = BenchConfig(ratios, pols, steps, dts, tau_list, seed, repeats,
                      dim=mc.num_attention_heads * mc.attention_head_dim)
    total = len(data) * len(dts) * len(pols) * (len(ratios) + len(tau_list))
    with tqdm(total=total, disable=not show_progress(quiet), desc="bench", unit="run") as bar:
        report = run_bench(session, data, cfg, progress=lambda: bar.update(1))
    report["created"] = timestamp()
    report["command"] = "topi-export " + " ".join(sys.argv[1:]) if sys.argv and "topi-export" in sys.argv[0] else None
    atomic_write_bytes(json_path, (json.dumps(strict_json(report), indent=2, allow_nan=False) + "\n").encode())
    table = markdown_table(report)
    md_path = md_path or str(Path(json_path).with_suffix(".md"))
    atomic_write_bytes(md_path, (table + "\n").encode())
    png_path = png_path or str(Path(json_path).with_suffix(".png"))
    plot(report, png_path)
    click.echo(table)
    click.echo(f"default policy: {report['default_policy']}; best measured at ratio {max(ratios):g}: "
               f"{report['best_policy']}")
    click.echo(f"report -> {json_path}, {md_path}, {png_path}")
