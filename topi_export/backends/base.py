"""The backend contract (docs/design.md, "Backends"): every backend module exposes

    BACKEND: Backend                         what it is, what it builds, where it runs, its options
    build(job: BuildJob) -> BuildOutput      engines from the exported ONNX graphs (backends that build)
    open_engine(source: EngineSource)        a StepEngine over a verified engine directory (or the model itself)
    check(options)                           (optional) refuse early what build would refuse after the export
    refit(job: RefitJob) -> list[str]        (optional) engines with other weights (LoRA), without re-exporting

A StepEngine runs the steps the temporal controller plans (method/schedule.py). The feed of every graph is built
and checked HERE, once per request, from the graph's entry (plan.GraphEntry: names, symbolic dims, dtypes): the
family's conditioning by name, the context expanded to the batch. A backend converts tensors to its own arrays
(``to_backend``) and runs one call (``run``); nothing else. Backends import the plan objects and the export layer
below them, never the runtime above."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from topi_export.errors import BadInput, RebuildNeeded, TopiError
from topi_export.plan.manifest import STATE

# Graph inputs that change every step; the rest is fixed for one request (bound once), except the per-request
# state (STATE: the reference K/V cache), which one call produces and later calls take back.
PER_CALL = ("latents", "timestep", "keep_idx", "score_idx")


def state_bytes(state: dict) -> int:
    """Bytes of a StepEngine's per-request state (torch tensors or backend arrays)."""
    return sum(int(v.numel()) * int(v.element_size()) if hasattr(v, "element_size") else int(v.nbytes)
               for v in state.values())


@dataclass(frozen=True)
class Backend:
    name: str
    builds: bool  # has a build step (an engine directory); False: runs the model's own weights (torch)
    precisions: tuple[str, ...]
    runs_on: str  # where its engines execute
    description: str
    dense_by_default: bool = False  # build the dense baseline unless told otherwise (free when weights are shared)
    triton_platform: str | None = None  # Triton platform of its engine models; None: Triton cannot load them
    triton_model_file: str | None = None  # file name Triton expects in the model's version folder
    triton_backend: str | None = None  # the Triton backend loading those models (a folder of its backend directory)
    options: type | None = None  # its build options (an Options dataclass), filled by the build command's flags


class Options:
    """Base of a backend's typed build options. Each field carries its command-line flag in its metadata:
    ``field(default=..., metadata={"flag": "--timing-cache", "help": "...", "type": click type, "multiple": bool,
    "is_flag": bool})``; ``click_options`` turns them into options of ``topi-export build``."""

    @classmethod
    def flags(cls) -> dict:
        """field name -> flag."""
        return {f.name: f.metadata["flag"] for f in fields(cls)}

    @classmethod
    def click_options(cls) -> list:
        import click

        out = []
        for f in fields(cls):
            md = dict(f.metadata)
            kwargs = {"help": md.get("help"), "default": f.default if not md.get("multiple") else ()}
            if md.get("is_flag"):
                kwargs["is_flag"] = True
            if md.get("multiple"):
                kwargs["multiple"] = True
            if md.get("type") is not None:
                kwargs["type"] = md["type"]
            if md.get("show_default"):
                kwargs["show_default"] = True
            out.append(click.option(md["flag"], f.name, **kwargs))
        return out

    def to_json(self) -> dict:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


@dataclass(frozen=True)
class BuildJob:
    """What a backend build receives: the exported graphs and everything the profiles depend on."""

    onnx_dir: Path  # topi.onnx (+ dense.onnx) + weights.data
    out_dir: Path  # the staging engine directory
    graphs: dict  # kind -> plan.GraphEntry of the exported ONNX graphs
    layouts: tuple  # plan.Layout per built resolution
    profiles: tuple  # plan.Profile table (layouts x (anchor + buckets))
    batch: int
    precision: str
    options: object = None  # the backend's Options (None: defaults)
    echo: object = print


@dataclass(frozen=True)
class BuildOutput:
    graphs: dict  # kind -> relative file the runtime loads
    target: dict  # where the engines run (execution provider, GPU, compute capabilities, versions)
    keep_onnx: bool = True  # whether the portable ONNX graphs stay in the engine directory
    versions: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RefitJob:
    """What a backend refit receives (topi_export/refitting.py): the verified source directory, the staging
    directory to write into, where every parameter sits in the graphs (export/weights_map.py Slot, graph paths
    relative to the source directory), the parameters to rewrite (those the old or the new adapters change) and
    the new parameters. The backend writes only the files whose bytes change and returns them (relative); every
    other file of the source directory is carried over unchanged."""

    manifest: object  # plan.Manifest of the source directory
    out_dir: Path
    slots: tuple  # export.weights_map.Slot
    changed: frozenset  # parameter names to rewrite
    new: dict  # parameter name -> tensor at the engines' precision
    echo: object = print


@dataclass(frozen=True)
class EngineSource:
    """What a backend opens: a verified manifest (backends that build), or the model itself (``family`` with its
    weights and ``settings``, for backends that run the model directly). ``device`` / ``dtype`` place the model."""

    manifest: object = None  # plan.Manifest
    family: object = None  # models.base.Family
    settings: object = None  # plan.MethodSettings
    device: str = "cpu"
    dtype: str = "fp32"
    options: dict = field(default_factory=dict)  # runtime options of the backend (e.g. CUDA graphs)


class StepEngine:
    """Shared step logic of every backend. ``bind`` fixes one request's conditioning and context latents [1, Nc, C];
    ``anchor`` / ``full`` / ``pruned`` / ``dense`` run one step; ``extract`` / ``cached`` run the reference K/V
    cache's steps. A backend implements ``to_backend`` and ``run``.

    Per-request state (docs/design.md, "Reference K/V cache"): ``state`` holds the graph outputs named in STATE
    (``ref_kv``) that one call produced, in the backend's own form (device memory for a GPU engine, never copied to
    the host), and feeds them to the later calls that take an input of that name. ``bind`` starts a request with
    an empty state; ``state_version`` counts the writes, so a backend that copies inputs into static buffers knows
    when to copy it again. It is the only place the cache lives: the runtime holds it once."""

    name = "engine"
    has_dense = False
    # torch threads for the loop's host-side work (scheduler, guidance) while this engine runs the model: 1, because
    # torch's OpenMP pool spinning beside the runtime's own threads made the ONNX Runtime ToPi loop 5-9% slower on a
    # 2-core CPU (docs/benchmarks.md, section 4). None keeps torch's setting (the torch backend computes on them).
    host_threads: int | None = 1

    def __init__(self, graphs: dict):
        self.graphs = graphs  # kind -> plan.GraphEntry (inputs and outputs the calls feed and read)
        self.layout = None

    # --- per request ----------------------------------------------------------------------------------------
    def bind(self, cond: dict, context: torch.Tensor, layout) -> None:
        self.cond, self.layout = cond, layout
        self.context = context.float()
        self.all_idx = torch.arange(layout.num_ctx, dtype=torch.int64)
        self.all_queries = torch.arange(layout.num_target, dtype=torch.int64)
        self.one_query = torch.zeros(1, dtype=torch.int64)
        self._static = {}  # (graph kind, batch) -> the fixed part of the feed, in the backend's arrays
        self.state, self.state_version = {}, 0

    def static_feed(self, kind: str, batch: int) -> dict:
        """The graph inputs fixed for this request, checked against the graph's entry once per (kind, batch)."""
        key = (kind, batch)
        if key not in self._static:
            if kind not in self.graphs:
                raise RebuildNeeded(f"this engine has no {kind} graph: rebuild with --dense-baseline")
            sizes = self.layout.sizes(batch=batch)
            feed = {}
            for t in self.graphs[kind].inputs:
                if t.name in PER_CALL or t.name in STATE:
                    continue
                v = self.context if t.name == "context" else self.cond.get(t.name)
                if v is None:
                    raise RebuildNeeded(f"the {kind} graph needs input '{t.name}', which this model's requests do not "
                                        f"provide: the engines were built for another model; rebuild them")
                if t.dims[:1] == ("B",) and v.shape[0] != batch:
                    v = v.expand(batch, *v.shape[1:])
                try:
                    want = t.shape(sizes)
                except KeyError as exc:
                    raise RebuildNeeded(f"graph input '{t.name}' has an unknown dimension {exc}: rebuild the "
                                        f"engines") from None
                if tuple(v.shape) != want:
                    raise BadInput(f"graph input '{t.name}' has shape {list(v.shape)} but the {kind} graph takes "
                                   f"{list(want)} for {self.layout.describe()}: the request does not fit these "
                                   f"engines")
                feed[t.name] = self.to_backend(v.contiguous(), t)
            self._static[key] = feed
        return self._static[key]

    # --- steps ----------------------------------------------------------------------------------------------
    def anchor(self, latents, timestep):
        """Velocity [B, Nx, C] and influence [B, Nc] over the full sequence."""
        return self._call("topi", "anchor", latents, timestep, self.all_idx, self.all_queries)

    def full(self, latents, timestep):
        """The unpruned velocity from the ToPi graph (every context token, influence not scored)."""
        return self._call("topi", "full", latents, timestep, self.all_idx, self.one_query)[0]

    def pruned(self, latents, timestep, keep_idx):
        """Velocity with only the kept context tokens (sorted int64 indices) from layer L0 on."""
        keep_idx = torch.as_tensor(keep_idx, dtype=torch.int64)
        return self._call("topi", "pruned", latents, timestep, keep_idx, self.one_query)[0]

    def dense(self, latents, timestep):
        """The plain model (the dense baseline graph)."""
        return self._call("dense", "dense", latents, timestep, None, None)[0]

    # --- reference K/V cache steps (docs/design.md, "Reference K/V cache") -------------------------------------
    def extract(self, latents, timestep, score: bool = True):
        """The full sequence; keeps every layer's context keys and values in ``state``. Velocity [B, Nx, C] and,
        with ``score``, influence [B, Nc] over every target query (else None: one query is scored and dropped)."""
        velocity, influence = self._call("extract", "extract", latents, timestep, None,
                                         self.all_queries if score else self.one_query)
        return velocity, influence if score else None

    def cached(self, latents, timestep, keep_idx=None, score: bool = False):
        """Text and target tokens only, against the cached keys/values (from L0 on the kept ones, keep_idx: sorted
        int64 indices, None: every one). With ``score`` (an anchor; keep_idx None) influence [B, Nc] over the
        cached keys from every target query, else None."""
        keep = self.all_idx if keep_idx is None else torch.as_tensor(keep_idx, dtype=torch.int64)
        step = "kv-anchor" if score else "kv-full" if keep_idx is None else "kv-pruned"
        velocity, influence = self._call("cached", step, latents, timestep, keep,
                                         self.all_queries if score else self.one_query)
        return velocity, influence if score else None

    def state_bytes(self) -> int:
        """Bytes the per-request state (the reference K/V cache) holds."""
        return state_bytes(self.state)

    def _call(self, kind, step, latents, timestep, keep_idx, score_idx):
        if self.layout is None:
            raise BadInput(f"{self.name}: bind(cond, context, layout) must be called before running a step")
        batch = int(latents.shape[0])
        entry = self.graphs.get(kind)
        if entry is None:
            raise RebuildNeeded(f"this engine has no {kind} graph: rebuild with "
                                f"{'--dense-baseline' if kind == 'dense' else '--kv-cache or --ref-kv reuse'}")
        feed = dict(self.static_feed(kind, batch))
        per_call = {"latents": latents.float(), "timestep": timestep.float().reshape(batch),
                    "keep_idx": keep_idx, "score_idx": score_idx}
        for t in entry.inputs:
            if t.name in PER_CALL:
                feed[t.name] = self.to_backend(per_call[t.name].contiguous(), t)
            elif t.name in STATE:
                if t.name not in self.state:
                    raise TopiError(f"the {kind} step needs '{t.name}', which no earlier step of this request "
                                    f"produced: run an extract step first (the temporal controller plans one)")
                feed[t.name] = self.state[t.name]
        out = self.run(kind, step, feed)
        for name in STATE:
            if name in out:
                self.state[name] = out.pop(name)
                self.state_version += 1
        return out["velocity"], out.get("influence")

    # --- backend --------------------------------------------------------------------------------------------
    def to_backend(self, tensor: torch.Tensor, spec):
        """A torch tensor as this backend's array for graph input ``spec`` (plan.GraphTensor)."""
        raise NotImplementedError

    def run(self, kind: str, step: str, feed: dict) -> dict:
        """One call of graph ``kind`` (``step``: anchor | full | pruned | dense | extract | kv-anchor | kv-pruned |
        kv-full, for backends that use it) -> {output name: float32 CPU torch tensor}; outputs named in STATE in a
        form ``to_backend`` passes through and the next call can take back as it is (they stay where they are)."""
        raise NotImplementedError

