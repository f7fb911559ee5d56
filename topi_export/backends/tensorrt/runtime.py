"""Runtime for TensorRT / TensorRT-RTX engines: one context per engine, the bucket's profile per step."""
from __future__ import annotations

import os
from pathlib import Path

from topi_export.errors import TopiError
from topi_export.backends.tensorrt.common import (
    GRAPH_KINDS, KEEP_INPUT, _make_logger, check_target, import_trt, running_target)


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

