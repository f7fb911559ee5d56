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

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from topi_export.errors import BadInput, TopiError
from topi_export.ops import influence_score, token_gather
from topi_export.plan import GraphTensor, Layout, MethodSettings
from topi_export.plan.tensors import TensorSpec


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
    ``drop_context`` removes the context keys/values from this layer's attention (the calibration probe).
    Reference K/V cache (docs/design.md, "Reference K/V cache"): ``kv`` = (k, v) [B, H, N, D] cached context
    keys/values spliced after the target's (a cached step runs no context tokens); ``record`` keeps this layer's
    context keys/values in ``recorded``."""

    def __init__(self):
        self.disarm()

    def disarm(self):
        self.n_text = self.n_target = 0
        self.score, self.score_idx, self.drop_context, self.influence = False, None, False, None
        self.kv, self.record, self.recorded = None, False, None

    def arm(self, n_text: int, n_target: int, *, score: bool, score_idx=None, drop_context: bool = False, kv=None,
            record: bool = False):
        self.n_text, self.n_target = n_text, n_target
        self.score, self.score_idx, self.drop_context = score, score_idx, drop_context
        self.kv, self.record = kv, record

    def __call__(self, q, k, v, key_mask=None):
        t_end, x_end = self.n_text, self.n_text + self.n_target
        if self.kv is not None:
            k, v = torch.cat([k, self.kv[0].to(k.dtype)], dim=2), torch.cat([v, self.kv[1].to(v.dtype)], dim=2)
        if self.record:
            self.recorded = (k[:, :, x_end:], v[:, :, x_end:])
        if self.score:
            q_target = q[:1, :, t_end:x_end]
            if self.score_idx is not None:
                q_target = q_target.index_select(2, self.score_idx)
            mask = None if key_mask is None else key_mask[:1].float()
            if mask is not None and mask.shape[-1] < k.shape[2]:  # cached context keys are never masked
                mask = torch.nn.functional.pad(mask, (0, k.shape[2] - mask.shape[-1]), value=1.0)
            self.influence = influence_score(q_target, k[:1], v[:1, :, x_end:], mask)
        if self.drop_context:
            k, v = k[:, :, :x_end], v[:, :, :x_end]
        return q, k, v


def call_tensor(kwargs: dict, name: str, pipeline: str) -> torch.Tensor:
    """One tensor argument of a pipeline's transformer call (the drop-in), as a tensor; a one-line error when the
    call lacks it."""
    value = kwargs.get(name)
    if value is None:
        raise BadInput(f"the transformer call has no '{name}': the ToPi drop-in serves {pipeline}'s transformer calls")
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)


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
    front_end: str | None = None  # module whose FRONT_END drives those pipelines from images (models/frontend.py)
    lora_loader: str | None = None  # diffusers.loaders mixin that reads this family's LoRA files (topi_export/lora.py)
    builtins: dict = {}  # built-in name -> callable returning a seeded diffusers config
    max_references: int | None = 1  # None: any number
    published: Published | None = None  # default method setting (with provenance)
    resolution_sets: dict = {}  # shorthand name -> list of (width, height) in pixels
    pixels_per_token: int = 16  # pixel side of one packed latent token (VAE factor x 2x2 packing)
    text_tokens_default: int = 8  # text tokens of synthetic requests
    pads_text: bool = False  # True: a masked family; shorter prompts are padded (mask 0) to a built text length
    max_branches: int = 1  # guidance branches one request may run, batched along B (2: true CFG)
    # Pipelines whose models were trained with a reference K/V cache (references attend only to themselves, so
    # their keys/values are computed once per request: docs/design.md, "Reference K/V cache"). Empty: the family
    # has no such models, and reference K/V reuse is only the approximate, opt-in mode.
    kv_pipelines: tuple[str, ...] = ()

    @classmethod
    def model_class(cls):
        """The model class of the built-ins and saved folders (diffusers' class of that name by default)."""
        import diffusers

        return getattr(diffusers, cls.model_classes[0])

    def __init__(self, config: dict, model=None, kv_model: bool = False):
        self.config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        self.model = model.eval() if model is not None else None
        if kv_model and not self.kv_pipelines:
            raise BadInput(f"{self.name} has no models trained with a reference K/V cache: drop --kv-cache (use "
                           f"`run --ref-kv reuse`, the approximate reuse, instead)")
        self.kv_model = bool(kv_model)  # the reference-K/V-cache attention of a KV-trained model
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
        """The family's name for its guidance mode, as reports show it (e.g. 'distilled': a scale is embedded;
        'none'; 'true-cfg': ``max_branches`` branches per step, combined by ``guide``)."""
        raise NotImplementedError

    def layer_name(self, layer: int) -> str:
        for name, start, end in self.layer_groups():
            if start <= layer < end:
                return f"{name}[{layer - start}]"
        raise IndexError(layer)

    def default_settings(self) -> MethodSettings:
        return self.published.for_depth(self.num_layers)

    # --- requests: derived from tensor_specs (override tensor_specs; branches for guidance) ------------
    def tensor_specs(self) -> tuple[TensorSpec, ...]:
        """Every tensor and scalar of a request besides the reference latents (plan/tensors.py): declared once,
        from which inputs files, graph inputs, synthetic inputs and Triton requests derive."""
        raise NotImplementedError

    def spec(self, name: str) -> TensorSpec:
        for s in self.tensor_specs():
            if s.name == name:
                return s
        raise KeyError(name)

    def branches(self, inputs) -> int:
        """Guidance branches this request runs (batched along B): 1, up to ``max_branches`` (e.g. true CFG)."""
        return 1

    def scalar(self, inputs, name: str) -> float:
        """A scalar of the request, or its declared default."""
        value = inputs.scalars.get(name)
        return float(self.spec(name).default if value is None else value)

    def text_tokens(self, inputs) -> int:
        """T of a request: the longest text tensor of its branches."""
        return max((int(inputs.tensors[s.name].shape[1]) for s in self.tensor_specs()
                    if s.role == "text" and s.name in inputs.tensors), default=1)

    def check_layout(self, layout: Layout) -> None:
        if self.max_references is not None and layout.num_refs > self.max_references:
            raise BadInput(f"{self.name} takes at most {self.max_references} reference image(s), the request has "
                           f"{layout.num_refs}: use a multi-reference family (e.g. FLUX.2) or fewer references")

    def check_inputs(self, inputs) -> None:
        """A request against this model: channels, every declared tensor's shape and values; one-line errors."""
        self.check_layout(inputs.layout)
        if inputs.channels != self.in_channels:
            raise BadInput(f"'reference_latents' has {inputs.channels} channels but the model expects "
                           f"{self.in_channels}: the inputs were made for another model")
        t = inputs.tensors
        for s in self.tensor_specs():
            if s.role == "scalar":
                v = inputs.scalars.get(s.name)
                if v is not None and not (math.isfinite(v) and s.bounds[0] <= v <= s.bounds[1]):
                    raise BadInput(f"'{s.name}' is {v}, outside {s.bounds[0]:g}..{s.bounds[1]:g}")
                continue
            x = t.get(s.name)
            if x is None:
                if s.required:
                    raise BadInput(f"the request has no '{s.name}': {self.name} needs "
                                   f"{', '.join(['reference_latents'] + [r.name for r in self.tensor_specs() if r.required])}")
                continue
            if x.dim() != s.rank or x.shape[0] != 1:
                raise BadInput(f"'{s.name}' has shape {list(x.shape)}, expected {list(s.request_dims)}")
            if s.features is not None and x.shape[-1] != s.features:
                raise BadInput(f"'{s.name}' has {x.shape[-1]} features but the model expects {s.features}: the "
                               f"inputs were made for another model")
            if s.role == "mask":
                text = t.get(s.mask_of)
                if text is None:
                    raise BadInput(f"the request has '{s.name}' but no '{s.mask_of}': add the embeddings or drop "
                                   f"the mask")
                if tuple(x.shape) != tuple(text.shape[:2]):
                    raise BadInput(f"'{s.name}' has shape {list(x.shape)} but '{s.mask_of}' has {text.shape[1]} "
                                   f"tokens: the mask needs shape [1, {text.shape[1]}]")
                if not bool(((x == 0) | (x == 1)).all()):
                    raise BadInput(f"'{s.name}' holds values other than 0 and 1: save the text encoder's attention "
                                   f"mask (1 = token, 0 = padding)")
        longest = self.text_tokens(inputs)
        if inputs.layout.text_tokens < longest:
            raise BadInput(f"the request's layout has {inputs.layout.text_tokens} text tokens but its embeddings "
                           f"have {longest}: the layout must hold the longest branch's text")

    def conditioning(self, inputs, layout: Layout | None = None) -> dict:
        """Every graph input that stays fixed during one generation (name -> float32 tensor, batch
        ``self.branches(inputs)``, branch 0 first): the declared tensors padded to the layout's text length
        (a masked text is padded with mask 0; an unmasked one must fit exactly), scalars as [B] tensors, and
        the rotary tables of the layout."""
        layout = layout or inputs.layout
        n, T = self.branches(inputs), layout.text_tokens
        specs = self.tensor_specs()
        masked = {s.mask_of for s in specs if s.role == "mask"}
        rows: dict[str, dict[int, torch.Tensor]] = {}
        for s in specs:
            if s.graph is None or s.branch >= n:
                continue
            if s.role == "scalar":
                value = torch.tensor([self.scalar(inputs, s.name)], dtype=torch.float32)
            elif s.role == "mask":
                text, mask = inputs.tensors.get(s.mask_of), inputs.tensors.get(s.name)
                if text is None:
                    continue
                value = F.pad(torch.ones(text.shape[:2]) if mask is None else mask.float(), (0, T - text.shape[1]))
            else:
                value = inputs.tensors.get(s.name)
                if value is None:
                    continue
                value = value.float()
                if s.role == "text" and value.shape[1] != T:
                    if s.name not in masked or value.shape[1] > T:
                        raise BadInput(f"'{s.name}' has {value.shape[1]} tokens but the layout holds {T}: build for "
                                       f"{value.shape[1]} text tokens")
                    value = F.pad(value, (0, 0, 0, T - value.shape[1]))
            rows.setdefault(s.graph, {})[s.branch] = value
        cond = {}
        for graph, by_branch in rows.items():
            first = by_branch[min(by_branch)]
            cond[graph] = torch.cat([by_branch.get(b, first) for b in range(n)]).contiguous()
        cos, sin = self.rope(layout)
        cond.update(rope_cos=cos, rope_sin=sin)
        return cond

    def graph_inputs(self) -> tuple[GraphTensor, ...]:
        """The conditioning inputs of the graphs, in order (names, symbolic dims, dtypes)."""
        out = {}
        for s in self.tensor_specs():
            if s.graph is not None and s.graph not in out:
                out[s.graph] = GraphTensor(s.graph, s.graph_dims, "float32")
        return tuple(out.values()) + self.rope_inputs()

    def rope(self, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables (cos, sin) [T + Nx + Nc, head_dim] of the layout, rows in joint order."""
        raise NotImplementedError

    def rope_inputs(self) -> tuple[GraphTensor, ...]:
        """The rotary tables every family passes: rows of [T | X | C], computed on the host."""
        return (GraphTensor("rope_cos", ("T+Nx+Nc", self.head_dim), "float32"),
                GraphTensor("rope_sin", ("T+Nx+Nc", self.head_dim), "float32"))

    def synthetic_inputs(self, layout: Layout, seed: int = 0):
        """A seeded random request for this layout (smoke tests, benchmarks, calibration): every declared text and
        pooled tensor (a second branch's text half as long, as a negative prompt is shorter than an edit), masks
        of ones, scalars at their defaults."""
        from topi_export.request import Inputs

        gen = torch.Generator().manual_seed(int(seed) % (1 << 63))
        ref = torch.randn(1, layout.num_ctx, self.in_channels, generator=gen)
        tensors = {}
        for s in self.tensor_specs():
            if s.role == "text":
                n_text = layout.text_tokens if s.branch == 0 else max(1, layout.text_tokens // 2)
                tensors[s.name] = torch.randn(1, n_text, s.features, generator=gen)
            elif s.role == "pooled":
                tensors[s.name] = torch.randn(1, s.features, generator=gen)
            elif s.role == "mask" and s.mask_of in tensors:
                tensors[s.name] = torch.ones(tensors[s.mask_of].shape[:2])
        return Inputs(layout, ref, tensors, source=f"synthetic(seed={seed})")

    # --- model (override) ----------------------------------------------------------------------
    def install_processors(self, model) -> None:
        """Replace the attention processors by ones that call ``self.hooks[layer]`` on q/k/v."""
        raise NotImplementedError

    def embed(self, latents, context, timestep, cond):
        """Inputs -> a mutable state (any object with n_text, n_target) for run_layer. context None: no context
        tokens (a cached step; the rotary tables then hold the [T | X] rows only)."""
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

    # --- diffusers drop-in (override parse_call(kwargs) -> (latents, timestep, Inputs); the rest when a pipeline
    # keeps a reference K/V cache between its transformer calls: docs/design.md, "Reference K/V cache") -----------
    def dropin_cache_call(self, kwargs) -> str | None:
        """How the pipeline's call uses a reference K/V cache: "extract" (the call that builds it), "cached" (a
        call that passes it back), None (a plain call)."""
        return None

    def dropin_output(self, velocity, cache=None, return_dict: bool = True):
        """What the transformer returns to the pipeline; with ``cache`` (an extract call), also the cache token
        the pipeline passes back to its later calls."""
        if not return_dict:
            return (velocity,) if cache is None else (velocity, cache)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=velocity)

    def dropin_attributes(self) -> dict:
        """Attributes a pipeline reads from its transformer besides config, dtype and device (name -> value)."""
        return {}

    # --- generic ToPi forward --------------------------------------------------------------------
    def text_input(self) -> str:
        """The graph input of the (first) text tensor: its length is T."""
        return next(s.graph for s in self.tensor_specs() if s.role == "text")

    def forward(self, latents, context, timestep, cond: dict, *, keep_idx=None, score_idx=None, prune_start: int = 0,
                influence_layers=(), drop_context_layer: int | None = None, ref_kv=None, record_kv: bool = False):
        """The model with ToPi. Returns (velocity [B, Nx, C_out], influence [1, K] of batch row 0, or None), and
        with ``record_kv`` also the context's keys and values of every layer, ref_kv [L, 2, B, H, Nc, D] (after
        QK-norm and RoPE).

        keep_idx (sorted context indices): layers >= prune_start see only those context tokens. influence_layers:
        the pivotal layers whose influence is summed (over the context tokens present; a pivotal layer before the
        gather is reduced to keep_idx so every term has K entries). score_idx: the target queries averaged (all
        when None). drop_context_layer: the calibration probe.

        ref_kv (a cached step, docs/design.md "Reference K/V cache"): ``context`` is None, only text and target
        tokens run, and each layer attends to the cached context keys/values spliced after the target's; layers
        >= prune_start to the kept ones (keep_idx) only. Influence is then scored over the cached keys."""
        if self.model is None:
            raise TopiError(f"{self.name}: this adapter was made from a config only; load the model with weights")
        pivotal = set(int(v) for v in influence_layers)
        kept_kv = None
        if ref_kv is not None:
            if context is not None:
                raise TopiError("a cached step takes the context's keys and values, not its tokens: pass context=None")
            # the cache holds post-RoPE keys: only the [T | X] rows of the rotary tables are used
            cut = cond[self.text_input()].shape[1] + latents.shape[1]
            cond = {**cond, "rope_cos": cond["rope_cos"][:cut], "rope_sin": cond["rope_sin"][:cut]}
            if keep_idx is not None:  # one gather of the kept keys/values for every layer from L0 on
                kept_kv = ref_kv[prune_start:].index_select(4, keep_idx)
        state = self.embed(latents, context, timestep, cond)
        influence, recorded = None, []
        for layer in range(self.num_layers):
            if keep_idx is not None and layer == prune_start and ref_kv is None:
                self.gather_context(state, layer, keep_idx)
            kv = None
            if ref_kv is not None:
                kv = kept_kv[layer - prune_start] if kept_kv is not None and layer >= prune_start else ref_kv[layer]
            hook = self.hooks[layer]
            hook.arm(state.n_text, state.n_target, score=layer in pivotal, score_idx=score_idx,
                     drop_context=layer == drop_context_layer, kv=kv, record=record_kv)
            try:
                self.run_layer(state, layer)
                part = hook.influence
                if record_kv:
                    recorded.append(torch.stack(hook.recorded))
            finally:
                hook.disarm()
            if part is not None:
                if keep_idx is not None and layer < prune_start:
                    part = token_gather(part.unsqueeze(-1), keep_idx)[..., 0]
                influence = part if influence is None else influence + part
        velocity = self.head(state)
        if record_kv:
            return velocity, influence, torch.stack(recorded)
        return velocity, influence
