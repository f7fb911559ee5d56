"""The engine directory's ``manifest.json`` as a typed, versioned object (docs/design.md, "Manifest").

Parsing checks every field's type and range and the cross-field rules (buckets vs keep counts, profiles vs
layouts, graph files vs the file table, the model config vs its hash), so an edited or truncated manifest is one
clear error, never a traceback. Reading files and checking hashes is artifacts/manifest.py's job.

The manifest is bound whole: ``manifest_sha256`` is the sha256 of every other field (``created`` aside) in
canonical JSON, the file table included, so an edit of anything that changes the result or what is loaded (the
model, a layout, the buckets, the method settings, the scheduler, policy, tau, backend, precision, the graphs, a
file's hash) is refused, however type-valid it is, and a manifest without its digest is refused too."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from topi_export.errors import RebuildNeeded, TopiError
from topi_export.plan.layout import MAX_TOKENS, Layout, keep_count
from topi_export.plan.schema import Reader
from topi_export.plan.settings import MethodSettings

FORMAT = "topi-engines/3"
NAME = "manifest.json"
FIX = "the manifest was edited or truncated; rebuild the engine directory with `topi-export build`"
PRECISIONS = ("fp32", "fp16", "bf16")
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool")
DIMS = ("B", "T", "Nx", "Nc", "K", "Q")
DIGEST = "manifest_sha256"
UNBOUND = ("created", DIGEST)  # the only fields the digest does not cover
MAX_BRANCHES = 8  # guidance branches batched in one call (a family declares its own; 2 for true CFG)


def manifest_digest(doc: dict) -> str:
    """sha256 of every manifest field but ``created`` and the digest itself, in canonical JSON."""
    blob = json.dumps({k: v for k, v in doc.items() if k not in UNBOUND}, sort_keys=True, separators=(",", ":"),
                      default=list)
    return hashlib.sha256(blob.encode()).hexdigest()


def config_digest(config: dict, cls=None) -> str:
    """A model config's identity: its public keys (those ``cls.__init__`` takes, when the class is known: a
    config.json may carry keys diffusers ignores), canonical JSON, 16 hex digits."""
    keep = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
    if cls is not None:
        import inspect

        params = inspect.signature(cls.__init__).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            keep = {k: v for k, v in keep.items() if k in params}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=list).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ModelIdentity:
    source: str
    family: str
    model_class: str
    config_hash: str
    weights_hash: str
    num_layers: int
    config: dict = field(default_factory=dict, compare=False, hash=False)
    # LoRA adapters fused into the weights (topi_export/lora.py): ({"file", "sha256", "scale"}, ...) in fusing order;
    # weights_hash stays the base model's. Written only when there are any, so older manifests keep their digest.
    adapters: tuple = field(default=(), hash=False)

    def to_json(self) -> dict:
        out = {"source": self.source, "family": self.family, "class": self.model_class,
               "config_hash": self.config_hash, "weights_hash": self.weights_hash, "num_layers": self.num_layers,
               "config": self.config}
        if self.adapters:
            out["adapters"] = [dict(a) for a in self.adapters]
        return out

    def describe_adapters(self) -> str:
        return ", ".join(f"{a['file']} x{a['scale']:g} (sha256 {a['sha256'][:12]})" for a in self.adapters)

    @classmethod
    def from_reader(cls, r: Reader) -> "ModelIdentity":
        adapters = []
        for i, entry in enumerate(r.list("adapters", optional=True)):
            ar = Reader(entry, r.where, r.fix, f"{r._name('adapters')}[{i}]")
            sha = ar.str("sha256")
            if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
                raise ar.fail("sha256", "is not a sha256 hex digest")
            adapters.append({"file": ar.str("file"), "sha256": sha, "scale": ar.float("scale", lo=-100.0, hi=100.0)})
        out = cls(r.str("source"), r.str("family"), r.str("class"), r.str("config_hash"), r.str("weights_hash"),
                  r.int("num_layers", lo=1, hi=100_000), r.dict("config"), tuple(adapters))
        # the runtime builds the model's conditioning from this config: an edited size (in_channels, heads) would
        # feed engines tensors of the wrong shape
        if out.config:
            try:
                same = config_digest(out.config) == out.config_hash
            except (TypeError, ValueError, RecursionError):
                same = False
            if not same:
                raise r.fail("config", "does not match model.config_hash (edited after the build)")
        return out


@dataclass(frozen=True)
class GraphTensor:
    name: str
    dims: tuple  # ints or symbolic sums of DIMS ("Nx+Nc")
    dtype: str

    def shape(self, sizes: dict) -> tuple[int, ...]:
        return tuple(resolve_dim(d, sizes) for d in self.dims)

    def to_json(self) -> dict:
        return {"name": self.name, "dims": list(self.dims), "dtype": self.dtype}

    @classmethod
    def from_reader(cls, r: Reader) -> "GraphTensor":
        dims = r.list("dims")
        for i, d in enumerate(dims):
            if isinstance(d, bool) or not (isinstance(d, int) and d >= 0 or isinstance(d, str) and _valid_dim(d)):
                raise r.fail(f"dims[{i}]", f"is {d!r}, expected a size or a sum of {', '.join(DIMS)}")
        return cls(r.str("name"), tuple(dims), r.str("dtype", choices=DTYPES))


def _valid_dim(text: str) -> bool:
    return all(p.strip() in DIMS or p.strip().isdigit() for p in text.split("+"))


def resolve_dim(d, sizes: dict) -> int:
    if isinstance(d, int):
        return d
    return sum(int(p) if p.strip().isdigit() else sizes[p.strip()] for p in d.split("+"))


@dataclass(frozen=True)
class GraphEntry:
    file: str  # the file the backend loads (relative to the engine directory)
    inputs: tuple[GraphTensor, ...]
    outputs: tuple[GraphTensor, ...]
    onnx: str | None = None  # the portable ONNX graph it was built from, when kept in the directory

    def input(self, name: str) -> GraphTensor | None:
        return next((t for t in self.inputs if t.name == name), None)

    def to_json(self) -> dict:
        return {"file": self.file, "onnx": self.onnx, "inputs": [t.to_json() for t in self.inputs],
                "outputs": [t.to_json() for t in self.outputs]}

    @classmethod
    def from_reader(cls, r: Reader) -> "GraphEntry":
        tensors = lambda key: tuple(GraphTensor.from_reader(Reader(v, r.where, r.fix, f"{r.path}.{key}[{i}]"))  # noqa: E731
                                    for i, v in enumerate(r.list(key, nonempty=True)))
        return cls(r.str("file"), tensors("inputs"), tensors("outputs"), r.str("onnx", optional=True))


@dataclass(frozen=True)
class Profile:
    """One shape a backend was built for: a layout at a keep count. ratio 0 is the anchor / full profile
    (every context token, any number of scored queries); other ratios are pruned buckets (one scored query)."""

    index: int
    layout: int  # index into Manifest.layouts
    ratio: float
    keep: int

    def to_json(self) -> dict:
        return {"index": self.index, "layout": self.layout, "ratio": self.ratio, "keep": self.keep}

    @classmethod
    def from_reader(cls, r: Reader) -> "Profile":
        return cls(r.int("index", lo=0), r.int("layout", lo=0), r.float("ratio", lo=0.0, hi=1.0, hi_open=True),
                   r.int("keep", lo=1, hi=MAX_TOKENS))


def profile_table(layouts, buckets) -> tuple[Profile, ...]:
    """Per layout: the anchor/full profile, then one per bucket (ascending ratios)."""
    out = []
    for li, lay in enumerate(layouts):
        for ratio in (0.0, *buckets):
            out.append(Profile(len(out), li, ratio, keep_count(ratio, lay.num_ctx)))
    return tuple(out)


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    model: ModelIdentity
    layouts: tuple[Layout, ...]
    batch: int  # guidance branches batched in one call (2 for true CFG)
    guidance: str  # the family's name for its guidance mode
    buckets: tuple[float, ...]
    profiles: tuple[Profile, ...]
    settings: MethodSettings
    policy: str
    backend: str
    precision: str
    target: dict
    graphs: dict  # "topi" (anchor + pruned steps) and optionally "dense" (the plain model baseline) -> GraphEntry
    files: dict  # relative path -> FileEntry
    versions: dict
    created: str = ""
    tau: float | None = None
    weights: dict = field(default_factory=dict)  # {"file", "bytes", "dtype"} of the one weights copy
    scheduler: dict = field(default_factory=dict)  # the pipeline folder's scheduler config, when built from one
    root: Path | None = field(default=None, compare=False)
    verified: dict = field(default_factory=dict, compare=False)  # relative path -> file identity when verified

    # --- queries ---------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self.root

    @property
    def layout(self) -> Layout:
        """The first (default) layout."""
        return self.layouts[0]

    def layout_index(self, layout: Layout) -> int:
        for i, built in enumerate(self.layouts):
            if built == layout:
                return i
        built = ", ".join(b.describe() for b in self.layouts)
        raise TopiError(f"the request is {layout.describe()} (text tokens, target grid, reference grids) but "
                        f"{self.root} serves only {built}: build with `topi-export build --resolutions ...` or "
                        f"matching --target-grid/--ref-grid/--text-tokens")

    def bucket_ratios(self) -> list[float]:
        return list(self.buckets)

    def profile_for(self, layout_index: int, keep: int) -> Profile:
        for p in self.profiles:
            if p.layout == layout_index and p.keep == keep:
                return p
        keeps = [(p.ratio, p.keep) for p in self.profiles if p.layout == layout_index]
        raise TopiError(f"no compiled profile keeps {keep} context tokens for {self.layouts[layout_index].describe()} "
                        f"in {self.root} (ratio, keep: {keeps}): use a compiled ratio or rebuild with --ratio-buckets")

    def file(self, rel: str) -> Path:
        """A file of the directory, confined to it (fsutil.confined_path rules)."""
        from topi_export.fsutil import confined_path

        return confined_path(self.root, rel, what="engine file")

    def has_graph(self, kind: str) -> bool:
        return kind in self.graphs

    def check_unchanged(self) -> None:
        """Called by a backend after it loaded the directory's files by name: every verified file still has the
        identity it had when its sha256 was checked, so what was loaded is what was verified (a concurrent writer
        changes mtime / ctime / inode)."""
        import os

        from topi_export.errors import RebuildNeeded
        from topi_export.fsutil import file_identity

        for rel, ident in self.verified.items():
            try:
                now = file_identity(os.stat(self.root / rel, follow_symlinks=False))
            except OSError:
                now = None
            if now != ident:
                raise RebuildNeeded(f"engine file {rel} in {self.root} changed while it was being loaded: rerun when "
                                    f"nothing writes to the engine directory")

    # --- JSON ------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        doc = {"format": FORMAT, "created": self.created, "model": self.model.to_json(),
                "layouts": [lay.to_json() for lay in self.layouts], "batch": self.batch, "guidance": self.guidance,
                "buckets": list(self.buckets), "profiles": [p.to_json() for p in self.profiles],
                "calibration": self.settings.to_json(), "policy": self.policy, "tau": self.tau,
                "backend": self.backend, "precision": self.precision, "target": self.target,
                "graphs": {k: g.to_json() for k, g in self.graphs.items()}, "weights": self.weights,
                "scheduler": self.scheduler,
                "files": {k: {"sha256": f.sha256, "bytes": f.bytes} for k, f in sorted(self.files.items())},
                "versions": self.versions}
        doc[DIGEST] = manifest_digest(doc)
        return doc

    @classmethod
    def from_json(cls, data, where: str, root: Path | None = None) -> "Manifest":
        r = Reader(data, where, FIX)
        fmt = r.get("format")
        if fmt != FORMAT:
            raise TopiError(f"{where} has format {fmt!r}, this topi-export reads {FORMAT!r}: rebuild the engine "
                            f"directory with `topi-export build` (engine directories are not converted)")
        model = ModelIdentity.from_reader(r.obj("model"))
        layouts = tuple(Layout.from_reader(Reader(v, where, FIX, f"layouts[{i}]"))
                        for i, v in enumerate(r.list("layouts", nonempty=True)))
        if len(set(layouts)) != len(layouts):
            raise r.fail("layouts", "lists a layout twice")
        buckets = []
        for i, v in enumerate(r.list("buckets", nonempty=True)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < 1.0:
                raise r.fail(f"buckets[{i}]", f"is {v!r}, expected a prune ratio in (0, 1)")
            buckets.append(float(v))
        if buckets != sorted(set(buckets)):
            raise r.fail("buckets", f"{buckets} are not ascending and unique")
        profiles = tuple(Profile.from_reader(Reader(v, where, FIX, f"profiles[{i}]"))
                         for i, v in enumerate(r.list("profiles", nonempty=True)))
        if profiles != profile_table(layouts, buckets):
            raise r.fail("profiles", "do not match the layouts and buckets (keep = ceil((1 - ratio) * context "
                                     "tokens), one anchor profile and one per bucket for each layout)")
        for lay in layouts:
            keeps = [keep_count(b, lay.num_ctx) for b in buckets]
            if len(set(keeps)) != len(keeps):
                raise r.fail("buckets", f"{buckets} collapse to the same keep count for {lay.describe()}")
        graphs_r = r.obj("graphs")
        graphs = {k: GraphEntry.from_reader(graphs_r.obj(k)) for k in graphs_r.data}
        if "topi" not in graphs:
            raise r.fail("graphs", "has no 'topi' graph")
        unknown = set(graphs) - {"topi", "dense"}
        if unknown:
            raise r.fail("graphs", f"names unknown graphs {sorted(unknown)}")
        files_r = r.obj("files")
        files = {}
        for rel in files_r.data:
            fr = files_r.obj(rel)
            sha = fr.str("sha256")
            if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
                raise fr.fail("sha256", "is not a sha256 hex digest")
            files[rel] = FileEntry(sha, fr.int("bytes", lo=0))
        for kind, g in graphs.items():
            for rel in (g.file, g.onnx):
                if rel is not None and rel not in files:
                    raise r.fail(f"graphs.{kind}", f"names {rel!r}, which is not in the file table")
        settings = MethodSettings.from_reader(r.obj("calibration")).check(model.num_layers, where)
        tau = r.float("tau", lo=0.0, hi=1.0, lo_open=True, optional=True)
        weights = r.dict("weights", optional=True)
        if weights:
            wr = r.obj("weights")
            if wr.str("file") not in files:
                raise r.fail("weights.file", "is not in the file table")
            wr.int("bytes", lo=0, optional=True)
            wr.str("dtype", choices=PRECISIONS, optional=True)
        guidance = r.str("guidance")
        if not guidance or len(guidance) > 64:
            raise r.fail("guidance", "must be the family's name for its guidance mode")
        m = cls(model=model, layouts=layouts, batch=r.int("batch", lo=1, hi=MAX_BRANCHES),
                guidance=guidance, buckets=tuple(buckets), profiles=profiles,
                settings=settings, policy=r.str("policy"), backend=r.str("backend"),
                precision=r.str("precision", choices=PRECISIONS), target=r.dict("target"), graphs=graphs,
                files=files, versions=r.dict("versions", optional=True), created=str(r.get("created") or ""),
                tau=tau, weights=weights, scheduler=r.dict("scheduler", optional=True), root=root)
        m._check_graph_shapes(r)
        want = r.str(DIGEST)
        if want != manifest_digest(data) or manifest_digest(m.to_json()) != want:
            raise RebuildNeeded(f"{where}: the manifest does not match its {DIGEST}: it was edited after the build "
                                f"and no longer describes the engines; rebuild the engine directory with "
                                f"`topi-export build`")
        return m

    def _check_graph_shapes(self, r: Reader) -> None:
        """Every input of the topi graph must be one the runtime knows how to feed, with dims it can resolve."""
        for kind, g in self.graphs.items():
            names = [t.name for t in g.inputs]
            if len(set(names)) != len(names):
                raise r.fail(f"graphs.{kind}.inputs", "repeats an input name")
            for lay in self.layouts:
                sizes = lay.sizes(batch=self.batch)
                for t in g.inputs + g.outputs:
                    try:
                        t.shape(sizes)
                    except KeyError as exc:
                        raise r.fail(f"graphs.{kind}", f"tensor {t.name!r} uses an unknown dimension {exc}")
        topi = self.graphs["topi"]
        for need in ("keep_idx", "score_idx"):
            if topi.input(need) is None:
                raise r.fail("graphs.topi.inputs", f"lacks {need!r}")
