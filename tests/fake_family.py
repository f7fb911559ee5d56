"""A made-up third model family, used by tests/test_family_contract.py to show that adding a family takes one
adapter module plus one registry line: a toy joint-attention DiT (text, target and context tokens in one
sequence, 1-D rotary positions), nothing from the other families."""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from topi_export.models.base import Family, Published, gather_rows
from topi_export.models.sampling import flow_match_scheduler
from topi_export.plan.tensors import TensorSpec


class ToyBlock(torch.nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm = torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))
        self.hook = None

    def forward(self, x, cos, sin):
        b, s, d = x.shape
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in self.qkv(self.norm(x)).chunk(3, -1))
        q, k = (t * cos + torch.stack([-t[..., 1::2], t[..., ::2]], -1).flatten(-2) * sin for t in (q, k))
        if self.hook is not None:
            q, k, v = self.hook(q, k, v)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)
        x = x + self.out(a)
        return x + self.mlp(x)


class ToyDiT(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, in_channels=8, text_dim=8, num_layers=3, num_attention_heads=2, attention_head_dim=8):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        self.x_in = torch.nn.Linear(in_channels, dim)
        self.txt_in = torch.nn.Linear(text_dim, dim)
        self.t_in = torch.nn.Linear(1, dim)
        self.blocks = torch.nn.ModuleList(ToyBlock(dim, num_attention_heads) for _ in range(num_layers))
        self.proj_out = torch.nn.Linear(dim, in_channels)

    def forward(self, latents, context, timestep, text, cos, sin):
        x = torch.cat([self.txt_in(text), self.x_in(torch.cat([latents, context], 1))], 1)
        x = x + self.t_in(timestep.view(-1, 1, 1))
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.proj_out(x[:, text.shape[1]:text.shape[1] + latents.shape[1]])


def rope(n: int, dim: int):
    pos = torch.arange(n, dtype=torch.float64)[:, None] / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return pos.cos().repeat_interleave(2, -1).float(), pos.sin().repeat_interleave(2, -1).float()


class ToyFamily(Family):
    name = "toy-dit"
    model_classes = ("ToyDiT",)
    pipelines = ()
    max_references = None
    published = Published((1,), 1, 2, 3, "a toy setting (tests)")
    scheduler_defaults = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)

    @classmethod
    def model_class(cls):
        return ToyDiT

    @property
    def num_layers(self):
        return int(self.config["num_layers"])

    @property
    def out_channels(self):
        return self.in_channels

    @property
    def guidance(self):
        return "none"

    def tensor_specs(self):
        # deliberately not the names of the real families: generic code must never assume them
        return (TensorSpec("text_embeds", "text", int(self.config["text_dim"]), graph="text"),
                TensorSpec("strength", "scalar", graph="strength", required=False, default=1.0, bounds=(0.0, 2.0)))

    def rope(self, layout):
        return rope(layout.num_tokens, self.head_dim)

    def install_processors(self, model):
        for block, hook in zip(model.blocks, self.hooks):
            block.hook = hook

    def embed(self, latents, context, timestep, cond):
        m = self.model
        x = torch.cat([m.txt_in(cond["text"]), m.x_in(torch.cat([latents, context], 1))], 1)
        x = x + m.t_in(timestep.view(-1, 1, 1)) * cond["strength"].view(-1, 1, 1)
        t = cond["text"].shape[1]
        return SimpleNamespace(x=x, cos=cond["rope_cos"], sin=cond["rope_sin"], n_text=t, n_target=latents.shape[1])

    def gather_context(self, s, layer, keep_idx):
        cut = s.n_text + s.n_target
        s.x = gather_rows(s.x, cut, keep_idx, dim=1)
        s.cos, s.sin = gather_rows(s.cos, cut, keep_idx), gather_rows(s.sin, cut, keep_idx)

    def run_layer(self, s, layer):
        s.x = self.model.blocks[layer](s.x, s.cos, s.sin)

    def head(self, s):
        return self.model.proj_out(s.x[:, s.n_text:s.n_text + s.n_target])

    def pipeline_call(self, model, latents, context, timestep, inputs, branch="positive"):
        cos, sin = rope(inputs.layout.num_tokens, self.head_dim)
        return model(latents, context, timestep * self.scalar(inputs, "strength"), inputs.tensors["text_embeds"], cos,
                     sin)

    def make_scheduler(self, steps, layout, scheduler_config=None):
        return flow_match_scheduler(scheduler_config or self.scheduler_defaults, steps, None)


ToyFamily.builtins = {"tiny-toy": lambda: dict(in_channels=8, text_dim=8, num_layers=3, num_attention_heads=2,
                                                attention_head_dim=8)}
FAMILY = ToyFamily
