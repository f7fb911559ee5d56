"""``build``: export the portable graphs (topi + dense baseline, one shared weights file), build one backend's
engines, write the manifest: all in a staging directory placed atomically and exclusively only when every stage
succeeded (fsutil.staged_dir). Every flag and path is checked before the slow work starts."""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from topi_export.artifacts.versions import tool_versions
from topi_export.errors import BadInput, TopiError
from topi_export.fsutil import is_onnx_cache, read_json_file
from topi_export.plan import Layout, Manifest, profile_table

ENGINE_ROOT = Path("engines")
CACHE_FILE = "cache.json"
CACHE_FORMAT = "topi-onnx-cache/1"


class Stages:
    """Prints '[i/n] what' when a build stage starts and '[i/n] done in X s' when it ends: each stage's own time,
    not the time since the build began."""

    def __init__(self, total: int, echo):
        self.total, self.echo, self.i, self.t0 = total, echo, 0, time.perf_counter()
        self.started = None

    def __call__(self, what: str):
        self.finish()
        self.i += 1
        self.started = time.perf_counter()
        self.echo(f"[{self.i}/{self.total}] {what}")

    def finish(self):
        if self.started is not None:
            self.echo(f"[{self.i}/{self.total}] done in {time.perf_counter() - self.started:.1f} s")
            self.started = None


@dataclass(frozen=True)
class BuildPlan:
    """Everything a build needs, checked before any slow work (docs/design.md, "Plan objects")."""

    model: str | None
    layouts: tuple  # plan.Layout per resolution (None: from --inputs or the model's default sample)
    buckets: tuple[float, ...]
    backend: str
    precision: str = "fp32"
    calibration: str | None = None
    policy: str | None = None
    tau: float | None = None
    dense: bool | None = None  # None: the backend's default (dense_by_default: free where weights are shared)
    cfg: bool | None = None  # graphs for every guidance branch batched (None: when the family has several)
    inputs: str | None = None
    resolutions: str | None = None  # "WxH,WxH" in pixels, or a family shorthand such as kontext-preferred
    references: int = 1  # references per layout with --resolutions
    text_tokens: int | None = None  # with --resolutions (default: a pipeline folder's, else the family's)
    loras: tuple = ()  # lora.Adapter (or "FILE[:SCALE]") fused into the weights before export
    image_sizes: str | None = None  # "WxH,WxH;WxH": reference images' sizes; the pipeline's rules give the layouts
    engine_dir: str | None = None
    onnx_dir: str | None = None
    force: bool = False
    options: object = None  # the backend's typed build options (backends/base.py Options); None: its defaults

    def to_json(self) -> dict:
        return {"model": self.model, "layouts": [lay.to_json() for lay in self.layouts], "buckets": list(self.buckets),
                "backend": self.backend, "precision": self.precision, "calibration": self.calibration,
                "policy": self.policy, "tau": self.tau, "dense": self.dense, "cfg": self.cfg,
                "loras": [a.to_json() if hasattr(a, "to_json") else str(a) for a in self.loras],
                "options": self.options.to_json() if self.options is not None else None}


def default_engine_dir(source: str, layout: Layout, backend: str) -> Path:
    name = Path(source).name if os.sep in source or Path(source).exists() else source
    return ENGINE_ROOT / f"{name}-{layout.describe()}-{backend}"


def _check_plan(plan: BuildPlan) -> None:
    from topi_export.backends import build_backends, get_backend
    from topi_export.method.selection import check_policy
    from topi_export.plan.limits import check_tau

    if plan.backend not in build_backends():
        raise BadInput(f"unknown build backend {plan.backend!r}: choose {', '.join(build_backends())}")
    module = get_backend(plan.backend)
    be = module.BACKEND
    if plan.precision not in be.precisions:
        raise BadInput(f"{plan.backend} builds {', '.join(be.precisions)}, not {plan.precision}: drop --precision or "
                       f"choose another backend")
    if plan.options is not None and be.options is not None and not isinstance(plan.options, be.options):
        raise BadInput(f"build options {type(plan.options).__name__} are not {plan.backend}'s ({be.options.__name__})")
    if hasattr(module, "check"):  # e.g. the TensorRT module is installed, before the export
        module.check(plan.options if plan.options is not None else (be.options() if be.options else None))
    if plan.policy is not None:
        check_policy(plan.policy)
    if plan.tau is not None:
        check_tau(plan.tau)


def _cache_key(identity, settings, precision: str, dense: bool) -> str:
    blob = json.dumps({"format": CACHE_FORMAT, "family": identity.family, "config_hash": identity.config_hash,
                       "weights_hash": identity.weights_hash, "adapters": [dict(a) for a in identity.adapters],
                       "pivotal_layers": list(settings.pivotal_layers),
                       "prune_start": settings.prune_start, "precision": precision, "dense": dense,
                       "versions": tool_versions()}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def _cache_valid(onnx_dir: Path, key: str) -> bool:
    """The cache is reused only when its key matches AND every file (confined to the cache) still has the hash
    recorded with it."""
    from topi_export.artifacts.hashcache import sha256_file
    from topi_export.fsutil import confined_path

    try:
        meta = read_json_file(onnx_dir / CACHE_FILE, "ONNX cache index", "it is rewritten", max_bytes=1 << 20)
        if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
            return False
        return all(sha256_file(confined_path(onnx_dir, rel, what="cached file")) == sha
                   for rel, sha in meta["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError, TopiError):
        return False


_is_cache_dir = is_onnx_cache  # an --onnx-dir a build may rewrite: proven by its ownership marker (fsutil/ownership.py)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def pipeline_front_end(model):
    """The front end (models/frontend.py) when --model is a diffusers pipeline folder, else None: a pipeline folder
    gives the build its text length and its pixels per token."""
    from topi_export.models import front_end_for, pipeline_index

    if not model or not Path(str(model)).is_dir() or pipeline_index(model) is None:
        return None
    try:
        return front_end_for(model)
    except TopiError:
        return None  # a pipeline topi-export does not drive: its transformer folder still builds


def resolve_layouts(plan: BuildPlan, loaded) -> tuple[Layout, ...]:
    from topi_export.artifacts.inputs import default_inputs, load_inputs

    if plan.resolutions or plan.image_sizes:
        front = pipeline_front_end(plan.model)
        text_tokens = plan.text_tokens or (front.text_tokens() if front else None)
        layouts = ()
        if plan.resolutions:
            layouts = resolution_layouts(plan.resolutions, loaded.family, plan.references, text_tokens,
                                         front.pixels_per_token() if front else None)
        if plan.image_sizes:
            layouts += tuple(lay for lay in image_size_layouts(plan.image_sizes, front, plan.model, text_tokens)
                             if lay not in layouts)
    elif plan.layouts:
        layouts = tuple(plan.layouts)
    elif plan.inputs:
        layouts = (load_inputs(plan.inputs, loaded.family).layout,)
    else:
        layouts = (default_inputs(loaded.source, loaded.family).layout,)
    for lay in layouts:
        loaded.family.check_layout(lay)
    return layouts


def image_size_layouts(text: str, front, model, text_tokens) -> tuple[Layout, ...]:
    """--image-sizes 'WxH,WxH;WxH' (the sizes of the reference images requests will bring) -> the layouts the
    pipeline makes of them with its resolution rules and default target size (models/frontend.py shape)."""
    if front is None:
        raise BadInput(f"--image-sizes needs --model to be a diffusers pipeline folder with a front end (its "
                       f"resolution rules make the layouts); {model} is not: use --resolutions TARGET:REF,REF")
    from PIL import Image

    from topi_export.models.frontend import EditRequest

    out = []
    for item in (i.strip() for i in text.split(";") if i.strip()):
        images = [Image.new("RGB", _pixels(p, {})) for p in item.split(",") if p.strip()]
        shape = front.shape(EditRequest(images, "", names=tuple(f"image {i + 1} ({p.strip()})" for i, p in
                                                                 enumerate(item.split(",")))))
        lay = shape.layout.with_text_tokens(text_tokens or shape.text_tokens)
        if lay not in out:
            out.append(lay)
    return tuple(out)


def _pixels(part: str, sets) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in part.strip().lower().split("x"))
    except ValueError:
        raise TopiError(f"bad resolution {part.strip()!r} in --resolutions: write WIDTHxHEIGHT in pixels, e.g. "
                        f"1024x1024, TARGET:REF,REF layouts, or one of "
                        f"{', '.join(sets) or '(no shorthands for this model)'}") from None
    return w, h


def resolution_layouts(text: str, family, references: int = 1, text_tokens: int | None = None,
                       pixels_per_token: int | None = None):
    """--resolutions (pixels, WIDTHxHEIGHT) -> layouts. Items are separated by ';'. An item 'TARGET:REF,REF,...'
    is one layout with those references; an item 'WxH,WxH,...' (or a shorthand of the family, e.g.
    kontext-preferred) is one layout per size, each with `references` references at the target's size.
    pixels_per_token: the pipeline's (VAE factor x packing), else the family's."""
    sets = family.resolution_sets
    if not 1 <= references <= 16:
        raise BadInput(f"--references {references} is outside 1..16")
    shapes = []  # (target, refs) in pixels
    for item in (i.strip() for i in text.split(";") if i.strip()):
        if item in sets:
            shapes += [(tuple(wh), (tuple(wh),) * references) for wh in sets[item]]
        elif ":" in item:
            target, _, refs = item.partition(":")
            ref_px = tuple(_pixels(r, sets) for r in refs.split(",") if r.strip())
            if not ref_px:
                raise TopiError(f"--resolutions {item!r} names no reference after ':': write TARGET:REF[,REF...]")
            shapes.append((_pixels(target, sets), ref_px))
        else:
            shapes += [(wh, (wh,) * references) for wh in (_pixels(p, sets) for p in item.split(",") if p.strip())]
    if not shapes:
        raise TopiError("--resolutions is empty: give WIDTHxHEIGHT[,WIDTHxHEIGHT...] or TARGET:REF,REF in pixels")
    ppt = pixels_per_token or family.pixels_per_token
    out = []
    for target, refs in shapes:
        grids = []
        for w, h in (target, *refs):
            if w <= 0 or h <= 0 or w % ppt or h % ppt:
                raise TopiError(f"resolution {w}x{h} is not a positive multiple of {ppt} pixels (one {family.name} "
                                f"token{' of this pipeline' if pixels_per_token else ''}): use "
                                f"{max(ppt, w // ppt * ppt)}x{max(ppt, h // ppt * ppt)}")
            grids.append((h // ppt, w // ppt))
        lay = Layout(text_tokens or family.text_tokens_default, grids[0], tuple(grids[1:]))
        if lay not in out:
            out.append(lay)
    return tuple(out)


def build_engines(plan: BuildPlan | None = None, *, echo=print, **kwargs) -> Path:
    """Build an engine directory; returns its path. Keyword arguments are the BuildPlan fields."""
    from topi_export.backends import DEFAULT_BUILD_BACKEND, get_backend
    from topi_export.backends.base import BuildJob
    from topi_export.export import export_graphs
    from topi_export.fsutil import check_disjoint, check_output_dir, check_writable, refuse_overwrite, staged_dir
    from topi_export.method.selection import DEFAULT_POLICY, check_bucket_keeps, parse_buckets
    from topi_export.models import load_model, resolve_model_dir, scheduler_config_for
    from topi_export.artifacts.inputs import default_inputs
    from topi_export.artifacts.manifest import file_entries, is_engine_dir, write_manifest
    from topi_export.artifacts.settings import method_settings

    if plan is None:
        kwargs.setdefault("layouts", ())
        kwargs["buckets"] = parse_buckets(kwargs.pop("ratio_buckets", "0.3,0.5"))
        kwargs.setdefault("backend", DEFAULT_BUILD_BACKEND)
        plan = BuildPlan(**kwargs)
    if plan.loras and any(isinstance(a, str) for a in plan.loras):
        from dataclasses import replace

        from topi_export.lora import parse_adapters

        plan = replace(plan, loras=parse_adapters([str(a) if isinstance(a, str) else a.flag() for a in plan.loras]))
    _check_plan(plan)
    backend = get_backend(plan.backend)
    protect = {}
    if plan.model and Path(plan.model).exists():
        protect[Path(plan.model)] = "the model folder"
    for a in plan.loras:
        protect[Path(a.path)] = "a LoRA file"
    if plan.loras:
        from topi_export.lora import require_peft

        require_peft()
    for p, label in ((plan.inputs, "the inputs file"), (plan.calibration, "the calibration profile")):
        if p:
            protect[Path(p)] = label
    if plan.engine_dir:  # refuse a bad output path before the slow work
        check_output_dir(plan.engine_dir, replace=plan.force, is_ours=is_engine_dir, protect=protect)
        check_disjoint([(plan.engine_dir, "--engine-dir"), (plan.onnx_dir, "--onnx-dir")])
    timing_cache = getattr(plan.options, "timing_cache", None)
    if timing_cache:  # TensorRT rewrites it after the build: it must be writable and overwrite nothing of the user's
        check_writable(timing_cache)
        refuse_overwrite(timing_cache, protect, what="--timing-cache")
    if plan.onnx_dir:
        check_output_dir(plan.onnx_dir, replace=True, is_ours=_is_cache_dir, protect=protect)
    stages = Stages(5, echo)
    fused = f" + LoRA {', '.join(a.describe() for a in plan.loras)} (fused)" if plan.loras else ""
    stages(f"load model {plan.model or '(default)'} ({plan.precision}){fused}")
    loaded = load_model(plan.model, dtype=plan.precision, adapters=plan.loras)
    family = loaded.family
    identity = loaded.identity()
    settings = method_settings(identity, family.default_settings(), plan.calibration)
    layouts = resolve_layouts(plan, loaded)
    for lay in layouts:
        check_bucket_keeps(plan.buckets, lay.num_ctx)
    policy = plan.policy or DEFAULT_POLICY
    dense = plan.dense if plan.dense is not None else backend.BACKEND.dense_by_default
    cfg = plan.cfg if plan.cfg is not None else family.max_branches > 1
    if cfg and family.max_branches == 1:
        raise BadInput(f"--cfg: {family.name} ({family.guidance} guidance) runs one branch per step, there are no "
                       f"guidance branches to batch")
    batch = family.max_branches if cfg else 1
    engine_dir = Path(plan.engine_dir) if plan.engine_dir else default_engine_dir(identity.source, layouts[0],
                                                                                   plan.backend)
    if not plan.engine_dir:
        check_output_dir(engine_dir, replace=plan.force, is_ours=is_engine_dir, protect=protect)
        check_disjoint([(engine_dir, "--engine-dir"), (plan.onnx_dir, "--onnx-dir")])
    sample = default_inputs(identity.source, family, 0, layouts[0])
    scheduler = scheduler_config_for(plan.model) if plan.model else None
    if plan.model and Path(plan.model).exists():
        resolve_model_dir(Path(plan.model))
    with staged_dir(engine_dir, replace=plan.force, is_ours=is_engine_dir, protect=protect, echo=echo) as tmp:
        onnx_dir = tmp / "onnx"
        key = _cache_key(identity, settings, plan.precision, dense)
        if plan.onnx_dir and _cache_valid(Path(plan.onnx_dir), key):
            stages(f"reuse the ONNX graphs in {plan.onnx_dir} (same model, settings and tool versions)")
            onnx_dir.mkdir()
            meta = read_json_file(Path(plan.onnx_dir) / CACHE_FILE, "ONNX cache index", "rebuild without --onnx-dir",
                                  max_bytes=1 << 20)
            for rel in meta["files"]:
                from topi_export.fsutil import confined_path

                _link_or_copy(confined_path(Path(plan.onnx_dir), rel, what="cached file"), onnx_dir / Path(rel).name)
            from topi_export.plan.manifest import GraphEntry
            from topi_export.plan.schema import Reader

            graphs = {k: GraphEntry.from_reader(Reader(v, CACHE_FILE, "rebuild", k)) for k, v in meta["graphs"].items()}
            weights = meta["weights"]
        else:
            stages(f"export {'topi + dense' if dense else 'topi'} ONNX graphs ({family.name}, {plan.precision})")
            from topi_export.progress import ticker

            def exporting(step):  # per graph, with a ticker: one torch.onnx.export call can take many minutes
                echo(f"  {step}")
                tick.label = f"  {step}: still running"

            with ticker("  exporting", echo) as tick:
                graphs, weights = export_graphs(family, settings, sample, layouts[0], onnx_dir, dense=dense,
                                                progress=exporting)
            if plan.onnx_dir:
                _save_cache(onnx_dir, Path(plan.onnx_dir), key, graphs, weights, protect, echo)
        # where every parameter sits in the graphs, for `topi-export refit` (other LoRA adapters, no re-export)
        from topi_export.export.weights_map import REFIT_MAP, find_slots, write_refit_map

        echo("  map the weights for refit")
        slots = find_slots(onnx_dir, [g.file for g in graphs.values()], family.model.state_dict(), plan.precision)
        fused_params = loaded.fused_params
        del loaded
        family.model = None  # the weights live in the graphs now; free them before engines are built
        profiles = profile_table(layouts, plan.buckets)
        stages(f"build {plan.backend} engines: {len(layouts)} layout(s) x buckets {list(plan.buckets)}")
        out = backend.build(BuildJob(onnx_dir, tmp, graphs, layouts, profiles, batch, plan.precision,
                                     plan.options, echo))
        if not out.keep_onnx:
            shutil.rmtree(onnx_dir)
        if out.keep_onnx or getattr(plan.options, "refittable", False):  # engines refit can change
            write_refit_map(tmp / REFIT_MAP, slots, fused_params)
        stages("write manifest (sha256 of every file)")
        files = [p.relative_to(tmp).as_posix() for p in sorted(tmp.rglob("*")) if p.is_file()]
        entries = {kind: _entry(graphs[kind], rel, out.keep_onnx) for kind, rel in out.graphs.items()}
        if weights and out.keep_onnx:
            weights = {**weights, "file": f"onnx/{weights['file']}", "dtype": plan.precision}
        else:
            weights = {}
        manifest = Manifest(
            model=identity, layouts=layouts, batch=batch, guidance=family.guidance, buckets=tuple(plan.buckets),
            profiles=profiles, settings=settings, policy=policy, backend=plan.backend, precision=plan.precision,
            target=out.target, graphs=entries, files=file_entries(tmp, files), versions=tool_versions(out.versions),
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), tau=plan.tau,
            weights=weights, scheduler=scheduler or {}, root=tmp)
        write_manifest(tmp, manifest)
        stages(f"move into place: {engine_dir}")
    stages.finish()
    echo(f"built in {time.perf_counter() - stages.t0:.1f} s")
    return engine_dir


def _entry(graph, rel: str, keep_onnx: bool):
    from dataclasses import replace

    return replace(graph, file=rel, onnx=f"onnx/{graph.file}" if keep_onnx else None)


def _save_cache(src: Path, dst: Path, key: str, graphs: dict, weights: dict, protect, echo) -> None:
    """Keep the exported graphs in --onnx-dir, keyed and hashed (a later build reuses them only on a match)."""
    from topi_export.artifacts.hashcache import sha256_file
    from topi_export.fsutil import staged_dir

    # concurrent="replace": another build's cache placed meanwhile is as good as ours; never fail a build for it
    with staged_dir(dst, replace=True, is_ours=_is_cache_dir, protect=protect, echo=echo,
                    concurrent="replace") as tmp:
        files = {}
        for f in sorted(src.iterdir()):
            _link_or_copy(f, tmp / f.name)
            files[f.name] = sha256_file(tmp / f.name)
        meta = {"format": CACHE_FORMAT, "key": key, "files": files,
                "graphs": {k: g.to_json() for k, g in graphs.items()}, "weights": weights}
        (tmp / CACHE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
