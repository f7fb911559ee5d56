"""topi-export: ToPi context-token pruning for in-context DiTs (FLUX.1 Kontext), compiled to ONNX with
``topi`` custom ops and built into ONNX Runtime / TensorRT / TensorRT-RTX engines.

Public API (imported lazily, so ``import topi_export`` is cheap):

    load_model(spec)                         -> LoadedModel (adapter, identity)
    build_engines(model=..., ratio_buckets=...)  -> engine directory
    open_session(model=..., engine_dir=...)  -> Session (engine, settings, selector(), denoise())
    load_inputs(path), synthetic_inputs(...) -> Inputs
    denoise(engine, inputs, steps=..., selector=...) -> RunResult (latents, per-step schedule)
    Selector, make_plan                      -> the method's selection and temporal plan
    read_manifest(engine_dir)                -> verified Manifest
    TopiKontextTransformer(engine_dir, ratio=0.5) -> drop-in transformer for FluxKontextPipeline
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "topi_export.models",
    "build_engines": "topi_export.builder",
    "open_session": "topi_export.runtime.session",
    "load_inputs": "topi_export.runtime.inputs",
    "synthetic_inputs": "topi_export.runtime.inputs",
    "Inputs": "topi_export.runtime.inputs",
    "denoise": "topi_export.runtime.loop",
    "Selector": "topi_export.method",
    "make_plan": "topi_export.method",
    "read_manifest": "topi_export.runtime.manifest",
    "TopiKontextTransformer": "topi_export.runtime.diffusers_transformer",
    "TopiError": "topi_export.errors",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'topi_export' has no attribute {name!r}")
