"""``topi-export refit``: a new engine directory whose weights are the model's with other LoRA adapters fused in
(none: the base weights), without re-exporting: ONNX Runtime gets a new weights file beside the same graphs;
TensorRT engines built with --refittable are refitted (backends/<name>.py ``refit``). The parameters to rewrite
and where they sit come from the directory's refit map (export/weights_map.py), written at build time."""
from __future__ import annotations

import click


@click.command("refit")
@click.option("--engine-dir", type=click.Path(file_okay=False), required=True, help="The engines to refit.")
@click.option("--lora", multiple=True, metavar="FILE[:SCALE]",
              help="LoRA adapter to fuse in instead of the engines' own (repeatable; none: the base weights).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="The new engine directory.")
@click.option("--model", default=None, metavar="NAME|PATH",
              help="The model the engines were built from (a model folder recorded in an engine directory is not "
                   "followed; built-in models are found by name).")
@click.option("--force", is_flag=True, help="Replace an existing engine directory made by topi-export.")
def cmd(engine_dir, lora, out, model, force):
    """Swap the LoRA adapters of built engines without re-exporting."""
    from topi_export.refitting import refit_engines

    path = refit_engines(engine_dir, lora, out, model=model, force=force, echo=lambda s: click.echo(s, err=True))
    click.echo(f"engines -> {path}")
    click.echo(f"next: topi-export run --engine-dir {path} --compare")
