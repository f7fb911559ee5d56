"""``topi-export triton``: a Triton Inference Server model repository from an engine directory.

    REPO/
      README.md                    how to serve it
      .topi-export-owner.json      ownership marker, written last (fsutil/ownership.py): what --force may replace
      <name>_topi/config.pbtxt     the topi graph: velocity + influence, every step of the loop
      <name>_topi/1/model.onnx     + 1/weights.data (ONNX Runtime), or 1/model.plan (TensorRT)
      <name>_dense/...             the plain model (the baseline), when the engine directory has one
      <name>_loop/config.pbtxt     Python backend (BLS): the denoising loop of `topi-export run`
      <name>_loop/manifest.json    the engine directory's manifest (layouts, buckets, calibration, graph I/O)
      <name>_loop/1/model.py       copy of topi_export/serving/bls_model.py

Dims: token dims are dynamic (-1) in every graph; fixed dims (channels, features) are numbers; the batch is an
explicit dim (max_batch_size 0). A TensorRT plan lists every optimization profile in its instance_group, so Triton
picks the profile from the request's shapes. ONNX Runtime models are the portable graphs; their external data is
placed next to model.onnx under the location the graph names.

Safety (docs/design.md, "Filesystem safety"): the output is checked before any work and written with
``fsutil.staged_dir``; every file taken from the engine directory is confined to it, re-hashed against the
manifest and only then hard-linked (or copied, hashing what is written); external-data locations are checked;
every config.pbtxt is parsed against Triton's ModelConfig schema before anything is written.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from topi_export.errors import TopiError
from topi_export.fsutil import (atomic_write_bytes, check_onnx_external_data, check_output_dir, confined_path,
                                is_triton_repository, read_small_file, staged_dir)
from topi_export.plan import NAME as MANIFEST_NAME, Manifest
from topi_export.serving.triton_engine import check_graph_types, loop_inputs, loop_outputs, model_names

TEMPLATE = Path(__file__).resolve().parent / "bls_model.py"
KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
MAX_INSTANCES = 1024
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
                "int32": "TYPE_INT32", "bool": "TYPE_BOOL"}
ONNX_TYPES = {"FLOAT": "float32", "FLOAT16": "float16", "BFLOAT16": "bfloat16", "INT64": "int64", "INT32": "int32",
              "BOOL": "bool"}


@dataclass
class Tensor:
    name: str
    dtype: str  # Triton TYPE_*
    dims: list
    optional: bool = False


@dataclass
class EngineModel:
    kind: str  # topi | dense
    name: str  # Triton model name
    files: dict  # path in the version folder -> path in the engine directory
    inputs: list
    outputs: list
    profiles: list = field(default_factory=list)  # TensorRT optimization profiles, as strings


# --- schema validation ----------------------------------------------------------------------------------------
def _model_config_cls():
    import importlib

    try:
        importlib.import_module("google.protobuf.text_format")
        model_config_pb2 = importlib.import_module("tritonclient.grpc.model_config_pb2")
    except ImportError as exc:
        raise TopiError(f"validating config.pbtxt against Triton's schema needs tritonclient[grpc] with protobuf "
                        f"({exc}): pip install 'topi-export[triton]'")
    return model_config_pb2.ModelConfig


def validate_config(text: str, where: str = "config.pbtxt"):
    """Parse ``text`` as Triton's ModelConfig (fields and types); returns the message or raises TopiError."""
    from google.protobuf import text_format

    try:
        return text_format.Parse(text, _model_config_cls()())
    except text_format.ParseError as exc:
        raise TopiError(f"generated {where} does not parse against Triton's ModelConfig schema ({exc}): "
                        f"this is a topi-export bug, please report it")


# --- config text ----------------------------------------------------------------------------------------------
def _q(text: str) -> str:
    from google.protobuf import text_encoding

    return '"' + text_encoding.CEscape(text, as_utf8=True) + '"'


def _tensor_block(t: Tensor) -> str:
    lines = [f"    name: {_q(t.name)}", f"    data_type: {t.dtype}", f"    dims: [ {', '.join(map(str, t.dims))} ]"]
    if t.optional:
        lines.append("    optional: true")
    return "  {\n" + "\n".join(lines) + "\n  }"


def _io(key: str, tensors) -> str:
    return f"{key} [\n" + ",\n".join(_tensor_block(t) for t in tensors) + "\n]"


def _instance_group(kind: str, count: int, profiles=()) -> str:
    lines = [f"    kind: {kind}", f"    count: {count}"]
    if profiles:
        lines.append(f"    profile: [ {', '.join(_q(p) for p in profiles)} ]")
    return "instance_group [\n  {\n" + "\n".join(lines) + "\n  }\n]"


def _parameters(params: dict) -> str:
    return "\n".join(f"parameters {{\n  key: {_q(k)}\n  value {{ string_value: {_q(v)} }}\n}}"
                     for k, v in params.items())


def engine_config(g: EngineModel, platform: str, kind: str, instances: int, header: str) -> str:
    parts = [header, f"name: {_q(g.name)}", f"platform: {_q(platform)}",
             "max_batch_size: 0  # the batch is an explicit dim (2 with true CFG); token dims are dynamic (-1)",
             _io("input", g.inputs), _io("output", g.outputs)]
    if g.profiles:
        parts.append("# Every optimization profile is listed: Triton picks the one that fits the request's shapes\n"
                     "# (layout, anchor or bucket keep count). Without the list only profile 0 would be used.")
    parts.append(_instance_group(kind, instances, g.profiles))
    return "\n".join(parts) + "\n"


def _wire(w) -> Tensor:
    return Tensor(w.name, w.dtype, list(w.dims), w.optional)


def loop_config(name: str, family, models: dict, manifest_sha256: str, instances: int, header: str) -> str:
    parts = [header, f"name: {_q(name)}", 'backend: "python"',
             "max_batch_size: 0  # one denoising loop per request; concurrency via instances",
             _io("input", [_wire(w) for w in loop_inputs(family)]),
             _io("output", [_wire(w) for w in loop_outputs(family)]),
             "# The loop runs on the CPU; the engine models it calls run where their instance_group says.",
             _instance_group("KIND_CPU", instances),
             _parameters({"topi_models": json.dumps(models, sort_keys=True), "manifest_sha256": manifest_sha256})]
    return "\n".join(parts) + "\n"


# --- engine models ----------------------------------------------------------------------------------------------
def _declared(tensors, where) -> list[Tensor]:
    out = []
    for t in tensors:
        if t.dtype not in TRITON_TYPES:
            raise TopiError(f"{where}: tensor {t.name!r} has dtype {t.dtype}, which Triton's config cannot declare")
        out.append(Tensor(t.name, TRITON_TYPES[t.dtype], [d if isinstance(d, int) else -1 for d in t.dims]))
    return out


def _onnx_io(path: Path, entry, where) -> tuple[list[Tensor], list[Tensor]]:
    """The ONNX graph's inputs and outputs (weights not loaded): dim_value -> number, symbolic -> -1; they must be
    the tensors the manifest records (names and dtypes), since the loop model feeds what the manifest says."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - anything unreadable is a broken directory
        raise TopiError(f"cannot read ONNX graph {where} ({type(exc).__name__}): rebuild the engine directory")

    def tensors(values, recorded):
        want = {t.name: t.dtype for t in recorded}
        out = []
        for v in values:
            tt = v.type.tensor_type
            dtype = ONNX_TYPES.get(onnx.TensorProto.DataType.Name(tt.elem_type), "unsupported")
            if want.get(v.name) != dtype:
                raise TopiError(f"{where} has tensor {v.name!r} ({dtype}) that its manifest entry does not record "
                                f"(it records {sorted(want.items())}): rebuild the engine directory")
            out.append(Tensor(v.name, TRITON_TYPES[dtype],
                              [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]))
        if {t.name for t in out} != set(want):
            raise TopiError(f"{where} lacks tensors {sorted(set(want) - {t.name for t in out})} that its manifest "
                            f"entry records: rebuild the engine directory")
        return out

    initializers = {t.name for t in model.graph.initializer}
    return (tensors([v for v in model.graph.input if v.name not in initializers], entry.inputs),
            tensors(model.graph.output, entry.outputs))


def engine_models(m: Manifest, prefix: str, backend) -> list[EngineModel]:
    """backend: the engine directory's backends.base.Backend (its Triton platform and model file name)."""
    names = model_names(prefix, [k for k in ("topi", "dense") if k in m.graphs])
    out = []
    for kind, name in names.items():
        g = m.graphs[kind]
        where = f"the {kind} graph of {m.root}"
        if g.file.endswith(".onnx"):  # a portable graph: Triton's backend optimizes it for its own provider
            src = g.onnx or g.file
            path = confined_path(m.root, src, what="engine file")
            files = {backend.triton_model_file: src}
            graph_dir = PurePosixPath(src).parent
            for rel in sorted(check_onnx_external_data(path, m.root)):
                files[PurePosixPath(rel).relative_to(graph_dir).as_posix()] = rel
            inputs, outputs = _onnx_io(path, g, where)
            profiles = []
        else:  # an engine plan with one optimization profile per (layout, anchor) and per (layout, bucket)
            files = {backend.triton_model_file: g.file}
            inputs, outputs = _declared(g.inputs, where), _declared(g.outputs, where)
            # topi: one profile per (layout, anchor) and per (layout, bucket); dense: one per layout
            count = len(m.profiles) if kind == "topi" else len(m.layouts)
            profiles = [str(i) for i in range(count)]
        for rel in files.values():
            if rel not in m.files:
                raise TopiError(f"{rel} (the {kind} graph's file) is not in the file table of "
                                f"{m.root / MANIFEST_NAME}: its hash cannot be checked; rebuild the engine directory")
        out.append(EngineModel(kind, name, files, inputs, outputs, profiles))
    return out


# --- files ----------------------------------------------------------------------------------------------------
def _place_verified(m: Manifest, rel: str, dst: Path) -> str:
    """Copy engine file ``rel`` to ``dst`` only as the bytes the manifest hashes: the source (confined to the
    engine directory) is hashed first, then hard-linked (and checked to be the very file hashed) or copied while
    hashing what is written. Returns "linked" or "copied"."""
    entry = m.files[rel]
    src = confined_path(m.root, rel, what="engine file")
    changed = TopiError(f"engine file {rel} in {m.root} does not match its sha256 in {MANIFEST_NAME} (modified after "
                        f"the build, or while the repository was written): rebuild with `topi-export build --force`")
    try:
        fd = os.open(src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise TopiError(f"cannot read engine file {rel} in {m.root} ({exc.strerror}): rebuild the engine directory")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size != entry.bytes:
            raise changed
        if _hash(f) != entry.sha256:
            raise changed
        try:
            os.link(src, dst, follow_symlinks=False)
            got = os.lstat(dst)
            if (got.st_dev, got.st_ino, got.st_size, got.st_mtime_ns) != (st.st_dev, st.st_ino, st.st_size,
                                                                          st.st_mtime_ns):
                raise changed  # the name now points to another file than the one hashed
            return "linked"
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES, errno.ENOTSUP):
                raise
        f.seek(0)
        with open(dst, "xb") as out:
            if _hash(f, out) != entry.sha256:
                raise changed
        return "copied"


def _hash(f, out=None) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 22), b""):
        h.update(chunk)
        if out is not None:
            out.write(chunk)
    return h.hexdigest()


# --- main entry -------------------------------------------------------------------------------------------------
def check_options(*, name: str, instances: int, kind: str) -> None:
    if not NAME_RE.match(name or ""):
        raise TopiError(f"--name {name!r} is not a usable Triton model-name prefix: use up to 100 letters, digits, "
                        f"'_', '-', '.'")
    if kind not in KINDS:
        raise TopiError(f"--kind {kind!r}: choose gpu or cpu")
    if not 1 <= instances <= MAX_INSTANCES:
        raise TopiError(f"--instances {instances} is outside 1..{MAX_INSTANCES} (model instances per model)")


def _read_engine_dir(engine_dir: Path):
    """(verified manifest, its raw bytes, its backend) of an engine directory Triton can serve."""
    from topi_export.artifacts.manifest import read_manifest
    from topi_export.backends import BACKENDS, get_backend

    m = read_manifest(engine_dir, verify_files=False)  # the files placed are hashed once, when placed
    backend = get_backend(m.backend).BACKEND
    if backend.triton_platform is None:
        servable = " or ".join(f"`--backend {n}`" for n in BACKENDS if get_backend(n).BACKEND.triton_platform)
        raise TopiError(f"{engine_dir} holds {m.backend} engines ({backend.description}), which Triton has no backend "
                        f"for: build with `topi-export build` {servable} for Triton")
    if m.target.get("weights") == "stripped":
        raise TopiError(f"{engine_dir} holds weight-stripped TensorRT plans, which Triton cannot refit: build without "
                        f"--strip-weights for Triton")
    check_graph_types(m.graphs, engine_dir)
    raw = read_small_file(confined_path(m.root, MANIFEST_NAME, what="manifest"), "manifest",
                          "rebuild the engine directory", max_bytes=16 << 20)  # bounded: it may have changed
    try:
        same = Manifest.from_json(json.loads(raw), str(engine_dir / MANIFEST_NAME), m.root) == m
    except (ValueError, TopiError):
        same = False
    if not same:
        raise TopiError(f"{engine_dir / MANIFEST_NAME} changed while it was read: rerun when the build has finished")
    return m, raw, backend


def generate_repository(engine_dir, out, *, name: str = "topi", instances: int = 1, kind: str = "gpu",
                        force: bool = False, echo=None) -> dict:
    """Write the repository; returns a summary {out, models, files}."""
    echo = echo or (lambda s: None)
    check_options(name=name, instances=instances, kind=kind)
    engine_dir = Path(engine_dir)
    protect = {engine_dir: "the engine directory"}
    out = check_output_dir(out, replace=force, is_ours=is_triton_repository, protect=protect)
    _model_config_cls()  # fail before any work when tritonclient is missing
    m, raw_manifest, backend = _read_engine_dir(engine_dir)
    if kind == "cpu" and "CPU" not in backend.runs_on:
        raise TopiError(f"--kind cpu: {m.backend} engines run on {backend.runs_on} only; use --kind gpu, or an engine "
                        f"directory of a backend that runs on the CPU for CPU serving")
    from topi_export.artifacts.manifest import adapter

    family = adapter(m)
    engines = engine_models(m, name, backend)
    loop_name = f"{name}_loop"
    header = (f"# Generated by topi-export triton ({m.backend} engines of {m.model.source}, "
              f"{len(m.layouts)} layout(s), buckets {list(m.buckets)}).")
    configs = {g.name: engine_config(g, backend.triton_platform, KINDS[kind], instances, header) for g in engines}
    configs[loop_name] = loop_config(loop_name, family, {g.kind: g.name for g in engines},
                                     hashlib.sha256(raw_manifest).hexdigest(), instances, header)
    for model_name, text in configs.items():  # every config parses against Triton's schema before anything is written
        parsed = validate_config(text, f"{model_name}/config.pbtxt")
        if parsed.name != model_name:
            raise TopiError(f"generated {model_name}/config.pbtxt names model {parsed.name!r}: topi-export bug")

    placed = {}
    with staged_dir(out, replace=force, is_ours=is_triton_repository, protect=protect, echo=echo) as tmp:
        atomic_write_bytes(tmp / "README.md", _readme(m, backend, family, engines, loop_name, kind,
                                                      instances).encode())
        for g in engines:
            for dst, rel in g.files.items():
                placed[f"{g.name}/1/{dst}"] = _place_verified(m, rel, tmp / g.name / "1" / dst)
        (tmp / loop_name / "1").mkdir(parents=True)
        atomic_write_bytes(tmp / loop_name / "1" / "model.py", TEMPLATE.read_bytes())
        atomic_write_bytes(tmp / loop_name / MANIFEST_NAME, raw_manifest)
        for model_name, text in configs.items():
            atomic_write_bytes(tmp / model_name / "config.pbtxt", text.encode())
        for d in [tmp, *tmp.rglob("*")]:
            if d.is_dir():
                d.chmod(0o755)  # Triton may run as another user
    for rel, how in placed.items():
        echo(f"{how}: {rel} (sha256 checked)")
    return {"out": out, "models": [g.name for g in engines] + [loop_name], "files": placed, "backend": m.backend}


def _readme(m: Manifest, be, family, engines, loop_name, kind, instances) -> str:
    rows = "\n".join(f"| {p.index} | {m.layouts[p.layout].describe()} | {p.ratio} | {p.keep} |" for p in m.profiles)
    what = {"topi": "the topi graph: velocity + influence (every step: anchor, pruned, unpruned)",
            "dense": "the plain model without pruning: the baseline"}
    models = "\n".join(f"| `{g.name}` | {what[g.kind]} |" for g in engines)
    inputs = "\n".join(f"| `{w.name}` | {w.dtype[5:].replace('STRING', 'BYTES')} | {list(w.dims)} | "
                       f"{'optional' if w.optional else 'required'} |" for w in loop_inputs(family))
    if not any(g.profiles for g in engines):
        backend = (f"The engine models are the portable ONNX graphs on Triton's `{be.triton_platform}` platform "
                   f"({kind.upper()} instances); their weights file is placed next to each `{be.triton_model_file}` "
                   f"(hard-linked when the repository is on the engine directory's file system).")
    else:
        backend = (f"The engine models are `{be.triton_platform}` engines ({m.backend}, precision {m.precision}, "
                   f"versions {json.dumps(m.versions, sort_keys=True)}). An engine plan runs only with the version "
                   f"and GPU architecture it was built for: serve it with the Triton release that ships that "
                   f"version, on the same GPU type (target {json.dumps(m.target, sort_keys=True)}). Every "
                   f"optimization profile is listed in the instance group, so Triton picks the profile from the "
                   f"request's shapes.")
    return f"""# Triton model repository (generated by topi-export triton)

Engines: {m.backend}, model `{m.model.source}` ({m.model.family}), {instances} instance(s) per model.

| model | what |
|---|---|
{models}
| `{loop_name}` | Python backend (BLS): the whole ToPi denoising loop; clients call this one |

{backend}

Served layouts, buckets and profiles (ratio 0: anchor / unpruned steps):

| profile | layout | ratio | keep |
|---|---|---|---|
{rows}

## Serve

`{loop_name}` imports topi_export: install topi-export (it brings torch and diffusers) in the Python
backend's environment, e.g. in NVIDIA's Triton container:

    pip install topi-export
    tritonserver --model-repository <this directory>

## Request

`{loop_name}` takes the tensors of a `topi-export run --inputs` file and `run`'s options; `target_grid` /
`reference_grids` ("HxW" strings) are needed only when several served layouts fit the tensors. It returns
`latents` and `schedule` (JSON). See docs/triton.md of topi-export for a client example.

| input | type | dims | |
|---|---|---|---|
{inputs}
"""
