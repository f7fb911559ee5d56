"""`refit` for both TensorRT flavours (commands/refit.py; docs/tensorrt.md, "Refit"): engines built with
``--refittable`` take other weights (LoRA adapters fused in) without re-exporting or rebuilding.

- Weight-stripped and refittable (``--strip-weights --refittable``): the engine refits itself at load from the ONNX
  weights the directory keeps (runtime.py ``_refit``), so refitting = a new ONNX weights file beside the same
  graphs, as for ONNX Runtime. No GPU needed.
- Refittable engines that hold their weights: TensorRT's Refitter on the deserialised engine
  (``trt.Refitter(engine, logger)``, ``set_named_weights(name, Weights)``, ``get_missing_weights``,
  ``refit_cuda_engine``, then ``engine.serialize()``), with the weight names the ONNX parser gave the initializers
  (recorded at build time in ``refit_map.json``: initializer -> parameter, transposed). Deserialising needs the GPU
  the engines are for.

Engines built without ``--refittable`` (TensorRT's default, or ``REFIT_IDENTICAL`` for a stripped plan, which may
fold weights into kernels) are refused: rebuild with ``--refittable`` or ``build --lora``. Not run on these
machines: data-center TensorRT is not installable and TensorRT-RTX 1.7.1 builds no refittable engine without a GPU
(the build probe refuses the flag there)."""
from __future__ import annotations

from topi_export.errors import BackendUnavailable, BadInput, TopiError
from topi_export.export.weights_map import REFIT_MAP


def _weights(trt, tensor, transposed: bool, precision: str):
    """trt.Weights of a parameter at the engine's precision (kept alive by the caller)."""
    import numpy as np
    import torch

    from topi_export.export.weights_map import DTYPES

    t = (tensor.t() if transposed else tensor).detach().to(DTYPES[precision]).contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return trt.Weights(trt.bfloat16, t.data_ptr(), t.numel()), t
    array = np.ascontiguousarray(t.numpy())
    return trt.Weights(array), array


def refit(job, backend: str) -> list[str]:
    from topi_export.backends.onnxruntime import refit_onnx_weights

    m = job.manifest
    target = m.target or {}
    if not target.get("refittable"):
        raise BadInput(f"{m.root} holds {backend} engines built without --refittable, which TensorRT may have "
                       f"optimized for their exact weights: rebuild with `topi-export build --backend {backend} "
                       f"--refittable ...` (then refit), or build the adapters in with `build --lora`")
    if target.get("weights") == "stripped":
        return refit_onnx_weights(job)
    return _refit_engines(job, backend)


def _refit_engines(job, backend: str) -> list[str]:
    from topi_export.backends.tensorrt.common import import_trt, make_logger

    m = job.manifest
    if REFIT_MAP not in m.files:
        raise BadInput(f"{m.root} has no {REFIT_MAP}: rebuild it with --refittable")
    trt = import_trt(backend)
    log = make_logger(trt)
    runtime = trt.Runtime(log)
    changed = set(job.changed)
    written = []
    for kind, entry in m.graphs.items():
        onnx_name = (entry.onnx or f"{kind}.onnx").split("/")[-1]
        slots = [s.to_json() for s in job.slots if s.graph.split("/")[-1] == onnx_name]
        engine = runtime.deserialize_cuda_engine(m.file(entry.file).read_bytes())
        if engine is None:
            raise BackendUnavailable(f"{backend} cannot load {entry.file} here "
                                     f"({(log.errors() or ['no GPU?'])[0]}): refitting engines that hold their "
                                     f"weights needs the GPU they are for; run refit there, or build with "
                                     f"--strip-weights --refittable, whose refit needs no GPU")
        refitter = trt.Refitter(engine, log)
        names = set(refitter.get_all_weights())
        keep = []
        done = set()
        for s in slots:
            params = [(p, t) for p, t in s["params"] if p in changed]
            if not params or s["name"] not in names:
                continue
            weights, alive = _weights(trt, job.new[params[0][0]], params[0][1], m.precision)
            keep.append(alive)
            if not refitter.set_named_weights(s["name"], weights):
                raise TopiError(f"{backend} refused new weights for {s['name']!r} in {entry.file}: rebuild with "
                                f"`build --lora`")
            done.update(p for p, _ in params)
        missing = sorted(changed - done)
        if missing:
            raise BadInput(f"{entry.file}: {len(missing)} changed parameter(s) ({', '.join(missing[:3])}) have no "
                           f"refittable weight in the engine (folded at export or build): build with `build --lora`")
        for name in refitter.get_missing_weights():  # weights TensorRT wants set together with the changed ones
            slot = next((s for s in slots if s["name"] == name), None)
            if slot is None:
                raise TopiError(f"{backend} needs weight {name!r} of {entry.file} to refit, which the refit map "
                                f"does not know: rebuild with `build --lora`")
            p, t = slot["params"][0]
            weights, alive = _weights(trt, job.new[p], t, m.precision)
            keep.append(alive)
            refitter.set_named_weights(name, weights)
        if not refitter.refit_cuda_engine():
            raise TopiError(f"refitting {entry.file} failed ({(log.errors() or ['no message'])[-1]}): rebuild with "
                            f"`build --lora`")
        data = engine.serialize()
        (job.out_dir / entry.file).write_bytes(bytes(data))
        written.append(entry.file)
        job.echo(f"  {entry.file}: {len(done)} parameter(s) refitted")
    return written
