"""Runtime for TensorRT / TensorRT-RTX engines: one execution context per engine sharing one device-memory block,
the profile chosen per call from the request's layout and keep count (docs/design.md, "Backends")."""
from __future__ import annotations

import os
from pathlib import Path

from topi_export.backends.base import PER_CALL, StepEngine
from topi_export.backends.tensorrt.common import check_target, import_trt, make_logger, running_target
from topi_export.errors import TopiError


def select_profile(manifest, layout_index: int, kind: str, keep: int | None) -> int:
    """The engine's optimization profile for one call. topi: the layout's anchor/full profile (ratio 0) when every
    context token is kept, else the bucket's (manifest.profile_for); dense: one profile per layout."""
    if kind == "dense":
        return layout_index
    if keep == manifest.layouts[layout_index].num_ctx:
        return next(p.index for p in manifest.profiles if p.layout == layout_index and p.ratio == 0)
    return manifest.profile_for(layout_index, keep).index


class _Slot:
    """Static input/output buffers of one (engine, profile, shapes), and its CUDA graph once captured."""

    def __init__(self, key, inputs, outputs):
        self.key, self.inputs, self.outputs = key, inputs, outputs
        self.bound_version = -1  # which bind() the per-request inputs hold
        self.runs = 0
        self.graph = None


class TensorRTEngine(StepEngine):
    """StepEngine over topi.engine (+ dense.engine, deserialised on the first dense step)."""

    def __init__(self, manifest, cuda_graphs: bool | None = None):
        import torch

        super().__init__(manifest.graphs)
        self.manifest, self.name = manifest, manifest.backend
        self.has_dense = manifest.has_graph("dense")
        self.trt = trt = import_trt(manifest.backend)
        if not torch.cuda.is_available():
            raise TopiError(f"{manifest.root} holds {manifest.backend} engines, which run on an NVIDIA GPU, and no "
                            f"CUDA GPU is visible here: run on a GPU the engines were built for, or use "
                            f"--backend torch / build --backend onnxruntime")
        check_target(manifest.target or {}, running_target(trt, manifest.backend), manifest.root)
        if cuda_graphs is None:
            cuda_graphs = os.environ.get("TOPI_TRT_CUDA_GRAPHS", "0") not in ("", "0", "false", "no")
        self.cuda_graphs = cuda_graphs
        self.log = make_logger(trt)
        self.runtime = trt.Runtime(self.log)
        self.device = torch.device("cuda")
        self.stream = torch.cuda.Stream(self.device)
        self.engines, self.contexts, self.io, self.slots = {}, {}, {}, {}
        self.active, self.bound = {}, {}  # per engine: selected profile, slot whose shapes/addresses it holds
        self.scratch = None
        self.runtime_cache = None
        self._runtime_configs = []  # kept alive as long as the contexts
        self.version = 0
        self._load("topi")

    # --- engines ---------------------------------------------------------------------------------
    def _load(self, kind):
        import torch

        trt, m = self.trt, self.manifest
        if kind not in m.graphs:
            raise TopiError(f"{m.root} has no {kind} graph: rebuild with --dense-baseline")
        self.log.stage = kind
        path = m.file(m.graphs[kind].file)
        engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        m.check_unchanged()  # what was deserialised is what was verified
        if engine is None:
            raise TopiError(f"{m.backend} could not load {path} ({(self.log.errors(kind) or ['no message'])[0]}): "
                            f"rebuild the engine directory")
        if (m.target or {}).get("weights") == "stripped":
            self._refit(kind, engine)
        want = len(m.profiles) if kind == "topi" else len(m.layouts)
        if engine.num_optimization_profiles != want:
            raise TopiError(f"{path} has {engine.num_optimization_profiles} optimization profiles, the manifest "
                            f"needs {want}: rebuild the engine directory")
        if m.backend == "tensorrt-rtx" and self.runtime_cache is None:
            self.runtime_cache = self._runtime_cache(engine)
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        if self.runtime_cache is not None:  # TensorRT-RTX: kernels compiled for this GPU, cached across runs
            config = engine.create_runtime_config()
            config.set_execution_context_allocation_strategy(strategy)
            config.set_runtime_cache(self.runtime_cache[1])
            self._runtime_configs.append(config)
            ctx = engine.create_execution_context(config)
        else:
            ctx = engine.create_execution_context(strategy)
        if ctx is None:
            raise TopiError(f"could not create an execution context for {path}: "
                            f"{(self.log.errors(kind) or ['no message'])[0]}")
        self.engines[kind], self.contexts[kind] = engine, ctx
        self.active[kind] = self.bound[kind] = None
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_in = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.io[kind] = {"inputs": [n for n in names if is_in[n]], "outputs": [n for n in names if not is_in[n]]}
        # one device-memory block for every context: they run one after the other on one stream
        size = max(int(e.device_memory_size_v2) for e in self.engines.values())
        if self.scratch is None or size > self.scratch.numel():
            self.scratch = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
            for slot in self.slots.values():  # captured graphs hold the old block's address
                slot.graph = None
            for c in self.contexts.values():
                c.set_device_memory(self.scratch.data_ptr(), self.scratch.numel())
        else:
            ctx.set_device_memory(self.scratch.data_ptr(), self.scratch.numel())

    def _refit(self, kind, engine):
        """Weight-stripped engine: refit it from the weights of the ONNX graph it was built from."""
        trt, m = self.trt, self.manifest
        rel = m.graphs[kind].onnx
        if not rel:
            raise TopiError(f"{m.root}: the {kind} engine is weight-stripped but the directory keeps no ONNX graph "
                            f"to refit it from: rebuild the engine directory")
        refitter = trt.Refitter(engine, self.log)
        parser = trt.OnnxParserRefitter(refitter, self.log)
        if not parser.refit_from_file(str(m.file(rel))):
            errors = [parser.get_error(i).desc() for i in range(parser.num_errors)] or self.log.errors(kind)
            raise TopiError(f"refitting the {kind} engine from {rel} failed ({(errors or ['no message'])[0]}): "
                            f"rebuild the engine directory")
        if not refitter.refit_cuda_engine():
            raise TopiError(f"refitting the {kind} engine from {rel} failed "
                            f"({(self.log.errors(kind) or ['no message'])[-1]}): rebuild the engine directory")

    def _runtime_cache(self, engine):
        """(path, IRuntimeCache) when TOPI_TRT_RUNTIME_CACHE names a file; saved again at exit."""
        import atexit

        path = os.environ.get("TOPI_TRT_RUNTIME_CACHE")
        if not path:
            return None
        path = Path(path)
        self._cache_config = config = engine.create_runtime_config()  # keep alive with its cache
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
        return path, cache

    def _torch_dtype(self, engine, name):
        import torch

        trt = self.trt
        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                 trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool, trt.uint8: torch.uint8}
        return table[engine.get_tensor_dtype(name)]

    # --- slots -----------------------------------------------------------------------------------
    def _select(self, kind, profile):
        if self.active[kind] != profile:
            if not self.contexts[kind].set_optimization_profile_async(profile, self.stream.cuda_stream):
                raise TopiError(f"{self.name}: cannot select optimization profile {profile} of the {kind} engine")
            self.active[kind] = profile
            self.bound[kind] = None

    def _slot(self, kind, profile, shapes):
        import torch

        key = (kind, profile, tuple(sorted(shapes.items())))
        if key in self.slots:
            return self.slots[key]
        engine, ctx = self.engines[kind], self.contexts[kind]
        self._select(kind, profile)
        inputs = {}
        for name in self.io[kind]["inputs"]:
            if not ctx.set_input_shape(name, shapes[name]):
                raise TopiError(f"{self.name}: shape {shapes[name]} of '{name}' is outside profile {profile} of the "
                                f"{kind} engine: the engine directory does not serve this request")
            inputs[name] = torch.zeros(shapes[name], dtype=self._torch_dtype(engine, name), device=self.device)
        outputs = {}
        for name in self.io[kind]["outputs"]:
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise TopiError(f"{self.name}: output '{name}' of the {kind} engine has no shape for {shapes}")
            outputs[name] = torch.empty(shape, dtype=self._torch_dtype(engine, name), device=self.device)
        self.bound[kind] = None  # shapes set, addresses not yet
        slot = self.slots[key] = _Slot(key, inputs, outputs)
        return slot

    def _bind_slot(self, kind, profile, slot):
        self._select(kind, profile)
        if self.bound[kind] is slot:
            return
        ctx = self.contexts[kind]
        for name, t in slot.inputs.items():
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        for name, t in slot.outputs.items():
            ctx.set_tensor_address(name, t.data_ptr())
        self.bound[kind] = slot

    # --- StepEngine ------------------------------------------------------------------------------
    def bind(self, cond, context, layout) -> None:
        super().bind(cond, context, layout)
        self.layout_index = self.manifest.layout_index(layout)
        self.version += 1

    def to_backend(self, tensor, spec):
        return tensor.to(self.device)

    def run(self, kind, step, feed):
        import torch

        if kind not in self.engines:
            self._load(kind)
        keep = feed.get("keep_idx")
        profile = select_profile(self.manifest, self.layout_index, kind, None if keep is None else int(keep.numel()))
        slot = self._slot(kind, profile, {n: tuple(feed[n].shape) for n in self.io[kind]["inputs"]})
        s = self.stream
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            for name, buf in slot.inputs.items():
                if name in PER_CALL or slot.bound_version != self.version:
                    buf.copy_(feed[name], non_blocking=True)
            slot.bound_version = self.version
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
        return {t.name: slot.outputs[t.name].float().cpu() for t in self.graphs[kind].outputs}

    def _capture(self, kind, slot):
        """Capture one execute_async_v3 of this slot into a CUDA graph (after its first, eager run): legal because
        the slot's shapes and addresses never change, and they are set again before every replay."""
        import warnings

        import torch

        self.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                self.contexts[kind].execute_async_v3(self.stream.cuda_stream)
        except Exception as exc:  # noqa: BLE001 - fall back to plain launches
            warnings.warn(f"{self.name}: CUDA graph capture failed for the {kind} engine ({exc}); running without")
            self.cuda_graphs = False
            return
        slot.graph = graph


def open_engine(source):
    return TensorRTEngine(source.manifest, source.options.get("cuda_graphs"))
