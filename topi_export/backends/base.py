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

from topi_export.errors import BadInput, RebuildNeeded

# Graph inputs that change every step; the rest is fixed for one request (bound once).
PER_CALL = ("latents", "timestep", "keep_idx", "score_idx")


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
    ``anchor`` / ``full`` / ``pruned`` / ``dense`` run one step. A backend implements ``to_backend`` and ``run``."""

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

    def static_feed(self, kind: str, batch: int) -> dict:
        """The graph inputs fixed for this request, checked against the graph's entry once per (kind, batch)."""
        key = (kind, batch)
        if key not in self._static:
            if kind not in self.graphs:
                raise RebuildNeeded(f"this engine has no {kind} graph: rebuild with --dense-baseline")
            sizes = self.layout.sizes(batch=batch)
            feed = {}
            for t in self.graphs[kind].inputs:
                if t.name in PER_CALL:
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

    def _call(self, kind, step, latents, timestep, keep_idx, score_idx):
        if self.layout is None:
            raise BadInput(f"{self.name}: bind(cond, context, layout) must be called before running a step")
        batch = int(latents.shape[0])
        entry = self.graphs.get(kind)
        feed = dict(self.static_feed(kind, batch))
        per_call = {"latents": latents.float(), "timestep": timestep.float().reshape(batch),
                    "keep_idx": keep_idx, "score_idx": score_idx}
        for t in entry.inputs:
            if t.name in PER_CALL:
                feed[t.name] = self.to_backend(per_call[t.name].contiguous(), t)
        out = self.run(kind, step, feed)
        return out["velocity"], out.get("influence")

    # --- backend --------------------------------------------------------------------------------------------
    def to_backend(self, tensor: torch.Tensor, spec):
        """A torch tensor as this backend's array for graph input ``spec`` (plan.GraphTensor)."""
        raise NotImplementedError

    def run(self, kind: str, step: str, feed: dict) -> dict:
        """One call of graph ``kind`` (``step``: anchor | full | pruned | dense, for backends that use it) ->
        {output name: float32 CPU torch tensor}."""
        raise NotImplementedError

