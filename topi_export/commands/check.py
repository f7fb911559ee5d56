"""``topi-export check``: built engines vs the PyTorch reference, per layout, graph and bucket."""
from __future__ import annotations

import click

from topi_export.commands.common import model_option, output_files, seed_option, write_json


@click.command("check")
@click.option("--engine-dir", type=click.Path(file_okay=False), required=True, help="Engine directory to check.")
@model_option
@click.option("--inputs", type=click.Path(dir_okay=False), default=None,
              help="Conditioning to check with (default: seeded synthetic inputs at every built layout).")
@click.option("--tolerance", type=click.FloatRange(0, 1), default=None,
              help="Max relative L2 per output (default by precision).")
@click.option("--verify", is_flag=True,
              help="Re-hash every file of the engine directory against its manifest, whatever the verification "
                   "cache says (run and the other commands re-hash only files changed since their last check).")
@seed_option
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the rows as JSON.")
@click.option("--lora", multiple=True, metavar="FILE[:SCALE]",
              help="The LoRA adapters the engines were built or refitted with, for the PyTorch reference.")
def cmd(engine_dir, model, inputs, tolerance, verify, seed, json_path, lora):
    """Compare every graph, layout and bucket of an engine directory with the PyTorch reference."""
    import math
    from dataclasses import replace

    from topi_export.backends import model_backend
    from topi_export.errors import BadInput, TopiError
    from topi_export.runtime.check import TOLERANCE, compare_engines
    from topi_export.runtime.session import open_session

    if tolerance is not None and not math.isfinite(tolerance):
        raise BadInput(f"--tolerance {tolerance} is not a number in [0, 1]")
    output_files([json_path], protected=[inputs, engine_dir])
    if verify:
        from topi_export.artifacts.manifest import read_manifest

        read_manifest(engine_dir, rehash=True)
        click.echo(f"every file of {engine_dir} matches its sha256 in the manifest (re-hashed)")
    session = open_session(engine_dir=engine_dir)
    reference = open_session(engine_dir=engine_dir, backend=model_backend(), model=model, loras=lora)
    m = session.manifest
    if inputs:
        datas = [session.load_inputs(inputs, seed)]
    else:
        datas = [session.family.synthetic_inputs(lay, seed + i) for i, lay in enumerate(m.layouts)]
    tol = tolerance if tolerance is not None else TOLERANCE.get(m.precision, 1e-4)
    rows = [replace(r, passed=r.finite and r.rel_l2 <= tol) for r in compare_engines(session, reference, datas,
                                                                                       seed=seed)]
    click.echo(f"{session.engine.name} engines in {engine_dir} vs the {reference.engine.name} reference (tolerance "
               f"rel. L2 {tol:g})")
    click.echo(f"{'layout':22} {'graph':7} {'bucket':>6} {'keep':>5} {'output':9} {'max |diff|':>11} {'rel. L2':>9}"
               f"  result")
    for r in rows:
        bucket = "-" if r.bucket is None else f"{r.bucket:g}"
        click.echo(f"{r.layout:22} {r.graph:7} {bucket:>6} {r.keep:>5} {r.output:9} {r.max_abs:11.2e} "
                   f"{r.rel_l2:9.2e}  {'PASS' if r.passed else 'FAIL'}")
    if json_path:
        write_json(json_path, {"engine_dir": str(engine_dir), "backend": session.engine.name, "tolerance": tol,
                               "rows": [r.to_json() for r in rows]})
    failed = sum(not r.passed for r in rows)
    if failed:
        raise TopiError(f"{failed} of {len(rows)} comparisons exceed rel. L2 {tol:g} or are not finite: rebuild, "
                        f"or check precision with --tolerance")
    click.echo(f"all {len(rows)} comparisons pass")
