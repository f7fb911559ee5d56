"""topi-export: ToPi context-token pruning for in-context DiTs (FLUX.1 Kontext, FLUX.2, Qwen-Image-Edit), compiled to
ONNX with ``topi`` custom ops and built into ONNX Runtime / TensorRT / TensorRT-RTX engines.

Public API (imported lazily, so ``import topi_export`` is cheap):

    load_model(spec)                         -> LoadedModel (family adapter, identity)
    build_engines(model=..., ratio_buckets=...)  -> engine directory
    open_session(model=..., engine_dir=...)  -> Session (engine, family, settings, selector(), denoise())
    load_inputs(path, family), save_inputs(path, inputs) -> Inputs
    denoise(engine, family, inputs, steps=..., selector=...) -> RunResult (latents, per-step schedule)
    Selector, TemporalController             -> the method's selection and temporal plan
    read_manifest(engine_dir)                -> verified, typed Manifest
    TopiTransformer(engine_dir, ratio=0.5)   -> drop-in transformer for the families' diffusers pipelines
"""
from importlib import import_module

__version__ = "0.2.0"

_EXPORTS = {
    "load_model": "topi_export.models",
    "build_engines": "topi_export.builder",
    "BuildPlan": "topi_export.builder",
    "open_session": "topi_export.runtime.session",
    "load_inputs": "topi_export.artifacts.inputs",
    "save_inputs": "topi_export.artifacts.inputs",
    "Inputs": "topi_export.request",
    "Layout": "topi_export.plan",
    "denoise": "topi_export.runtime.loop",
    "Selector": "topi_export.method.selection",
    "TemporalController": "topi_export.method.schedule",
    "read_manifest": "topi_export.artifacts.manifest",
    "TopiTransformer": "topi_export.runtime.diffusers_transformer",
    "TopiKontextTransformer": "topi_export.runtime.diffusers_transformer",
    "TopiError": "topi_export.errors",
    "BadInput": "topi_export.errors",
    "RebuildNeeded": "topi_export.errors",
    "BackendUnavailable": "topi_export.errors",
    "TensorSpec": "topi_export.plan.tensors",
    "StepRecord": "topi_export.plan.results",
    "RunReport": "topi_export.plan.results",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'topi_export' has no attribute {name!r}")
