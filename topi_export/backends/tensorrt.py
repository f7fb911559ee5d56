"""TensorRT and TensorRT-RTX backends: one builder and one runtime for both (DESIGN §3).

``tensorrt`` (data-center TensorRT 10.x/11.x) and ``tensorrt_rtx`` (TensorRT for RTX) expose the same Python
API for everything used here; the module is imported by name and only the TensorRT-RTX ahead-of-time
compute-capability targets differ.

Build: the portable ONNX graphs are parsed with the ``OnnxParser`` (``topi`` nodes become plugins when the
plugins are registered, otherwise the parser inlines their model-local function bodies), then

- ``anchor.engine``: one optimization profile at the build shape;
- ``pruned.engine``: one optimization profile per ratio bucket, ``keep_idx`` length = the bucket's keep count
  (min = opt = max), every other input fixed to the build shape. Profile i <-> bucket i (ascending ratios).

Precision: every network is created strongly typed. TensorRT 11 and TensorRT-RTX have no FP16/BF16 builder
flags (weak typing was deprecated in TensorRT 10.12 and removed in 11; TensorRT-RTX never had it), and
NVIDIA's documented replacement is to put the precision into the ONNX graph (ModelOpt AutoCast) and build
strongly typed. ``autocast_onnx`` below is a small built-in pass of that kind, so fp16/bf16 builds work the
same on every member of the family without an extra dependency: I/O stays fp32, matrix products run in
the low precision, numerically sensitive ops (normalisations, softmax, reductions, pow/sqrt/exp, sin/cos
of RoPE and the timestep embedding) and the ``topi`` ops run in fp32, other ops follow their inputs.

Runtime: ``TensorRTEngine`` deserialises both engines, one execution context each sharing one device
memory block, switches the pruned profile per step with ``set_optimization_profile_async``, binds torch
CUDA tensors with ``set_tensor_address`` and runs ``execute_async_v3`` on a torch CUDA stream; with
``TOPI_TRT_CUDA_GRAPHS=1`` each (engine, profile) is captured once into a CUDA graph (shapes are static per
profile, so replaying is legal) and replayed.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from topi_export.errors import TopiError

MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
INSTALL_HINTS = {
    "tensorrt": "install TensorRT >= 10.8 for your CUDA version (`pip install tensorrt`, which downloads NVIDIA's "
                "wheels from NVIDIA's package index) on a machine with a data-center / Jetson NVIDIA GPU; for "
                "ahead-of-time builds without a GPU use --backend tensorrt-rtx",
    "tensorrt-rtx": "`pip install tensorrt-rtx-cu13` (TensorRT for RTX; builds ahead of time on a machine without a "
                    "GPU, runs on RTX-class GPUs)",
}
GRAPH_KINDS = ("anchor", "pruned")
KEEP_INPUT = "keep_idx"
DEFAULT_RTX_TARGET = "SM89"
PRECISIONS = ("fp32", "fp16", "bf16")


# ---------------------------------------------------------------------------------------------------------
# module import
# ---------------------------------------------------------------------------------------------------------
def module_name(backend: str) -> str:
    try:
        return MODULES[backend]
    except KeyError:
        raise TopiError(f"unknown TensorRT backend {backend!r}: choose tensorrt or tensorrt-rtx") from None


def import_trt(backend: str):
    """The Python module of this TensorRT flavour, or a TopiError with an install hint."""
    name = module_name(backend)
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise TopiError(f"--backend {backend} needs the Python module '{name}', which cannot be imported "
                        f"({exc}): {INSTALL_HINTS[backend]}") from None
    except Exception as exc:  # a broken install (e.g. missing shared libraries) raises OSError & co.
        raise TopiError(f"the Python module '{name}' for --backend {backend} is installed but fails to load "
                        f"({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): reinstall it: "
                        f"{INSTALL_HINTS[backend]}") from None


# ---------------------------------------------------------------------------------------------------------
# plain helpers (no TensorRT needed; unit-tested)
# ---------------------------------------------------------------------------------------------------------
def profile_table(bucket_table, layout, input_shapes) -> dict:
    """Optimization profiles per engine: ``{"anchor": [profile], "pruned": [profile per bucket]}`` where a
    profile is ``{input_name: (min, opt, max)}`` with each shape a tuple of ints.

    ``input_shapes``: ``{kind: {input_name: shape}}``, a shape being a list of ints, ``None`` (or a string /
    negative number) marking a dynamic dimension; only ``keep_idx`` of the pruned graph may be dynamic.
    ``bucket_table``: ``runtime.manifest.bucket_table`` rows, profile i = bucket i.
    """
    expected_seq = layout.num_target + layout.num_ctx
    for i, b in enumerate(bucket_table):
        if b.get("profile", i) != i:
            raise TopiError(f"bucket {b} has profile {b.get('profile')}, expected {i}: profile i must be bucket i")
        if not 1 <= int(b["keep"]) <= layout.num_ctx:
            raise TopiError(f"bucket {b['ratio']} keeps {b['keep']} tokens, outside 1..{layout.num_ctx} context "
                            f"tokens of {layout.describe()}")
    keeps = [int(b["keep"]) for b in bucket_table]
    if len(set(keeps)) != len(keeps):
        raise TopiError(f"buckets {[b['ratio'] for b in bucket_table]} give equal keep counts {keeps} for "
                        f"{layout.num_ctx} context tokens: two TensorRT profiles cannot share one keep_idx length; "
                        f"choose buckets further apart or a larger reference grid")
    if not bucket_table:
        raise TopiError("no ratio buckets: the pruned engine needs at least one profile (--ratio-buckets)")

    def static(kind, name, shape):
        dims = []
        for d in shape:
            if d is None or isinstance(d, str) or int(d) < 0:
                raise TopiError(f"{kind} graph input '{name}' has a dynamic dimension ({list(shape)}); only "
                                f"'{KEEP_INPUT}' of the pruned graph may be dynamic: re-export the graphs")
            dims.append(int(d))
        return tuple(dims)

    out = {}
    for kind in GRAPH_KINDS:
        if kind not in input_shapes:
            raise TopiError(f"no input shapes for the {kind} graph")
        shapes = dict(input_shapes[kind])
        if "hidden_states" in shapes:
            seq = shapes["hidden_states"][1] if len(shapes["hidden_states"]) > 1 else None
            if isinstance(seq, int) and seq >= 0 and seq != expected_seq:
                raise TopiError(f"the {kind} graph was exported for {seq} image tokens but the layout "
                                f"{layout.describe()} has {expected_seq}: re-export the graphs for this shape")
        if kind == "anchor" and KEEP_INPUT in shapes:
            raise TopiError(f"the anchor graph has a '{KEEP_INPUT}' input: the graphs are swapped or stale")
        fixed = {n: static(kind, n, s) for n, s in shapes.items() if not (kind == "pruned" and n == KEEP_INPUT)}
        base = {n: (s, s, s) for n, s in fixed.items()}
        if kind == "anchor":
            out[kind] = [base]
        else:
            if KEEP_INPUT not in shapes:
                raise TopiError(f"the pruned graph has no '{KEEP_INPUT}' input: re-export the graphs")
            if len(shapes[KEEP_INPUT]) != 1:
                raise TopiError(f"'{KEEP_INPUT}' must be 1-D, the graph has shape {list(shapes[KEEP_INPUT])}")
            out[kind] = [{**base, KEEP_INPUT: ((k,), (k,), (k,))} for k in keeps]
    return out


def onnx_input_shapes(path) -> dict:
    """{input_name: [dim or None]} of an ONNX file's graph inputs (weights are not loaded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    shapes = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return shapes


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_workspace(text) -> int | None:
    """'4G', '512M', '1.5GiB', '1073741824' -> bytes (binary units). None/'' -> None (TensorRT's default)."""
    if text is None or str(text).strip() == "":
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise TopiError(f"--workspace {text!r} is not a size: use e.g. 4G, 512M or a byte count")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise TopiError(f"--workspace {text!r} must be positive")
    return value


def normalize_compute_capability(text) -> str:
    """'SM89', 'sm_89', '8.9', '89' -> 'SM89'; 'CURRENT' stays."""
    t = str(text).strip().upper().replace("_", "")
    if t == "CURRENT":
        return t
    m = re.fullmatch(r"(?:SM)?(\d{1,2})\.?(\d)", t)
    if not m:
        raise TopiError(f"--compute-capability {text!r} is not a compute capability: use e.g. SM89 (RTX 40), "
                        f"SM86 (RTX 30), SM120 (RTX 50)")
    return f"SM{int(m.group(1))}{m.group(2)}"


def sm_name(capability) -> str:
    """(8, 9) -> 'SM89'."""
    major, minor = capability
    return f"SM{int(major)}{int(minor)}"


def check_target(target: dict, running: dict, engine_dir="the engine directory") -> None:
    """Refuse engines built for another TensorRT module/version or another GPU architecture.

    target: the manifest's "target" (module, version, compute_capabilities). running: the same keys for
    this process plus "gpu" (name) and "compute_capability" ((major, minor) of the GPU in use)."""
    want_mod, have_mod = target.get("module"), running.get("module")
    if want_mod and have_mod and want_mod != have_mod:
        raise TopiError(f"{engine_dir} holds engines built with '{want_mod}' but this runtime uses '{have_mod}': "
                        f"run them with the backend they were built for, or rebuild")
    want_ver, have_ver = target.get("version"), running.get("version")
    if want_ver and have_ver and want_ver != have_ver:
        raise TopiError(f"{engine_dir} was built with {want_mod or have_mod} {want_ver} but {have_ver} is installed; "
                        f"TensorRT engines only load in the version that built them: rebuild with "
                        f"`topi-export build --backend ... --force` here or install {want_ver}")
    targets = [normalize_compute_capability(c) for c in target.get("compute_capabilities") or []]
    cap = running.get("compute_capability")
    if cap is not None and targets:
        sm = sm_name(cap)
        if sm not in targets:
            gpu = running.get("gpu") or "this GPU"
            hint = (f"rebuild with --compute-capability {sm}" if want_mod == "tensorrt_rtx"
                    else "rebuild the engines on this GPU")
            raise TopiError(f"{engine_dir} was built for compute capability {', '.join(targets)}"
                            f"{' (' + target['gpu'] + ')' if target.get('gpu') else ''} but {gpu} is {sm}: {hint}")


# ---------------------------------------------------------------------------------------------------------
# precision: strongly typed networks, precision in the graph
# ---------------------------------------------------------------------------------------------------------
# Ops that start low precision (the matrix products carry the FLOPs).
LOW_PRECISION_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum"})
# Ops kept in fp32: normalisations, softmax, reductions, transcendental functions (RoPE, timestep embedding).
FP32_OPS = frozenset({
    "Softmax", "LogSoftmax", "LayerNormalization", "RMSNormalization", "GroupNormalization",
    "InstanceNormalization", "BatchNormalization", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1",
    "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceProd", "Pow", "Sqrt", "Reciprocal", "Exp", "Log",
    "Sin", "Cos", "Tan", "Erf", "CumSum", "Range", "Resize", "TopK", "RandomNormalLike", "RandomUniformLike"})
# Ops that accept any input type and need no cast.
TYPE_AGNOSTIC_OPS = frozenset({"Shape", "Size", "Cast"})


def _low_tensor(array, elem_type, name):
    """An fp32 numpy array as an fp16/bf16 TensorProto (round to nearest even, via torch)."""
    import numpy as np
    import torch
    from onnx import TensorProto

    t = torch.from_numpy(np.array(array, dtype=np.float32, copy=True))
    if elem_type == TensorProto.BFLOAT16:
        raw = t.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    else:
        raw = t.to(torch.float16).numpy().tobytes()
    out = TensorProto(name=name, data_type=elem_type, dims=list(array.shape))
    out.raw_data = raw
    return out


def autocast_onnx(model, precision: str):
    """Rewrite an fp32 ONNX model for a strongly typed fp16/bf16 build; returns (model, stats).

    Graph inputs and outputs stay fp32 (casts at the edges), so the runtime binds the same tensors at every
    precision. Matrix products (LOW_PRECISION_OPS) run in the low type, FP32_OPS and every non-standard-domain
    node (the ``topi`` ops) in fp32, any other op in the low type when one of its float inputs already is.
    Initializers are converted once per precision they are used in; other casts are explicit Cast nodes
    (TensorRT folds casts of constants). The model is modified in place."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if precision == "fp32":
        return model, {"precision": "fp32", "casts": 0, "low_nodes": 0, "fp32_nodes": 0}
    low = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}.get(precision)
    if low is None:
        raise TopiError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    FLOAT = TensorProto.FLOAT
    g = model.graph
    for node in g.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise TopiError(f"{precision} autocast does not handle control flow (node {node.name} {node.op_type}); "
                            f"build with --precision fp32")

    inits = {i.name: i for i in g.initializer}

    def known_types(graph):
        types = {vi.name: vi.type.tensor_type.elem_type
                 for vi in list(graph.value_info) + list(g.input) + list(g.output)}
        types.update({name: init.data_type for name, init in inits.items()})
        return types

    orig = known_types(g)
    if any(o and o not in orig for n in g.node for o in n.output):
        orig = known_types(onnx.shape_inference.infer_shapes(model).graph)
    const_out = set()  # outputs of Constant nodes: flexible like initializers
    for node in g.node:
        if node.op_type == "Constant":
            const_out.update(node.output)
    missing = [o for n in g.node for o in n.output if o and o not in orig]
    if missing:
        raise TopiError(f"{precision} autocast needs the type of every tensor; ONNX shape inference left "
                        f"{len(missing)} unknown (e.g. {missing[0]}): build with --precision fp32")

    cur = {vi.name: FLOAT for vi in g.input if vi.type.tensor_type.elem_type == FLOAT}
    new_nodes, cast_cache, low_inits = [], {}, {}
    stats = {"precision": precision, "casts": 0, "low_nodes": 0, "fp32_nodes": 0, "low_initializers": 0}
    graph_outputs = {o.name for o in g.output}
    renamed = {}

    def is_float(name):
        return bool(name) and orig.get(name) == FLOAT

    def converted(name, want):
        """name as a tensor of type want (FLOAT or low)."""
        if name in inits and name not in cur:  # initializer: convert the data once
            if want == FLOAT:
                return name
            if name not in low_inits:
                arr = numpy_helper.to_array(inits[name])
                new = _low_tensor(arr, low, f"{name}__{precision}")
                g.initializer.append(new)
                low_inits[name] = new.name
                stats["low_initializers"] += 1
            return low_inits[name]
        have = cur.get(name, FLOAT)
        if have == want:
            return name
        key = (name, want)
        if key not in cast_cache:
            out = f"{name}__to_{'fp32' if want == FLOAT else precision}"
            new_nodes.append(helper.make_node("Cast", [name], [out], to=want, name=f"autocast_{out}"))
            cur[out] = want
            cast_cache[key] = out
            stats["casts"] += 1
        return cast_cache[key]

    for node in g.node:
        node_inputs = [renamed.get(i, i) for i in node.input]
        del node.input[:]
        node.input.extend(node_inputs)
        float_in = [i for i in node.input if is_float(i)]
        if node.op_type in TYPE_AGNOSTIC_OPS or node.op_type == "Constant":
            want = None
        elif node.domain not in ("", "ai.onnx") or node.op_type in FP32_OPS:
            want = FLOAT
        elif node.op_type in LOW_PRECISION_OPS:
            want = low
        else:
            live = [i for i in float_in if not (i in inits and i not in cur) and i not in const_out]
            want = low if any(cur.get(i, FLOAT) == low for i in live) else FLOAT
        if want is not None:
            for j, name in enumerate(node.input):
                if is_float(name):
                    node.input[j] = converted(name, want)
            stats["low_nodes" if want == low else "fp32_nodes"] += 1
        for j, out in enumerate(node.output):
            if not out:
                continue
            if node.op_type == "Cast" or want is None or orig.get(out) != FLOAT:
                cur[out] = orig.get(out)
                continue
            cur[out] = want
            if want == low and out in graph_outputs:  # rename; a Cast back to fp32 takes the output's name
                lp = f"{out}__{precision}"
                node.output[j] = lp
                renamed[out] = lp
                cur[lp], cur[out] = low, FLOAT
        new_nodes.append(node)

    for out in g.output:  # keep I/O fp32
        src = renamed.get(out.name)
        if src is not None:
            new_nodes.append(helper.make_node("Cast", [src], [out.name], to=FLOAT, name=f"autocast_out_{out.name}"))
            stats["casts"] += 1
    del g.node[:]
    g.node.extend(new_nodes)
    # value_info: record the new types; drop stale entries of renamed tensors
    for vi in g.value_info:
        t = cur.get(vi.name)
        if t is not None and vi.type.tensor_type.elem_type == FLOAT and t == low:
            vi.type.tensor_type.elem_type = low
    # drop initializers no node reads any more (fully converted)
    used = {i for n in g.node for i in n.input} | {x.name for x in g.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return model, stats


# ---------------------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------------------
_SEVERITY = ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE")


def _make_logger(trt, verbose: bool = False):
    """A TensorRT ILogger that keeps every line (tagged with the current stage) for build_log.txt."""

    class Log(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.lines = []  # (stage, severity name, message)
            self.stage = "setup"
            self.max_level = 4 if verbose else 3

        def log(self, severity, msg):
            level = int(severity)
            if level <= self.max_level:
                self.lines.append((self.stage, _SEVERITY[level] if level < len(_SEVERITY) else str(level), msg))

        def note(self, msg):
            self.lines.append((self.stage, "TOPI", msg))

        def errors(self, stage=None):
            return [m for s, lvl, m in self.lines if lvl in ("ERROR", "INTERNAL_ERROR") and (stage in (None, s))]

        def text(self):
            return "".join(f"[{s}] {lvl}: {m.rstrip()}\n" for s, lvl, m in self.lines)

    return Log()


def _gpu_info():
    """(name, (major, minor)) of CUDA device 0, or None without a GPU / CUDA torch."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0), tuple(torch.cuda.get_device_capability(0))
    except Exception:  # noqa: BLE001 - a broken driver means "no GPU" here
        pass
    return None


def _import_plugins():
    try:
        from plugins import trt_plugins  # repo checkout on sys.path
    except ImportError:
        root = Path(__file__).resolve().parents[2]
        if not (root / "plugins" / "trt_plugins.py").is_file():
            raise
        sys.path.insert(0, str(root))
        from plugins import trt_plugins
    return trt_plugins


def _register_plugins(backend: str, trt_name: str, log, echo) -> bool:
    """True when the topi plugins are registered with trt_name; otherwise prints why and returns False
    (the parser then inlines the topi function bodies)."""
    if backend == "tensorrt-rtx":
        msg = ("TensorRT-RTX has no Python plugin API (tensorrt_rtx.plugin): the ONNX parser inlines the topi "
               "function bodies")
        echo(f"  note: {msg}")
        log.note(msg)
        return False
    try:
        trt_plugins = _import_plugins()
        trt_plugins.register_plugins(trt_name)
    except Exception as exc:  # noqa: BLE001 - any failure means "build without plugins"
        msg = (f"topi plugins not registered ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
               f"the ONNX parser inlines the topi function bodies")
        echo(f"  note: {msg}")
        log.note(msg)
        return False
    msg = "topi plugins registered (namespace 'topi', version '1'): topi nodes import as fused plugins"
    echo(f"  {msg}")
    log.note(msg)
    return True


def _parser_errors(parser) -> str:
    errs = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        where = ", ".join(x for x in (f"node {e.node_name()}" if e.node_name() else "",
                                      f"op {e.node_operator()}" if e.node_operator() else "") if x)
        errs.append(f"{e.desc()}{' (' + where + ')' if where else ''}")
    return errs


def _rtx_targets(trt, options, echo, log):
    caps = [normalize_compute_capability(c) for c in options.get("compute_capabilities") or []]
    gpu = _gpu_info()
    if not caps:
        if gpu is not None:
            caps = [sm_name(gpu[1])]
            echo(f"  target: the GPU here, {gpu[0]} ({caps[0]})")
        else:
            caps = [DEFAULT_RTX_TARGET]
            echo(f"  target: {DEFAULT_RTX_TARGET} (no GPU here and no --compute-capability given)")
        log.note(f"compute capabilities: {caps} (default)")
    members = trt.ComputeCapability.__members__
    for c in caps:
        if c not in members or c in ("NONE", "CURRENT"):
            allowed = [m for m in members if m not in ("NONE", "CURRENT")]
            raise TopiError(f"compute capability {c} is not a TensorRT-RTX {trt.__version__} target: choose from "
                            f"{', '.join(allowed)} (Hopper SM90 and data-center GPUs need --backend tensorrt)")
    return caps, gpu


def build(graphs_dir, out_dir, bucket_table, layout, backend, options, echo=print) -> dict:
    """Build anchor.engine and pruned.engine into out_dir; returns the manifest's graphs/target/precision."""
    trt_name = module_name(backend)
    trt = import_trt(backend)
    graphs_dir, out_dir = Path(graphs_dir), Path(out_dir)
    options = dict(options or {})
    precision = options.get("precision") or "fp32"
    if precision not in PRECISIONS:
        raise TopiError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    workspace = parse_workspace(options.get("workspace"))
    opt_level = options.get("optimization_level")
    log = _make_logger(trt, verbose=bool(os.environ.get("TOPI_TRT_VERBOSE")))
    rtx = backend == "tensorrt-rtx"

    shapes = {k: onnx_input_shapes(graphs_dir / f"{k}.onnx") for k in GRAPH_KINDS}
    table = profile_table(bucket_table, layout, shapes)

    if rtx:
        caps, gpu = _rtx_targets(trt, options, echo, log)
    else:
        if options.get("compute_capabilities"):
            raise TopiError("--compute-capability is a TensorRT-RTX option: data-center TensorRT builds for the "
                            "GPU it runs on (use --backend tensorrt-rtx for ahead-of-time targets)")
        gpu = _gpu_info()
        if gpu is None:
            raise TopiError("--backend tensorrt builds on the GPU the engines are for, and no CUDA GPU is visible "
                            "(torch.cuda.is_available() is False); build on that GPU, or use --backend tensorrt-rtx "
                            "for ahead-of-time builds on a machine without a GPU")
        caps = [sm_name(gpu[1])]

    plugins = bool(options.get("plugins", True)) and _register_plugins(backend, trt_name, log, echo)
    try:
        builder = trt.Builder(log)
    except Exception as exc:  # noqa: BLE001
        raise TopiError(f"{trt_name} could not create a Builder ({exc}): "
                        f"{'check the NVIDIA driver and CUDA' if not rtx else 'reinstall tensorrt-rtx-cu13'}")
    if builder is None:
        raise TopiError(f"{trt_name} could not create a Builder: {(log.errors() or ['see its log'])[0]}")

    cache_path = Path(options["timing_cache"]) if options.get("timing_cache") else None
    if cache_path is not None and rtx:
        # TensorRT-RTX deprecated timing caches in 1.2 (no-ops: it does not time tactics; kernels are compiled
        # for the GPU at run time, see its runtime cache, TOPI_TRT_RUNTIME_CACHE).
        msg = f"--timing-cache {cache_path} ignored: timing caches are no-ops in TensorRT-RTX"
        echo(f"  note: {msg}")
        log.note(msg)
        cache_path = None
    timing_cache = None
    graphs, t_all = {}, time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="topi-trt-") as scratch:
        for kind in GRAPH_KINDS:
            t0 = time.perf_counter()
            log.stage = kind
            src = graphs_dir / f"{kind}.onnx"
            parse_path, cast_stats = src, None
            if precision != "fp32":
                import onnx

                from topi_export.export.graphs import save_model
                from topi_export.ops.onnx import register_schemas

                register_schemas()
                model, cast_stats = autocast_onnx(onnx.load(str(src)), precision)
                parse_path = Path(scratch) / f"{kind}.{precision}.onnx"
                save_model(model, parse_path)
                del model
                echo(f"  {kind}: {precision} autocast: {cast_stats['low_nodes']} nodes in {precision}, "
                     f"{cast_stats['fp32_nodes']} kept fp32, {cast_stats['casts']} casts")
                log.note(f"autocast {json.dumps(cast_stats)}")

            flags = 0
            if "STRONGLY_TYPED" in trt.NetworkDefinitionCreationFlag.__members__:
                flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
            network = builder.create_network(flags)
            parser = trt.OnnxParser(network, log)
            ok = parser.parse_from_file(str(parse_path))
            errors = _parser_errors(parser)
            for e in errors:
                log.lines.append((kind, "PARSER_ERROR", e))
            if not ok or errors:
                raise TopiError(f"{trt_name}'s ONNX parser rejected the {kind} graph ({len(errors)} error(s)); "
                                f"first: {errors[0] if errors else (log.errors(kind) or ['no message'])[0]}")
            log.note(f"parsed {src.name}: {network.num_layers} layers, {network.num_inputs} inputs, "
                     f"{network.num_outputs} outputs, parser errors: 0")
            plugin_layers = _count_plugin_layers(trt, network)
            if plugins and plugin_layers == 0:
                msg = "plugins registered but no plugin layer in the network: the parser inlined the topi functions"
                echo(f"  note: {kind}: {msg}")
                log.note(msg)

            config = builder.create_builder_config()
            if precision == "fp32" and "TF32" in trt.BuilderFlag.__members__:
                config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: matches the PyTorch reference
            if opt_level is not None:
                config.builder_optimization_level = int(opt_level)
            if workspace is not None:
                config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
            if rtx:
                config.num_compute_capabilities = len(caps)
                for i, c in enumerate(caps):
                    config.set_compute_capability(getattr(trt.ComputeCapability, c), i)
            if cache_path is not None:
                if timing_cache is None:
                    data = cache_path.read_bytes() if cache_path.is_file() else b""
                    timing_cache = config.create_timing_cache(data)
                    log.note(f"timing cache {'loaded from' if data else 'new, saved to'} {cache_path}")
                if not config.set_timing_cache(timing_cache, False):
                    raise TopiError(f"timing cache {cache_path} does not match this {trt_name} / GPU: delete it or "
                                    f"pass another --timing-cache")

            profiles_out = _add_profiles(trt, builder, config, network, table[kind], bucket_table, kind)
            if config.num_optimization_profiles != len(table[kind]):
                raise TopiError(f"{trt_name} accepted {config.num_optimization_profiles} of {len(table[kind])} "
                                f"optimization profiles for the {kind} engine")
            serialized = builder.build_serialized_network(network, config)
            if serialized is None:
                raise TopiError(f"{trt_name} failed to build the {kind} engine: "
                                f"{(log.errors(kind) or ['no error logged; rerun with TOPI_TRT_VERBOSE=1'])[0]}")
            engine_file = out_dir / f"{kind}.engine"
            with open(engine_file, "wb") as f:
                f.write(serialized)
            seconds = time.perf_counter() - t0
            size = engine_file.stat().st_size
            log.note(f"built {engine_file.name}: {size} bytes, {len(profiles_out)} profile(s), {seconds:.1f} s")
            echo(f"  {kind}: {network.num_layers} layers, {len(profiles_out)} profile(s)"
                 f"{', ' + str(plugin_layers) + ' topi plugin layer(s)' if plugin_layers else ''}, "
                 f"{size / 1e6:.1f} MB in {seconds:.1f} s")
            graphs[kind] = {"file": engine_file.name, "onnx": f"onnx/{kind}.onnx", "profiles": profiles_out,
                            "layers": network.num_layers, "plugin_layers": plugin_layers,
                            "build_seconds": round(seconds, 3)}
            if cast_stats:
                graphs[kind]["autocast"] = cast_stats
            del parser, network, config, serialized

    if timing_cache is not None and cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(cache_path.name + f".tmp-{os.getpid()}")
        tmp.write_bytes(bytes(timing_cache.serialize()))
        os.replace(tmp, cache_path)
        log.stage = "done"
        log.note(f"timing cache saved to {cache_path}")
    log.stage = "done"
    log.note(f"total {time.perf_counter() - t_all:.1f} s; warnings {sum(1 for l in log.lines if l[1] == 'WARNING')}, "
             f"errors {len(log.errors())}, parser errors 0")
    (out_dir / "build_log.txt").write_text(log.text())

    version_key = trt_name  # "tensorrt" | "tensorrt_rtx"
    # the GPU name is recorded only when the engines target the GPU they were built on
    built_for_gpu = gpu is not None and not (rtx and options.get("compute_capabilities"))
    target = {"module": trt_name, "version": trt.__version__, "compute_capabilities": caps,
              "gpu": gpu[0] if built_for_gpu else None,
              "ahead_of_time": rtx, "strongly_typed": True,
              "plugins": "topi" if plugins else "inlined",
              "optimization_level": None if opt_level is None else int(opt_level),
              "workspace_bytes": workspace}
    return {"graphs": graphs, "target": target, "precision": precision, "versions": {version_key: trt.__version__}}


def _count_plugin_layers(trt, network) -> int:
    kinds = {getattr(trt.LayerType, n) for n in ("PLUGIN", "PLUGIN_V2", "PLUGIN_V3") if hasattr(trt.LayerType, n)}
    return sum(1 for i in range(network.num_layers) if network.get_layer(i).type in kinds)


def _add_profiles(trt, builder, config, network, profiles, bucket_table, kind) -> list[dict]:
    """Add the profiles to config; returns them as read back from TensorRT's profile objects."""
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    out = []
    for index, prof in enumerate(profiles):
        missing = sorted(set(names) - set(prof))
        if missing:
            raise TopiError(f"the {kind} network has inputs {missing} that the profile table does not cover")
        p = builder.create_optimization_profile()
        for name in names:
            lo, opt, hi = prof[name]
            p.set_shape(name, lo, opt, hi)
        idx = config.add_optimization_profile(p)
        if idx != index:
            raise TopiError(f"TensorRT rejected optimization profile {index} of the {kind} engine (returned {idx})")
        shapes = {}
        for name in names:
            lo, opt, hi = p.get_shape(name)
            shapes[name] = {"min": list(lo), "opt": list(opt), "max": list(hi)}
        entry = {"index": index, "shapes": shapes}
        if kind == "pruned":
            entry.update(ratio=bucket_table[index]["ratio"], keep=int(bucket_table[index]["keep"]))
        out.append(entry)
    return out


# ---------------------------------------------------------------------------------------------------------
# runtime
# ---------------------------------------------------------------------------------------------------------
def running_target(trt, backend: str) -> dict:
    info = _gpu_info()
    return {"module": module_name(backend), "version": trt.__version__,
            "gpu": info[0] if info else None, "compute_capability": info[1] if info else None}


class _Slot:
    """Static input/output buffers of one (engine, profile), and its CUDA graph once captured."""

    def __init__(self, inputs, outputs):
        self.inputs, self.outputs = inputs, outputs
        self.bound_version = -1  # which bind() the static inputs hold
        self.runs = 0
        self.graph = None


class TensorRTEngine:
    """StepEngine over anchor.engine / pruned.engine (both TensorRT flavours)."""

    def __init__(self, manifest, cuda_graphs: bool | None = None):
        import torch

        self.manifest = manifest
        self.name = manifest.backend
        trt = import_trt(manifest.backend)
        self.trt = trt
        if not torch.cuda.is_available():
            raise TopiError(f"{manifest.path} holds {manifest.backend} engines, which run on an NVIDIA GPU, and no "
                            f"CUDA GPU is visible here: run on a GPU the engines were built for, or use "
                            f"--backend torch / build --backend onnxruntime")
        check_target(manifest.data.get("target") or {}, running_target(trt, manifest.backend), manifest.path)
        if cuda_graphs is None:
            cuda_graphs = os.environ.get("TOPI_TRT_CUDA_GRAPHS", "0") not in ("", "0", "false", "no")
        self.cuda_graphs = cuda_graphs
        self.log = _make_logger(trt)
        self.runtime = trt.Runtime(self.log)
        self.device = torch.device("cuda")
        self.stream = torch.cuda.Stream(self.device)
        self.engines, self.contexts = {}, {}
        for kind in GRAPH_KINDS:
            self.log.stage = kind
            path = manifest.graph_file(kind)
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise TopiError(f"{manifest.backend} could not load {path} "
                                f"({(self.log.errors(kind) or ['no message'])[0]}): rebuild the engine directory")
            self.engines[kind] = engine
        # One device-memory block shared by both contexts: they run one after the other on one stream.
        size = max(int(e.device_memory_size_v2) for e in self.engines.values())
        self.scratch = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
        self.runtime_cache = self._runtime_cache() if manifest.backend == "tensorrt-rtx" else None
        self._runtime_configs = []  # kept alive as long as the contexts
        for kind, engine in self.engines.items():
            strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
            if self.runtime_cache is not None:  # TensorRT-RTX: JIT-compiled kernels cached across runs
                config = engine.create_runtime_config()
                config.set_execution_context_allocation_strategy(strategy)
                config.set_runtime_cache(self.runtime_cache[1])
                self._runtime_configs.append(config)
                ctx = engine.create_execution_context(config)
            else:
                ctx = engine.create_execution_context(strategy)
            if ctx is None:
                raise TopiError(f"could not create an execution context for {manifest.graph_file(kind)}: "
                                f"{(self.log.errors(kind) or ['no message'])[0]}")
            ctx.set_device_memory(self.scratch.data_ptr(), size)
            self.contexts[kind] = ctx
        self.io = {kind: self._io(engine) for kind, engine in self.engines.items()}
        for kind in GRAPH_KINDS:
            want = len(manifest.data["graphs"][kind].get("profiles") or [None])
            have = self.engines[kind].num_optimization_profiles
            if have != want:
                raise TopiError(f"{manifest.graph_file(kind)} has {have} optimization profiles, the manifest "
                                f"lists {want}: rebuild the engine directory")
        self.slots = {}
        self.active = {kind: None for kind in GRAPH_KINDS}  # profile selected in each context
        self.bound = {kind: None for kind in GRAPH_KINDS}  # slot whose addresses the context holds
        self.version = 0
        self.static = None

    def _runtime_cache(self):
        """(path, IRuntimeCache) when TOPI_TRT_RUNTIME_CACHE names a file; saved again at exit."""
        import atexit

        path = os.environ.get("TOPI_TRT_RUNTIME_CACHE")
        if not path:
            return None
        path = Path(path)
        config = self.engines["anchor"].create_runtime_config()
        cache = config.create_runtime_cache()
        if path.is_file() and not cache.deserialize(path.read_bytes()):
            self.log.note(f"runtime cache {path} does not match this GPU / driver / version: starting a new one")

        def save():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(bytes(cache.serialize()))
            except Exception:  # noqa: BLE001 - a cache that cannot be written is only slower next time
                pass

        atexit.register(save)
        self._cache_config = config  # keep alive with its cache
        return path, cache

    # --- engine I/O ------------------------------------------------------------------------------
    def _io(self, engine):
        trt = self.trt
        inputs, outputs = [], []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(name)
        return {"inputs": inputs, "outputs": outputs}

    def _torch_dtype(self, engine, name):
        import torch

        trt = self.trt
        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                 trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool, trt.uint8: torch.uint8}
        return table[engine.get_tensor_dtype(name)]

    def _select(self, kind, profile):
        ctx = self.contexts[kind]
        if self.active[kind] != profile:
            if not ctx.set_optimization_profile_async(profile, self.stream.cuda_stream):
                raise TopiError(f"{self.name}: cannot select optimization profile {profile} of the {kind} engine")
            self.active[kind] = profile
            self.bound[kind] = None

    def _slot(self, kind, profile):
        import torch

        key = (kind, profile)
        if key in self.slots:
            return self.slots[key]
        engine, ctx = self.engines[kind], self.contexts[kind]
        self._select(kind, profile)
        inputs = {}
        for name in self.io[kind]["inputs"]:
            shape = tuple(engine.get_tensor_profile_shape(name, profile)[1])  # opt = min = max
            if not ctx.set_input_shape(name, shape):
                raise TopiError(f"{self.name}: shape {shape} of '{name}' is outside profile {profile} ({kind})")
            inputs[name] = torch.zeros(shape, dtype=self._torch_dtype(engine, name), device=self.device)
        outputs = {}
        for name in self.io[kind]["outputs"]:
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise TopiError(f"{self.name}: output '{name}' of the {kind} engine has no static shape in profile "
                                f"{profile} ({shape})")
            outputs[name] = torch.empty(shape, dtype=self._torch_dtype(engine, name), device=self.device)
        slot = self.slots[key] = _Slot(inputs, outputs)
        return slot

    def _bind_slot(self, kind, profile, slot):
        ctx = self.contexts[kind]
        self._select(kind, profile)
        if self.bound[kind] == profile:
            return
        for name, t in slot.inputs.items():
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        for name, t in slot.outputs.items():
            ctx.set_tensor_address(name, t.data_ptr())
        self.bound[kind] = profile

    # --- StepEngine ------------------------------------------------------------------------------
    def bind(self, inputs) -> None:
        import torch

        from topi_export.models import kontext_ids

        self.manifest.check_layout(inputs.layout)
        txt_ids, img_ids = kontext_ids(inputs.layout)
        dev = self.device
        self.num_target = inputs.layout.num_target
        self.num_ctx = inputs.layout.num_ctx
        self.static = {"encoder_hidden_states": inputs.prompt_embeds.to(dev, torch.float32),
                       "pooled_projections": inputs.pooled_prompt_embeds.to(dev, torch.float32),
                       "img_ids": img_ids.to(dev), "txt_ids": txt_ids.to(dev),
                       "guidance": inputs.guidance_tensor().to(dev, torch.float32)}
        self.reference = inputs.reference_latents.to(dev, torch.float32)
        self.version += 1

    def _run(self, kind, profile, latents, timestep, keep_idx=None):
        import torch

        if self.static is None:
            raise TopiError("TensorRTEngine.bind(inputs) must be called before running a step")
        slot = self._slot(kind, profile)
        s = self.stream
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            hs = slot.inputs["hidden_states"]
            if slot.bound_version != self.version:
                for name, value in self.static.items():
                    if name in slot.inputs:
                        slot.inputs[name].copy_(value.reshape(slot.inputs[name].shape))
                hs[:, self.num_target:].copy_(self.reference)
                slot.bound_version = self.version
            hs[:, :self.num_target].copy_(latents.reshape(1, self.num_target, -1), non_blocking=True)
            slot.inputs["timestep"].copy_(timestep.reshape(slot.inputs["timestep"].shape), non_blocking=True)
            if keep_idx is not None:
                slot.inputs[KEEP_INPUT].copy_(keep_idx.reshape(-1), non_blocking=True)
            self._bind_slot(kind, profile, slot)
            if slot.graph is not None:
                slot.graph.replay()
            else:
                if not self.contexts[kind].execute_async_v3(s.cuda_stream):
                    raise TopiError(f"{self.name}: execute_async_v3 failed for the {kind} engine (profile {profile}): "
                                    f"{(self.log.errors() or ['no message'])[-1]}")
                slot.runs += 1
                if self.cuda_graphs and slot.runs == 1:
                    self._capture(kind, slot)
        s.synchronize()
        return slot.outputs

    def _capture(self, kind, slot):
        """Capture one execute_async_v3 of this (engine, profile) into a CUDA graph (after a warm-up run)."""
        import warnings

        import torch

        ctx = self.contexts[kind]
        self.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                ctx.execute_async_v3(self.stream.cuda_stream)
        except Exception as exc:  # noqa: BLE001 - fall back to plain launches
            warnings.warn(f"{self.name}: CUDA graph capture failed for the {kind} engine ({exc}); running without")
            self.cuda_graphs = False
            return
        slot.graph = graph

    def anchor(self, latents, timestep):
        out = self._run("anchor", 0, latents, timestep)
        velocity = out["velocity"].float().to(latents.device, copy=True)
        influence = out["influence"].float().to(latents.device, copy=True)
        return velocity, influence[0]

    def full(self, latents, timestep):
        # The anchor graph runs the full sequence: its velocity is the unpruned one. The pruned engine
        # has profiles only for the compiled buckets, not for keep = num_ctx.
        return self.anchor(latents, timestep)[0]

    def pruned(self, latents, timestep, keep_idx):
        import torch

        keep_idx = torch.as_tensor(keep_idx, dtype=torch.int64)
        if keep_idx.numel() == self.num_ctx:
            return self.full(latents, timestep)
        profile = self.manifest.profile_for(int(keep_idx.numel()))
        out = self._run("pruned", profile, latents, timestep, keep_idx)
        return out["velocity"].float().to(latents.device, copy=True)
