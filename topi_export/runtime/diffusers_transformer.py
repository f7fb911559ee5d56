"""A drop-in ``transformer`` for diffusers' FluxKontextPipeline that runs ToPi (PyTorch reference or built
engines): keep your pipeline, swap the transformer.

    pipe = FluxKontextPipeline.from_pretrained(...)
    pipe.transformer = TopiKontextTransformer("engines/my-kontext", ratio=0.5)
    image = pipe(image=ref, prompt=..., num_inference_steps=28).images[0]

The pipeline calls the transformer once per denoising step with hidden_states = [latents | reference]; this
module follows the same temporal plan as ``topi-export run`` (anchor every dT steps, pruned otherwise) and
starts a new plan whenever the timestep goes up (a new generation)."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from topi_export.errors import TopiError
from topi_export.models import Layout
from topi_export.runtime.inputs import Inputs


def layout_from_ids(txt_ids: torch.Tensor, img_ids: torch.Tensor) -> Layout:
    ids = img_ids[0] if img_ids.dim() == 3 else img_ids
    grids = []
    for first in (0, 1):
        part = ids[ids[:, 0] == first]
        if part.numel() == 0:
            raise TopiError("img_ids hold no reference tokens (first id component 1): this is not a Kontext call")
        grids.append((int(part[:, 1].max()) + 1, int(part[:, 2].max()) + 1))
    text = txt_ids.shape[-2]
    return Layout(text, grids[0], grids[1])


class TopiKontextTransformer(torch.nn.Module):
    def __init__(self, engine_dir=None, *, model=None, backend=None, ratio=None, tau=None, ratio_buckets=None,
                 policy=None, update_interval=None, calibration=None, seed: int = 0):
        super().__init__()
        from topi_export.runtime.session import open_session

        self.session = open_session(model=model, engine_dir=engine_dir, backend=backend, calibration=calibration,
                                    update_interval=update_interval)
        self._selection = dict(ratio=ratio, tau=tau, ratio_buckets=ratio_buckets, policy=policy, seed=seed)
        info = self.session.model_info
        self.config = SimpleNamespace(in_channels=info["in_channels"], guidance_embeds=info["guidance_embeds"],
                                      joint_attention_dim=info["text_dim"], pooled_projection_dim=info["pooled_dim"])
        self.interval = int(self.session.settings["update_interval"])
        self.schedule = []  # per-step records of the current generation
        self._last_t = None

    @property
    def dtype(self):
        return torch.float32

    @property
    def device(self):
        return torch.device("cpu")

    def _start(self, hidden_states, encoder_hidden_states, pooled_projections, txt_ids, img_ids, guidance):
        layout = layout_from_ids(txt_ids, img_ids)
        if self.session.manifest is not None:
            self.session.manifest.check_layout(layout)
        ref = hidden_states[:, layout.num_target:].float()
        g = guidance.reshape(-1)[:1].float() if guidance is not None else None
        self.inputs = Inputs(ref, encoder_hidden_states.float(), pooled_projections.float(), layout, guidance=g,
                             source="FluxKontextPipeline")
        self.selector = self.session.selector(self.inputs, **self._selection)
        self.session.engine.bind(self.inputs)
        self.step, self.keep_idx, self.schedule = 0, None, []

    def forward(self, hidden_states, timestep=None, guidance=None, pooled_projections=None,
                encoder_hidden_states=None, txt_ids=None, img_ids=None, joint_attention_kwargs=None,
                return_dict: bool = True, **_):
        if hidden_states.shape[0] != 1:
            raise TopiError("TopiKontextTransformer runs batch 1 (one image per prompt, no true CFG batch)")
        t = float(timestep.reshape(-1)[0])
        if self._last_t is None or t >= self._last_t:
            self._start(hidden_states, encoder_hidden_states, pooled_projections, txt_ids, img_ids, guidance)
        self._last_t = t
        nx = self.inputs.layout.num_target
        latents = hidden_states[:, :nx].float()
        ts = timestep.reshape(-1)[:1].float()
        engine = self.session.engine
        with torch.inference_mode():
            if self.step % self.interval == 0:
                kind = "anchor"
                velocity, influence = engine.anchor(latents, ts)
                self.keep_idx, ratio, keep = self.selector.select(influence, self.step)
                self._bucket = (ratio, keep)
            else:
                kind = "pruned"
                velocity = engine.full(latents, ts) if self.keep_idx is None else engine.pruned(latents, ts,
                                                                                                self.keep_idx)
        self.schedule.append({"step": self.step, "kind": kind, "keep": self._bucket[1], "bucket": self._bucket[0]})
        self.step += 1
        velocity = velocity.to(hidden_states.dtype)
        if not return_dict:
            return (velocity,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=velocity)
