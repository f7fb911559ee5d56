"""FLUX.1 Kontext adapter over diffusers' FluxTransformer2DModel.

Token layout (FluxKontextPipeline): joint sequence [T text | X target | C context]; the image stream
is [X | C] with ids cat([latent_ids, image_ids]) where image_ids[:, 0] = 1; txt_ids = zeros(T, 3).
The ToPi forward below re-runs the model's own blocks and only adds: influence scoring at pivotal
layers (inside the attention processor, where q/k/v exist after QK-norm and RoPE) and the gather of
kept context tokens (hidden states and RoPE rows) right before the prune-start layer L0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb, get_1d_rotary_pos_embed

from topi_export.ops import influence_score, token_gather


@dataclass(frozen=True)
class Layout:
    """Token counts and grids of one Kontext request (grids are packed-token grids, HxW)."""

    text_tokens: int
    target_grid: tuple[int, int]
    ref_grid: tuple[int, int]

    @property
    def num_target(self) -> int:
        return self.target_grid[0] * self.target_grid[1]

    @property
    def num_ctx(self) -> int:
        return self.ref_grid[0] * self.ref_grid[1]

    def describe(self) -> str:
        h, w = self.target_grid
        rh, rw = self.ref_grid
        return f"t{self.text_tokens}-x{h}x{w}-c{rh}x{rw}"


def grid_ids(grid: tuple[int, int], first: float) -> torch.Tensor:
    h, w = grid
    ids = torch.zeros(h, w, 3)
    ids[..., 0] = first
    ids[..., 1] = torch.arange(h)[:, None].float()
    ids[..., 2] = torch.arange(w)[None, :].float()
    return ids.reshape(h * w, 3)


def kontext_ids(layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """(txt_ids [T,3], img_ids [X+C,3]) exactly as FluxKontextPipeline builds them."""
    txt_ids = torch.zeros(layout.text_tokens, 3)
    img_ids = torch.cat([grid_ids(layout.target_grid, 0.0), grid_ids(layout.ref_grid, 1.0)], dim=0)
    return txt_ids, img_ids


class TopiFluxAttnProcessor:
    """diffusers' FluxAttnProcessor plus two optional hooks, set per call by the ToPi forward:
    ``score`` (compute the influence of context tokens from this layer's q/k/v) and
    ``drop_context`` (remove context keys/values: the calibration probe)."""

    def __init__(self):
        self.n_text = 0
        self.n_target = 0
        self.score = False
        self.drop_context = False
        self.influence = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        query = attn.to_q(hidden_states).unflatten(-1, (-1, attn.head_dim))
        key = attn.to_k(hidden_states).unflatten(-1, (-1, attn.head_dim))
        value = attn.to_v(hidden_states).unflatten(-1, (-1, attn.head_dim))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            eq = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            ek = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            ev = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([eq, query], dim=1)
            key = torch.cat([ek, key], dim=1)
            value = torch.cat([ev, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, H, S, D]
        t_end, x_end = self.n_text, self.n_text + self.n_target
        if self.score:
            self.influence = influence_score(q[:, :, t_end:x_end], k, v[:, :, x_end:])
        if self.drop_context:
            k, v = k[:, :, :x_end], v[:, :, :x_end]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        enc_out, img_out = out.split_with_sizes([encoder_hidden_states.shape[1], hidden_states.shape[1]], dim=1)
        img_out = attn.to_out[1](attn.to_out[0](img_out.contiguous()))
        return img_out, attn.to_add_out(enc_out.contiguous())


def rope_float32(pos_embed, ids: torch.Tensor):
    """FluxPosEmbed with float32 frequencies: the exported graphs keep no float64 math."""
    cos, sin = [], []
    for i, dim in enumerate(pos_embed.axes_dim):
        c, s = get_1d_rotary_pos_embed(dim, ids[:, i].float(), theta=pos_embed.theta, repeat_interleave_real=True,
                                       use_real=True, freqs_dtype=torch.float32)
        cos.append(c)
        sin.append(s)
    return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


class FluxKontextAdapter:
    """Everything architecture-specific about FLUX.1 Kontext; the rest of topi-export is generic."""

    name = "flux-kontext"
    model_class = "FluxTransformer2DModel"

    def __init__(self, model):
        self.model = model.eval()
        self.processors = []
        for block in list(model.transformer_blocks) + list(model.single_transformer_blocks):
            proc = TopiFluxAttnProcessor()
            block.attn.set_processor(proc)
            self.processors.append(proc)

    # --- description -------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def num_double(self) -> int:
        return len(self.model.transformer_blocks)

    @property
    def num_layers(self) -> int:
        return self.num_double + len(self.model.single_transformer_blocks)

    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    @property
    def text_dim(self) -> int:
        return self.config.joint_attention_dim

    @property
    def pooled_dim(self) -> int:
        return self.config.pooled_projection_dim

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.config.guidance_embeds)

    def layer_name(self, layer: int) -> str:
        if layer < self.num_double:
            return f"double[{layer}]"
        return f"single[{layer - self.num_double}]"

    # --- forward --------------------------------------------------------------------------------
    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance=None, *, num_target: int, keep_idx=None, prune_layer: int | None = None,
                influence_layers=(), drop_context_layer: int | None = None, rope_fp32: bool = False):
        """Kontext transformer call. Returns (velocity [B, Nx, C], influence [B, Nc] or None).

        keep_idx (sorted context indices) + prune_layer: the pruned forward; influence_layers: the
        pivotal layers whose influence is summed; drop_context_layer: calibration probe.
        """
        m = self.model
        dtype = hidden_states.dtype
        hs = m.x_embedder(hidden_states)
        t = timestep.to(dtype) * 1000
        if self.guidance_embeds:
            if guidance is None:
                raise ValueError("this model embeds guidance: pass guidance")
            temb = m.time_text_embed(t, guidance.to(dtype) * 1000, pooled_projections)
        else:
            temb = m.time_text_embed(t, pooled_projections)
        enc = m.context_embedder(encoder_hidden_states)
        ids = torch.cat([txt_ids, img_ids], dim=0)
        cos, sin = rope_float32(m.pos_embed, ids) if rope_fp32 else m.pos_embed(ids)
        n_text = enc.shape[1]
        pivotal = set(influence_layers)
        influence = None
        blocks = list(m.transformer_blocks) + list(m.single_transformer_blocks)
        for layer, (block, proc) in enumerate(zip(blocks, self.processors)):
            if keep_idx is not None and layer == prune_layer:
                hs = torch.cat([hs[:, :num_target], token_gather(hs[:, num_target:], keep_idx)], dim=1)
                cut = n_text + num_target
                cos = torch.cat([cos[:cut], token_gather(cos[cut:].unsqueeze(0), keep_idx)[0]], dim=0)
                sin = torch.cat([sin[:cut], token_gather(sin[cut:].unsqueeze(0), keep_idx)[0]], dim=0)
            proc.n_text, proc.n_target = n_text, num_target
            proc.score = layer in pivotal
            proc.drop_context = layer == drop_context_layer
            enc, hs = block(hidden_states=hs, encoder_hidden_states=enc, temb=temb, image_rotary_emb=(cos, sin))
            if proc.score:
                influence = proc.influence if influence is None else influence + proc.influence
                proc.influence, proc.score = None, False
            proc.drop_context = False
        hs = m.norm_out(hs, temb)
        out = m.proj_out(hs)
        return out[:, :num_target], influence


def mid_config() -> dict:
    """The mid-size benchmark config: 4 heads x 64 dims, 2 double + 4 single blocks."""
    return dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64,
                num_attention_heads=4, joint_attention_dim=256, pooled_projection_dim=64, guidance_embeds=True,
                axes_dims_rope=(8, 28, 28))


def tiny_config() -> dict:
    """A small deterministic Flux config (2 double + 4 single blocks, 2 heads x 16 dims)."""
    return dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                axes_dims_rope=(4, 6, 6))
