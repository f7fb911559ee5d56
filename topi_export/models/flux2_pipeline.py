"""Flux2Pipeline's and Flux2KleinPipeline's front end (models/frontend.py): their resolution rules and call.

Shapes (diffusers ``pipeline_flux2.py`` / ``pipeline_flux2_klein.py``): each reference above 1024x1024 pixels of
area is resized to that area (``Flux2ImageProcessor._resize_to_target_area``), then floored to a token; the target
is ``height`` x ``width``, by default the first reference's size, floored to a token. The prompt is padded to
``max_sequence_length`` (512) tokens. Flux2KleinPipeline runs its negative branch as a second transformer call,
which the drop-in serves from the same engines (one branch per call)."""
from __future__ import annotations

import math

from topi_export.errors import BadInput
from topi_export.models.frontend import (CallOption, EditRequest, PipelineFrontEnd, PipelineShape, both_or_neither,
                                         check_px, floor_to, option_value)

MAX_REFERENCE_AREA = 1024 * 1024  # the pipelines' reference-area limit (a literal in their __call__)


class Flux2FrontEnd(PipelineFrontEnd):
    family = "flux2"
    pipelines = ("Flux2Pipeline", "Flux2KleinPipeline")
    options = (CallOption("--guidance", "guidance_scale", float,
                          "Guidance scale: embedded (Flux2Pipeline) or CFG with an empty negative prompt "
                          "(Flux2KleinPipeline, non-distilled) (default: the pipeline's)."),)

    def pixels_per_token(self) -> int:
        blocks = self.component_config("vae").get("block_out_channels") or (0,) * 4
        return 2 ** (len(blocks) - 1) * 2

    def text_tokens(self) -> int:
        return int(self.call_default("max_sequence_length") or 512)

    def shape(self, request: EditRequest) -> PipelineShape:
        from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

        self.check_images(request)
        both_or_neither(request)
        ppt = self.pixels_per_token()
        refs = []
        for name, img in zip(request.names or [f"image {i + 1}" for i in range(len(request.images))], request.images):
            try:
                Flux2ImageProcessor.check_image_input(img)
            except ValueError as exc:
                raise BadInput(f"{name}: {str(exc).splitlines()[0]}") from None
            w, h = img.size
            if w * h > MAX_REFERENCE_AREA:
                scale = math.sqrt(MAX_REFERENCE_AREA / (w * h))
                w, h = int(w * scale), int(h * scale)
            refs.append((floor_to(w, ppt), floor_to(h, ppt)))
            check_px(refs[-1], ppt, name)
        if request.width is not None:
            target = (floor_to(request.width, ppt), floor_to(request.height, ppt))
        else:
            target = refs[0]
        check_px(target, ppt, "the target")
        return PipelineShape(target, tuple(refs), ppt, self.text_tokens())

    def decode(self, vae, latents, grid):
        import torch

        h, w = grid
        x = latents.to(vae.dtype).transpose(1, 2).reshape(1, -1, h, w)  # Flux2Pipeline._pack_latents, inverted
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(x.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(x.dtype)
        x = self.pipeline_class()._unpatchify_latents(x * std + mean)
        return self.to_pil(vae.decode(x, return_dict=False)[0])

    def call_kwargs(self, request: EditRequest) -> dict:
        kwargs = {"image": list(request.images), "prompt": request.prompt}
        if request.width is not None:
            kwargs.update(width=request.width, height=request.height)
        guidance = option_value(request, "guidance_scale")
        if guidance is not None:
            kwargs["guidance_scale"] = float(guidance)
        return kwargs


FRONT_END = Flux2FrontEnd
