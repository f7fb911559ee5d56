"""``topi-export run``: one ToPi generation, optionally against the dense baseline (--compare)."""
from __future__ import annotations

import click

from topi_export.commands.common import (POLICY_HELP, device_options, model_option, output_files, quiet_option,
                                         save_latents, seed_option, show_progress, steps_option, write_json)


def schedule_summary(schedule) -> str:
    anchors = [r["step"] for r in schedule if r["kind"] == "anchor"]
    keeps = sorted({r["keep"] for r in schedule if r["kind"] == "pruned"})
    total = sum(r["time_s"] for r in schedule)
    return (f"{len(schedule)} steps, anchors at {anchors}, pruned steps keep {keeps} context tokens, "
            f"{total:.2f} s in the transformer")


def compare_table(report) -> str:
    t = report["time_s"]
    base = "dense" if report["baseline"] == "dense" else "full"
    rows = [("", "time [s]", "speedup", "PSNR [dB]", "rel. L2"),
            (f"{base} (baseline)", f"{t[base]:.3f}", "1.00x", "-", "-"),
            ("ToPi", f"{t['topi']:.3f}", f"{report['speedup']:.2f}x", f"{report['psnr_db']:.2f}",
             f"{report['rel_l2']:.2e}")]
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
@steps_option
@seed_option
@click.option("--compare", is_flag=True, help="Also run the dense baseline; print time, speedup, PSNR, rel. L2.")
@click.option("--repeats", type=click.IntRange(1, 20), default=3, show_default=True,
              help="With --compare: timed runs of each loop, interleaved (ToPi, baseline, ToPi, ...); the fastest of "
                   "each is reported, so a machine whose speed drifts does not favour either.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write a JSON report.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write final latents (safetensors).")
@click.option("--png", type=click.Path(dir_okay=False), default=None,
              help="With --compare: save a strip of the references with their kept tokens, the baseline and ToPi.")
@device_options
@quiet_option
def cmd(model, inputs, engine_dir, backend, ratio, tau, ratio_buckets, policy, update_interval, calibration, steps,
        seed, compare, repeats, json_path, out, png, device, dtype, quiet):
    """Run a ToPi-pruned in-context generation and report the per-step schedule."""
    from topi_export.errors import TopiError
    from topi_export.runtime.session import open_session

    if png and not compare:
        raise TopiError("--png needs --compare (the strip shows the baseline and the ToPi result)")
    output_files([json_path, out, png], protected=[inputs, calibration, model])
    session = open_session(model=model, engine_dir=engine_dir, backend=backend, calibration=calibration,
                           update_interval=update_interval, device=device, dtype=dtype)
    if session.manifest is not None:  # a new file next to the engines is fine; none of the engine files
        from topi_export.fsutil import refuse_overwrite
        from topi_export.plan import NAME

        m = session.manifest
        for p in (json_path, out, png):
            if p:
                refuse_overwrite(p, [m.root / NAME] + [m.root / rel for rel in m.files], what="the output")
    data = session.load_inputs(inputs, seed)
    selector = session.selector(data, ratio=ratio, tau=tau, ratio_buckets=ratio_buckets, policy=policy, seed=seed)
    progress = show_progress(quiet)
    base_mode = session.baseline_mode()
    session.warmup(data, selector, dense=compare)
    topi = session.denoise(data, steps=steps, seed=seed, selector=selector, progress=progress)
    base = session.denoise(data, steps=steps, seed=seed, mode=base_mode, progress=progress,
                           desc=base_mode) if compare else None
    for _ in range(repeats - 1 if compare else 0):  # deterministic: only the times change
        topi.time_s = min(topi.time_s, session.denoise(data, steps=steps, seed=seed, selector=selector).time_s)
        base.time_s = min(base.time_s, session.denoise(data, steps=steps, seed=seed, mode=base_mode).time_s)
    report = session.describe(data, selector, steps)
    report["time_s"] = {"topi": topi.time_s}
    report["schedule"] = topi.schedule
    click.echo(schedule_summary(topi.schedule))
    if compare:
        from topi_export.runtime.loop import psnr, rel_l2

        if base_mode != "dense":
            click.echo(f"note: {engine_dir} has no dense baseline graph; the speedup is against the in-engine "
                       f"unpruned step (rebuild with --dense-baseline)", err=True)
        report["repeats"] = repeats
        report["baseline"] = "dense" if base_mode == "dense" else "in-engine-full"
        report["time_s"][base_mode] = base.time_s
        report["speedup"] = base.time_s / topi.time_s
        report["psnr_db"] = psnr(topi.latents, base.latents)
        report["rel_l2"] = rel_l2(topi.latents, base.latents)
        click.echo(compare_table(report))
        if png:
            from topi_export.runtime.visualize import save_strip

            last = max(topi.kept) if topi.kept else None
            save_strip(png, data, base.latents, topi.latents, topi.kept.get(last) if last is not None else None)
            click.echo(f"strip -> {png}")
        if data.target_latents is not None:
            report["psnr_db_vs_truth"] = {"topi": psnr(topi.latents, data.target_latents),
                                          "baseline": psnr(base.latents, data.target_latents)}
            click.echo(f"vs ground truth: PSNR baseline {report['psnr_db_vs_truth']['baseline']:.2f} dB, "
                       f"ToPi {report['psnr_db_vs_truth']['topi']:.2f} dB")
    if out:
        save_latents(out, topi.latents)
        click.echo(f"latents -> {out}")
    if json_path:
        write_json(json_path, report)
        click.echo(f"report -> {json_path}")
