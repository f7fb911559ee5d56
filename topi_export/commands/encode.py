"""``topi-export encode``: the front end of `edit` writing an inputs file instead of an image: the family's
diffusers pipeline encodes the images and the prompt (text encoders, VAE) and the tensors of its first transformer
call are saved (reference latents, prompt embeddings, masks, grids, the seeded initial latents), exactly what
``load_inputs`` reads for that family (artifacts/inputs.py), so `run`, `bench`, `calibrate` and Triton clients get
real requests."""
from __future__ import annotations

import click

from topi_export.commands.common import output_files
from topi_export.commands.edit import make_request, pipeline_options


@click.command("encode")
@pipeline_options
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="The inputs file (.safetensors).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Precision of the text encoders and the VAE (the file holds float32).")
def cmd(model, images, prompt, width, height, steps, seed, out, dtype, **given):
    """Encode reference image(s) and a prompt into an inputs file for run / bench / calibrate / Triton."""
    from topi_export.artifacts.inputs import load_inputs, save_inputs
    from topi_export.fsutil import refuse_overwrite
    from topi_export.models import DTYPES, family_named
    from topi_export.runtime import pipeline as P

    P.require_packages()
    P.loading_bars(False)
    front = P.open_front_end(model)
    request = make_request(front, images, prompt, steps, seed, width, height, given)
    output_files([out], protected=list(images))
    refuse_overwrite(out, [front.folder], what="the output")
    shape = front.shape(request)
    click.echo(f"{front.class_name} ({front.family}): {shape.describe()}", err=True)
    data = P.encode_request(front, request, dtype=DTYPES[dtype])
    P.check_planned(shape, [data.layout], front.family)
    save_inputs(out, data)
    back = load_inputs(out, family_named(front.family)(_config(front)))
    names = ", ".join(["reference_latents", *back.tensors, *back.scalars, "noise"])
    click.echo(f"inputs -> {out} ({back.layout.describe()}: {names})")
    click.echo(f"next: topi-export run --model {front.folder} --inputs {out} --steps {steps}")


def _config(front):
    from topi_export.models import _read_config, resolve_model_dir

    return {k: v for k, v in _read_config(resolve_model_dir(front.folder)).items() if not k.startswith("_")}
