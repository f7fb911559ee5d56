"""The PyTorch reference backend: runs the adapter's ToPi forward eagerly, on the CPU or a CUDA GPU.
On CUDA the ``topi`` ops run the fused Triton kernels of ``plugins/`` when OpenAI Triton is installed."""
from __future__ import annotations

import torch

from topi_export.errors import TopiError
from topi_export.models import kontext_ids

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def use_cuda_kernels() -> bool:
    """Register the Triton kernels as the CUDA implementations of the topi torch ops (once)."""
    try:
        from plugins.torch_kernels import register_torch_cuda_kernels
    except ImportError:
        return False
    register_torch_cuda_kernels()
    return True


class TorchEngine:
    name = "torch"

    def __init__(self, adapter, settings: dict, device: str = "cpu", dtype: str = "fp32"):
        if dtype not in DTYPES:
            raise TopiError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise TopiError(f"--device {device}: no CUDA GPU is visible to PyTorch; use --device cpu")
        if device == "cpu" and dtype != "fp32":
            raise TopiError("the CPU reference runs fp32: drop --dtype or use --device cuda")
        self.adapter = adapter
        self.pivotal = tuple(settings["pivotal_layers"])
        self.prune_start = int(settings["prune_start"])
        self.device, self.dtype = torch.device(device), DTYPES[dtype]
        if self.device.type != "cpu":
            model = adapter.model
            if getattr(model, "_keep_in_fp32_modules", None):
                model.to(self.device, self.dtype)  # diffusers keeps those modules in fp32
            else:  # nothing to keep in fp32: skip ModelMixin.to's warning about it
                torch.nn.Module.to(model, self.device, self.dtype)
            self.kernels = use_cuda_kernels()

    def _to(self, t):
        return t.to(self.device, self.dtype)

    def bind(self, inputs) -> None:
        self.inputs = inputs
        txt_ids, img_ids = kontext_ids(inputs.layout)
        self.txt_ids, self.img_ids = txt_ids.to(self.device), img_ids.to(self.device)
        self.num_target = inputs.layout.num_target
        self.reference = self._to(inputs.reference_latents)
        self.prompt, self.pooled = self._to(inputs.prompt_embeds), self._to(inputs.pooled_prompt_embeds)
        self.guidance = self._to(inputs.guidance_tensor()) if self.adapter.guidance_embeds else None

    def _call(self, latents, timestep, **kw):
        hidden = torch.cat([self._to(latents), self.reference], dim=1)
        velocity, influence = self.adapter.forward(hidden, self.prompt, self.pooled, self._to(timestep),
                                                   self.img_ids, self.txt_ids, self.guidance,
                                                   num_target=self.num_target, **kw)
        # the scheduler and the selection run on the CPU in float32, as for every other backend
        return velocity.float().cpu(), None if influence is None else influence.float().cpu()

    def full(self, latents, timestep):
        return self._call(latents, timestep)[0]

    def anchor(self, latents, timestep):
        velocity, influence = self._call(latents, timestep, influence_layers=self.pivotal)
        return velocity, influence[0]

    def pruned(self, latents, timestep, keep_idx):
        idx = keep_idx.to(self.device)
        return self._call(latents, timestep, keep_idx=idx, prune_layer=self.prune_start)[0]
