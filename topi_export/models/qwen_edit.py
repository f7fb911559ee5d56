"""Qwen-Image-Edit and Qwen-Image-Edit-Plus (diffusers ``QwenImageTransformer2DModel`` as ``QwenImageEditPipeline``
and ``QwenImageEditPlusPipeline`` call it). docs/qwen-image-edit.md describes the family.

Token layout: hidden_states = cat([latents, image_latents]) with every reference's packed tokens in order (Edit: one
reference, Plus: several); ``img_shapes`` = [(1, h, w) of the target, then (1, h, w) of each reference]. Rotary
embeddings (``QwenEmbedRope``, scale_rope=True): image i has frame index i and rows/columns centred on 0; text token
l has position max_i(max(h_i // 2, w_i // 2)) + l on every axis. Qwen rotates interleaved pairs by complex
multiplication; the tables here are the same rotation as real cos/sin, repeat-interleaved, so diffusers'
``apply_rotary_emb(use_real=True, use_real_unbind_dim=-1)`` applies it (no complex numbers in any graph).

60 dual-stream blocks keep the text and image streams apart; each block's joint attention runs over
[text | target | references] with the text padding masked out (``encoder_hidden_states_mask``). With ``zero_cond_t``
(Qwen-Image-Edit-2511) the model embeds the timestep twice (t and 0) and modulates reference tokens with the t = 0
embedding (``modulate_index``: 0 target, 1 reference); the index is rebuilt after the gather, so it follows the
kept tokens.

Guidance is true CFG: the pipelines call the transformer once with the prompt and once with the negative prompt and
combine neg + s (pos - neg), rescaled per token to the positive prediction's norm. Here both branches run as one
batch of 2, the shorter text padded with mask 0 (masked keys take no attention weight, so each branch's image tokens
see exactly what they see unbatched).
"""
from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from topi_export.errors import BadInput, TopiError
from topi_export.models.base import Family, Published, call_tensor, gather_rows
from topi_export.models.sampling import flow_match_scheduler, shift_from_config
from topi_export.plan import Layout
from topi_export.plan.tensors import TensorSpec

DEFAULT_TRUE_CFG = 4.0  # QwenImageEdit(Plus)Pipeline's default true_cfg_scale
# Qwen-Image's scheduler/scheduler_config.json (as ported by independent projects; a pipeline folder's own
# scheduler config wins): exponential dynamic time shift with mu from the target's token count.
SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                 base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
# Config flags of QwenImageTransformer2DModel that the edit pipelines cannot run (diffusers 0.42.1): the guidance
# embedding is wired to a time embedding without a guidance input, the extra time condition and the layered RoPE
# belong to Qwen-Image-Layered.
UNSUPPORTED = {"guidance_embeds": "its time embedding takes no guidance in diffusers",
               "use_additional_t_cond": "it needs additional_t_cond, which the edit pipelines never pass",
               "use_layer3d_rope": "layered RoPE belongs to Qwen-Image-Layered, not the edit pipelines"}


@lru_cache(maxsize=8)
def _rope_module(axes_dim: tuple[int, ...]):
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    return QwenEmbedRope(theta=10000, axes_dim=list(axes_dim), scale_rope=True)


def img_shapes(layout: Layout) -> list[tuple[int, int, int]]:
    """One sample's img_shapes as the edit pipelines build them: the target, then each reference."""
    return [(1, *layout.target_grid)] + [(1, *g) for g in layout.ref_grids]


def rope_tables(axes_dim, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """QwenEmbedRope of the layout -> real cos, sin [T + Nx + Nc, head_dim] in joint order [text | target | refs],
    each complex factor repeated for its (even, odd) pair."""
    vid, txt = _rope_module(tuple(int(a) for a in axes_dim))([img_shapes(layout)], device=torch.device("cpu"),
                                                            max_txt_seq_len=layout.text_tokens)
    freqs = torch.cat([txt, vid], dim=0)
    return (freqs.real.repeat_interleave(2, dim=-1).float().contiguous(),
            freqs.imag.repeat_interleave(2, dim=-1).float().contiguous())


class TopiQwenAttnProcessor:
    """diffusers' QwenDoubleStreamAttnProcessor2_0 with an AttentionHook on the joint q/k/v [B, H, S, D]
    ([text | image], after QK-norm and RoPE). image_rotary_emb is the (cos, sin) pair of joint tables."""

    def __init__(self, hook):
        self.hook = hook

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        head_dim = attn.inner_dim // attn.heads
        n_text = encoder_hidden_states.shape[1]

        def heads(t):
            return t.unflatten(-1, (-1, head_dim))

        img_q, img_k, img_v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(
            attn.to_v(hidden_states))
        txt_q, txt_k = heads(attn.add_q_proj(encoder_hidden_states)), heads(attn.add_k_proj(encoder_hidden_states))
        txt_v = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_q is not None:
            img_q = attn.norm_q(img_q)
        if attn.norm_k is not None:
            img_k = attn.norm_k(img_k)
        if attn.norm_added_q is not None:
            txt_q = attn.norm_added_q(txt_q)
        if attn.norm_added_k is not None:
            txt_k = attn.norm_added_k(txt_k)
        query, key = torch.cat([txt_q, img_q], dim=1), torch.cat([txt_k, img_k], dim=1)
        value = torch.cat([txt_v, img_v], dim=1)
        if image_rotary_emb is not None:  # per token, so rotating the joint sequence = rotating each stream
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        key_mask = None
        if encoder_hidden_states_mask is not None:  # the influence softmax leaves out the padding the model masks
            key_mask = F.pad(encoder_hidden_states_mask.float(), (0, key.shape[1] - n_text), value=1.0)
        q, k, v = self.hook(*(t.transpose(1, 2) for t in (query, key, value)), key_mask)  # [B, H, S, D]
        if encoder_hidden_states_mask is not None:
            # the joint key mask: text padding out, every image key (those the hook kept) in
            image_keys = torch.ones(k.shape[0], k.shape[2] - n_text, dtype=torch.bool, device=k.device)
            attention_mask = torch.cat([encoder_hidden_states_mask, image_keys], dim=1)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        txt_out, img_out = out[:, :n_text], out[:, n_text:]
        img_out = attn.to_out[0](img_out.contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        return img_out, attn.to_add_out(txt_out.contiguous())


def modulate_index(batch: int, n_tokens: int, n_target: int, device=None) -> torch.Tensor:
    """zero_cond_t's per-token modulation choice [B, Nx + Nc]: 0 for target tokens, 1 for reference tokens."""
    return (torch.arange(n_tokens, device=device) >= n_target).to(torch.int32).unsqueeze(0).expand(batch, -1)


class QwenImageEdit(Family):
    name = "qwen-image-edit"
    pads_text = True  # the text mask makes padding exact for the image tokens
    model_classes = ("QwenImageTransformer2DModel",)
    pipelines = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline")
    front_end = "topi_export.models.qwen_edit_pipeline"
    lora_loader = "QwenImageLoraLoaderMixin"
    max_references = None  # Edit takes one reference, Plus several: one family
    max_branches = 2  # true CFG: positive and negative prompt, batched
    published = Published((35, 37, 42), 11, 10, 60,
                          "ToPi paper: pivotal layers {35, 37, 42} of 60 and dT 10 for Qwen-Image-Edit; prune start "
                          "11 = FLUX.1 Kontext's published 10 of 57 at the same relative depth (not published)")
    pixels_per_token = 16  # VAE factor 8 x 2x2 packing
    scheduler_defaults = SCHEDULER

    def __init__(self, config: dict, model=None, kv_model: bool = False):
        for key, why in UNSUPPORTED.items():
            if config.get(key):
                raise TopiError(f"QwenImageTransformer2DModel with {key}=True is not served ({why}): use a "
                                f"Qwen-Image-Edit / Edit-Plus checkpoint")
        super().__init__(config, model, kv_model)

    # --- description -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.config["num_layers"])

    def layer_groups(self):
        return [("block", 0, self.num_layers)]

    @property
    def out_channels(self) -> int:
        patch = int(self.config.get("patch_size", 2))
        return patch * patch * int(self.config.get("out_channels") or self.in_channels)

    @property
    def guidance(self) -> str:
        return "true-cfg"

    @property
    def text_dim(self) -> int:
        return int(self.config["joint_attention_dim"])

    @property
    def zero_cond_t(self) -> bool:
        return bool(self.config.get("zero_cond_t"))

    # --- requests ----------------------------------------------------------------------------
    def tensor_specs(self):
        d = self.text_dim
        return (TensorSpec("prompt_embeds", "text", d, graph="encoder_hidden_states"),
                TensorSpec("prompt_embeds_mask", "mask", graph="encoder_hidden_states_mask", required=False,
                           mask_of="prompt_embeds"),
                TensorSpec("negative_prompt_embeds", "text", d, graph="encoder_hidden_states", branch=1,
                           required=False),
                TensorSpec("negative_prompt_embeds_mask", "mask", graph="encoder_hidden_states_mask", branch=1,
                           required=False, mask_of="negative_prompt_embeds"),
                TensorSpec("true_cfg_scale", "scalar", required=False, default=DEFAULT_TRUE_CFG))

    def cfg_scale(self, inputs) -> float:
        """The request's true_cfg_scale; the pipelines' default 4.0 when it has negative embeddings but no scale."""
        if inputs.scalars.get("true_cfg_scale") is not None:
            return float(inputs.scalars["true_cfg_scale"])
        return DEFAULT_TRUE_CFG if "negative_prompt_embeds" in inputs.tensors else 1.0

    def branches(self, inputs) -> int:
        scale = self.cfg_scale(inputs)
        if "negative_prompt_embeds" not in inputs.tensors:
            if scale > 1:
                raise BadInput(f"true_cfg_scale is {scale:g} but the inputs have no negative_prompt_embeds: add "
                               f"negative_prompt_embeds (e.g. of the prompt ' ') or set true_cfg_scale to 1")
            return 1
        return 2 if scale > 1 else 1  # the pipelines skip the negative branch at scale <= 1

    def rope(self, layout: Layout):
        return rope_tables(self.config.get("axes_dims_rope", (16, 56, 56)), layout)

    # --- model -------------------------------------------------------------------------------
    def install_processors(self, model):
        self.blocks = list(model.transformer_blocks)
        for block, hook in zip(self.blocks, self.hooks):
            block.attn.set_processor(TopiQwenAttnProcessor(hook))

    def embed(self, latents, context, timestep, cond):
        m = self.model
        dtype = m.img_in.weight.dtype
        hs = m.img_in((latents if context is None else torch.cat([latents, context], dim=1)).to(dtype))
        t = timestep.to(dtype)
        if self.zero_cond_t:
            t = torch.cat([t, t * 0], dim=0)  # reference tokens are modulated as if clean (t = 0)
        temb = m.time_text_embed(t, hs)
        enc = m.txt_in(m.txt_norm(cond["encoder_hidden_states"].to(dtype)))
        n_target = latents.shape[1]
        index = modulate_index(hs.shape[0], hs.shape[1], n_target, hs.device) if self.zero_cond_t else None
        return SimpleNamespace(hs=hs, enc=enc, temb=temb, mask=cond["encoder_hidden_states_mask"] != 0,
                               rope=(cond["rope_cos"], cond["rope_sin"]), index=index, n_text=enc.shape[1],
                               n_target=n_target)

    def gather_context(self, s, layer, keep_idx):
        s.hs = gather_rows(s.hs, s.n_target, keep_idx, dim=1)
        cut = s.n_text + s.n_target
        s.rope = tuple(gather_rows(t, cut, keep_idx) for t in s.rope)
        if s.index is not None:
            s.index = modulate_index(s.hs.shape[0], s.hs.shape[1], s.n_target, s.hs.device)

    def run_layer(self, s, layer):
        s.enc, s.hs = self.blocks[layer](hidden_states=s.hs, encoder_hidden_states=s.enc,
                                         encoder_hidden_states_mask=s.mask, temb=s.temb, image_rotary_emb=s.rope,
                                         modulate_index=s.index)

    def head(self, s):
        m = self.model
        temb = s.temb.chunk(2, dim=0)[0] if self.zero_cond_t else s.temb
        return m.proj_out(m.norm_out(s.hs[:, :s.n_target], temb))

    def pipeline_call(self, model, latents, context, timestep, inputs, branch="positive"):
        names = {"positive": ("prompt_embeds", "prompt_embeds_mask"),
                 "negative": ("negative_prompt_embeds", "negative_prompt_embeds_mask")}
        if branch not in names:
            raise TopiError(f"unknown guidance branch {branch!r}: positive or negative")
        emb_name, mask_name = names[branch]
        b = latents.shape[0]
        emb = inputs.tensors[emb_name].expand(b, -1, -1)
        mask = inputs.tensors.get(mask_name)
        if mask is not None:  # encode_prompt drops an all-ones mask
            mask = None if bool(mask.all()) else mask.expand(b, -1)
        out = model(hidden_states=torch.cat([latents, context.expand(b, -1, -1)], dim=1), timestep=timestep,
                    guidance=None, encoder_hidden_states_mask=mask, encoder_hidden_states=emb,
                    img_shapes=[img_shapes(inputs.layout)] * b, attention_kwargs={}, return_dict=False)[0]
        return out[:, :latents.shape[1]]

    # --- sampling ----------------------------------------------------------------------------
    def make_scheduler(self, steps, layout, scheduler_config=None):
        config = dict(scheduler_config or SCHEDULER)
        return flow_match_scheduler(config, steps, shift_from_config(layout.num_target, config))

    def guide(self, velocity, inputs):
        """QwenImageEdit(Plus)Pipeline's true CFG: neg + s (pos - neg), rescaled per token to the positive norm."""
        if velocity.shape[0] == 1:
            return velocity
        pos, neg = velocity[:1], velocity[1:2]
        comb = neg + self.cfg_scale(inputs) * (pos - neg)
        return comb * (torch.norm(pos, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))

    # --- diffusers drop-in -------------------------------------------------------------------
    def parse_call(self, kwargs):
        """One branch's transformer call of QwenImageEdit(Plus)Pipeline -> (latents, timestep, Inputs holding that
        branch's text as prompt_embeds)."""
        from topi_export.request import Inputs

        hidden, shapes = call_tensor(kwargs, "hidden_states", "QwenImageEdit(Plus)Pipeline"), kwargs.get("img_shapes")
        if kwargs.get("controlnet_block_samples") is not None:
            raise TopiError("QwenImage ControlNet residuals are not supported by the ToPi drop-in: run the pipeline "
                            "without a ControlNet")
        if not shapes or len(shapes[0]) < 2:
            raise TopiError("img_shapes holds no reference image: this is not an edit call (QwenImageEditPipeline / "
                            "QwenImageEditPlusPipeline pass the target and each reference)")
        shapes = [tuple(int(v) for v in s) for s in shapes[0]]
        if any(f != 1 for f, _, _ in shapes):
            raise TopiError(f"img_shapes {shapes} has an image with more than one frame: not an edit call")
        enc = call_tensor(kwargs, "encoder_hidden_states", "QwenImageEdit(Plus)Pipeline")
        layout = Layout(int(enc.shape[1]), shapes[0][1:], tuple(s[1:] for s in shapes[1:]))
        if hidden.shape[1] != layout.num_target + layout.num_ctx:
            raise TopiError(f"hidden_states has {hidden.shape[1]} tokens but img_shapes {shapes} hold "
                            f"{layout.num_target + layout.num_ctx}: not an edit call")
        mask = kwargs.get("encoder_hidden_states_mask")
        mask = torch.ones(1, layout.text_tokens) if mask is None else mask[:1].float()
        inputs = Inputs(layout, hidden[:1, layout.num_target:].float(),
                        {"prompt_embeds": enc[:1].float(), "prompt_embeds_mask": mask},
                        source="QwenImageEdit(Plus)Pipeline")
        return hidden[:, :layout.num_target], kwargs["timestep"], inputs


def tiny_config(zero_cond_t: bool = False) -> dict:
    """A small deterministic config: 4 blocks, 2 heads x 16 dims, 16 packed channels in, 4 latent channels out."""
    return dict(patch_size=2, in_channels=16, out_channels=4, num_layers=4, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6),
                zero_cond_t=zero_cond_t)


def mid_config() -> dict:
    """The mid-size benchmark config: 4 heads x 64 dims, 6 blocks, Qwen-Image's channel layout (64 in, 16 out)."""
    return dict(patch_size=2, in_channels=64, out_channels=16, num_layers=6, attention_head_dim=64,
                num_attention_heads=4, joint_attention_dim=256, guidance_embeds=False, axes_dims_rope=(8, 28, 28))


QwenImageEdit.builtins = {"tiny-qwen-edit": tiny_config, "tiny-qwen-edit-zero-cond-t": lambda: tiny_config(True),
                          "mid-qwen-edit": mid_config}
FAMILY = QwenImageEdit
