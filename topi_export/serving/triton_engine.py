"""The step engine of Triton's BLS loop model, plus the request parsing that model needs.

``TritonEngine`` implements the StepEngine protocol (runtime/engine.py), so Triton runs the very same
``topi_export.runtime.loop.denoise`` as ``topi-export run``. Its anchor / pruned / full calls go through
one callable ``infer(model_name, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]``:
inside Triton that callable wraps ``pb_utils.InferenceRequest(...).exec()`` (see bls_model.py); in tests
an ONNX Runtime stand-in implements it. Nothing here imports Triton.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from topi_export.errors import TopiError
from topi_export.runtime.engine import static_feed

# Loop model request tensors: the inputs file of `run` (runtime/inputs.py) plus run's options as scalars.
CONDITIONING = ("reference_latents", "prompt_embeds", "pooled_prompt_embeds", "noise", "guidance")
OPTIONS = {"steps": "TYPE_INT32", "seed": "TYPE_INT64", "ratio": "TYPE_FP32", "tau": "TYPE_FP32",
           "update_interval": "TYPE_INT32", "policy": "TYPE_STRING"}
REQUEST_INPUTS = CONDITIONING + tuple(OPTIONS)
DEFAULT_STEPS = 28  # the default of `run --steps`

_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "int64": np.int64,
              "int32": np.int32, "bool": np.bool_}


def _np_dtype(name: str):
    if name == "bfloat16":
        raise TopiError("a bfloat16 engine input cannot be fed from numpy: build the engines with fp32 I/O "
                        "(--precision bf16 keeps fp32 inputs and outputs in a strongly typed network)")
    return _NP_DTYPES[name]


class TritonEngine:
    """StepEngine whose graph calls are Triton model calls (or anything with the same ``infer`` signature).

    names: {"anchor": model name, "pruned": model name}.
    io: optional {"anchor": {"inputs": {name: dtype}}, "pruned": {...}}: the inputs each model declares
        (so e.g. ``guidance`` is sent only where the graph has it) and their numpy dtypes.
    full_via: "pruned" (keep_idx = every context token; ONNX Runtime graphs accept any length) or
        "anchor" (the anchor model's velocity, influence dropped; TensorRT pruned plans only have the
        bucket profiles, none for the full context).
    """

    name = "triton"

    def __init__(self, infer, names: dict | None = None, io: dict | None = None, full_via: str = "pruned"):
        if full_via not in ("pruned", "anchor"):
            raise TopiError(f"full_via must be 'pruned' or 'anchor', not {full_via!r}")
        self.infer = infer
        self.names = {"anchor": "topi_anchor", "pruned": "topi_pruned", **(names or {})}
        self.io = io or {}
        self.full_via = full_via

    # --- StepEngine ------------------------------------------------------------------------------
    def bind(self, inputs) -> None:
        self.reference, self.static, self.all_idx = static_feed(inputs)

    def full(self, latents, timestep):
        if self.full_via == "anchor":
            return self.anchor(latents, timestep)[0]
        return self.pruned(latents, timestep, self.all_idx)

    def anchor(self, latents, timestep):
        out = self._call("anchor", self._feed("anchor", latents, timestep), ["velocity", "influence"])
        return out["velocity"], out["influence"].reshape(-1)

    def pruned(self, latents, timestep, keep_idx):
        idx = keep_idx.numpy() if isinstance(keep_idx, torch.Tensor) else np.asarray(keep_idx)
        if self.full_via == "anchor" and idx.size == self.all_idx.size:  # no profile for the full context
            return self.full(latents, timestep)
        out = self._call("pruned", self._feed("pruned", latents, timestep, idx.astype(np.int64)), ["velocity"])
        return out["velocity"]

    # --- plumbing --------------------------------------------------------------------------------
    def _feed(self, kind, latents, timestep, keep_idx=None) -> dict:
        feed = {"hidden_states": np.concatenate([latents.numpy().astype(np.float32), self.reference], axis=1),
                "timestep": timestep.numpy().astype(np.float32), **self.static}
        if keep_idx is not None:
            feed["keep_idx"] = keep_idx
        declared = self.io.get(kind, {}).get("inputs")
        if declared:
            missing = set(declared) - set(feed)
            if missing:
                raise TopiError(f"model {self.names[kind]} declares inputs {sorted(missing)} that the Kontext "
                                f"step does not produce: regenerate the repository with `topi-export triton`")
            feed = {k: np.ascontiguousarray(feed[k].astype(_np_dtype(d), copy=False)) for k, d in declared.items()}
        return feed

    def _call(self, kind, feed, outputs) -> dict:
        model = self.names[kind]
        result = self.infer(model, feed, list(outputs))
        out = {}
        for name in outputs:
            if name not in result or result[name] is None:
                raise TopiError(f"model {model} returned no output '{name}'")
            out[name] = torch.from_numpy(np.array(result[name], dtype=np.float32, copy=True))
        return out


# --- request parsing (loop model) ----------------------------------------------------------------------
@dataclass
class RequestOptions:
    steps: int = DEFAULT_STEPS
    seed: int = 0
    ratio: float | None = None
    tau: float | None = None
    update_interval: int | None = None
    policy: str | None = None


def _scalar(arrays: dict, name: str):
    if name not in arrays or arrays[name] is None:
        return None
    a = np.asarray(arrays[name])
    if a.size != 1:
        raise TopiError(f"request input '{name}' must hold one value, got shape {list(a.shape)}")
    return a.reshape(-1)[0]


def request_options(arrays: dict) -> RequestOptions:
    """steps / seed / ratio / tau / update_interval / policy from the request (all optional, as in `run`)."""
    opts = RequestOptions()
    if (v := _scalar(arrays, "steps")) is not None:
        opts.steps = int(v)
    if (v := _scalar(arrays, "seed")) is not None:
        opts.seed = int(v)
    # FP32 on the wire: 0.3 arrives as 0.30000001; snap to 6 decimals so it matches the compiled bucket 0.3.
    if (v := _scalar(arrays, "ratio")) is not None:
        opts.ratio = round(float(v), 6)
    if (v := _scalar(arrays, "tau")) is not None:
        opts.tau = round(float(v), 6)
    if (v := _scalar(arrays, "update_interval")) is not None:
        opts.update_interval = int(v)
    if (v := _scalar(arrays, "policy")) is not None:
        opts.policy = v.decode() if isinstance(v, (bytes, np.bytes_)) else str(v)
    if opts.steps < 1:
        raise TopiError(f"steps {opts.steps} must be >= 1")
    return opts


def inputs_from_arrays(arrays: dict, manifest, source: str = "triton request"):
    """The request's conditioning tensors as ``Inputs`` with the engine directory's layout; the same
    rank / batch / finiteness / token-count checks as an inputs file (runtime/inputs.py)."""
    from topi_export.runtime.inputs import OPTIONAL, REQUIRED, Inputs

    layout = manifest.layout
    model = manifest.data["model"]
    want = {"reference_latents": [1, layout.num_ctx, model["in_channels"]],
            "prompt_embeds": [1, layout.text_tokens, model["text_dim"]],
            "pooled_prompt_embeds": [1, model["pooled_dim"]],
            "noise": [1, layout.num_target, model["in_channels"]], "guidance": [1]}
    tensors = {}
    for name in CONDITIONING:
        a = arrays.get(name)
        if a is None:
            if name in REQUIRED:
                raise TopiError(f"request has no input '{name}': send {', '.join(REQUIRED)} (see docs/triton.md)")
            continue
        a = np.asarray(a)
        rank = REQUIRED.get(name, OPTIONAL.get(name))
        if a.ndim != rank or list(a.shape) != want[name]:
            raise TopiError(f"request input '{name}' has shape {list(a.shape)}, expected {want[name]} "
                            f"(the engines were built for {layout.describe()})")
        t = torch.from_numpy(np.array(a, dtype=np.float32, copy=True))
        if not torch.isfinite(t).all():
            raise TopiError(f"request input '{name}' contains NaN or Inf")
        tensors[name] = t
    return Inputs(tensors["reference_latents"], tensors["prompt_embeds"], tensors["pooled_prompt_embeds"], layout,
                  noise=tensors.get("noise"), guidance=tensors.get("guidance"), source=source)
