"""The PyTorch backend: runs the family's ToPi forward eagerly, on the CPU or a CUDA GPU (the reference every
other backend is checked against). On CUDA the ``topi`` ops run the fused Triton kernels of ``topi_export/kernels/`` when
OpenAI Triton is installed. Its dense step is the same model with no pruning and no scoring."""
from __future__ import annotations

import torch

from topi_export.backends.base import Backend, StepEngine
from topi_export.errors import TopiError

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
        raise TopiError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if not (device == "cpu" or device.startswith("cuda")):
        raise TopiError(f"--device {device!r}: use cpu or cuda[:N]")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TopiError(f"--device {device}: no CUDA GPU is visible to PyTorch; use --device cpu")
    if device == "cpu" and dtype != "fp32":
        raise TopiError("the CPU reference runs fp32: drop --dtype or use --device cuda")


class TorchEngine(StepEngine):
    name = "torch"
    has_dense = True
    host_threads = None  # the model runs on torch's threads

    def __init__(self, family, settings, device: str = "cpu", dtype: str = "fp32"):
        check_device(device, dtype)
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

    def bind(self, cond, context, layout):
        super().bind(cond, context, layout)
        # rotary tables and masks stay float32 (the model upcasts for RoPE); embeddings go to the model dtype
        self.dev_cond = {k: v.to(self.device) for k, v in cond.items()}
        self.dev_context = self.context.to(self.device, self.dtype)

    def _call(self, kind, latents, timestep, keep_idx, score_idx):
        b = latents.shape[0]
        args = (latents.to(self.device, self.dtype), self.dev_context.expand(b, -1, -1),
                timestep.to(self.device, torch.float32), self.dev_cond)
        if kind == "dense":
            velocity, influence = self.family.forward(*args)
        else:
            scoring = score_idx is not None and score_idx is not self.one_query
            everything = keep_idx is self.all_idx
            velocity, influence = self.family.forward(
                *args, keep_idx=None if everything else keep_idx.to(self.device),
                score_idx=score_idx.to(self.device) if scoring else None, prune_start=self.prune_start,
                influence_layers=self.pivotal if scoring else ())
        # the scheduler and the selection run on the CPU in float32, as for every other backend
        return velocity.float().cpu(), None if influence is None else influence.float().cpu()


def open_engine(manifest=None, *, family, settings, device="cpu", dtype="fp32", **_):
    return TorchEngine(family, settings, device, dtype)
