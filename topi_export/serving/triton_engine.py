"""The step engine of Triton's BLS loop model, and the request parsing that model needs (docs/design.md, "Serving").

``TritonEngine`` is a ``StepEngine`` (backends/base.py), so Triton runs the very same ``runtime.loop.denoise`` as
``topi-export run``. Its one graph call goes through a callable ``infer(model_name, inputs: dict[str, np.ndarray],
outputs: list[str]) -> dict[str, np.ndarray]``: inside Triton that callable wraps
``pb_utils.InferenceRequest(...).exec()`` (bls_model.py); in tests ONNX Runtime stands in for it. Nothing here
imports Triton.

The loop model's request is the inputs file of ``run`` (artifacts/inputs.py: reference latents, the family's request
fields, optional noise and guidance scales, grids as strings) plus ``run``'s options as scalars; it is parsed by
``inputs_from_tensors``, so a request is validated exactly like an inputs file.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from topi_export.backends.base import StepEngine
from topi_export.errors import BadInput, RebuildNeeded, TopiError
from topi_export.plan.limits import (MAX_SEED, MAX_STEPS, MAX_UPDATE_INTERVAL, check_mode, check_tau,
                                     parse_residual)
from topi_export.plan.manifest import STATE

DEFAULT_STEPS = 28  # the default of `run --steps`

# Triton data types of the graph tensors the loop model feeds (numpy cannot hold bfloat16).
NUMPY_TYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


@dataclass(frozen=True)
class Wire:
    """One tensor of the loop model's config: name, Triton type, dims (-1: any size), optional."""

    name: str
    dtype: str
    dims: tuple
    optional: bool = True


# Options of `run`, as request scalars (Triton types); the grids are "HxW" / "HxW,HxW" strings.
OPTIONS = (Wire("steps", "TYPE_INT32", (1,)), Wire("seed", "TYPE_UINT64", (1,)), Wire("ratio", "TYPE_FP32", (1,)),
           Wire("tau", "TYPE_FP32", (1,)), Wire("update_interval", "TYPE_INT32", (1,)),
           Wire("policy", "TYPE_STRING", (1,)), Wire("mode", "TYPE_STRING", (1,)),
           Wire("target_grid", "TYPE_STRING", (1,)), Wire("reference_grids", "TYPE_STRING", (1,)),
           Wire("reuse", "TYPE_STRING", (1,)), Wire("reuse_order", "TYPE_INT32", (1,)),
           Wire("ref_kv", "TYPE_STRING", (1,)),  # "reuse": approximate reference K/V reuse (docs/design.md)
           Wire("pruning_residual", "TYPE_STRING", (1,)))  # "on" | "off", as `run --pruning-residual`


def loop_inputs(family) -> tuple[Wire, ...]:
    """The loop model's inputs: the tensors of an inputs file (without target_latents: the family's declared
    tensors and scalars, plan/tensors.py) and the options of `run`."""
    c = family.in_channels
    out = [Wire("reference_latents", "TYPE_FP32", (1, -1, c), optional=False)]
    for spec in family.tensor_specs():
        dims = tuple(-1 if d == "T" else d for d in spec.request_dims)
        out.append(Wire(spec.name, "TYPE_FP32", dims, optional=not spec.required))
    out.append(Wire("noise", "TYPE_FP32", (1, -1, c)))
    return tuple(out) + OPTIONS


def loop_outputs(family) -> tuple[Wire, ...]:
    return (Wire("latents", "TYPE_FP32", (1, -1, family.in_channels), optional=False),
            Wire("schedule", "TYPE_STRING", (1,), optional=False))


def model_names(prefix: str, kinds) -> dict:
    """Triton model name of each engine graph: <prefix>_topi, <prefix>_dense."""
    return {kind: f"{prefix}_{kind}" for kind in kinds}


def check_graph_types(graphs: dict, where) -> None:
    for kind, g in graphs.items():
        for t in g.inputs + g.outputs:
            if t.dtype not in NUMPY_TYPES:
                raise TopiError(f"the {kind} graph of {where} has {t.dtype} tensor {t.name!r}, which the loop model "
                                f"cannot feed from numpy: build the engines with float32/float16 inputs and outputs")


class TritonEngine(StepEngine):
    """A StepEngine whose graph calls are Triton model calls (or anything with the same ``infer`` signature).

    manifest: the engine directory's manifest (graph inputs/outputs, by name and dtype).
    models: {"topi": Triton model name, "dense": ...} (model_names()).
    Each call feeds exactly the inputs the graph declares, in the declared dtypes."""

    name = "triton"

    def __init__(self, infer, manifest, models: dict):
        from topi_export.plan.manifest import REQUIRED_GRAPHS

        if any(kind not in models for kind in REQUIRED_GRAPHS[manifest.ref_kv]):
            raise RebuildNeeded(f"the loop model needs the names of the {' and '.join(REQUIRED_GRAPHS[manifest.ref_kv])} "
                                f"engine models: regenerate the repository with `topi-export triton`")
        check_graph_types(manifest.graphs, manifest.root)
        self.models = {k: v for k, v in models.items() if k in manifest.graphs}
        super().__init__({k: g for k, g in manifest.graphs.items() if k in self.models})
        self.infer = infer
        self.has_dense = "dense" in self.models

    def to_backend(self, tensor, spec):
        return np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=NUMPY_TYPES[spec.dtype])

    def run(self, kind, step, feed):
        model = self.models[kind]
        names = [t.name for t in self.graphs[kind].outputs]
        result = self.infer(model, feed, names)
        out = {}
        for name in names:
            if result.get(name) is None:
                raise TopiError(f"model {model} returned no output '{name}'")
            if name in STATE:  # the reference K/V cache: kept by this loop model, fed back to later engine calls
                spec = next(t for t in self.graphs[kind].outputs if t.name == name)
                out[name] = np.array(result[name], dtype=NUMPY_TYPES[spec.dtype], copy=True)
            else:
                out[name] = torch.from_numpy(np.array(result[name], dtype=np.float32, copy=True))
        return out


# --- request parsing (loop model) ----------------------------------------------------------------------------
@dataclass
class RequestOptions:
    steps: int = DEFAULT_STEPS
    seed: int = 0
    ratio: float | None = None
    tau: float | None = None
    update_interval: int | None = None
    policy: str | None = None
    mode: str = "topi"
    reuse: object = None  # 'off' | 'auto' | N | None (the model's default), as `run --reuse`
    reuse_order: int = 0
    ref_kv: str | None = None  # None: the engines' own (a KV-trained model's exact cache)
    pruning_residual: bool = False


def _one(arrays: dict, name: str):
    a = arrays.get(name)
    if a is None:
        return None
    a = np.asarray(a)
    if a.size != 1:
        raise TopiError(f"request input '{name}' must hold one value, got shape {list(a.shape)}")
    return a.reshape(-1)[0]


def _int(arrays, name, lo, hi):
    v = _one(arrays, name)
    if v is None:
        return None
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TopiError(f"request input '{name}' is {v!r}: send an integer")
    v = int(v)
    if not lo <= v <= hi:
        raise TopiError(f"request input '{name}' is {v}, outside {lo}..{hi}")
    return v


def _float(arrays, name):
    v = _one(arrays, name)
    if v is None:
        return None
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (float, int, np.floating, np.integer)):
        raise TopiError(f"request input '{name}' is {v!r}: send a number")
    # FP32 on the wire: 0.3 arrives as 0.30000001; 6 decimals match the compiled bucket 0.3 again
    return round(float(v), 6)


def _text(arrays, name):
    v = _one(arrays, name)
    if v is None:
        return None
    if isinstance(v, (bytes, np.bytes_)):
        try:
            return bytes(v).decode("utf-8")
        except UnicodeDecodeError:
            raise TopiError(f"request input '{name}' is not UTF-8 text") from None
    if isinstance(v, str):
        return v
    raise TopiError(f"request input '{name}' is {v!r}: send a string (BYTES)")


def request_options(arrays: dict) -> RequestOptions:
    """steps / seed / ratio / tau / update_interval / policy / mode, all optional as in `run`, range-checked."""
    from topi_export.method import check_policy, validate_ratio

    opts = RequestOptions()
    if (v := _int(arrays, "steps", 1, MAX_STEPS)) is not None:
        opts.steps = v
    if (v := _int(arrays, "seed", 0, MAX_SEED)) is not None:
        opts.seed = v
    opts.update_interval = _int(arrays, "update_interval", 1, MAX_UPDATE_INTERVAL)
    opts.ratio, opts.tau = _float(arrays, "ratio"), _float(arrays, "tau")
    if opts.ratio is not None and opts.tau is not None:
        raise TopiError("send either 'ratio' or 'tau', not both")
    if opts.ratio is not None:
        validate_ratio(opts.ratio, "request input 'ratio'")
    if opts.tau is not None:
        check_tau(opts.tau, "request input 'tau'")
    if (v := _text(arrays, "policy")) is not None:
        opts.policy = check_policy(v)
    if (v := _text(arrays, "mode")) is not None:
        opts.mode = check_mode(v, "request input 'mode'")
    if (v := _text(arrays, "reuse")) is not None:
        from topi_export.method.reuse import parse_reuse

        opts.reuse = parse_reuse(v)
    if (v := _int(arrays, "reuse_order", 0, 1)) is not None:
        opts.reuse_order = v
    if (v := _text(arrays, "ref_kv")) is not None:
        if v != "reuse":
            raise TopiError(f"request input 'ref_kv' is {v!r}: send 'reuse' (a KV-trained model's exact cache is used "
                            f"without it)")
        opts.ref_kv = v
    if (v := _text(arrays, "pruning_residual")) is not None:
        opts.pruning_residual = parse_residual(v, "request input 'pruning_residual'")
    return opts


def _tensor_names(family) -> list[str]:
    return ["reference_latents", "noise", *(s.name for s in family.tensor_specs())]


def request_input_names(family) -> list[str]:
    """Every input the loop model reads from a request."""
    return [w.name for w in loop_inputs(family)]


def default_grids(manifest, tensors: dict, meta: dict) -> dict:
    """Fill a missing target_grid / reference_grids from the one served layout that fits the request's token
    counts (the engine directory's only layout, when it has one); ask for the grids when several fit."""
    from topi_export.plan import grid_text, parse_grid, parse_grids

    ref, noise = tensors.get("reference_latents"), tensors.get("noise")
    if ref is None or ref.dim() != 3 or ("target_grid" in meta and "reference_grids" in meta):
        return meta
    target = parse_grid(meta["target_grid"], "target_grid") if "target_grid" in meta else None
    refs = parse_grids(meta["reference_grids"], "reference_grids") if "reference_grids" in meta else None
    fits = {(lay.target_grid, lay.ref_grids) for lay in manifest.layouts
            if lay.num_ctx == ref.shape[1] and (noise is None or noise.dim() != 3 or lay.num_target == noise.shape[1])
            and target in (None, lay.target_grid) and refs in (None, lay.ref_grids)}
    if len(fits) > 1:
        shown = ", ".join(f"target {grid_text(t)} references {','.join(map(grid_text, r))}" for t, r in sorted(fits))
        raise TopiError(f"several served layouts have {ref.shape[1]} reference tokens ({shown}): send "
                        f"'target_grid' (\"HxW\") and 'reference_grids' (\"HxW,HxW,...\")")
    if len(fits) == 1:
        (t, r), = fits
        meta = dict(meta)
        meta.setdefault("target_grid", grid_text(t))
        meta.setdefault("reference_grids", ",".join(map(grid_text, r)))
    return meta  # none fits: the grids inferred from the tensors are reported against the served layouts


def parse_request(arrays: dict, manifest, family, source: str = "the request"):
    """Request tensors (numpy) -> (Inputs, RequestOptions), with the checks of an inputs file."""
    from topi_export.artifacts.inputs import inputs_from_tensors

    tensors = {}
    for name in _tensor_names(family):
        a = arrays.get(name)
        if a is None:
            continue
        a = np.asarray(a)
        if a.dtype.kind not in "fiub":
            raise TopiError(f"request input '{name}' has dtype {a.dtype}: send FP32")
        tensors[name] = torch.from_numpy(np.array(a, copy=True))
    meta = {k: v for k in ("target_grid", "reference_grids") if (v := _text(arrays, k)) is not None}
    meta = default_grids(manifest, tensors, meta)
    inputs = inputs_from_tensors(tensors, meta, family, source=source)
    return inputs, request_options(arrays)


# --- the loop model's work, without Triton ---------------------------------------------------------------------
def open_loop_session(model_dir, infer, models: dict, manifest_sha256: str | None = None):
    """The Session of a loop model: the manifest copied next to its config.pbtxt, a TritonEngine over ``infer``."""
    from topi_export.artifacts.manifest import adapter, read_manifest
    from topi_export.plan import NAME
    from topi_export.runtime.session import Session

    model_dir = Path(model_dir)
    if manifest_sha256:
        have = hashlib.sha256((model_dir / NAME).read_bytes()).hexdigest()
        if have != manifest_sha256:
            raise TopiError(f"{model_dir / NAME} does not match the sha256 in config.pbtxt: regenerate the repository "
                            f"with `topi-export triton`")
    # The engine files stay with the engine models; their hashes were checked when the repository was written.
    m = read_manifest(model_dir, verify_files=False)
    engine = TritonEngine(infer, m, models)
    session = Session(engine, adapter(m), m.settings, m.model, m, m.scheduler or None)
    warm_up(session)
    return session


def warm_up(session) -> None:
    """Pay at model load what the first request would: building the family's scheduler imports diffusers (and
    what it pulls in), 6-7 s of a 2-core CPU here, which was the first request's latency otherwise. Host work
    only: the engine models may not be loaded yet. A failure is left to the requests to report."""
    try:
        session.family.make_scheduler(1, session.manifest.layouts[0], session.scheduler_config)
    except Exception:  # noqa: BLE001 - the same call fails each request with its own message
        pass


def run_request(session, arrays: dict) -> tuple[np.ndarray, str]:
    """One loop-model request: the latents [1, Nx, C] (float32) and the schedule as JSON."""
    data, opts = parse_request(arrays, session.manifest, session.family)
    data = session.check_inputs(data)
    if opts.mode == "dense" and not session.engine.has_dense:
        raise TopiError("mode 'dense' needs the dense baseline model: build the engine directory with "
                        "--dense-baseline and regenerate the repository")
    selector = None
    if opts.mode == "topi":  # exactly what `topi-export run --engine-dir` does
        selector = session.selector(data, ratio=opts.ratio, tau=opts.tau, policy=opts.policy, seed=opts.seed)
    update_interval = opts.update_interval or session.settings.update_interval
    ref_kv = session.check_ref_kv(opts.ref_kv)
    plan = session.reuse_plan(data, steps=opts.steps, reuse=opts.reuse, order=opts.reuse_order,
                              update_interval=update_interval) if opts.mode == "topi" else None
    result = session.denoise(data, steps=opts.steps, seed=opts.seed, selector=selector, mode=opts.mode,
                             update_interval=update_interval, reuse=plan, ref_kv=ref_kv,
                             pruning_residual=opts.pruning_residual)
    report = {"mode": opts.mode, "steps": opts.steps, "seed": opts.seed, "update_interval": update_interval,
              "ratio": selector.ratio if selector else None, "tau": selector.tau if selector else None,
              "policy": selector.policy if selector else None, "layout": data.layout.to_json(),
              "reuse": plan.to_json() if plan is not None else None, "pruning_residual": opts.pruning_residual,
              "schedule": [r.to_json() for r in result.schedule], "time_s": result.time_s}
    if result.ref_kv is not None:
        report["ref_kv"] = session.ref_kv_report(data, result)
    return np.ascontiguousarray(result.latents.numpy(), dtype=np.float32), json.dumps(report)
