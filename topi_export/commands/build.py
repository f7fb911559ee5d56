"""``topi-export build``: graphs + engines + manifest for one model, one or several shapes."""
from __future__ import annotations

import click

from topi_export.backends import DEFAULT_BUILD_BACKEND, build_backends
from topi_export.commands.common import model_option


def backend_options(f):
    """The build flags every backend owns (backends/<name>.py, BACKEND.options), each flag once."""
    from topi_export.backends import build_backends, get_backend

    seen = {}
    for name in build_backends():
        cls = get_backend(name).BACKEND.options
        if cls is None:
            continue
        for field_name, option in zip(cls.flags(), cls.click_options()):
            seen.setdefault(field_name, option)
    for option in reversed(list(seen.values())):
        f = option(f)
    return f


def layouts_from_flags(inputs, target_grid, ref_grid, ref_grids, text_tokens, resolutions, default_text: int = 8):
    """The build shapes the flags ask for; () means "from --inputs / --resolutions / the model's default"."""
    from topi_export.errors import TopiError
    from topi_export.plan import Layout, parse_grid, parse_grids

    grid_flags = bool(target_grid or ref_grid or ref_grids)
    if sum(map(bool, (inputs, grid_flags, resolutions))) > 1:
        raise TopiError("give one of --inputs, --target-grid/--ref-grid, --resolutions/--image-sizes")
    if ref_grid and ref_grids:
        raise TopiError("give either --ref-grid (repeatable) or --ref-grids HxW,HxW, not both")
    if not grid_flags:
        if text_tokens is not None and not resolutions:
            raise TopiError("--text-tokens needs --target-grid HxW or --resolutions")
        return ()
    if not target_grid:
        raise TopiError("--ref-grid/--ref-grids need --target-grid HxW")
    tg = parse_grid(target_grid, "--target-grid")
    refs = tuple(parse_grid(g, "--ref-grid") for g in ref_grid) if ref_grid else (
        parse_grids(ref_grids, "--ref-grids") if ref_grids else (tg,))
    return (Layout(text_tokens or default_text, tg, refs),)


@click.command("build")
@model_option
@click.option("--ratio-buckets", default="0.3,0.5", show_default=True,
              help="Prune fractions to compile, ascending, each in (0,1). One TensorRT profile per bucket and shape.")
@click.option("--calibration", type=click.Path(dir_okay=False), default=None, help="Calibration profile JSON.")
@click.option("--inputs", type=click.Path(dir_okay=False), default=None, help="Take the build shape from this inputs file.")
@click.option("--target-grid", default=None, help="Target token grid HxW (instead of --inputs).")
@click.option("--ref-grid", multiple=True, help="A reference token grid HxW; repeat for several references "
                                                "(default: one, the target grid).")
@click.option("--ref-grids", default=None, help="Reference token grids HxW,HxW,... (instead of repeating --ref-grid).")
@click.option("--text-tokens", type=click.IntRange(1, 4096), default=None,
              help="Text tokens (default: the pipeline's when --model is a pipeline folder, e.g. 512; else 8 with "
                   "--target-grid, the family's with --resolutions).")
@click.option("--resolutions", multiple=True,
              help="Serve several shapes from one engine directory, in pixels: WIDTHxHEIGHT,... (each reference at "
                   "the target's size), TARGET:REF,REF layouts (e.g. 1024x1024:1184x880), or a shorthand "
                   "(kontext-preferred: the 17 resolutions FluxKontextPipeline snaps to). Repeatable; ';' also "
                   "separates layouts. With a pipeline folder, pixels per token come from its VAE.")
@click.option("--image-sizes", multiple=True, metavar="WxH[,WxH...]",
              help="With a pipeline folder: the sizes of the reference images requests will bring (one WxH per "
                   "reference; repeat for several layouts); the pipeline's resolution rules and default target size "
                   "give the layouts (e.g. 800x600 -> 1024x1024:1184x880 for FLUX.1 Kontext).")
@click.option("--references", type=click.IntRange(1, 16), default=1, show_default=True,
              help="References per request with --resolutions (each at the target's resolution).")
@click.option("--backend", default=DEFAULT_BUILD_BACKEND, show_default=True,
              help=f"Engine backend: {' | '.join(build_backends())}.")
@click.option("--engine-dir", type=click.Path(file_okay=False), default=None,
              help="Output directory (default: engines/<model>-<shape>-<backend>).")
@click.option("--onnx-dir", type=click.Path(file_okay=False), default=None,
              help="Keep the exported ONNX graphs here and reuse them when model, settings and tool versions match "
                   "(checked by hash).")
@click.option("--policy", default=None, help="Token selection policy recorded as the runtime's default.")
@click.option("--tau", type=float, default=None,
              help="Adaptive default for `run` on these engines: keep tau of the influence, rounded up to a bucket.")
@click.option("--dense-baseline/--no-dense-baseline", "dense", default=None,
              help="Also build the plain dense model, the baseline of every reported speedup (default: on for "
                   "onnxruntime, where it shares the weights file; off for TensorRT, where it is a second engine).")
@click.option("--cfg/--no-cfg", "cfg", default=None,
              help="Graphs for true classifier-free guidance (both branches batched). Default: when the model "
                   "family guides with true CFG (Qwen-Image-Edit).")
@click.option("--force", is_flag=True, help="Replace an existing engine directory made by topi-export.")
@click.option("--lora", multiple=True, metavar="FILE[:SCALE]",
              help="LoRA adapter (.safetensors) fused into the weights before export, at SCALE (default 1); "
                   "repeatable. Swap adapters later with `topi-export refit`.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Precision the weights are loaded and exported in (TensorRT; ONNX Runtime engines are fp32).")
@backend_options
@click.option("--build-dynamic-shape", is_flag=True, hidden=True)  # TensorRT demo users: explained, not ignored
def cmd(model, ratio_buckets, calibration, inputs, target_grid, ref_grid, ref_grids, text_tokens, resolutions,
        image_sizes, references, backend, engine_dir, onnx_dir, policy, tau, dense, cfg, force, lora, precision,
        build_dynamic_shape, **backend_flags):
    """Export topi (+ dense baseline) graphs with topi custom ops and build engines per shape and ratio bucket."""
    from topi_export.backends import options_for
    from topi_export.builder import BuildPlan, build_engines
    from topi_export.errors import TopiError
    from topi_export.method.selection import parse_buckets

    if build_dynamic_shape:
        raise TopiError("--build-dynamic-shape is not needed: the ONNX graphs have dynamic token dimensions, and "
                        "TensorRT engines get one profile per (resolution, bucket); list resolutions with "
                        "--resolutions WxH,WxH")
    from topi_export.builder import pipeline_front_end
    from topi_export.lora import parse_adapters

    resolutions = ";".join(resolutions) or None
    image_sizes = ";".join(image_sizes) or None
    front = pipeline_front_end(model)  # a pipeline folder gives the default text length
    layouts = layouts_from_flags(inputs, target_grid, ref_grid, ref_grids, text_tokens, resolutions or image_sizes,
                                 front.text_tokens() if front is not None else 8)
    adapters = parse_adapters(lora)
    ctx = click.get_current_context()
    if ctx.get_parameter_source("references") == click.core.ParameterSource.COMMANDLINE and not resolutions:
        raise TopiError("--references sets the reference count of --resolutions layouts; with --target-grid give one "
                        "--ref-grid per reference (or --ref-grids HxW,HxW)")
    for flag, value in (("--engine-dir", engine_dir), ("--onnx-dir", onnx_dir)):
        if value is not None and not str(value).strip():
            raise TopiError(f"{flag} is empty: name a directory")
    given = {k: v for k, v in backend_flags.items()
             if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
    options = options_for(backend, given)
    plan = BuildPlan(model=model, layouts=layouts, buckets=parse_buckets(ratio_buckets), backend=backend,
                     precision=precision, calibration=calibration, policy=policy, tau=tau, dense=dense, cfg=cfg,
                     inputs=inputs, resolutions=resolutions, references=references, text_tokens=text_tokens,
                     image_sizes=image_sizes,
                     engine_dir=engine_dir, onnx_dir=onnx_dir, force=force, options=options, loras=adapters)
    out = build_engines(plan, echo=lambda s: click.echo(s, err=True))
    click.echo(f"engines -> {out}")
    if adapters:
        click.echo(f"LoRA fused: {', '.join(f'{a.describe()} (sha256 {a.sha256[:12]})' for a in adapters)}")
    click.echo(f"next: topi-export run --engine-dir {out} --compare")
