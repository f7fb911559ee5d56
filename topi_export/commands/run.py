"""``topi-export run``: one ToPi generation, optionally against the dense baseline (--compare)."""
from __future__ import annotations

import click

from topi_export.commands.common import (POLICY_HELP, device_options, model_option, output_files, quiet_option,
                                         residual_option, reuse_options, save_latents, seed_option, show_progress,
                                         steps_option, write_json)


def schedule_summary(schedule) -> str:
    anchors = [r.step for r in schedule if r.selected_keep is not None or r.kind == "anchor"]
    keeps = sorted({r.keep for r in schedule if r.graph in ("pruned", "kv-pruned")})
    total = sum(r.time_s for r in schedule)
    computed = sum(r.kind != "reuse" for r in schedule)
    residuals = sum(bool(r.residual) for r in schedule)
    pruned = (f"pruned steps keep {keeps} context tokens" if keeps else
              "no step pruned (every anchor kept all context tokens)")
    residual = f", {residuals} anchors measured the pruning residual" if residuals else ""
    return (f"{len(schedule)} steps ({computed} computed), anchors at {anchors}, {pruned}{residual}, {total:.2f} s "
            f"in the transformer")


def compare_table(report) -> str:
    t = report.time_s
    base = "dense" if report.baseline == "dense" else "full"
    lo, hi = report.speedup_spread
    rows = [("", "time [s]", "speedup", "PSNR [dB]", "rel. L2"),
            (f"{base} (baseline)", f"{t[base]:.3f}", "1.00x", "-", "-")]
    if "kv-cache" in t:  # a KV-trained model's unpruned cached loop (docs/design.md, "Reference K/V cache")
        rows.append(("KV cache, unpruned", f"{t['kv-cache']:.3f}", f"{t[base] / t['kv-cache']:.2f}x", "-", "-"))
    rows.append(("ToPi", f"{t['topi']:.3f}", f"{report.speedup:.2f}x ({lo:.2f}-{hi:.2f})", f"{report.psnr_db:.2f}",
                 f"{report.rel_l2:.2e}"))
    if report.speedup_vs_kv_cache is not None:
        klo, khi = report.speedup_vs_kv_cache_spread
        rows.append(("ToPi vs KV cache", "", f"{report.speedup_vs_kv_cache:.2f}x ({klo:.2f}-{khi:.2f})", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


@click.command("run")
@model_option
@click.option("--inputs", type=click.Path(dir_okay=False), default=None,
              help="Inputs .safetensors (README, inputs file). Default: the embedded model's sample, or a seeded "
                   "synthetic input.")
@click.option("--engine-dir", type=click.Path(file_okay=False), default=None,
              help="Run built engines from this directory (see `topi-export build`).")
@click.option("--backend", default=None, help="torch | onnxruntime | tensorrt | tensorrt-rtx. Default: torch, "
                                              "or the engine directory's backend.")
@click.option("--ratio", type=float, default=None, help="Fixed prune fraction in [0, 1). Default 0.5.")
@click.option("--tau", type=float, default=None,
              help="Adaptive mode: keep at least tau of the total influence, rounded up to a compiled bucket.")
@click.option("--ratio-buckets", default=None, help="Compiled buckets for --tau, e.g. 0.3,0.5.")
@click.option("--policy", default=None, help=POLICY_HELP)
@click.option("--update-interval", type=click.IntRange(1, 1000), default=None,
              help="Anchor every N steps (dT). Default: the calibration's.")
@click.option("--calibration", type=click.Path(dir_okay=False), default=None,
              help="Calibration profile JSON; 'none': the family's default setting, ignoring a shipped profile.")
@reuse_options
@residual_option
@steps_option
@seed_option
@click.option("--compare", is_flag=True, help="Also run the dense baseline; print time, speedup, PSNR, rel. L2.")
@click.option("--repeats", type=click.IntRange(1, 20), default=3, show_default=True,
              help="With --compare: timed runs of each loop, interleaved (ToPi, baseline, ToPi, ...); the fastest of "
                   "each is reported, so a machine whose speed drifts does not favour either.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write a JSON report.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write final latents (safetensors).")
@click.option("--png", type=click.Path(dir_okay=False), default=None,
              help="With --compare: save a strip of the references with their kept tokens, the baseline and ToPi "
                   "(and the ground truth when the inputs carry it), titled.")
@click.option("--vae", type=click.Path(file_okay=False), default=None, metavar="PIPELINE_DIR",
              help="Decode the --png strip with this pipeline folder's VAE (default: --model's, when it is a pipeline "
                   "folder; else the first three latent channels are shown).")
@device_options
@quiet_option
@click.option("--lora", multiple=True, metavar="FILE[:SCALE]",
              help="LoRA fused into the model the PyTorch backend runs (repeatable). Engines hold the adapters they "
                   "were built or refitted with (`topi-export refit` swaps them).")
# --- reference K/V cache (docs/design.md, "Reference K/V cache") ---
@click.option("--ref-kv", "ref_kv", type=click.Choice(["reuse"]), default=None,
              help="Approximate reference K/V reuse (any model): anchors run in full and record the references' keys "
                   "and values, the steps between run text and target tokens against the kept ones. A KV-trained "
                   "model (FLUX.2 [klein] KV) uses its exact cache without this flag.")
@click.option("--kv-cache/--no-kv-cache", "kv_cache", default=None,
              help="Run --model as a KV-trained model (default: when it is a Flux2KleinKVPipeline folder).")
# ---
def cmd(model, inputs, engine_dir, backend, ratio, tau, ratio_buckets, policy, update_interval, calibration, reuse,
        reuse_order, pruning_residual, steps, seed, compare, repeats, json_path, out, png, vae, device, dtype, quiet,
        lora, ref_kv, kv_cache):
    """Run a ToPi-pruned in-context generation and report the per-step schedule."""
    from topi_export.errors import TopiError
    from topi_export.plan.limits import parse_residual
    from topi_export.runtime.session import open_session

    if png and not compare:
        raise TopiError("--png needs --compare (the strip shows the baseline and the ToPi result)")
    output_files([json_path, out, png], protected=[inputs, calibration, model, vae, *lora])
    session = open_session(model=model, engine_dir=engine_dir, backend=backend, calibration=calibration,
                           update_interval=update_interval, device=device, dtype=dtype, loras=lora, kv_cache=kv_cache)
    ref_kv = session.check_ref_kv(ref_kv)
    if session.manifest is not None:  # a new file next to the engines is fine; none of the engine files
        from topi_export.fsutil import refuse_overwrite
        from topi_export.plan import NAME

        m = session.manifest
        for p in (json_path, out, png):
            if p:
                refuse_overwrite(p, [m.root / NAME] + [m.root / rel for rel in m.files], what="the output")
    data = session.load_inputs(inputs, seed)
    selector = session.selector(data, ratio=ratio, tau=tau, ratio_buckets=ratio_buckets, policy=policy, seed=seed)
    plan = session.reuse_plan(data, steps=steps, reuse=reuse, order=reuse_order, update_interval=update_interval)
    residual = parse_residual(pruning_residual)
    progress = show_progress(quiet)
    session.warmup(data, selector, dense=compare, ref_kv=ref_kv)
    comparison = None
    if compare:
        from topi_export.runtime.compare import compare as run_compare

        comparison = run_compare(session, data, steps=steps, seed=seed, selector=selector, repeats=repeats,
                                 progress=progress, update_interval=update_interval, reuse=plan, ref_kv=ref_kv,
                                 pruning_residual=residual)
        topi = comparison.topi
    else:
        topi = session.denoise(data, steps=steps, seed=seed, selector=selector, progress=progress,
                               update_interval=update_interval, reuse=plan, ref_kv=ref_kv, pruning_residual=residual)
    report = session.report(data, selector, steps, topi, comparison, reuse=plan)
    lora = f", LoRA {session.identity.describe_adapters()}" if session.identity.adapters else ""
    click.echo(f"{session.source} ({session.family.name}{lora}) on {session.engine.name}: "
               f"{selection_text(selector)}, policy {selector.policy}")
    click.echo(f"step reuse: {reuse_text(plan, steps)}")
    click.echo(schedule_summary(topi.schedule))
    if report.ref_kv is not None:
        kv = report.ref_kv
        click.echo(f"reference K/V cache ({kv['label']}): {kv['cache_bytes'] / 2**20:.1f} MiB")
    note = tau_note(selector, topi.schedule, data.layout.num_ctx)
    if note:
        click.echo(f"note: {note}", err=True)
    if comparison is not None:
        if comparison.mode != "dense":
            click.echo(f"note: {engine_dir} has no dense baseline graph; the speedup is against the in-engine "
                       f"unpruned step (rebuild with --dense-baseline)", err=True)
        click.echo(compare_table(report))
        if comparison.warning():
            click.echo(f"note: {comparison.warning()}", err=True)
        if png:
            from topi_export.runtime.visualize import save_strip

            from topi_export.runtime.pipeline import latent_decoder

            decode = latent_decoder(vae, required=True) if vae else (latent_decoder(model) if model else None)
            last = max(topi.kept) if topi.kept else None
            save_strip(png, data, comparison.baseline.latents, topi.latents,
                       topi.kept.get(last) if last is not None else None, decode=decode,
                       baseline_name="dense" if comparison.mode == "dense" else "unpruned (in-engine)")
            click.echo(f"strip -> {png}")
        if report.psnr_db_vs_truth is not None:
            click.echo(f"vs ground truth: PSNR baseline {report.psnr_db_vs_truth['baseline']:.2f} dB, "
                       f"ToPi {report.psnr_db_vs_truth['topi']:.2f} dB")
    if out:
        save_latents(out, topi.latents)
        click.echo(f"latents -> {out}")
    if json_path:
        write_json(json_path, report.to_json())
        click.echo(f"report -> {json_path}")


def reuse_text(plan, steps: int) -> str:
    if not plan.enabled:
        return plan.why
    order = "the last velocity" if plan.order == 0 else "extrapolated from the last two"
    return (f"{len(plan.steps)} of {steps} steps reuse {order} (steps {list(plan.steps)}); {plan.why}")


def selection_text(selector) -> str:
    if selector.tau is not None:
        return f"tau {selector.tau:g} over buckets {list(selector.buckets)}"
    return f"ratio {selector.ratio:g}"



def tau_note(selector, schedule, num_ctx: int) -> str | None:
    """With --tau: the anchors at which no compiled bucket kept enough influence, so their interval ran unpruned."""
    if selector.tau is None:
        return None
    full = [r.step for r in schedule if r.selected_keep is not None and r.selected_keep >= num_ctx]
    if not full:
        return None
    return (f"tau {selector.tau:g}: at anchor step(s) {full} no compiled bucket keeps that much of the influence, so "
            f"those intervals ran unpruned (all {num_ctx} context tokens); lower --tau or build a bucket with a "
            f"smaller ratio")
