"""The PyTorch backend: runs the family's ToPi forward eagerly, on the CPU or a CUDA GPU (the reference every
other backend is checked against). It opens the model itself, not an engine directory. On CUDA the ``topi`` ops
run the fused Triton kernels of ``topi_export/kernels/`` when OpenAI Triton is installed. Its dense step is the
same model with no pruning and no scoring."""
from __future__ import annotations

import torch

from topi_export.backends.base import Backend, StepEngine
from topi_export.errors import BackendUnavailable, BadInput

BACKEND = Backend("torch", builds=False, precisions=("fp32", "fp16", "bf16"), runs_on="CPU, or a CUDA GPU",
                  description="PyTorch eager reference (no build step)")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def use_cuda_kernels() -> bool:
    """Register the Triton kernels as the CUDA implementations of the topi torch ops (once)."""
    try:
        from topi_export.kernels.torch_kernels import register_torch_cuda_kernels
    except ImportError:
        return False
    register_torch_cuda_kernels()
    return True


def check_device(device: str, dtype: str) -> None:
    if dtype not in DTYPES:
        raise BadInput(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if not (device == "cpu" or device.startswith("cuda")):
        raise BadInput(f"--device {device!r}: use cpu or cuda[:N]")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailable(f"--device {device}: no CUDA GPU is visible to PyTorch; use --device cpu")
    if device == "cpu" and dtype != "fp32":
        raise BadInput("the CPU reference runs fp32: drop --dtype or use --device cuda")


class TorchEngine(StepEngine):
    name = "torch"
    has_dense = True
    host_threads = None  # the model runs on torch's threads

    def __init__(self, family, settings, device: str = "cpu", dtype: str = "fp32"):
        from topi_export.export.graphs import graph_tensors

        check_device(device, dtype)
        super().__init__({kind: graph_tensors(family, kind) for kind in ("topi", "dense")})
        self.family = family
        self.pivotal = tuple(settings.pivotal_layers)
        self.prune_start = int(settings.prune_start)
        self.device, self.dtype = torch.device(device), DTYPES[dtype]
        if self.device.type != "cpu":
            model = family.model
            if getattr(model, "_keep_in_fp32_modules", None):
                model.to(self.device, self.dtype)  # diffusers keeps those modules in fp32
            else:  # nothing to keep in fp32: skip ModelMixin.to's warning about it
                torch.nn.Module.to(model, self.device, self.dtype)
            self.kernels = use_cuda_kernels()

    def to_backend(self, tensor, spec):
        # latents and context in the model's dtype; rotary tables, masks, indices as they are (the model upcasts)
        if spec.name in ("latents", "context"):
            return tensor.to(self.device, self.dtype)
        return tensor.to(self.device)

    def run(self, kind, step, feed):
        cond = {k: v for k, v in feed.items() if k not in ("latents", "context", "timestep", "keep_idx", "score_idx")}
        args = (feed["latents"], feed["context"], feed["timestep"].float(), cond)
        if kind == "dense":
            velocity, influence = self.family.forward(*args)
        else:  # pruned and unpruned steps skip the influence work entirely; the anchor scores every query
            velocity, influence = self.family.forward(
                *args, keep_idx=feed["keep_idx"] if step == "pruned" else None,
                score_idx=feed["score_idx"] if step == "anchor" else None, prune_start=self.prune_start,
                influence_layers=self.pivotal if step == "anchor" else ())
        # the scheduler and the selection run on the CPU in float32, as for every other backend
        out = {"velocity": velocity.float().cpu()}
        if influence is not None:
            out["influence"] = influence.float().cpu()
        return out


def open_engine(source):
    return TorchEngine(source.family, source.settings, source.device, source.dtype)
