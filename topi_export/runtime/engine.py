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
