"""``topi-export run``: one ToPi generation, optionally against the unpruned baseline (--compare)."""
from __future__ import annotations

import click

from topi_export.commands.common import (device_options, model_option, quiet_option, save_latents, show_progress,
                                         steps_option, write_json)


@click.command("run")
@model_option
@click.option("--inputs", type=click.Path(dir_okay=False), default=None,
              help="Inputs .safetensors (reference_latents, prompt_embeds, pooled_prompt_embeds[, noise, guidance]). "
                   "Default: the embedded model's sample, or a seeded synthetic input.")
@click.option("--engine-dir", type=click.Path(file_okay=False), default=None,
              help="Run built engines from this directory (see `topi-export build`).")
@click.option("--backend", default=None, help="torch | onnxruntime | tensorrt | tensorrt-rtx. Default: torch, "
                                              "or the engine directory's backend.")
@click.option("--ratio", type=float, default=None, help="Fixed prune fraction in [0, 1). Default 0.5.")
@click.option("--tau", type=float, default=None, help="Adaptive mode: keep tau of total influence, rounded up to a bucket.")
@click.option("--ratio-buckets", default=None, help="Compiled buckets for --tau, e.g. 0.3,0.5.")
@click.option("--policy", default=None, help="Token selection policy: topi-dither (default), topi, topi-cov, "
                                            "uniform, random.")
@click.option("--update-interval", type=int, default=None, help="Anchor every N steps (dT). Default: calibration's.")
@click.option("--calibration", type=click.Path(dir_okay=False), default=None, help="Calibration profile JSON.")
@steps_option
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initial noise.")
@click.option("--compare", is_flag=True, help="Also run the unpruned loop; print time, speedup, PSNR, rel. L2.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write a JSON report.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write final latents (safetensors).")
@click.option("--png", type=click.Path(dir_okay=False), default=None,
              help="With --compare: save a strip reference | unpruned | ToPi | kept-token mask.")
@device_options
@quiet_option
def cmd(model, inputs, engine_dir, backend, ratio, tau, ratio_buckets, policy, update_interval, calibration, steps,
        seed, compare, json_path, out, png, device, dtype, quiet):
    """Run a ToPi-pruned Kontext generation and report the per-step schedule."""
    from topi_export.runtime.session import open_session

    session = open_session(model=model, engine_dir=engine_dir, backend=backend, calibration=calibration,
                           update_interval=update_interval, device=device, dtype=dtype)
    data = session.load_inputs(inputs, seed)
    selector = session.selector(data, ratio=ratio, tau=tau, ratio_buckets=ratio_buckets, policy=policy, seed=seed)
    progress = show_progress(quiet)
    session.warmup(data, selector)
    topi = session.denoise(data, steps=steps, seed=seed, selector=selector, progress=progress)
    report = session.describe(data, selector, steps)
    report["time_s"] = {"topi": topi.time_s}
    report["schedule"] = topi.schedule
    click.echo(session.schedule_summary(topi.schedule))
    if compare:
        from topi_export.runtime.loop import psnr, rel_l2

        full = session.denoise(data, steps=steps, seed=seed, selector=None, progress=progress, desc="full")
        report["time_s"]["full"] = full.time_s
        report["speedup"] = full.time_s / topi.time_s
        report["psnr_db"] = psnr(topi.latents, full.latents)
        report["rel_l2"] = rel_l2(topi.latents, full.latents)
        click.echo(session.compare_table(report))
        if png:
            from topi_export.runtime.visualize import save_strip

            last = max(topi.kept) if topi.kept else None
            save_strip(png, data, full.latents, topi.latents, topi.kept.get(last) if last is not None else None)
            click.echo(f"strip -> {png}")
        if data.target_latents is not None:
            report["psnr_db_vs_truth"] = {"topi": psnr(topi.latents, data.target_latents),
                                          "full": psnr(full.latents, data.target_latents)}
            click.echo(f"vs ground truth: PSNR unpruned {report['psnr_db_vs_truth']['full']:.2f} dB, "
                       f"ToPi {report['psnr_db_vs_truth']['topi']:.2f} dB")
    elif png:
        from topi_export.errors import TopiError

        raise TopiError("--png needs --compare (the strip shows the unpruned and the ToPi result)")
    if out:
        save_latents(out, topi.latents)
        click.echo(f"latents -> {out}")
    if json_path:
        write_json(json_path, report)
        click.echo(f"report -> {json_path}")
