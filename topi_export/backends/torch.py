"""The PyTorch reference backend: runs the adapter's ToPi forward eagerly."""
from __future__ import annotations

import torch

from topi_export.models import kontext_ids


class TorchEngine:
    name = "torch"

    def __init__(self, adapter, settings: dict):
        self.adapter = adapter
        self.pivotal = tuple(settings["pivotal_layers"])
        self.prune_start = int(settings["prune_start"])

    def bind(self, inputs) -> None:
        self.inputs = inputs
        self.txt_ids, self.img_ids = kontext_ids(inputs.layout)
        self.num_target = inputs.layout.num_target
        self.guidance = inputs.guidance_tensor() if self.adapter.guidance_embeds else None

    def _call(self, latents, timestep, **kw):
        i = self.inputs
        hidden = torch.cat([latents, i.reference_latents], dim=1)
        return self.adapter.forward(hidden, i.prompt_embeds, i.pooled_prompt_embeds, timestep, self.img_ids,
                                    self.txt_ids, self.guidance, num_target=self.num_target, **kw)

    def full(self, latents, timestep):
        return self._call(latents, timestep)[0]

    def anchor(self, latents, timestep):
        velocity, influence = self._call(latents, timestep, influence_layers=self.pivotal)
        return velocity, influence[0]

    def pruned(self, latents, timestep, keep_idx):
        return self._call(latents, timestep, keep_idx=keep_idx, prune_layer=self.prune_start)[0]
