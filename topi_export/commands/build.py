"""``topi-export build``: graphs + engines + manifest for one model and shape."""
from __future__ import annotations

import click

from topi_export.commands.common import model_option


@click.command("build")
@model_option
@click.option("--ratio-buckets", default="0.3,0.5", show_default=True,
              help="Prune fractions to compile, ascending, each in (0,1). One TensorRT profile per bucket.")
@click.option("--calibration", type=click.Path(dir_okay=False), default=None, help="Calibration profile JSON.")
@click.option("--inputs", type=click.Path(dir_okay=False), default=None, help="Take the build shape from this inputs file.")
@click.option("--target-grid", default=None, help="Target token grid HxW (instead of --inputs).")
@click.option("--ref-grid", default=None, help="Reference token grid HxW (default: the target grid).")
@click.option("--text-tokens", type=int, default=None, help="Text tokens (default 8 with --target-grid).")
@click.option("--backend", default="onnxruntime", show_default=True, help="onnxruntime | tensorrt | tensorrt-rtx")
@click.option("--engine-dir", type=click.Path(file_okay=False), default=None,
              help="Output directory (default: engines/<model>-<shape>-<backend>).")
@click.option("--onnx-dir", type=click.Path(file_okay=False), default=None,
              help="Keep/reuse the exported portable ONNX graphs here (reused when model, shape and layers match).")
@click.option("--policy", default=None, help="Token selection policy recorded for the runtime (default: the "
                                            "measured best, see README).")
@click.option("--tau", type=float, default=None, help="Record an adaptive tau default in the manifest.")
@click.option("--force", is_flag=True, help="Replace an existing engine directory.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="TensorRT precision (ONNX Runtime engines are fp32).")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None, help="TensorRT timing cache file.")
@click.option("--optimization-level", type=click.IntRange(0, 5), default=3, show_default=True,
              help="TensorRT builder optimization level.")
@click.option("--workspace", default=None, help="TensorRT workspace limit, e.g. 4G.")
@click.option("--compute-capability", "compute_capability", multiple=True,
              help="TensorRT-RTX ahead-of-time target, e.g. SM89 (repeatable).")
@click.option("--no-plugins", is_flag=True, help="TensorRT: let the parser inline the topi function bodies.")
@click.option("--build-dynamic-shape", is_flag=True, hidden=True)  # TensorRT demo users: explained, not silently ignored
def cmd(model, ratio_buckets, calibration, inputs, target_grid, ref_grid, text_tokens, backend, engine_dir, onnx_dir,
        policy, tau, force, precision, timing_cache, optimization_level, workspace, compute_capability, no_plugins,
        build_dynamic_shape):
    """Export anchor/pruned graphs with topi custom ops and build engines per ratio bucket."""
    from topi_export.builder import build_engines
    from topi_export.errors import TopiError
    from topi_export.models import Layout
    from topi_export.runtime.inputs import parse_grid

    if build_dynamic_shape:
        raise TopiError("--build-dynamic-shape is not supported: engines are static per shape except keep_idx "
                        "(one profile per ratio bucket); build one engine directory per resolution instead")
    layout = None
    if target_grid or ref_grid or text_tokens:
        if inputs:
            raise TopiError("give either --inputs or --target-grid/--ref-grid/--text-tokens, not both")
        if not target_grid:
            raise TopiError("--ref-grid/--text-tokens need --target-grid HxW")
        tg = parse_grid(target_grid, "--target-grid")
        layout = Layout(text_tokens or 8, tg, parse_grid(ref_grid, "--ref-grid") if ref_grid else tg)
    if backend == "onnxruntime" and precision != "fp32":
        raise TopiError("ONNX Runtime engines are fp32: drop --precision or build --backend tensorrt")
    options = {"precision": precision, "timing_cache": timing_cache, "optimization_level": optimization_level,
               "workspace": workspace, "compute_capabilities": list(compute_capability), "plugins": not no_plugins}
    out = build_engines(model=model, calibration=calibration, layout=layout, inputs=inputs,
                        ratio_buckets=ratio_buckets, backend=backend, engine_dir=engine_dir, onnx_dir=onnx_dir,
                        policy=policy, tau=tau, force=force, backend_options=options,
                        echo=lambda s: click.echo(s, err=True))
    click.echo(f"engines -> {out}")
    click.echo(f"next: topi-export run --engine-dir {out} --compare")
