"""``topi-export check``: built engines vs the PyTorch reference, per graph and per bucket."""
from __future__ import annotations

import click

from topi_export.commands.common import model_option, write_json


@click.command("check")
@click.option("--engine-dir", type=click.Path(file_okay=False), required=True, help="Engine directory to check.")
@model_option
@click.option("--inputs", type=click.Path(dir_okay=False), default=None, help="Conditioning to check with.")
@click.option("--tolerance", type=float, default=None, help="Max relative L2 per output (default by precision).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the rows as JSON.")
def cmd(engine_dir, model, inputs, tolerance, seed, json_path):
    """Compare every graph and bucket of an engine directory with the PyTorch reference."""
    from topi_export.errors import TopiError
    from topi_export.runtime.check import TOLERANCE, compare_engines
    from topi_export.runtime.manifest import open_engine_session

    session = open_engine_session(engine_dir)
    reference = open_engine_session(engine_dir, backend="torch", model=model)
    data = session.load_inputs(inputs, seed)
    tol = tolerance if tolerance is not None else TOLERANCE.get(session.manifest.data.get("precision", "fp32"), 1e-4)
    rows = compare_engines(session.engine, reference.engine, data, session.manifest.data["buckets"], seed=seed)
    click.echo(f"{session.engine.name} engines in {engine_dir} vs PyTorch reference (tolerance rel. L2 {tol:g})")
    click.echo(f"{'graph':8} {'bucket':>6} {'keep':>5} {'output':10} {'max |diff|':>11} {'rel. L2':>9}  result")
    failed = 0
    for r in rows:
        ok = r["finite"] and r["rel_l2"] <= tol
        failed += not ok
        r["pass"] = ok
        bucket = "-" if r["bucket"] is None else f"{r['bucket']:g}"
        click.echo(f"{r['graph']:8} {bucket:>6} {r['keep']:>5} {r['output']:10} {r['max_abs']:11.2e} "
                   f"{r['rel_l2']:9.2e}  {'PASS' if ok else 'FAIL'}")
    if json_path:
        write_json(json_path, {"engine_dir": str(engine_dir), "backend": session.engine.name, "tolerance": tol,
                               "rows": rows})
    if failed:
        raise TopiError(f"{failed} of {len(rows)} comparisons exceed rel. L2 {tol:g} or are not finite: rebuild, "
                        f"or check precision with --tolerance")
    click.echo(f"all {len(rows)} comparisons pass")
