"""A drop-in ``transformer`` for diffusers pipelines that runs ToPi (PyTorch reference or built engines): keep your
pipeline, swap the transformer. Generic over families: the family parses its pipeline's call (``parse_call``).

    pipe = FluxKontextPipeline.from_pretrained(...)          # or Flux2Pipeline, QwenImageEditPlusPipeline, ...
    pipe.transformer = TopiTransformer("engines/my-engines", ratio=0.5)
    image = pipe(image=ref, prompt=..., num_inference_steps=28).images[0]

The pipeline calls the transformer once per denoising step, or once per guidance branch. Pipelines with several
branches name them through diffusers' ``cache_context("cond")`` / ``cache_context("uncond")``; the drop-in reads
that name (a pipeline that names no branch makes one call per step). The temporal controller (method/schedule.py)
plans the steps exactly as ``topi-export run`` does, and the one step runner (runtime/steps.py) runs them: the
"cond" branch's anchor decides the kept set; the "uncond" branch runs the same plan with its own embeddings, never
re-scoring. A new generation starts when the "cond" branch's timestep goes up (or repeats).

Pipelines that keep a reference K/V cache between their calls (Flux2KleinKVPipeline: docs/design.md, "Reference
K/V cache") build it in their first call ("extract", which starts a generation) and pass it back to every later
one ("cached"). The drop-in hands them a ``ReferenceKVCache`` token, never the keys and values: those stay in the
engine (StepEngine.state), held once, and are freed when the pipeline clears the token."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from topi_export.errors import BadInput, TopiError

# diffusers' cache_context names of the guidance branches -> branch index (0 decides the kept set)
BRANCHES = {"cond": 0, "uncond": 1}


class ReferenceKVCache:
    """The token a pipeline that keeps a reference K/V cache gets from the drop-in's extract call and passes back:
    the request it was made for (``inputs``: the family's parse_call reads the layout and references from it) and
    a way to free the engine's copy (``clear``, which the pipeline calls when it is done)."""

    def __init__(self, inputs, release):
        self.inputs, self._release = inputs, release
        self.num_ref_tokens = inputs.layout.num_ctx

    def clear(self):
        self.inputs = None
        self._release()


class TopiTransformer(torch.nn.Module):
    def __init__(self, engine_dir=None, *, model=None, backend=None, ratio=None, tau=None, ratio_buckets=None,
                 policy=None, update_interval=None, calibration=None, seed: int = 0, device: str = "cpu",
                 dtype: str = "fp32", reuse=None, reuse_order: int = 0, steps: int | None = None, loras=(),
                 kv_cache=None, ref_kv=None, pruning_residual: bool = False):
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        from topi_export.runtime.session import open_session

        self.session = open_session(model=model, engine_dir=engine_dir, backend=backend, calibration=calibration,
                                    update_interval=update_interval, device=device, dtype=dtype, loras=loras,
                                    kv_cache=kv_cache)
        self.family = self.session.family
        self.ref_kv = self.session.check_ref_kv(ref_kv)  # a KV-trained model's exact cache, or "reuse"
        for name, value in self.family.dropin_attributes().items():
            object.__setattr__(self, name, value)
        if not hasattr(self.family, "parse_call"):
            raise TopiError(f"{self.family.name} has no diffusers drop-in")
        self._selection = dict(ratio=ratio, tau=tau, ratio_buckets=ratio_buckets, policy=policy, seed=seed)
        from topi_export.method.reuse import check_order, parse_reuse

        # step reuse needs the schedule up front (which steps, at which sigmas), as diffusers' MagCacheConfig does
        self._reuse = (parse_reuse(reuse) if reuse is not None else None, check_order(reuse_order))
        if steps is None and self._reuse[0] not in (None, "off"):
            raise BadInput("step reuse in the drop-in needs steps= (the pipeline's num_inference_steps)")
        self._steps = steps
        self._residual = bool(pruning_residual)  # runtime/steps.py: each branch measures its own at the anchors
        if self.session.manifest is not None:  # a ratio or tau the engines cannot serve fails here, not mid-pipeline
            self.session.check_selection(**self._selection)
        self.config = FrozenDict(self.family.config)
        self.schedule = []  # StepRecords of the current generation
        self._branch_name = None  # set by cache_context
        self._last_t = None  # timestep of the last branch-0 call
        self.step = -1

    @property
    def dtype(self):
        return torch.float32

    @property
    def device(self):
        return torch.device("cpu")

    @contextmanager
    def cache_context(self, name, **kwargs):  # diffusers' CacheMixin API: the pipelines name each branch's call
        before, self._branch_name = self._branch_name, name
        try:
            yield
        finally:
            self._branch_name = before

    def _start(self, inputs):
        from topi_export.method.schedule import TemporalController
        from topi_export.runtime.steps import StepRunner

        from topi_export.plan.reuse import OFF

        selector = self.session.selector(inputs, **self._selection)
        spec, order = self._reuse
        plan = OFF
        if self._steps is not None and spec != "off":
            plan = self.session.reuse_plan(inputs, steps=self._steps, reuse=spec, order=order)
        self.reuse = plan
        controller = TemporalController(selector, self.session.settings.update_interval, inputs.layout.num_ctx,
                                        inputs.layout.ref_grids, reuse=plan, ref_kv=self.ref_kv,
                                        residual=self._residual, num_steps=self._steps)
        self.runner = StepRunner(self.session.engine, controller, inputs.layout)
        self.step, self.schedule = 0, []

    def _release_cache(self, runner):
        """Free the reference K/V cache the engine holds for ``runner``'s generation (ReferenceKVCache.clear)."""
        runner.states.clear()
        if getattr(self, "runner", None) is runner:
            self.session.engine.state = {}

    def _branch(self) -> int:
        if self._branch_name is None:
            return 0
        if self._branch_name not in BRANCHES:
            raise BadInput(f"the pipeline names its transformer call {self._branch_name!r}; the ToPi drop-in knows the "
                           f"guidance branches {', '.join(BRANCHES)}")
        return BRANCHES[self._branch_name]

    def forward(self, *args, return_dict: bool = True, **kwargs):
        if args:
            kwargs.setdefault("hidden_states", args[0])
        cache_call = self.family.dropin_cache_call(kwargs)
        latents, timestep, inputs = self.family.parse_call(kwargs)
        timestep = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)  # a pipeline may pass a float
        if timestep.numel() < 1 or not bool(torch.isfinite(timestep).all()):
            raise BadInput("the transformer call's timestep is empty or not finite")
        inputs = self.session.check_inputs(inputs)
        if latents.shape[0] != 1:
            raise BadInput("TopiTransformer runs one image per call (num_images_per_prompt=1): the pipeline's guidance "
                           "branches come as separate calls")
        t = float(timestep.reshape(-1)[0])
        branch = self._branch()
        if branch == 0:
            if cache_call == "extract" or (cache_call is None and (self._last_t is None or t >= self._last_t)):
                self._start(inputs)
            else:
                self.step += 1
            self._last_t = t
        elif self.step < 0:
            raise BadInput("the pipeline's first transformer call of a generation is not its 'cond' branch: the ToPi "
                           "drop-in needs the conditional branch first")
        if self._steps is not None and self.step >= self._steps:
            raise BadInput(f"the pipeline runs more steps than steps={self._steps} given to TopiTransformer: pass its "
                           f"num_inference_steps")
        engine = self.session.engine
        if self.runner.controller.plan(self.step).kind != "reuse":  # a reused step makes no engine call at all
            engine.bind(self.family.conditioning(inputs, inputs.layout), inputs.reference_latents, inputs.layout)
        with torch.inference_mode():
            velocity, record = self.runner.step(self.step, latents.float(), timestep.reshape(-1)[:1].float(),
                                                branch=branch)
        if branch == 0:
            self.schedule.append(record)
        velocity = velocity[:1].to(device=latents.device, dtype=latents.dtype)
        cache = None
        if cache_call == "extract":
            runner = self.runner
            cache = ReferenceKVCache(inputs, lambda: self._release_cache(runner))
        return self.family.dropin_output(velocity, cache, return_dict)


TopiKontextTransformer = TopiTransformer  # the first release's name
