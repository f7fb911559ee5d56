"""FLUX.1 Kontext (diffusers ``FluxTransformer2DModel`` as ``FluxKontextPipeline`` calls it).

Token layout: hidden_states = cat([latents, image_latents]); img_ids = cat([latent_ids, image_ids]) where the
reference ids have first component 1; txt_ids = zeros(T, 3); the transformer gets timestep / 1000 and a distilled
guidance scale; only out[:, :Nx] is used. 19 double-stream then 38 single-stream blocks in [dev]. The image stream
is [X | C] in both block kinds (diffusers' single blocks concatenate the text themselves), so the gather at L0 is the
same for both.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from topi_export.models.base import Family, Published, call_tensor, gather_rows
from topi_export.models.sampling import flow_match_scheduler, shift_from_config
from topi_export.plan import Layout
from topi_export.plan.tensors import TensorSpec

DEFAULT_GUIDANCE = 2.5  # FluxKontextPipeline's default guidance_scale
# FluxKontextPipeline's scheduler (FLUX.1 Kontext [dev] scheduler_config.json).
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096)


# FluxKontextPipeline's PREFERRED_KONTEXT_RESOLUTIONS (width, height), copied: importing the pipeline module needs
# transformers (tests/test_torch_reference.py checks they agree).
PREFERRED_KONTEXT_RESOLUTIONS = ((672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248),
                                 (880, 1184), (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832),
                                 (1328, 800), (1392, 752), (1456, 720), (1504, 688), (1568, 672))


def grid_ids(grid, first: float) -> torch.Tensor:
    h, w = grid
    ids = torch.zeros(h, w, 3)
    ids[..., 0] = first
    ids[..., 1] = torch.arange(h)[:, None].float()
    ids[..., 2] = torch.arange(w)[None, :].float()
    return ids.reshape(h * w, 3)


def kontext_ids(layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """(txt_ids [T, 3], img_ids [Nx + Nc, 3]) exactly as FluxKontextPipeline builds them."""
    txt_ids = torch.zeros(layout.text_tokens, 3)
    img_ids = torch.cat([grid_ids(layout.target_grid, 0.0)] + [grid_ids(g, 1.0) for g in layout.ref_grids], dim=0)
    return txt_ids, img_ids


class TopiFluxAttnProcessor:
    """diffusers' FluxAttnProcessor with an AttentionHook on q/k/v after QK-norm and RoPE."""

    def __init__(self, hook):
        self.hook = hook

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        query = attn.to_q(hidden_states).unflatten(-1, (-1, attn.head_dim))
        key = attn.to_k(hidden_states).unflatten(-1, (-1, attn.head_dim))
        value = attn.to_v(hidden_states).unflatten(-1, (-1, attn.head_dim))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            eq = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            ek = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            ev = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            query, key, value = torch.cat([eq, query], 1), torch.cat([ek, key], 1), torch.cat([ev, value], 1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        q, k, v = self.hook(*(t.transpose(1, 2) for t in (query, key, value)))  # [B, H, S, D]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        enc_out, img_out = out.split_with_sizes([encoder_hidden_states.shape[1], hidden_states.shape[1]], dim=1)
        img_out = attn.to_out[1](attn.to_out[0](img_out.contiguous()))
        return img_out, attn.to_add_out(enc_out.contiguous())


def rope_tables(axes_dim, ids: torch.Tensor, theta: int = 10000) -> tuple[torch.Tensor, torch.Tensor]:
    """FluxPosEmbed (float64 frequencies, as diffusers computes them on the CPU) -> float32 cos, sin [S, D]."""
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    cos, sin = FluxPosEmbed(theta=theta, axes_dim=list(axes_dim))(ids.float())
    return cos.float().contiguous(), sin.float().contiguous()


class FluxBlocks:
    """The FLUX block structure (FLUX.1 and FLUX.2): `num_layers` double-stream blocks, then `num_single_layers`
    single-stream blocks; layers are numbered double first."""

    @property
    def num_double(self) -> int:
        return int(self.config["num_layers"])

    @property
    def num_layers(self) -> int:
        return self.num_double + int(self.config["num_single_layers"])

    def layer_groups(self):
        return [("double", 0, self.num_double), ("single", self.num_double, self.num_layers)]


class FluxKontext(FluxBlocks, Family):
    name = "flux-kontext"
    model_classes = ("FluxTransformer2DModel",)
    pipelines = ("FluxKontextPipeline",)
    front_end = "topi_export.models.flux_kontext_pipeline"
    lora_loader = "FluxLoraLoaderMixin"
    max_references = 1
    published = Published((13, 18, 31), 10, 10, 57, "published ToPi setting for FLUX.1 Kontext [dev]")
    pixels_per_token = 16
    scheduler_defaults = SCHEDULER

    resolution_sets = {"kontext-preferred": PREFERRED_KONTEXT_RESOLUTIONS}

    # --- description -------------------------------------------------------------------------
    @property
    def guidance(self) -> str:
        return "distilled" if self.config.get("guidance_embeds") else "none"

    @property
    def text_dim(self) -> int:
        return int(self.config["joint_attention_dim"])

    @property
    def pooled_dim(self) -> int:
        return int(self.config["pooled_projection_dim"])

    # --- requests ----------------------------------------------------------------------------
    def tensor_specs(self):
        specs = (TensorSpec("prompt_embeds", "text", self.text_dim, graph="encoder_hidden_states"),
                 TensorSpec("pooled_prompt_embeds", "pooled", self.pooled_dim, graph="pooled_projections"))
        if self.guidance == "distilled":
            specs += (TensorSpec("guidance", "scalar", graph="guidance", required=False, default=DEFAULT_GUIDANCE),)
        return specs

    def rope(self, layout: Layout):
        txt_ids, img_ids = kontext_ids(layout)
        return rope_tables(self.config.get("axes_dims_rope", (16, 56, 56)), torch.cat([txt_ids, img_ids], dim=0))

    # --- model -------------------------------------------------------------------------------
    def install_processors(self, model):
        blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
        for block, hook in zip(blocks, self.hooks):
            block.attn.set_processor(TopiFluxAttnProcessor(hook))
        self.blocks = blocks

    def embed(self, latents, context, timestep, cond):
        m = self.model
        dtype = m.x_embedder.weight.dtype
        hs = m.x_embedder(torch.cat([latents, context], dim=1).to(dtype))
        t = timestep.to(dtype) * 1000
        pooled = cond["pooled_projections"].to(dtype)
        if "guidance" in cond:
            temb = m.time_text_embed(t, cond["guidance"].to(dtype) * 1000, pooled)
        else:
            temb = m.time_text_embed(t, pooled)
        enc = m.context_embedder(cond["encoder_hidden_states"].to(dtype))
        return SimpleNamespace(hs=hs, enc=enc, temb=temb, rope=(cond["rope_cos"], cond["rope_sin"]),
                               n_text=enc.shape[1], n_target=latents.shape[1])

    def gather_context(self, s, layer, keep_idx):
        s.hs = gather_rows(s.hs, s.n_target, keep_idx, dim=1)
        cut = s.n_text + s.n_target
        s.rope = tuple(gather_rows(t, cut, keep_idx) for t in s.rope)

    def run_layer(self, s, layer):
        s.enc, s.hs = self.blocks[layer](hidden_states=s.hs, encoder_hidden_states=s.enc, temb=s.temb,
                                         image_rotary_emb=s.rope)

    def head(self, s):
        m = self.model
        return m.proj_out(m.norm_out(s.hs[:, :s.n_target], s.temb))

    def pipeline_call(self, model, latents, context, timestep, inputs, branch="positive"):
        txt_ids, img_ids = kontext_ids(inputs.layout)
        guidance = None
        if model.config.guidance_embeds:
            guidance = torch.full([latents.shape[0]], self.scalar(inputs, "guidance"))
        out = model(hidden_states=torch.cat([latents, context], dim=1), timestep=timestep, guidance=guidance,
                    pooled_projections=inputs.tensors["pooled_prompt_embeds"],
                    encoder_hidden_states=inputs.tensors["prompt_embeds"], txt_ids=txt_ids, img_ids=img_ids,
                    return_dict=False)[0]
        return out[:, :latents.shape[1]]

    # --- sampling ----------------------------------------------------------------------------
    def make_scheduler(self, steps, layout, scheduler_config=None):
        config = dict(scheduler_config or SCHEDULER)
        return flow_match_scheduler(config, steps, shift_from_config(layout.num_target, config))

    # --- diffusers drop-in -------------------------------------------------------------------
    def parse_call(self, kwargs):
        """FluxKontextPipeline's transformer call -> (latents, context, timestep, Inputs)."""
        from topi_export.errors import BadInput, TopiError
        from topi_export.request import Inputs

        hidden, img_ids, txt_ids = (call_tensor(kwargs, n, "FluxKontextPipeline")
                                    for n in ("hidden_states", "img_ids", "txt_ids"))
        ids = img_ids[0] if img_ids.dim() == 3 else img_ids
        if ids.dim() != 2 or ids.shape[0] != hidden.shape[1]:
            raise BadInput(f"img_ids hold {ids.shape[0] if ids.dim() == 2 else '?'} positions but hidden_states has "
                            f"{hidden.shape[1]} tokens: the call's ids do not match its latents")
        grids = []
        for first in (0, 1):
            part = ids[ids[:, 0] == first]
            if part.numel() == 0:
                raise TopiError("img_ids hold no reference tokens (first id component 1): this is not a Kontext call")
            grids.append((int(part[:, 1].max()) + 1, int(part[:, 2].max()) + 1))
        layout = Layout(int(txt_ids.shape[-2]), grids[0], (grids[1],))
        g = kwargs.get("guidance")
        if layout.num_target + layout.num_ctx != hidden.shape[1]:
            raise BadInput(f"img_ids describe a {grids[0][0]}x{grids[0][1]} target and a {grids[1][0]}x{grids[1][1]} "
                            f"reference, not the {hidden.shape[1]} tokens of hidden_states: not a Kontext call")
        inputs = Inputs(layout, hidden[:1, layout.num_target:].float(),
                        {"prompt_embeds": call_tensor(kwargs, "encoder_hidden_states", "FluxKontextPipeline")[:1].float(),
                         "pooled_prompt_embeds": call_tensor(kwargs, "pooled_projections",
                                                             "FluxKontextPipeline")[:1].float()},
                        {} if g is None else {"guidance": float(g.reshape(-1)[0])}, source="FluxKontextPipeline")
        return hidden[:, :layout.num_target], kwargs["timestep"], inputs


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


FluxKontext.builtins = {"tiny-kontext": tiny_config, "mid-kontext": mid_config}
FAMILY = FluxKontext
