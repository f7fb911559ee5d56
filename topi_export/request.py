"""One generation request in latent space, model-agnostic: the layout, the reference latents (every reference's
packed tokens concatenated in order), the family's tensors and scalars by name (declared by the family's
``tensor_specs``, plan/tensors.py). Families turn it into graph inputs (models/base.py ``Family.conditioning``);
artifacts/inputs.py reads it from files."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from topi_export.plan.layout import Layout


@dataclass
class Inputs:
    layout: Layout
    reference_latents: torch.Tensor  # [1, Nc, C]
    tensors: dict = field(default_factory=dict)  # the family's text / mask / pooled tensors by name
    scalars: dict = field(default_factory=dict)  # the family's scalars by name (e.g. a guidance scale)
    noise: torch.Tensor | None = None  # [1, Nx, C] initial latents
    target_latents: torch.Tensor | None = None  # [1, Nx, C] ground truth (benchmarks)
    source: str = "synthetic"
    meta: dict = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return int(self.reference_latents.shape[-1])

    def initial_noise(self, seed: int) -> torch.Tensor:
        if self.noise is not None:
            return self.noise.clone()
        gen = torch.Generator().manual_seed(int(seed) % (1 << 63))
        return torch.randn(1, self.layout.num_target, self.channels, generator=gen)

    def references(self) -> list[torch.Tensor]:
        """The reference latents split per reference."""
        return list(self.reference_latents.split(list(self.layout.ref_sizes), dim=1))

    def with_layout(self, layout: Layout) -> "Inputs":
        return replace(self, layout=layout)
