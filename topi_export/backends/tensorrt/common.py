"""Shared by the TensorRT builder and runtime: module import, the optimization-profile shapes, targets, the log.
Everything here except ``import_trt`` and ``make_logger`` runs without TensorRT (unit-tested)."""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field

import click

from topi_export.backends.base import Options
from topi_export.errors import BackendUnavailable, TopiError

PRECISIONS = ("fp32", "fp16", "bf16")
MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
INSTALL_HINTS = {
    "tensorrt": "install TensorRT >= 10.8 for your CUDA version (`pip install tensorrt`, which downloads NVIDIA's "
                "wheels from NVIDIA's package index) on a machine with a data-center / Jetson NVIDIA GPU; for "
                "ahead-of-time builds without a GPU use --backend tensorrt-rtx",
    "tensorrt-rtx": "`pip install tensorrt-rtx-cu13` (TensorRT for RTX; builds ahead of time on a machine without a "
                    "GPU, runs on RTX-class GPUs)",
}
DEFAULT_RTX_TARGET = "SM89"
ENGINE_FILES = {"topi": "topi.engine", "dense": "dense.engine"}
BUILD_LOG = "build_log.txt"


# --- build options (the flags of `topi-export build` these backends own) ----------------------------------
@dataclass(frozen=True)
class TensorRTOptions(Options):
    timing_cache: str | None = field(default=None, metadata={
        "flag": "--timing-cache", "type": click.Path(dir_okay=False), "help": "TensorRT timing cache file."})
    optimization_level: int = field(default=3, metadata={
        "flag": "--optimization-level", "type": click.IntRange(0, 5), "show_default": True,
        "help": "TensorRT builder optimization level."})
    workspace: str | None = field(default=None, metadata={
        "flag": "--workspace", "help": "TensorRT workspace limit, e.g. 4G."})
    no_plugins: bool = field(default=False, metadata={
        "flag": "--no-plugins", "is_flag": True, "help": "TensorRT: let the parser inline the topi function bodies."})
    strip_weights: bool = field(default=False, metadata={
        "flag": "--strip-weights", "is_flag": True,
        "help": "TensorRT: weight-stripped engine, refitted from the ONNX weights at load (the directory keeps the "
                "weights once, in ONNX)."})
    refittable: bool = field(default=False, metadata={
        "flag": "--refittable", "is_flag": True,
        "help": "TensorRT: engines whose weights `topi-export refit` can replace (other LoRA adapters) without "
                "a rebuild. Step-time cost not measured here (docs/tensorrt.md)."})


@dataclass(frozen=True)
class TensorRTRTXOptions(TensorRTOptions):
    compute_capabilities: tuple = field(default=(), metadata={
        "flag": "--compute-capability", "multiple": True,
        "help": "TensorRT-RTX ahead-of-time target, e.g. SM89 (repeatable)."})


# --- module import -------------------------------------------------------------------------------
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
        raise BackendUnavailable(f"--backend {backend} needs the Python module '{name}', which cannot be imported "
                        f"({exc}): {INSTALL_HINTS[backend]}") from None
    except Exception as exc:  # a broken install (e.g. missing shared libraries) raises OSError & co.
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise BackendUnavailable(f"the Python module '{name}' for --backend {backend} is installed but fails to load "
                        f"({exc.__class__.__name__}: {first}): reinstall it: {INSTALL_HINTS[backend]}") from None


# --- Polygraphy (NVIDIA's TensorRT toolkit: builder configs, profiles, engine building) -------------------------
def polygraphy(backend: str):
    """(config loader class, Profile, PostprocessConfig, EngineBytesFromNetwork, logger) of Polygraphy for this
    flavour: ``CreateConfig`` for TensorRT, ``CreateConfigRTX`` for TensorRT-RTX. Polygraphy picks the TensorRT
    module once per process (``polygraphy.config.USE_TENSORRT_RTX``, read when its TensorRT modules are imported),
    so one process builds one flavour."""
    import sys

    rtx = backend == "tensorrt-rtx"
    try:
        import polygraphy.config as pconfig
    except ImportError as exc:
        raise BackendUnavailable(f"--backend {backend} builds through Polygraphy, which cannot be imported ({exc}): "
                                 f"pip install 'topi-export[{backend}]'") from None
    if "polygraphy.backend.trt" not in sys.modules:
        pconfig.USE_TENSORRT_RTX = rtx
    elif bool(pconfig.USE_TENSORRT_RTX) != rtx:
        raise BackendUnavailable(f"Polygraphy is set up for {'tensorrt-rtx' if pconfig.USE_TENSORRT_RTX else 'tensorrt'} "
                                 f"in this process: build --backend {backend} in a new process")
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, PostprocessConfig, Profile
    from polygraphy.logger import G_LOGGER

    if rtx:
        from polygraphy.backend.tensorrt_rtx import CreateConfigRTX as CreateConfig  # noqa: F811
    return CreateConfig, Profile, PostprocessConfig, EngineBytesFromNetwork, G_LOGGER


def compute_capability_tuple(name: str) -> tuple[int, int]:
    """'SM89' -> (8, 9); 'SM120' -> (12, 0)."""
    digits = normalize_compute_capability(name)[2:]
    return int(digits[:-1]), int(digits[-1])


# --- optimization profiles (docs/design.md, "Backends") -------------------------------------------
def profile_shapes(graph, kind: str, profiles, layouts, batch: int) -> list[dict]:
    """The optimization profiles of one engine: a list of ``{input: (min, opt, max)}``, shapes as int tuples.

    topi: profile i <-> profiles[i] (plan.Profile). The anchor/full profile (ratio 0) keeps every context token
    and scores 1..Nx target queries (opt Nx: the anchor); a bucket profile keeps `keep` tokens and scores one
    query. dense: one profile per layout. The batch ranges 1..batch (opt batch); every other dimension is fixed
    by the layout through the graph's symbolic dims (GraphTensor.shape)."""
    if kind == "dense":
        table = [(lay, lay.num_ctx, (1, 1, 1)) for lay in layouts]
    else:
        table = []
        for i, p in enumerate(profiles):
            if p.index != i:
                raise TopiError(f"profile table entry {i} has index {p.index}: profile i must be entry i")
            lay = layouts[p.layout]
            if not 1 <= p.keep <= lay.num_ctx:
                raise TopiError(f"profile {i} keeps {p.keep} tokens, outside 1..{lay.num_ctx} context tokens of "
                                f"{lay.describe()}")
            queries = (1, lay.num_target, lay.num_target) if p.ratio == 0 else (1, 1, 1)
            table.append((lay, p.keep, queries))
    if not table:
        raise TopiError(f"no optimization profiles for the {kind} engine: the build has no layouts")
    out = []
    for lay, keep, queries in table:
        prof = {}
        for t in graph.inputs:
            try:
                lo, opt, hi = (t.shape(lay.sizes(keep=keep, queries=q, batch=b))
                               for q, b in zip(queries, (1, batch, batch)))
            except KeyError as exc:
                raise TopiError(f"{kind} graph input {t.name!r} has dims {list(t.dims)} with an unknown dimension "
                                f"{exc}: re-export the graphs") from None
            prof[t.name] = (lo, opt, hi)
        out.append(prof)
    return out


# --- sizes and targets ---------------------------------------------------------------------------
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


def gpu_info():
    """(name, (major, minor)) of CUDA device 0, or None without a GPU / CUDA torch."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0), tuple(torch.cuda.get_device_capability(0))
    except Exception:  # noqa: BLE001 - a broken driver means "no GPU" here
        pass
    return None


def running_target(trt, backend: str) -> dict:
    info = gpu_info()
    return {"module": module_name(backend), "version": trt.__version__,
            "gpu": info[0] if info else None, "compute_capability": info[1] if info else None}


# --- logging -------------------------------------------------------------------------------------
_SEVERITY = ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE")


def make_logger(trt, verbose: bool = False):
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
            return [m for s, lvl, m in self.lines if lvl in ("ERROR", "INTERNAL_ERROR") and stage in (None, s)]

        def text(self):
            return "".join(f"[{s}] {lvl}: {m.rstrip()}\n" for s, lvl, m in self.lines)

    return Log()
