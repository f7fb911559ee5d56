"""``topi-export edit``: reference image(s) and a prompt in, the edited image out, through the family's own
diffusers pipeline with its transformer replaced by the ToPi drop-in (runtime/pipeline.py). ``--compare`` also runs
the unmodified pipeline and writes a strip (references | dense | ToPi) and a JSON report."""
from __future__ import annotations

import click

from topi_export.commands.common import (POLICY_HELP, device_options, output_files, quiet_option, residual_option,
                                         seed_option, show_progress, steps_option)


def front_end_options(f):
    """The families' own flags (models/<family>_pipeline.py CallOption), each flag once; a flag the pipeline's
    family does not own is refused, not ignored."""
    import importlib

    from topi_export.models import families

    seen, owners = {}, {}
    for fam in families():
        if fam.front_end:
            for opt in importlib.import_module(fam.front_end).FRONT_END.options:
                seen.setdefault(opt.flag, opt)
                owners.setdefault(opt.flag, []).append(fam.name)
    for opt in reversed(list(seen.values())):
        f = click.option(opt.flag, opt.dest, type=opt.kind, default=None,
                         help=f"[{', '.join(owners[opt.flag])}] {opt.help}")(f)
    return f


def pipeline_options(f):
    """Flags `edit` and `encode` share: the pipeline, images, prompt, size, loop settings, the families' flags."""
    f = front_end_options(f)
    for option in reversed([
        click.option("--model", "model", required=True, metavar="PIPELINE_DIR",
                     help="A local diffusers pipeline folder of a served family (saved with save_pretrained; README, "
                          "Model families, lists the pipelines)."),
        click.option("--image", "images", multiple=True, required=True, metavar="FILE",
                     help="A reference image; repeat once per reference, in order."),
        click.option("--prompt", required=True, help="The edit instruction."),
        click.option("--width", type=click.IntRange(16, 8192), default=None,
                     help="Target width in pixels (with --height). Default: the pipeline's resolution rules."),
        click.option("--height", type=click.IntRange(16, 8192), default=None, help="Target height in pixels."),
        steps_option, seed_option]):
        f = option(f)
    return f


def family_options(front, given: dict) -> dict:
    """{kwarg: value} of the family flags given; a flag of another family is refused."""
    own = {o.dest: o for o in front.options}
    out = {}
    for dest, value in given.items():
        if value is None:
            continue
        if dest not in own:
            flags = ", ".join(o.flag for o in front.options) or "none"
            raise click.UsageError(f"--{dest.replace('_', '-')} is not an option of {front.class_name} "
                                   f"({front.family}); its options: {flags}")
        out[own[dest].kwarg] = value
    return out


def make_request(front, images, prompt, steps, seed, width, height, given):
    from topi_export.models.frontend import EditRequest
    from topi_export.runtime.pipeline import load_images

    pics, names = load_images(images)
    return EditRequest(pics, prompt, steps, seed, width, height, family_options(front, given), names)


@click.command("edit")
@pipeline_options
@click.option("--engine-dir", type=click.Path(file_okay=False), default=None,
              help="Run built engines (from `build --model PIPELINE_DIR ...`). Default: the PyTorch backend runs the "
                   "family's ToPi forward.")
@click.option("--backend", default=None, help="Default: torch without --engine-dir, else the engines' backend.")
@click.option("--ratio", type=float, default=None, help="Fixed prune fraction in [0, 1). Default 0.5.")
@click.option("--tau", type=float, default=None,
              help="Adaptive: keep at least tau of the influence, rounded up to a compiled bucket.")
@click.option("--ratio-buckets", default=None, help="Buckets for --tau without engines, e.g. 0.3,0.5.")
@click.option("--policy", default=None, help=POLICY_HELP)
@click.option("--update-interval", type=click.IntRange(1, 1000), default=None, help="Anchor every N steps (dT).")
@residual_option
@click.option("--lora", multiple=True, metavar="FILE[:SCALE]",
              help="LoRA fused into the PyTorch model (repeatable). Engines hold theirs (`build --lora`, `refit`); "
                   "with --engine-dir --compare, the same adapters are given to the unmodified pipeline.")
@click.option("--out", type=click.Path(dir_okay=False), default="edited.png", show_default=True,
              help="The edited image (PNG).")
@click.option("--save-latents", type=click.Path(dir_okay=False), default=None,
              help="Also write the final latents (safetensors 'latents', as `run --out`).")
@click.option("--compare", is_flag=True,
              help="Also run the unmodified pipeline: writes <out stem>_compare.png (references | dense | ToPi) and "
                   "<out stem>.json (time_s, speedup, psnr_db, ssim).")
@device_options
@quiet_option
def cmd(model, images, prompt, width, height, steps, seed, engine_dir, backend, ratio, tau, ratio_buckets, policy,
        update_interval, pruning_residual, lora, out, save_latents, compare, device, dtype, quiet, **given):
    """Edit reference image(s) with a prompt through the family's diffusers pipeline with the ToPi transformer."""
    from pathlib import Path

    from topi_export.lora import parse_adapters
    from topi_export.plan.limits import parse_residual
    from topi_export.runtime import pipeline as P

    P.require_packages()
    P.loading_bars(show_progress(quiet))
    front = P.open_front_end(model)
    request = make_request(front, images, prompt, steps, seed, width, height, given)
    out_path = Path(out)
    json_path = out_path.with_name(f"{out_path.stem}.json") if compare else None
    strip_path = out_path.with_name(f"{out_path.stem}_compare.png") if compare else None
    output_files([out, save_latents, json_path, strip_path], protected=list(images))
    for p in (out, save_latents, json_path, strip_path):  # never into the pipeline folder
        if p:
            from topi_export.fsutil import refuse_overwrite

            refuse_overwrite(p, [front.folder], what="the output")
    adapters = parse_adapters(lora)
    shape = front.shape(request)  # before any text encoder or VAE runs
    manifest = None
    if engine_dir is not None:
        manifest = _check_engines(front, engine_dir, shape, adapters, compare, [out, save_latents, json_path,
                                                                                  strip_path])
    runs = _Edit(front, request, shape, manifest, adapters, quiet)
    topi = runs.topi(engine_dir, backend, dict(ratio=ratio, tau=tau, ratio_buckets=ratio_buckets, policy=policy),
                     update_interval, device, dtype, parse_residual(pruning_residual))
    _save_png(out, topi.image)
    click.echo(f"edited image -> {out}")
    if save_latents:
        from topi_export.commands.common import save_latents as write_latents

        write_latents(save_latents, topi.latents)
        click.echo(f"latents -> {save_latents}")
    if compare:
        runs.compare(topi, strip_path, json_path, dtype)


def _check_engines(front, engine_dir, shape, adapters, compare, outputs):
    from topi_export.artifacts.manifest import read_manifest
    from topi_export.errors import BadInput
    from topi_export.fsutil import refuse_overwrite
    from topi_export.lora import describe_recorded, same_adapters
    from topi_export.plan import NAME
    from topi_export.runtime import pipeline as P

    m = read_manifest(engine_dir)
    for p in outputs:
        if p:
            refuse_overwrite(p, [m.root / NAME] + [m.root / rel for rel in m.files], what="the output")
    if adapters and not (compare and same_adapters(adapters, m.model.adapters)):
        raise BadInput(f"{m.root} holds weights fused at build time (LoRA: {describe_recorded(m.model.adapters)}): "
                       f"for other adapters write new engines with `topi-export refit --engine-dir {m.root} --lora "
                       f"FILE[:SCALE] --out DIR` (--lora with --engine-dir only names the engines' own adapters for "
                       f"--compare)")
    if compare and m.model.adapters and not same_adapters(adapters, m.model.adapters):
        raise BadInput(f"{m.root} holds weights fused with LoRA {describe_recorded(m.model.adapters)}: --compare runs "
                       f"the unmodified pipeline with the same adapters; pass them with --lora FILE:SCALE")
    P.check_fit(front, m, shape, identity=P.transformer_identity(front), adapters=adapters)
    return m


def _save_png(path, image) -> None:
    import io

    from topi_export.fsutil import atomic_write_bytes

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


class _Edit:
    def __init__(self, front, request, shape, manifest, adapters, quiet):
        self.front, self.request, self.shape, self.manifest = front, request, shape, manifest
        self.adapters, self.progress = adapters, show_progress(quiet)
        self.transformer = self.pipe = None

    def topi(self, engine_dir, backend, selection, update_interval, device, dtype, residual=False):
        from topi_export.commands.run import schedule_summary, selection_text, tau_note
        from topi_export.models import DTYPES
        from topi_export.runtime import pipeline as P
        from topi_export.runtime.diffusers_transformer import TopiTransformer

        tr = TopiTransformer(engine_dir, model=None if engine_dir else str(self.front.folder), backend=backend,
                             update_interval=update_interval, seed=self.request.seed, device=device, dtype=dtype,
                             loras=() if engine_dir else self.adapters, pruning_residual=residual, **selection)
        self.transformer = tr
        self.pipe = self.front.load(transformer=tr, dtype=DTYPES[dtype])
        if device != "cpu":
            self.pipe.to(device)
        session = tr.session
        selector = session.selector_for(self.shape.layout, **tr._selection)
        self.selector = selector
        lora = f", LoRA {session.identity.describe_adapters()}" if session.identity.adapters else ""
        click.echo(f"{self.front.class_name} ({self.front.family}) from {self.front.folder}, transformer on "
                   f"{session.engine.name}{lora}: {selection_text(selector)}, policy {selector.policy}; "
                   f"{self.shape.describe()}", err=True)
        run = P.run_pipeline(self.front, self.pipe, self.request, desc="ToPi", progress=self.progress)
        P.check_planned(self.shape, run.layouts, self.front.family)
        click.echo(schedule_summary(tr.schedule))
        note = tau_note(selector, tr.schedule, self.shape.layout.num_ctx)
        if note:
            click.echo(f"note: {note}", err=True)
        click.echo(f"{run.time_s:.2f} s in the pipeline, {run.transformer_s:.2f} s in the transformer")
        self.schedule = list(tr.schedule)
        self.kept = dict(tr.runner.kept) if hasattr(tr, "runner") else {}
        return run

    def compare(self, topi, strip_path, json_path, dtype):
        import math

        from topi_export.commands.common import write_json
        from topi_export.models import DTYPES
        from topi_export.runtime import pipeline as P
        from topi_export.runtime.images import image_psnr, image_ssim
        from topi_export.runtime.visualize import edit_strip

        engine_name = self.transformer.session.engine.name
        self.transformer = None
        reference = P.unmodified_transformer(self.front, DTYPES[dtype])
        if self.adapters:  # the reference runs the adapters unfused, as a diffusers user would
            P.load_adapters(self.front, reference, self.adapters)
        self.pipe.transformer = reference
        dense = P.run_pipeline(self.front, self.pipe, self.request, desc="dense", progress=self.progress)
        psnr, ssim = image_psnr(topi.image, dense.image), image_ssim(topi.image, dense.image)
        speedup = dense.transformer_s / topi.transformer_s if topi.transformer_s > 0 else None
        last = max(self.kept) if self.kept else None
        edit_strip(strip_path, self.request, self.shape, dense.image, topi.image,
                   self.kept.get(last) if last is not None else None)
        report = {
            "model": str(self.front.folder), "pipeline": self.front.class_name, "family": self.front.family,
            "backend": engine_name, "baseline": "the unmodified pipeline (diffusers transformer, PyTorch)",
            "engine_dir": str(self.manifest.root) if self.manifest is not None else None,
            "images": list(self.request.names), "prompt": self.request.prompt, "steps": self.request.steps,
            "seed": self.request.seed, "layout": self.shape.layout.to_json(),
            "pixels": {"target": list(self.shape.target_px), "references": [list(r) for r in self.shape.refs_px]},
            "selection": {"ratio": self.selector.ratio, "tau": self.selector.tau,
                          "buckets": list(self.selector.buckets), "policy": self.selector.policy},
            "adapters": [a.to_json() for a in self.adapters],
            "time_s": {"topi": topi.time_s, "dense": dense.time_s},
            "transformer_s": {"topi": topi.transformer_s, "dense": dense.transformer_s},
            "speedup": speedup, "pipeline_speedup": dense.time_s / topi.time_s if topi.time_s > 0 else None,
            "psnr_db": psnr, "ssim": ssim, "schedule": [r.to_json() for r in self.schedule]}
        write_json(json_path, report)
        shown = "inf (identical)" if math.isinf(psnr) else f"{psnr:.2f}"
        click.echo(f"dense (unmodified pipeline): {dense.time_s:.2f} s ({dense.transformer_s:.2f} s transformer); "
                   f"ToPi {topi.time_s:.2f} s ({topi.transformer_s:.2f} s); transformer speedup "
                   f"{speedup or 0:.2f}x; PSNR {shown} dB, SSIM {ssim:.4f}")
        if self.manifest is not None:
            click.echo(f"note: the baseline is the diffusers transformer in PyTorch and ToPi ran on {engine_name}: "
                       f"the speedup compares backends too (`run --engine-dir ... --compare` measures against the "
                       f"dense graph on the same backend)", err=True)
        click.echo(f"strip -> {strip_path}")
        click.echo(f"report -> {json_path}")
