"""The model-family contract (docs/design.md, "Model families").

A family adapter owns everything architecture-specific about one kind of in-context DiT: which diffusers classes and
pipelines it serves, its built-in seeded configs, the request fields it needs, the conditioning tensors (text
embeddings, rotary tables, masks) a layout turns into, the ToPi forward (influence at pivotal layers, gather of the
kept context at L0), the pipeline's own transformer call (the reference semantics), its scheduler and guidance mode,
and its published or default method setting. Everything else in topi-export iterates over this contract.

Sequence convention shared by every family: the joint attention sequence is [T text | X target | C context], where
C is every reference's tokens concatenated in order; attention processors hand q/k/v [B, H, S, D] in that order
(after QK-norm and RoPE) to an ``AttentionHook``.

Graph dimensions are symbolic (plan/manifest.py DIMS): B batch, T text tokens, Nx target tokens, Nc context tokens,
K kept context tokens, Q scored target queries.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from topi_export.errors import TopiError
from topi_export.ops import influence_score, token_gather
from topi_export.plan import GraphTensor, Layout, MethodSettings

GUIDANCE_MODES = ("distilled", "none", "true-cfg")

# Inputs every ToPi graph has, before the family's conditioning inputs.
CORE_INPUTS = (GraphTensor("latents", ("B", "Nx", "C_in"), "float32"),)


@dataclass(frozen=True)
class RequestField:
    """One family tensor of an inputs file / request: name, rank, the size of its last dim (None: any),
    whether dim 1 is the text length T, and whether it is required."""

    name: str
    rank: int
    last_dim: int | None
    text: bool = False
    required: bool = True
    dtype: str = "float"  # "float" | "mask" (0/1 values)


@dataclass(frozen=True)
class Published:
    """A published ToPi setting for a model of `depth` layers (scaled to other depths), with its source."""

    pivotal_layers: tuple[int, ...]
    prune_start: int
    update_interval: int
    depth: int
    source: str

    def for_depth(self, num_layers: int) -> MethodSettings:
        if num_layers == self.depth:
            return MethodSettings(self.pivotal_layers, self.prune_start, self.update_interval, self.source, "published")
        pivotal = []
        for layer in self.pivotal_layers:
            want = min(num_layers - 1, round(layer * num_layers / self.depth))
            # rounding can collide on shallow models: take the nearest free layer
            for cand in sorted(range(num_layers), key=lambda c: (abs(c - want), c)):
                if cand not in pivotal:
                    pivotal.append(cand)
                    break
        l0 = max(1, min(num_layers - 1, round(self.prune_start * num_layers / self.depth))) if num_layers > 1 else 0
        l0 = min(l0, min(pivotal))  # every pivotal layer runs on the kept set, as in the published setting
        return MethodSettings(tuple(sorted(pivotal)), l0, self.update_interval,
                              f"{self.source}, scaled from {self.depth} to {num_layers} layers", "published-scaled")


# --- attention hooks ------------------------------------------------------------------------------------
class AttentionHook:
    """Called by a family's attention processor with q/k/v [B, H, S, D] ([T | X | C'], after QK-norm and RoPE) and,
    where the model masks keys (Qwen's text padding), its key mask [B, S] (0 = masked). Armed per layer by
    ``Family.forward``: ``score`` computes the influence [1, C'] of the context keys present from the target
    queries selected by ``score_idx`` (all target queries when None), of batch row 0 only: the positive branch
    decides the kept set (docs/design.md, "Model families"), so the negative branch is not scored;
    ``drop_context`` removes the context keys/values from this layer's attention (the calibration probe)."""

    def __init__(self):
        self.disarm()

    def disarm(self):
        self.n_text = self.n_target = 0
        self.score, self.score_idx, self.drop_context, self.influence = False, None, False, None

    def arm(self, n_text: int, n_target: int, *, score: bool, score_idx=None, drop_context: bool = False):
        self.n_text, self.n_target = n_text, n_target
        self.score, self.score_idx, self.drop_context = score, score_idx, drop_context

    def __call__(self, q, k, v, key_mask=None):
        t_end, x_end = self.n_text, self.n_text + self.n_target
        if self.score:
            q_target = q[:1, :, t_end:x_end]
            if self.score_idx is not None:
                q_target = q_target.index_select(2, self.score_idx)
            mask = None if key_mask is None else key_mask[:1].float()
            self.influence = influence_score(q_target, k[:1], v[:1, :, x_end:], mask)
        if self.drop_context:
            k, v = k[:, :, :x_end], v[:, :, :x_end]
        return q, k, v


def gather_rows(table: torch.Tensor, cut: int, keep_idx: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Rows [:cut] of a table (tokens along `dim`) plus its rows cut + keep_idx: the kept context tokens' rows."""
    if dim == 0:
        return torch.cat([table[:cut], token_gather(table[cut:].unsqueeze(0), keep_idx)[0]], dim=0)
    return torch.cat([table[:, :cut], token_gather(table[:, cut:], keep_idx)], dim=1)


# --- the contract ---------------------------------------------------------------------------------------
class Family:
    """Base class of a family adapter. Class attributes describe the family; an instance wraps one model config
    (and, for the PyTorch path and export, the diffusers model with its weights)."""

    name: str = ""
    model_classes: tuple[str, ...] = ()  # diffusers transformer classes served
    pipelines: tuple[str, ...] = ()  # diffusers pipelines the drop-in serves
    builtins: dict = {}  # built-in name -> callable returning a seeded diffusers config
    max_references: int | None = 1  # None: any number
    published: Published | None = None  # default method setting (with provenance)
    resolution_sets: dict = {}  # shorthand name -> list of (width, height) in pixels
    pixels_per_token: int = 16  # pixel side of one packed latent token (VAE factor x 2x2 packing)
    text_tokens_default: int = 8  # text tokens of synthetic requests
    pads_text: bool = False  # True: a masked family; shorter prompts are padded (mask 0) to a built text length

    @classmethod
    def model_class(cls):
        """The model class of the built-ins and saved folders (diffusers' class of that name by default)."""
        import diffusers

        return getattr(diffusers, cls.model_classes[0])

    def __init__(self, config: dict, model=None):
        self.config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        self.model = model.eval() if model is not None else None
        self.hooks = [AttentionHook() for _ in range(self.num_layers)]
        if model is not None:
            self.install_processors(model)

    # --- description (override) ---------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        raise NotImplementedError

    def layer_groups(self) -> list[tuple[str, int, int]]:
        """(name, first layer, end) per block kind, e.g. [("double", 0, 19), ("single", 19, 57)]."""
        return [("block", 0, self.num_layers)]

    @property
    def in_channels(self) -> int:
        return int(self.config["in_channels"])

    @property
    def out_channels(self) -> int:
        return int(self.config.get("out_channels") or self.in_channels)

    @property
    def heads(self) -> int:
        return int(self.config["num_attention_heads"])

    @property
    def head_dim(self) -> int:
        return int(self.config["attention_head_dim"])

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    @property
    def guidance(self) -> str:
        """'distilled' (a guidance scale is embedded), 'none', or 'true-cfg' (two branches per step)."""
        raise NotImplementedError

    def layer_name(self, layer: int) -> str:
        for name, start, end in self.layer_groups():
            if start <= layer < end:
                return f"{name}[{layer - start}]"
        raise IndexError(layer)

    def default_settings(self) -> MethodSettings:
        return self.published.for_depth(self.num_layers)

    # --- requests (override) -------------------------------------------------------------------
    def request_fields(self) -> tuple[RequestField, ...]:
        raise NotImplementedError

    def text_tokens(self, inputs) -> int:
        """T of a request (the longest text of its branches)."""
        return int(inputs.tensors["prompt_embeds"].shape[1])

    def check_layout(self, layout: Layout) -> None:
        if self.max_references is not None and layout.num_refs > self.max_references:
            raise TopiError(f"{self.name} takes at most {self.max_references} reference image(s), the request has "
                            f"{layout.num_refs}: use a multi-reference family (e.g. FLUX.2) or fewer references")

    def check_inputs(self, inputs) -> None:
        """Channel/feature checks of a request against this model; one-line errors."""
        self.check_layout(inputs.layout)
        if inputs.channels != self.in_channels:
            raise TopiError(f"'reference_latents' has {inputs.channels} channels but the model expects "
                            f"{self.in_channels}: the inputs were made for another model")
        for f in self.request_fields():
            t = inputs.tensors.get(f.name)
            if t is not None and f.last_dim is not None and t.shape[-1] != f.last_dim:
                raise TopiError(f"'{f.name}' has {t.shape[-1]} features but the model expects {f.last_dim}: the "
                                f"inputs were made for another model")

    def batch(self, inputs) -> int:
        """1, or 2 when the request runs two guidance branches (true CFG) batched."""
        return 1

    def conditioning(self, inputs, layout: Layout | None = None) -> dict:
        """Every graph input that stays fixed during one generation (name -> float32/int64 tensor, batch
        ``self.batch(inputs)``): text embeddings, rotary tables of the layout, masks, guidance."""
        raise NotImplementedError

    def graph_inputs(self, batch: int = 1) -> tuple[GraphTensor, ...]:
        """The conditioning inputs of the graphs, in order (names, symbolic dims, dtypes)."""
        raise NotImplementedError

    def rope_inputs(self) -> tuple[GraphTensor, ...]:
        """The rotary tables every family passes: rows of [T | X | C], computed on the host."""
        return (GraphTensor("rope_cos", ("T+Nx+Nc", self.head_dim), "float32"),
                GraphTensor("rope_sin", ("T+Nx+Nc", self.head_dim), "float32"))

    def synthetic_inputs(self, layout: Layout, seed: int = 0):
        """Seeded random conditioning for this layout (smoke tests, benchmarks, calibration)."""
        raise NotImplementedError

    # --- model (override) ----------------------------------------------------------------------
    def install_processors(self, model) -> None:
        """Replace the attention processors by ones that call ``self.hooks[layer]`` on q/k/v."""
        raise NotImplementedError

    def embed(self, latents, context, timestep, cond):
        """Inputs -> a mutable state (any object with n_text, n_target) for run_layer."""
        raise NotImplementedError

    def gather_context(self, state, layer: int, keep_idx) -> None:
        """Keep only the context tokens keep_idx (hidden states AND rotary rows, and any per-token tensor)."""
        raise NotImplementedError

    def run_layer(self, state, layer: int) -> None:
        raise NotImplementedError

    def head(self, state) -> torch.Tensor:
        """Final norm and projection; the velocity of the target tokens [B, Nx, C_out]."""
        raise NotImplementedError

    def pipeline_call(self, model, latents, context, timestep, inputs, branch: str = "positive") -> torch.Tensor:
        """The unmodified diffusers transformer called exactly as the family's pipeline calls it (the reference
        semantics tests compare against). Returns the target tokens' velocity [1, Nx, C_out]."""
        raise NotImplementedError

    # --- sampling (override) -------------------------------------------------------------------
    scheduler_defaults: dict = {}

    def make_scheduler(self, steps: int, layout: Layout, scheduler_config: dict | None = None):
        """The pipeline's scheduler with its timesteps set for `steps` steps at this layout."""
        raise NotImplementedError

    def guide(self, velocity: torch.Tensor, inputs) -> torch.Tensor:
        """Combine the branches of a batched velocity [B, Nx, C] into one [1, Nx, C] (true CFG); identity at B=1."""
        return velocity[:1]

    # --- generic ToPi forward --------------------------------------------------------------------
    def forward(self, latents, context, timestep, cond: dict, *, keep_idx=None, score_idx=None, prune_start: int = 0,
                influence_layers=(), drop_context_layer: int | None = None):
        """The model with ToPi. Returns (velocity [B, Nx, C_out], influence [1, K] of batch row 0, or None).

        keep_idx (sorted context indices): layers >= prune_start see only those context tokens. influence_layers:
        the pivotal layers whose influence is summed (over the context tokens present; a pivotal layer before the
        gather is reduced to keep_idx so every term has K entries). score_idx: the target queries averaged (all
        when None). drop_context_layer: the calibration probe."""
        if self.model is None:
            raise TopiError(f"{self.name}: this adapter was made from a config only; load the model with weights")
        pivotal = set(int(v) for v in influence_layers)
        state = self.embed(latents, context, timestep, cond)
        influence = None
        for layer in range(self.num_layers):
            if keep_idx is not None and layer == prune_start:
                self.gather_context(state, layer, keep_idx)
            hook = self.hooks[layer]
            hook.arm(state.n_text, state.n_target, score=layer in pivotal, score_idx=score_idx,
                     drop_context=layer == drop_context_layer)
            try:
                self.run_layer(state, layer)
                part = hook.influence
            finally:
                hook.disarm()
            if part is not None:
                if keep_idx is not None and layer < prune_start:
                    part = token_gather(part.unsqueeze(-1), keep_idx)[..., 0]
                influence = part if influence is None else influence + part
        return self.head(state), influence
