"""Shared by the TensorRT builder and runtime: module import, profile table, targets."""
from __future__ import annotations

import importlib
import re

from topi_export.errors import TopiError
from topi_export.export.precision import PRECISIONS  # noqa: F401  (part of this module's API)

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




def _gpu_info():
    """(name, (major, minor)) of CUDA device 0, or None without a GPU / CUDA torch."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0), tuple(torch.cuda.get_device_capability(0))
    except Exception:  # noqa: BLE001 - a broken driver means "no GPU" here
        pass
    return None


def running_target(trt, backend: str) -> dict:
    info = _gpu_info()
    return {"module": module_name(backend), "version": trt.__version__,
            "gpu": info[0] if info else None, "compute_capability": info[1] if info else None}


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
