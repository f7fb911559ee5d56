"""``topi-export triton``: a Triton Inference Server model repository from an engine directory.

    REPO/
      README.md                      what was generated, from which engines, how to serve it
      <prefix>_anchor/config.pbtxt   full-sequence graph: velocity + influence
      <prefix>_anchor/1/model.onnx | model.plan
      <prefix>_pruned/config.pbtxt   kept-context graph (keep_idx); TensorRT: every bucket's profile listed
      <prefix>_pruned/1/model.onnx | model.plan
      <prefix>_loop/config.pbtxt     Python backend (BLS): the denoising loop of `topi-export run`
      <prefix>_loop/manifest.json    the engine directory's manifest (layout, buckets, calibration)
      <prefix>_loop/1/model.py       copy of topi_export/serving/bls_model.py

ONNX Runtime engine directories contribute their *portable* graphs (onnx/<graph>.onnx), not the
``<graph>.ort.onnx`` files: those were optimized offline for the CPU execution provider, and ONNX Runtime
ties an offline-optimized model to the provider and hardware it was optimized for, while Triton's
onnxruntime backend runs GPU instances on the CUDA provider and optimizes the graph itself at load time.
The portable graph runs on every provider (ONNX Runtime inlines the ``topi`` model-local functions).

Every config.pbtxt is parsed against Triton's own schema (tritonclient's model_config_pb2) before it is
written; files are hard-linked or copied and their sha256 re-checked against the manifest; the repository
is assembled in a temporary directory next to ``--out`` and renamed into place only when complete.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from topi_export.errors import TopiError
from topi_export.fsutil import staged_dir
from topi_export.runtime.manifest import NAME as MANIFEST_NAME, read_manifest, sha256_file
from topi_export.serving.triton_engine import OPTIONS

TEMPLATE = Path(__file__).resolve().parent / "bls_model.py"
SUPPORTED = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
MODEL_FILE = {"onnxruntime": "model.onnx", "tensorrt": "model.plan"}
KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# ONNX TensorProto element type names / numpy names -> Triton data types
ONNX_TO_TRITON = {"FLOAT": "TYPE_FP32", "FLOAT16": "TYPE_FP16", "BFLOAT16": "TYPE_BF16", "DOUBLE": "TYPE_FP64",
                  "INT64": "TYPE_INT64", "INT32": "TYPE_INT32", "INT8": "TYPE_INT8", "UINT8": "TYPE_UINT8",
                  "BOOL": "TYPE_BOOL"}
NUMPY_TO_TRITON = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64",
                   "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8",
                   "bool": "TYPE_BOOL"}
TRITON_TO_NUMPY = {v: k for k, v in NUMPY_TO_TRITON.items()}


@dataclass
class Tensor:
    name: str
    dtype: str  # Triton TYPE_*
    dims: list[int]
    optional: bool = False


@dataclass
class GraphModel:
    kind: str  # anchor | pruned
    model: str  # Triton model name
    source: str  # file relative to the engine directory
    extra: list[str] = field(default_factory=list)  # external-data files (ONNX), relative to the engine directory
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    profiles: list[str] | None = None


# --- schema validation ---------------------------------------------------------------------------------
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

    cls = _model_config_cls()
    try:
        return text_format.Parse(text, cls())
    except text_format.ParseError as exc:
        raise TopiError(f"generated {where} does not parse against Triton's ModelConfig schema ({exc}): "
                        f"this is a topi-export bug, please report it")


# --- config text -----------------------------------------------------------------------------------------
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


def _instance_group(kind: str, count: int, profiles=None) -> str:
    lines = [f"    kind: {kind}", f"    count: {count}"]
    if profiles:
        lines.append(f"    profile: [ {', '.join(_q(p) for p in profiles)} ]")
    return "instance_group [\n  {\n" + "\n".join(lines) + "\n  }\n]"


def _parameters(params: dict) -> str:
    return "\n".join(f"parameters {{\n  key: {_q(k)}\n  value {{ string_value: {_q(v)} }}\n}}"
                     for k, v in params.items())


def graph_config(g: GraphModel, platform: str, kind: str, instances: int, header: str) -> str:
    parts = [header, f"name: {_q(g.model)}", f"platform: {_q(platform)}",
             "max_batch_size: 0  # batch-1 static-shape graphs (see docs/triton.md)",
             _io("input", g.inputs), _io("output", g.outputs)]
    if g.profiles:
        parts.append("# One TensorRT optimization profile per ratio bucket; Triton picks the one whose keep_idx\n"
                     "# length matches the request (unlisted profiles are never used: only profile 0 would be).")
    parts.append(_instance_group(kind, instances, g.profiles))
    return "\n".join(parts) + "\n"


def loop_tensors(manifest) -> tuple[list[Tensor], list[Tensor]]:
    """The loop model's inputs mirror `run`'s inputs file and options; outputs: latents + schedule JSON."""
    lay, model = manifest.layout, manifest.data["model"]
    c = model["in_channels"]
    inputs = [Tensor("reference_latents", "TYPE_FP32", [1, lay.num_ctx, c]),
              Tensor("prompt_embeds", "TYPE_FP32", [1, lay.text_tokens, model["text_dim"]]),
              Tensor("pooled_prompt_embeds", "TYPE_FP32", [1, model["pooled_dim"]]),
              Tensor("noise", "TYPE_FP32", [1, lay.num_target, c], optional=True)]
    if model.get("guidance_embeds", True):
        inputs.append(Tensor("guidance", "TYPE_FP32", [1], optional=True))
    inputs += [Tensor(name, dtype, [1], optional=True) for name, dtype in OPTIONS.items()]
    outputs = [Tensor("latents", "TYPE_FP32", [1, lay.num_target, c]), Tensor("schedule", "TYPE_STRING", [1])]
    return inputs, outputs


def loop_config(name: str, manifest, engines: dict, instances: int, header: str) -> str:
    inputs, outputs = loop_tensors(manifest)
    parts = [header, f"name: {_q(name)}", 'backend: "python"',
             "max_batch_size: 0  # one denoising loop per request; concurrency via instances",
             _io("input", inputs), _io("output", outputs),
             "# The loop itself runs on the CPU; the engine models it calls run where their instance_group says.",
             _instance_group("KIND_CPU", instances),
             _parameters({"topi_engines": json.dumps(engines, sort_keys=True),
                          "manifest_sha256": sha256_file(manifest.path / MANIFEST_NAME)})]
    return "\n".join(parts) + "\n"


# --- graph I/O ---------------------------------------------------------------------------------------------
def _onnx_io(path: Path) -> tuple[list[Tensor], list[Tensor], list[str], int]:
    """Inputs, outputs, external-data locations and default-domain opset of an ONNX file (weights not loaded)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise TopiError(f"cannot read ONNX graph {path} ({type(exc).__name__}): rebuild the engine directory")

    def tensor(v):
        tt = v.type.tensor_type
        elem = onnx.TensorProto.DataType.Name(tt.elem_type)
        if elem not in ONNX_TO_TRITON:
            raise TopiError(f"{path}: tensor '{v.name}' has type {elem}, which Triton's config cannot declare")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        return Tensor(v.name, ONNX_TO_TRITON[elem], dims)

    initializer_names = {t.name for t in model.graph.initializer}
    inputs = [tensor(v) for v in model.graph.input if v.name not in initializer_names]
    outputs = [tensor(v) for v in model.graph.output]
    locations = set()
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(e.value for e in t.external_data if e.key == "location")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return inputs, outputs, sorted(locations), opset


def _declared_io(entry: dict, what: str) -> list[Tensor] | None:
    """Graph I/O recorded in the manifest's graph entry: {name: {shape, dtype}} or [{name, shape, dtype}]."""
    spec = entry.get(what)
    if not spec or not isinstance(spec, (dict, list)) or (isinstance(spec, list) and isinstance(spec[0], str)):
        return None
    items = spec.items() if isinstance(spec, dict) else ((s["name"], s) for s in spec)
    out = []
    for name, s in items:
        dtype = str(s.get("dtype", "")).replace("torch.", "")
        if dtype not in NUMPY_TO_TRITON:
            raise TopiError(f"manifest graph entry declares {what[:-1]} '{name}' with dtype {dtype!r}, which Triton's "
                            f"config cannot declare")
        out.append(Tensor(name, NUMPY_TO_TRITON[dtype], [int(d) if int(d) > 0 else -1 for d in s["shape"]]))
    return out


def _finish_io(kind: str, inputs: list[Tensor], outputs: list[Tensor], where) -> None:
    names = {t.name for t in inputs}
    need = {"hidden_states", "timestep"} | ({"keep_idx"} if kind == "pruned" else set())
    out_need = {"velocity"} | ({"influence"} if kind == "anchor" else set())
    if not need <= names or not out_need <= {t.name for t in outputs}:
        raise TopiError(f"{where} is not a topi {kind} graph (inputs {sorted(names)}, outputs "
                        f"{[t.name for t in outputs]}): rebuild the engine directory with `topi-export build`")
    for t in inputs:
        if t.name == "keep_idx":
            t.dims = [-1]  # one graph for every bucket: the length is the bucket's keep count


def _graph_models(m, prefix: str) -> tuple[list[GraphModel], dict]:
    backend = m.backend
    graphs, files = m.data["graphs"], m.data["files"]
    models, info = [], {}
    for kind in ("anchor", "pruned"):
        entry = graphs.get(kind)
        if not entry:
            raise TopiError(f"{m.path / MANIFEST_NAME} has no '{kind}' graph: rebuild the engine directory")
        if backend == "onnxruntime":
            source = entry.get("onnx") or entry["file"]
            inputs, outputs, extra, opset = _onnx_io(m.file(source))
            extra = [str(Path(source).parent / loc) for loc in extra]
            info[kind] = {"opset": opset}
        else:
            source, extra = entry["file"], []
            inputs, outputs = _declared_io(entry, "inputs"), _declared_io(entry, "outputs")
            if inputs is None or outputs is None:
                onnx_rel = entry.get("onnx")
                if not onnx_rel or onnx_rel not in files:
                    raise TopiError(f"{m.path / MANIFEST_NAME} records neither the {kind} engine's inputs/outputs nor "
                                    f"its portable ONNX graph: cannot write Triton's config; rebuild the engines")
                inputs, outputs, _, _ = _onnx_io(m.file(onnx_rel))
        for rel in [source, *extra]:
            if rel not in files:
                raise TopiError(f"{kind} file {rel} is not listed in {m.path / MANIFEST_NAME}: its hash cannot be "
                                f"checked; rebuild the engine directory")
        _finish_io(kind, inputs, outputs, m.file(source))
        models.append(GraphModel(kind, f"{prefix}_{kind}", source, extra, inputs, outputs))
    if backend == "tensorrt":
        models[1].profiles = _pruned_profiles(m)
    return models, info


def _pruned_profiles(m) -> list[str]:
    """Every bucket's optimization profile index of the pruned plan (profile i = bucket i), cross-checked with
    the profiles the TensorRT builder recorded ({"index", "keep", "ratio", "shapes"} each)."""
    buckets = m.data["buckets"]
    recorded = m.data["graphs"]["pruned"].get("profiles")
    if recorded is None:
        return [str(b["profile"]) for b in buckets]
    if not isinstance(recorded, list) or len(recorded) != len(buckets):
        raise TopiError(f"{m.path / MANIFEST_NAME}: the pruned engine records {len(recorded or [])} optimization "
                        f"profiles but there are {len(buckets)} buckets; rebuild the engines")
    for b, p in zip(buckets, recorded):
        if not isinstance(p, dict):
            continue
        if p.get("index", b["profile"]) != b["profile"] or p.get("keep", b["keep"]) != b["keep"]:
            raise TopiError(f"{m.path / MANIFEST_NAME}: pruned profile {p.get('index')} (keep {p.get('keep')}) does "
                            f"not match bucket {b['ratio']} (profile {b['profile']}, keep {b['keep']}); rebuild the "
                            f"engines")
    return [str(b["profile"]) for b in buckets]


# --- files ------------------------------------------------------------------------------------------------
def _place(src: Path, dst: Path) -> str:
    """Hard-link (cheap for multi-GB engines) or copy; returns how."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
        return "linked"
    except OSError:
        shutil.copyfile(src, dst)
        return "copied"


def _place_checked(m, rel: str, dst: Path) -> str:
    how = _place(m.file(rel), dst)
    want = m.data["files"][rel]["sha256"]
    if sha256_file(dst) != want:
        raise TopiError(f"{dst.name} ({rel}) does not match its sha256 in {m.path / MANIFEST_NAME} after it was "
                        f"{how}: the engine directory changed while the repository was written; rebuild and retry")
    return how


# --- main entry ---------------------------------------------------------------------------------------------
def check_options(*, name: str, max_batch_size: int, instances: int, kind: str) -> None:
    if not NAME_RE.match(name or ""):
        raise TopiError(f"--name {name!r} is not a usable Triton model-name prefix: use letters, digits, '_', '-', '.'")
    if kind not in KINDS:
        raise TopiError(f"--kind {kind!r}: choose gpu or cpu")
    if instances < 1:
        raise TopiError(f"--instances {instances} must be >= 1 (model instances per model)")
    if max_batch_size < 0:
        raise TopiError(f"--max-batch-size {max_batch_size} must be >= 0")
    if max_batch_size > 0:
        raise TopiError(f"--max-batch-size {max_batch_size}: the anchor and pruned graphs are built for batch 1 with "
                        f"static shapes (hidden_states [1, N, C]) and the loop model runs one denoising loop per "
                        f"request, so Triton cannot batch them; keep --max-batch-size 0 and use --instances N to "
                        f"serve N requests at once")


def generate_repository(engine_dir, out, *, name: str = "topi", max_batch_size: int = 0, instances: int = 1,
                        kind: str = "gpu", force: bool = False, echo=None) -> dict:
    """Write the repository; returns a summary {out, models, files}."""
    echo = echo or (lambda s: None)
    check_options(name=name, max_batch_size=max_batch_size, instances=instances, kind=kind)
    _model_config_cls()  # fail before any work when tritonclient is missing
    out = Path(out)
    engine_dir = Path(engine_dir)
    if out.exists() and not force:
        raise TopiError(f"{out} already exists: pass --force to replace it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise TopiError(f"{out} exists and is not a directory: choose another --out")
    eng, dst = engine_dir.resolve(), out.resolve()
    if dst == eng or eng in dst.parents or dst in eng.parents:
        raise TopiError(f"--out {out} overlaps the engine directory {engine_dir}: write the repository elsewhere")

    m = read_manifest(engine_dir)  # verifies every file's sha256
    if m.backend == "tensorrt-rtx":
        raise TopiError(f"{engine_dir} holds TensorRT-RTX engines: Triton's TensorRT backend loads TensorRT plans, "
                        f"not TensorRT-RTX engines; build with `topi-export build --backend tensorrt` (or onnxruntime) "
                        f"for Triton")
    if m.backend not in SUPPORTED:
        raise TopiError(f"{engine_dir} holds {m.backend} engines; Triton repositories are written for "
                        f"{' and '.join(SUPPORTED)} engine directories")
    if m.backend == "tensorrt" and kind == "cpu":
        raise TopiError("--kind cpu: TensorRT plans run on NVIDIA GPUs only; use --kind gpu, or an onnxruntime "
                        "engine directory for CPU serving")
    platform = SUPPORTED[m.backend]
    models, info = _graph_models(m, name)
    loop_name = f"{name}_loop"
    engines = {"backend": m.backend, "full_via": "pruned" if m.backend == "onnxruntime" else "anchor"}
    for g in models:
        engines[g.kind] = {"model": g.model, "inputs": {t.name: TRITON_TO_NUMPY[t.dtype] for t in g.inputs},
                           "outputs": {t.name: TRITON_TO_NUMPY[t.dtype] for t in g.outputs}}
    header = (f"# Generated by topi-export triton from {m.path.resolve()} ({m.backend}, {m.layout.describe()}, "
              f"buckets {m.bucket_ratios()}).")

    configs = {g.model: graph_config(g, platform, KINDS[kind], instances, header) for g in models}
    configs[loop_name] = loop_config(loop_name, m, engines, instances, header)
    for model_name, text in configs.items():  # every config parses against Triton's schema before anything is written
        parsed = validate_config(text, f"{model_name}/config.pbtxt")
        if parsed.name != model_name:
            raise TopiError(f"generated {model_name}/config.pbtxt names model {parsed.name!r}: topi-export bug")

    placed = {}
    with staged_dir(dst) as tmp:
        for g in models:
            version = tmp / g.model / "1"
            model_file = MODEL_FILE[m.backend]
            placed[f"{g.model}/1/{model_file}"] = _place_checked(m, g.source, version / model_file)
            for rel in g.extra:  # ONNX external data keeps its name: the graph refers to it by location
                placed[f"{g.model}/1/{Path(rel).name}"] = _place_checked(m, rel, version / Path(rel).name)
        (tmp / loop_name / "1").mkdir(parents=True)
        shutil.copyfile(TEMPLATE, tmp / loop_name / "1" / "model.py")
        shutil.copyfile(m.path / MANIFEST_NAME, tmp / loop_name / MANIFEST_NAME)
        for model_name, text in configs.items():
            (tmp / model_name / "config.pbtxt").write_text(text)
        (tmp / "README.md").write_text(_readme(m, models, loop_name, kind, instances, info, out))
        for d in [tmp, *tmp.rglob("*")]:
            if d.is_dir():
                d.chmod(0o755)
    for rel, how in placed.items():
        echo(f"{how}: {rel} (sha256 checked)")
    return {"out": out, "models": [g.model for g in models] + [loop_name], "files": placed, "backend": m.backend}


def _readme(m, models, loop_name, kind, instances, info, out) -> str:
    lay = m.layout
    model = m.data["model"]
    c, d, p = model["in_channels"], model["text_dim"], model["pooled_dim"]
    if m.backend == "onnxruntime":
        opset = max(v["opset"] for v in info.values())
        backend_note = (f"The engine models are the portable ONNX graphs (opset {opset}: needs an ONNX Runtime "
                        f"that supports it, 1.17+ for opset 20) on Triton's onnxruntime backend, {kind.upper()} "
                        f"instances.\n")
    else:
        target = m.data.get("target", {})
        versions = m.data.get("versions", {})
        trt = target.get("version") or versions.get("tensorrt") or "(see manifest)"
        backend_note = (f"The engine models are TensorRT plans (precision {m.data.get('precision')}, built with "
                        f"TensorRT {trt}). A plan runs only with the TensorRT version and GPU architecture it was "
                        f"built for: serve it with the Triton release that ships that TensorRT version, on the "
                        f"same GPU type (target: {json.dumps(target)}).\n"
                        f"The pruned model lists optimization profiles {models[1].profiles}, one per bucket, so "
                        f"Triton selects the bucket's profile from the keep_idx length.\n")
    rows = "\n".join(f"| {b['ratio']} | {b['keep']} | {b['profile']} |" for b in m.data["buckets"])
    return f"""# Triton model repository (generated by `topi-export triton`)

Engines: `{m.path.resolve()}` ({m.backend}), model `{m.data['model'].get('source')}`, layout {lay.describe()}
({lay.text_tokens} text tokens, {lay.num_target} target tokens, {lay.num_ctx} reference/context tokens).

| model | what |
|---|---|
| `{models[0].model}` | full sequence: velocity + influence over the context tokens |
| `{models[1].model}` | kept context only (`keep_idx`): velocity |
| `{loop_name}` | Python backend (BLS): the whole ToPi denoising loop; call this one |

{backend_note}
Buckets (ratio, kept context tokens, optimization profile of a TensorRT pruned plan):

| ratio | keep | profile |
|---|---|---|
{rows}

## Serve

The `{loop_name}` model imports `topi_export`: the Python backend's environment must have topi-export
installed (`pip install topi-export`, which brings torch and diffusers), e.g. in the Triton container:

    pip install topi-export
    tritonserver --model-repository {out}

## Request

Inputs of `{loop_name}` (FP32 unless noted; shapes are fixed by the engines):
`reference_latents` [1, {lay.num_ctx}, {c}], `prompt_embeds` [1, {lay.text_tokens}, {d}],
`pooled_prompt_embeds` [1, {p}], optional `noise` [1, {lay.num_target}, {c}], `guidance` [1], `steps` (INT32, default 28), `seed` (INT64, default 0),
`ratio` or `tau` (FP32), `update_interval` (INT32), `policy` (BYTES). Outputs: `latents` [1, {lay.num_target}, {c}]
and `schedule` (BYTES, JSON: per-step anchor/pruned, kept tokens, bucket, time).
See docs/triton.md of topi-export for a tritonclient example.
"""
