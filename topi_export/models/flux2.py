"""FLUX.2 (diffusers ``Flux2Transformer2DModel`` as ``Flux2Pipeline`` and ``Flux2KleinPipeline`` call it).

Token layout (Flux2Pipeline): hidden_states = cat([latents, image_latents]) with every reference's packed tokens
concatenated in order; 4-D position ids (T, H, W, L): the target has T = 0, reference i has T = 10 + 10 i
(``_prepare_image_ids``), text token l is (0, 0, 0, l) (``_prepare_text_ids``). The transformer gets timestep / 1000
and, for guidance-distilled checkpoints, an embedded guidance scale; only out[:, :Nx] is used.

Blocks: double-stream blocks keep the text and image streams apart (image stream [X | C]); diffusers concatenates
[text | image] once before the single-stream blocks, which see the joint sequence [T | X | C]. So the gather at L0
cuts the image stream at Nx in a double block and the joint sequence at T + Nx in a single block; the rotary rows
([T | X | C]) are cut at T + Nx in both. The modulations (double_stream_modulation_img/txt, single_stream_modulation)
are computed from the time embedding once per call and are per-batch, not per-token, so nothing else is gathered.

FLUX.2 [klein] KV models (``Flux2KleinKVPipeline``, diffusers 0.42.1 ``pipeline_flux2_klein_kv.py`` and the
``Flux2KV*Processor`` of ``transformer_flux2.py``) were trained with a reference K/V cache: the reference tokens
attend only to themselves and are modulated with a fixed timestep (``ref_fixed_timestep`` 0), so their keys and
values do not depend on the step and are computed once. With ``kv_model`` this adapter runs that attention: the
modulations become per-token ([X | C] in the image stream, [T | X | C] in single blocks, gathered at L0 like the
hidden states) and the reference queries attend to the reference keys only. The pipeline orders the sequence
[ref | target]; here it stays [target | ref] (attention and RoPE are per token, so only the order differs).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from dataclasses import replace

from topi_export.errors import BadInput, TopiError
from topi_export.models.base import Family, call_tensor, gather_rows
from topi_export.models.flux_kontext import FluxBlocks, FluxKontext
from topi_export.models.sampling import compute_empirical_mu, flow_match_scheduler
from topi_export.plan import Layout
from topi_export.plan.tensors import TensorSpec

DEFAULT_GUIDANCE = 4.0  # Flux2Pipeline's default guidance_scale
REF_FIXED_TIMESTEP = 0.0  # Flux2Transformer2DModel.forward's ref_fixed_timestep default (the KV pipeline passes none)
REF_T_SCALE = 10  # Flux2Pipeline._prepare_image_ids: reference i has T = scale + scale * i
# FlowMatchEulerDiscreteScheduler of the FLUX.2 pipelines; mu comes from compute_empirical_mu, not from a shift
# formula, so base/max shift are never read.
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)


def grid_ids(grid, t: int) -> torch.Tensor:
    """(T, H, W, L) ids [H*W, 4] of one image, raster order (torch.cartesian_prod as the pipeline builds them)."""
    h, w = grid
    return torch.cartesian_prod(torch.tensor([t]), torch.arange(h), torch.arange(w), torch.tensor([0]))


def flux2_ids(layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """(txt_ids [T, 4], img_ids [Nx + Nc, 4]) int64, exactly as Flux2Pipeline builds them."""
    txt_ids = torch.cartesian_prod(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]),
                                   torch.arange(layout.text_tokens))
    refs = [grid_ids(g, REF_T_SCALE + REF_T_SCALE * i) for i, g in enumerate(layout.ref_grids)]
    return txt_ids, torch.cat([grid_ids(layout.target_grid, 0)] + refs, dim=0)


def rope_tables(axes_dim, ids: torch.Tensor, theta: int = 2000) -> tuple[torch.Tensor, torch.Tensor]:
    """Flux2PosEmbed (float64 frequencies on the CPU, as diffusers computes them) -> float32 cos, sin [S, D]."""
    from diffusers.models.transformers.transformer_flux2 import Flux2PosEmbed

    cos, sin = Flux2PosEmbed(theta=theta, axes_dim=list(axes_dim))(ids)
    return cos.float().contiguous(), sin.float().contiguous()


def _sdpa(q, k, v, attention_mask, ref_self=None):
    """diffusers' native attention on [B, H, S, D] -> [B, S, H*D]. ref_self (a KV model's step with reference
    tokens, diffusers' _flux2_kv_causal_attention): the queries from that position on (the references) attend only
    to the keys from there on; text and target queries attend to every key."""
    if ref_self is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
    else:
        out = torch.cat([F.scaled_dot_product_attention(q[:, :, :ref_self], k, v),
                         F.scaled_dot_product_attention(q[:, :, ref_self:], k[:, :, ref_self:], v[:, :, ref_self:])],
                        dim=2)
    return out.transpose(1, 2).flatten(2, 3).to(q.dtype)


class AttentionMode:
    """What a forward's attention processors do besides plain joint attention, set by ``Flux2.embed``: whether the
    reference tokens attend only to themselves (a KV model's step that runs them)."""

    def __init__(self):
        self.ref_self = False


class _HookedProcessor:
    """What both FLUX.2 attention processors share: the hook, the attention mode, where reference queries start."""

    def __init__(self, hook, mode=None):
        self.hook, self.mode = hook, mode or AttentionMode()

    def _ref_start(self, k):
        """Where the reference queries start in [T | X | C] (the hook knows T and X), or None. None too when the
        hook removed the context keys (the calibration probe): the references then attend to [T | X]."""
        start = self.hook.n_text + self.hook.n_target
        return start if self.mode.ref_self and k.shape[2] > start else None


class TopiFlux2AttnProcessor(_HookedProcessor):
    """diffusers' Flux2AttnProcessor (double-stream blocks) with an AttentionHook on q/k/v after QK-norm and RoPE;
    with a KV model's reference tokens, Flux2KVAttnProcessor's attention."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.transformers.transformer_flux2 import _get_qkv_projections

        query, key, value, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
            ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
            ev = ev.unflatten(-1, (-1, attn.head_dim))
            query, key, value = torch.cat([eq, query], 1), torch.cat([ek, key], 1), torch.cat([ev, value], 1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        q, k, v = self.hook(*(t.transpose(1, 2) for t in (query, key, value)))  # [B, H, S, D]
        out = _sdpa(q, k, v, attention_mask, self._ref_start(k))
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        enc_out, img_out = out.split_with_sizes([encoder_hidden_states.shape[1], hidden_states.shape[1]], dim=1)
        return attn.to_out[1](attn.to_out[0](img_out)), attn.to_add_out(enc_out)


class TopiFlux2ParallelSelfAttnProcessor(_HookedProcessor):
    """diffusers' Flux2ParallelSelfAttnProcessor (single-stream blocks, fused QKV + MLP) with an AttentionHook;
    with a KV model's reference tokens, Flux2KVParallelSelfAttnProcessor's attention."""

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        hidden_states = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = hidden_states.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp = torch.split(hidden_states, [local_qkv, hidden_states.shape[-1] - local_qkv], dim=-1)
        query, key, value = qkv.chunk(3, dim=-1)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        q, k, v = self.hook(*(t.transpose(1, 2) for t in (query, key, value)))  # [B, H, S, D]
        out = _sdpa(q, k, v, attention_mask, self._ref_start(k))
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


class Flux2(FluxBlocks, Family):
    name = "flux2"
    model_classes = ("Flux2Transformer2DModel",)
    pipelines = ("Flux2Pipeline", "Flux2KleinPipeline", "Flux2KleinKVPipeline")
    kv_pipelines = ("Flux2KleinKVPipeline",)
    front_end = "topi_export.models.flux2_pipeline"
    lora_loader = "Flux2LoraLoaderMixin"
    max_references = None
    published = replace(FluxKontext.published, source="FLUX.1 Kontext published setting, no FLUX.2 setting published")
    pixels_per_token = 16
    scheduler_defaults = SCHEDULER

    # --- description -------------------------------------------------------------------------
    @property
    def guidance(self) -> str:
        return "distilled" if self.config.get("guidance_embeds", True) else "none"

    @property
    def text_dim(self) -> int:
        return int(self.config["joint_attention_dim"])

    # --- requests ----------------------------------------------------------------------------
    def tensor_specs(self):
        specs = (TensorSpec("prompt_embeds", "text", self.text_dim, graph="encoder_hidden_states"),)
        if self.guidance == "distilled":
            specs += (TensorSpec("guidance", "scalar", graph="guidance", required=False, default=DEFAULT_GUIDANCE),)
        return specs

    def rope(self, layout: Layout):
        txt_ids, img_ids = flux2_ids(layout)
        return rope_tables(self.config.get("axes_dims_rope", (32, 32, 32, 32)), torch.cat([txt_ids, img_ids], dim=0),
                           int(self.config.get("rope_theta", 2000)))

    # --- model -------------------------------------------------------------------------------
    def install_processors(self, model):
        self.attn_mode = AttentionMode()
        for block, hook in zip(model.transformer_blocks, self.hooks):
            block.attn.set_processor(TopiFlux2AttnProcessor(hook, self.attn_mode))
        for block, hook in zip(model.single_transformer_blocks, self.hooks[self.num_double:]):
            block.attn.set_processor(TopiFlux2ParallelSelfAttnProcessor(hook, self.attn_mode))
        self.blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)

    def embed(self, latents, context, timestep, cond):
        m = self.model
        dtype = m.x_embedder.weight.dtype
        t = timestep.to(dtype) * 1000
        g = cond["guidance"].to(dtype) * 1000 if "guidance" in cond else None
        temb = m.time_guidance_embed(t, g)
        tokens = latents if context is None else torch.cat([latents, context], dim=1)
        s = SimpleNamespace(
            hs=m.x_embedder(tokens.to(dtype)), enc=m.context_embedder(cond["encoder_hidden_states"].to(dtype)),
            temb=temb, mod_img=m.double_stream_modulation_img(temb), mod_txt=m.double_stream_modulation_txt(temb),
            mod_single=m.single_stream_modulation(temb), rope=(cond["rope_cos"], cond["rope_sin"]),
            joint=False, n_text=cond["encoder_hidden_states"].shape[1], n_target=latents.shape[1], per_token=False)
        self.attn_mode.ref_self = self.kv_model and context is not None
        if self.attn_mode.ref_self:
            # Flux2Transformer2DModel.forward, kv_cache_mode="extract": the references are modulated at
            # ref_fixed_timestep (_blend_double_block_mods / _blend_single_block_mods), per token
            ref_temb = m.time_guidance_embed(torch.full_like(t, REF_FIXED_TIMESTEP * 1000), g)
            nx, nc, nt = latents.shape[1], context.shape[1], s.n_text

            def per_token(step_mod, ref_mod, n_step):
                return torch.cat([step_mod[:, None].expand(-1, n_step, -1), ref_mod[:, None].expand(-1, nc, -1)], 1)

            s.mod_img = per_token(s.mod_img, m.double_stream_modulation_img(ref_temb), nx)
            s.mod_single = per_token(s.mod_single, m.single_stream_modulation(ref_temb), nt + nx)
            s.per_token = True
        return s

    def gather_context(self, s, layer, keep_idx):
        cut = s.n_text + s.n_target
        # single blocks hold the joint sequence [T | X | C]; double blocks the image stream [X | C]
        s.hs = gather_rows(s.hs, cut if s.joint else s.n_target, keep_idx, dim=1)
        s.rope = tuple(gather_rows(t, cut, keep_idx) for t in s.rope)
        if s.per_token:  # a KV model's per-token modulations follow their tokens
            s.mod_img = gather_rows(s.mod_img, s.n_target, keep_idx, dim=1)
            s.mod_single = gather_rows(s.mod_single, cut, keep_idx, dim=1)

    def run_layer(self, s, layer):
        block = self.blocks[layer]
        if layer < self.num_double:
            s.enc, s.hs = block(hidden_states=s.hs, encoder_hidden_states=s.enc, temb_mod_img=s.mod_img,
                                temb_mod_txt=s.mod_txt, image_rotary_emb=s.rope)
            return
        if not s.joint:  # diffusers concatenates [text | image] once, before the first single block
            s.hs, s.enc, s.joint = torch.cat([s.enc, s.hs], dim=1), None, True
        s.hs = block(hidden_states=s.hs, encoder_hidden_states=None, temb_mod=s.mod_single, image_rotary_emb=s.rope)

    def head(self, s):
        m = self.model
        start = s.n_text if s.joint else 0
        return m.proj_out(m.norm_out(s.hs[:, start:start + s.n_target], s.temb))

    def pipeline_call(self, model, latents, context, timestep, inputs, branch="positive"):
        if self.kv_model:  # one call without a cache: the extract call's velocity
            return self.kv_pipeline_call(model, latents, context, timestep, inputs, None)[0]
        b = latents.shape[0]
        txt_ids, img_ids = flux2_ids(inputs.layout)
        prompt = inputs.tensors["prompt_embeds"]
        guidance = torch.full([b], self.scalar(inputs, "guidance")) if self.guidance == "distilled" else None
        out = model(hidden_states=torch.cat([latents, context.expand(b, -1, -1)], dim=1).to(model.dtype),
                    timestep=timestep, guidance=guidance,
                    encoder_hidden_states=prompt.expand(b, -1, -1), txt_ids=txt_ids.expand(b, -1, -1),
                    img_ids=img_ids.expand(b, -1, -1), return_dict=False)[0]
        return out[:, :latents.shape[1]]

    def kv_pipeline_call(self, model, latents, context, timestep, inputs, kv_cache):
        """The unmodified transformer called as Flux2KleinKVPipeline calls it (its processors must be the
        Flux2KV*Processors the pipeline installs): without ``kv_cache`` the step-0 call on [ref | target] with
        kv_cache_mode="extract", returning (velocity, the new Flux2KVCache); with it, a cached call on the target
        only, returning (velocity, kv_cache)."""
        txt_ids, img_ids = flux2_ids(inputs.layout)
        nx = latents.shape[1]
        common = dict(timestep=timestep, guidance=None, encoder_hidden_states=inputs.tensors["prompt_embeds"],
                      txt_ids=txt_ids[None], return_dict=False)
        if kv_cache is None:
            ids = torch.cat([img_ids[nx:], img_ids[:nx]])[None]
            out, kv_cache = model(hidden_states=torch.cat([context, latents], dim=1).to(model.dtype), img_ids=ids,
                                  kv_cache_mode="extract", num_ref_tokens=context.shape[1], **common)
            return out, kv_cache
        out = model(hidden_states=latents.to(model.dtype), img_ids=img_ids[None, :nx], kv_cache=kv_cache,
                    kv_cache_mode="cached", **common)[0]
        return out, kv_cache

    # --- sampling ----------------------------------------------------------------------------
    def make_scheduler(self, steps, layout, scheduler_config=None):
        config = dict(scheduler_config or SCHEDULER)
        return flow_match_scheduler(config, steps, compute_empirical_mu(layout.num_target, steps))

    # --- diffusers drop-in -------------------------------------------------------------------
    def dropin_cache_call(self, kwargs):
        return kwargs.get("kv_cache_mode")

    def dropin_output(self, velocity, cache=None, return_dict=True):
        if cache is None or not return_dict:
            return super().dropin_output(velocity, cache, return_dict)
        from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModelOutput

        return Flux2Transformer2DModelOutput(sample=velocity, kv_cache=cache)

    def dropin_attributes(self):
        """Flux2KleinKVPipeline.__init__ sets its KV attention processors on every block: the drop-in runs that
        attention itself, so its blocks take any processor and ignore it."""
        class Attn:
            def set_processor(self, processor):
                pass

        def blocks(n):
            return [SimpleNamespace(attn=Attn()) for _ in range(n)]

        return {"transformer_blocks": blocks(self.num_double),
                "single_transformer_blocks": blocks(self.num_layers - self.num_double)}

    def parse_call(self, kwargs):
        """Flux2Pipeline's / Flux2KleinPipeline's / Flux2KleinKVPipeline's transformer call -> (latents, timestep,
        Inputs). The layout is read from the ids: the target is the run of T = 0, then one grid per T value.
        Flux2KleinKVPipeline's first call ("extract") orders the tokens [references | target]; its later calls
        ("cached") carry the target only and pass back the cache token of the first (``kv_cache.inputs``)."""
        from topi_export.request import Inputs

        mode = kwargs.get("kv_cache_mode")
        if (mode is not None) != self.kv_model:
            raise TopiError("the transformer was called with a reference KV cache (Flux2KleinKVPipeline) but the "
                            "engines run a model without one: build with --kv-cache (docs/flux2.md)" if mode else
                            "the engines run a KV-trained model (reference K/V cache) but the pipeline calls it "
                            "without one (another pipeline, or no reference image): use Flux2KleinKVPipeline with "
                            "reference images (docs/flux2.md)")
        if mode == "cached":
            inputs = getattr(kwargs.get("kv_cache"), "inputs", None)
            if inputs is None:
                raise TopiError("the cached call's kv_cache was not made by this transformer's extract call (or was "
                                "cleared): start the generation again")
            inputs = Inputs(inputs.layout, inputs.reference_latents,
                            {"prompt_embeds": call_tensor(kwargs, "encoder_hidden_states",
                                                          "Flux2KleinKVPipeline")[:1].float()}, dict(inputs.scalars),
                            source=inputs.source)
            return kwargs["hidden_states"], kwargs["timestep"], inputs
        hidden, img_ids, txt_ids = kwargs["hidden_states"], kwargs.get("img_ids"), kwargs.get("txt_ids")
        if img_ids is None or txt_ids is None:
            raise TopiError("the transformer call has no img_ids / txt_ids: this is not a FLUX.2 pipeline call")
        ids = (img_ids[0] if img_ids.dim() == 3 else img_ids).long().cpu()
        if mode == "extract":  # [references | target] -> the [target | references] order used here
            n_ref = int(kwargs.get("num_ref_tokens") or 0)
            hidden = torch.cat([hidden[:, n_ref:], hidden[:, :n_ref]], dim=1)
            ids = torch.cat([ids[n_ref:], ids[:n_ref]])
        t = ids[:, 0]
        changes = (torch.nonzero(t[1:] != t[:-1]).flatten() + 1).tolist()
        starts, ends = [0] + changes, changes + [len(t)]
        firsts = [int(t[a]) for a in starts]
        want = [0] + [REF_T_SCALE + REF_T_SCALE * i for i in range(len(starts) - 1)]
        if len(starts) < 2 or firsts != want:
            raise TopiError(f"img_ids hold image groups with T = {firsts}, not [target T=0 | references T=10, 20, "
                            f"...]: the ToPi drop-in needs reference images in a Flux2Pipeline layout")
        grids = []
        for a, e in zip(starts, ends):
            part = ids[a:e]
            h, w = int(part[:, 1].max()) + 1, int(part[:, 2].max()) + 1
            if h * w != e - a:
                raise TopiError(f"img_ids group T={int(t[a])} holds {e - a} tokens, not a {h}x{w} grid")
            grids.append((h, w))
        layout = Layout(int(txt_ids.shape[-2]), grids[0], tuple(grids[1:]))
        if len(t) != hidden.shape[1]:
            raise BadInput(f"img_ids hold {len(t)} positions but hidden_states has {hidden.shape[1]} tokens: the "
                            f"call's ids do not match its latents")
        g = kwargs.get("guidance")
        if g is None and self.guidance == "distilled":  # diffusers would skip the guidance embedding
            raise TopiError("the pipeline passes no guidance but this model embeds one (guidance_embeds): use "
                            "Flux2Pipeline for guidance-distilled FLUX.2 checkpoints")
        source = "Flux2KleinKVPipeline" if mode else "Flux2Pipeline"
        inputs = Inputs(layout, hidden[:1, layout.num_target:].float(),
                        {"prompt_embeds": call_tensor(kwargs, "encoder_hidden_states", source)[:1].float()},
                        {} if g is None else {"guidance": float(g.reshape(-1)[0])}, source=source)
        return hidden[:, :layout.num_target], kwargs["timestep"], inputs


def tiny_config() -> dict:
    """A small deterministic FLUX.2 config (2 double + 4 single blocks, 2 heads x 16 dims)."""
    return dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=32, mlp_ratio=3.0,
                axes_dims_rope=(4, 4, 4, 4), rope_theta=2000, guidance_embeds=True)


def mid_config() -> dict:
    """The mid-size benchmark config: 4 heads x 64 dims, 2 double + 4 single blocks."""
    return dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64,
                num_attention_heads=4, joint_attention_dim=256, timestep_guidance_channels=256, mlp_ratio=3.0,
                axes_dims_rope=(16, 16, 16, 16), rope_theta=2000, guidance_embeds=True)


Flux2.builtins = {"tiny-flux2": tiny_config, "mid-flux2": mid_config}
FAMILY = Flux2
