"""``topi-export triton``: a Triton Inference Server model repository from an engine directory."""
from __future__ import annotations

import click


@click.command("triton")
@click.option("--engine-dir", required=True, type=click.Path(file_okay=False),
              help="Engine directory from `topi-export build` (onnxruntime or tensorrt).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model repository to write.")
@click.option("--name", "name", default="topi", show_default=True,
              help="Model-name prefix: <name>_topi, <name>_dense (when built), <name>_loop.")
@click.option("--instances", type=int, default=1, show_default=True, help="Instances per model (instance_group count).")
@click.option("--kind", type=click.Choice(["gpu", "cpu"]), default="gpu", show_default=True,
              help="Instance kind of the engine models (KIND_GPU / KIND_CPU); TensorRT needs gpu. The loop model "
                   "runs on the CPU.")
@click.option("--force", is_flag=True, help="Replace an existing --out repository made by topi-export.")
def cmd(engine_dir, out, name, instances, kind, force):
    """Write a Triton model repository: the engine models and a BLS loop model."""
    from topi_export.serving.triton_repo import generate_repository

    summary = generate_repository(engine_dir, out, name=name, instances=instances, kind=kind, force=force,
                                  echo=lambda s: click.echo(s, err=True))
    click.echo(f"repository -> {summary['out']} (models: {', '.join(summary['models'])}; every config.pbtxt "
               f"validated against Triton's ModelConfig schema)")
    click.echo(f"next: pip install topi-export in Triton's Python backend environment, then "
               f"tritonserver --model-repository {summary['out']}")
