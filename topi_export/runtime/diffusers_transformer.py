"""A drop-in ``transformer`` for diffusers pipelines that runs ToPi (PyTorch reference or built engines): keep your
pipeline, swap the transformer. Generic over families: the family parses its pipeline's call (``parse_call``).

    pipe = FluxKontextPipeline.from_pretrained(...)          # or Flux2Pipeline, QwenImageEditPlusPipeline, ...
    pipe.transformer = TopiTransformer("engines/my-engines", ratio=0.5)
    image = pipe(image=ref, prompt=..., num_inference_steps=28).images[0]

The pipeline calls the transformer once per denoising step, or twice with true CFG (positive, then negative
branch at the same timestep). The temporal controller (method/schedule.py) plans the steps exactly as
``topi-export run`` does: the positive branch's anchor decides the kept set; the negative branch runs the same plan
with its own embeddings, never re-scoring. A new generation starts when the timestep goes up (or repeats with
the same embeddings)."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from topi_export.errors import TopiError


class TopiTransformer(torch.nn.Module):
    def __init__(self, engine_dir=None, *, model=None, backend=None, ratio=None, tau=None, ratio_buckets=None,
                 policy=None, update_interval=None, calibration=None, seed: int = 0, device: str = "cpu",
                 dtype: str = "fp32"):
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        from topi_export.runtime.session import open_session

        self.session = open_session(model=model, engine_dir=engine_dir, backend=backend, calibration=calibration,
                                    update_interval=update_interval, device=device, dtype=dtype)
        self.family = self.session.family
        if not hasattr(self.family, "parse_call"):
            raise TopiError(f"{self.family.name} has no diffusers drop-in")
        self._selection = dict(ratio=ratio, tau=tau, ratio_buckets=ratio_buckets, policy=policy, seed=seed)
        self.config = FrozenDict(self.family.config)
        self.schedule = []  # per-step records of the current generation
        self._last = None  # (timestep, positive Inputs) of the last positive call
        self._branch = None

    @property
    def dtype(self):
        return torch.float32

    @property
    def device(self):
        return torch.device("cpu")

    @contextmanager
    def cache_context(self, name):  # diffusers' CacheMixin API, used by some pipelines around each branch
        yield

    def _start(self, inputs):
        from topi_export.method.schedule import TemporalController

        self.selector = self.session.selector(inputs, **self._selection)
        self.controller = TemporalController(self.selector, self.session.settings.update_interval,
                                             inputs.layout.num_ctx, inputs.layout.ref_grids)
        self.step, self.schedule = 0, []

    def _which_branch(self, t: float, inputs) -> str:
        last = self._last
        if last is not None and t == last[0] and self._branch == "positive" and not _same_text(inputs, last[1]):
            return "negative"
        if last is None or t >= last[0]:
            self._start(inputs)
        else:
            self.step += 1
        self._last = (t, inputs)
        return "positive"

    def forward(self, *args, return_dict: bool = True, **kwargs):
        if args:
            kwargs.setdefault("hidden_states", args[0])
        latents, timestep, inputs = self.family.parse_call(kwargs)
        inputs = self.session.check_inputs(inputs)
        if latents.shape[0] != 1:
            raise TopiError("TopiTransformer runs one image per call (num_images_per_prompt=1): the pipeline's true "
                            "CFG branches come as separate calls")
        t = float(timestep.reshape(-1)[0])
        self._branch = branch = self._which_branch(t, inputs)
        plan = self.controller.plan(self.step)
        engine = self.session.engine
        engine.bind(self.family.conditioning(inputs, inputs.layout), inputs.reference_latents, inputs.layout)
        x, ts = latents.float(), timestep.reshape(-1)[:1].float()
        with torch.inference_mode():
            if plan.kind == "anchor" and branch == "positive":
                velocity, influence = engine.anchor(x, ts)
                record = self.controller.observe(self.step, influence[0])
            elif plan.kind == "anchor" or plan.keep_idx is None:
                velocity, record = engine.full(x, ts), {}
            else:
                velocity, record = engine.pruned(x, ts, plan.keep_idx), {}
        if branch == "positive":
            pruned = plan.kind == "pruned" and plan.keep_idx is not None
            self.schedule.append({"step": self.step, "kind": plan.kind, **record,
                                  "keep": plan.keep if pruned else inputs.layout.num_ctx,
                                  "bucket": plan.ratio if pruned else 0.0})
        velocity = velocity[:1].to(latents.dtype)
        if not return_dict:
            return (velocity,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=velocity)


def _same_text(a, b) -> bool:
    x, y = a.tensors.get("prompt_embeds"), b.tensors.get("prompt_embeds")
    return x is not None and y is not None and x.shape == y.shape and bool(torch.equal(x, y))


TopiKontextTransformer = TopiTransformer  # the first release's name
