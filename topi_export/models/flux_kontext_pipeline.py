"""FluxKontextPipeline's front end (models/frontend.py): its resolution rules and call.

Shapes (diffusers ``pipeline_flux_kontext.py``, read from that module so they stay its own): the target is
``height`` x ``width`` (default ``default_sample_size * vae_scale_factor``) rescaled to ``max_area`` at the same
aspect ratio and floored to a token; the reference is snapped to the ``PREFERRED_KONTEXT_RESOLUTIONS`` entry of the
closest aspect ratio and floored to a token. So an 800x600 photo and no size give a 1024x1024 target and a 1184x880
(55x74-token) reference. The T5 prompt is padded to ``max_sequence_length`` (512) tokens."""
from __future__ import annotations

from topi_export.models.frontend import (CallOption, EditRequest, PipelineFrontEnd, PipelineShape, both_or_neither,
                                         check_px, floor_to, option_value)

DEFAULT_SAMPLE_SIZE = 128  # FluxKontextPipeline.default_sample_size (set in __init__, not readable from the class)


class KontextFrontEnd(PipelineFrontEnd):
    family = "flux-kontext"
    pipelines = ("FluxKontextPipeline",)
    max_images = 1
    options = (CallOption("--guidance", "guidance_scale", float,
                          "The pipeline's guidance_scale: embedded (distilled) guidance, or CFG with an empty negative "
                          "prompt for a non-distilled Flux2KleinPipeline (default: the pipeline's)."),)

    def pixels_per_token(self) -> int:
        blocks = self.component_config("vae").get("block_out_channels") or (0,) * 4
        return 2 ** (len(blocks) - 1) * 2

    def text_tokens(self) -> int:
        return int(self.call_default("max_sequence_length") or 512)

    def _module(self):
        import importlib

        return importlib.import_module(self.pipeline_class().__module__)

    def shape(self, request: EditRequest) -> PipelineShape:
        self.check_images(request)
        both_or_neither(request)
        ppt = self.pixels_per_token()
        if request.width is not None:
            w, h, area = request.width, request.height, request.width * request.height
        else:
            w = h = DEFAULT_SAMPLE_SIZE * (ppt // 2)
            area = int(self.call_default("max_area") or 1024 ** 2)
        aspect = w / h
        target = (floor_to(round((area * aspect) ** 0.5), ppt), floor_to(round((area / aspect) ** 0.5), ppt))
        iw, ih = request.images[0].size
        iw, ih = iw - iw % ppt, ih - ih % ppt  # VaeImageProcessor.get_default_height_width
        check_px((iw, ih), ppt, "the reference image")
        aspect = iw / ih
        _, iw, ih = min((abs(aspect - pw / ph), pw, ph) for pw, ph in self._module().PREFERRED_KONTEXT_RESOLUTIONS)
        ref = (floor_to(iw, ppt), floor_to(ih, ppt))
        check_px(target, ppt, "the target")
        return PipelineShape(target, (ref,), ppt, self.text_tokens())

    def decode(self, vae, latents, grid):
        ppt = self.pixels_per_token()
        x = self.pipeline_class()._unpack_latents(latents.to(vae.dtype), grid[0] * ppt, grid[1] * ppt, ppt // 2)
        x = x / vae.config.scaling_factor + vae.config.shift_factor
        return self.to_pil(vae.decode(x, return_dict=False)[0])

    def call_kwargs(self, request: EditRequest) -> dict:
        kwargs = {"image": request.images[0], "prompt": request.prompt}
        if request.width is not None:  # max_area = the asked area keeps the asked size (the pipeline rescales)
            kwargs.update(width=request.width, height=request.height, max_area=request.width * request.height)
        guidance = option_value(request, "guidance_scale")
        if guidance is not None:
            kwargs["guidance_scale"] = float(guidance)
        return kwargs


FRONT_END = KontextFrontEnd
