"""The step-engine interface every backend implements. The loop (runtime/loop.py) only talks to this, so
PyTorch, ONNX Runtime, TensorRT and Triton's BLS model run the same plan step by step."""
from __future__ import annotations

from typing import Protocol

import torch


class StepEngine(Protocol):
    name: str

    def bind(self, inputs) -> None:
        """Fix the per-request conditioning (reference latents, prompt embeds, ids, guidance)."""

    def full(self, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Unpruned velocity [1, Nx, C]."""

    def anchor(self, latents: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-sequence velocity and influence over the context tokens [Nc]."""

    def pruned(self, latents: torch.Tensor, timestep: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        """Velocity with only the kept context tokens (sorted int64 indices) from layer L0 on."""


def static_feed(inputs):
    """The graph inputs that stay fixed for a request, as float32/int64 numpy arrays, plus the reference
    latents (concatenated to the latents every step) and every context index (the unpruned keep_idx)."""
    import numpy as np

    from topi_export.models import kontext_ids

    txt_ids, img_ids = kontext_ids(inputs.layout)
    static = {"encoder_hidden_states": inputs.prompt_embeds.numpy().astype(np.float32),
              "pooled_projections": inputs.pooled_prompt_embeds.numpy().astype(np.float32),
              "img_ids": img_ids.numpy(), "txt_ids": txt_ids.numpy(),
              "guidance": inputs.guidance_tensor().numpy().astype(np.float32)}
    return (inputs.reference_latents.numpy().astype(np.float32), static,
            np.arange(inputs.layout.num_ctx, dtype=np.int64))
