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
@click.option("--engine-models", type=click.Choice(["platform", "python"]), default="platform", show_default=True,
              help="platform: the engine models on the backend's Triton platform (onnxruntime_onnx, tensorrt_plan). "
                   "python: Python-backend models running the ONNX graphs with ONNX Runtime in-process, same "
                   "tensors (for a Triton without the onnxruntime backend, e.g. PyPI's nvidia-pytriton).")
@click.option("--ort-threads", type=int, default=None,
              help="ONNX Runtime intra-op threads per python engine-model instance (default: ONNX Runtime's).")
@click.option("--force", is_flag=True, help="Replace an existing --out repository made by topi-export.")
def cmd(engine_dir, out, name, instances, kind, engine_models, ort_threads, force):
    """Write a Triton model repository: the engine models and a BLS loop model."""
    from topi_export.serving.triton_repo import generate_repository

    summary = generate_repository(engine_dir, out, name=name, instances=instances, kind=kind,
                                  engine_models=engine_models, ort_threads=ort_threads, force=force,
                                  echo=lambda s: click.echo(s, err=True))
    click.echo(f"repository -> {summary['out']} (models: {', '.join(summary['models'])}; every config.pbtxt "
               f"validated against Triton's ModelConfig schema)")
    if engine_models == "python":
        click.echo(f"next: topi-export serve --repo {summary['out']} --env ENV --create-env")
    else:
        click.echo(f"next: install topi-export (from its checkout or a wheel: docs/triton.md) in Triton's Python "
                   f"backend environment, then tritonserver --model-repository {summary['out']}")
