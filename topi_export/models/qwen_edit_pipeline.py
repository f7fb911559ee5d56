"""QwenImageEditPipeline's and QwenImageEditPlusPipeline's front end (models/frontend.py): resolution rules, the
text length (which depends on the prompt and the images: the Qwen2.5-VL prompt holds the condition images' vision
tokens) and the call.

Shapes (diffusers ``pipeline_qwenimage_edit.py`` / ``pipeline_qwenimage_edit_plus.py``, their own
``calculate_dimensions``, ``VAE_IMAGE_SIZE`` and ``CONDITION_IMAGE_SIZE``): Edit-Plus resizes every reference to
``VAE_IMAGE_SIZE`` pixels of area at its aspect ratio (multiples of 32), Edit its one reference to 1024x1024 of area;
the target is ``height`` x ``width``, by default 1024x1024 of area at the last reference's aspect ratio, floored to
a token. The text length is counted by the pipeline's own prompt encoder with a stand-in text encoder that returns
zeros: the processor (tokenizer + image processor) runs, the Qwen2.5-VL model does not."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from topi_export.models.frontend import (CallOption, EditRequest, PipelineFrontEnd, PipelineShape, both_or_neither,
                                         check_px, floor_to, option_value)

TARGET_AREA = 1024 * 1024  # the target's default area (a literal in the pipelines' __call__)
TOKENIZER_MAX_LENGTH = 1024  # the pipelines' tokenizer_max_length (set in __init__): the default build text length


class _TextLengths(torch.nn.Module):
    """Stands in for Qwen2.5-VL when only the prompt's token count is wanted: zeros of the input's length."""

    dtype = torch.float32

    def forward(self, input_ids, attention_mask=None, output_hidden_states=True, **kwargs):
        return SimpleNamespace(hidden_states=[torch.zeros(*input_ids.shape, 1)])


def load_processor(folder):
    """The pipeline's Qwen2VLProcessor. transformers 5 builds one only with a video processor, which needs
    torchvision; the edit pipelines pass images only, so without torchvision it is assembled from its image
    processor and tokenizer (Qwen2VLProcessor.__init__'s attributes, video processor None)."""
    import importlib.util

    import transformers

    cls = transformers.Qwen2VLProcessor
    try:
        return cls.from_pretrained(folder)
    except ImportError:
        if importlib.util.find_spec("torchvision") is not None:
            raise
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    proc = cls.__new__(cls)
    proc.tokenizer, proc.image_processor, proc.video_processor = (
        tok, transformers.AutoImageProcessor.from_pretrained(folder), None)
    proc.image_token = getattr(tok, "image_token", None) or "<|image_pad|>"
    proc.video_token = getattr(tok, "video_token", None) or "<|video_pad|>"
    proc.image_token_id = tok.convert_tokens_to_ids(proc.image_token)
    proc.video_token_id = tok.convert_tokens_to_ids(proc.video_token)
    proc.chat_template = None
    return proc


class QwenEditFrontEnd(PipelineFrontEnd):
    family = "qwen-image-edit"
    pipelines = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline")
    options = (CallOption("--negative-prompt", "negative_prompt", str,
                          "Negative prompt of true CFG (e.g. ' '); without it the pipeline runs one branch."),
               CallOption("--true-cfg-scale", "true_cfg_scale", float,
                          "True CFG scale with --negative-prompt (default: the pipeline's)."))

    @property
    def plus(self) -> bool:
        return "Plus" in self.class_name

    @property
    def max_images(self):
        return None if self.plus else 1

    def _module(self):
        import importlib

        return importlib.import_module(self.pipeline_class().__module__)

    def pixels_per_token(self) -> int:
        down = self.component_config("vae").get("temperal_downsample") or (False,) * 3
        return 2 ** len(down) * 2

    def text_tokens(self) -> int:
        return TOKENIZER_MAX_LENGTH

    def cfg_scale(self, request) -> float:
        return float(option_value(request, "true_cfg_scale", self.call_default("true_cfg_scale") or 4.0))

    def branches(self, request: EditRequest) -> int:
        return 2 if option_value(request, "negative_prompt") is not None and self.cfg_scale(request) > 1 else 1

    def _sizes(self, request):
        """(target, [VAE reference sizes], [condition images for the prompt]) as the pipeline computes them."""
        mod = self._module()
        ppt = self.pixels_per_token()

        def dims(area, img):
            out = mod.calculate_dimensions(area, img.size[0] / img.size[1])
            return int(out[0]), int(out[1])

        if self.plus:
            refs = [dims(mod.VAE_IMAGE_SIZE, img) for img in request.images]
            conds = [img.resize(dims(mod.CONDITION_IMAGE_SIZE, img)) for img in request.images]
            base = request.images[-1]
        else:
            refs = [dims(TARGET_AREA, request.images[0])]
            conds = [request.images[0].resize(refs[0])]
            base = request.images[0]
        target = dims(TARGET_AREA, base)
        if request.width is not None:
            target = (request.width, request.height)
        target = (floor_to(target[0], ppt), floor_to(target[1], ppt))
        return target, [(floor_to(w, ppt), floor_to(h, ppt)) for w, h in refs], conds

    def _text_length(self, conds, prompt: str) -> int:
        cls = self.pipeline_class()
        light = cls(scheduler=None, vae=None, text_encoder=_TextLengths(), tokenizer=None,
                    processor=load_processor(self.folder / "processor"), transformer=None)
        emb, _ = light._get_qwen_prompt_embeds(prompt, conds if self.plus else conds[0], device=torch.device("cpu"),
                                               dtype=torch.float32)
        return int(emb.shape[1])

    def shape(self, request: EditRequest) -> PipelineShape:
        self.check_images(request)
        both_or_neither(request)
        ppt = self.pixels_per_token()
        target, refs, conds = self._sizes(request)
        check_px(target, ppt, "the target")
        for r in refs:
            check_px(r, ppt, "a reference")
        texts = [request.prompt] + ([option_value(request, "negative_prompt")] if self.branches(request) > 1 else [])
        text = max(self._text_length(conds, t) for t in texts)
        return PipelineShape(target, tuple(refs), ppt, text, self.branches(request))

    def load(self, *, transformer=None, dtype=None):
        return self.from_pretrained(transformer, dtype, processor=load_processor(self.folder / "processor"))

    def decode(self, vae, latents, grid):
        ppt = self.pixels_per_token()
        x = self.pipeline_class()._unpack_latents(latents.to(vae.dtype), grid[0] * ppt, grid[1] * ppt, ppt // 2)
        z = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(x.dtype)
        std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(x.dtype)
        return self.to_pil(vae.decode(x * std + mean, return_dict=False)[0][:, :, 0])

    def call_kwargs(self, request: EditRequest) -> dict:
        kwargs = {"image": list(request.images) if self.plus else request.images[0], "prompt": request.prompt}
        if request.width is not None:
            kwargs.update(width=request.width, height=request.height)
        negative = option_value(request, "negative_prompt")
        if negative is not None:
            kwargs["negative_prompt"] = negative
        if option_value(request, "true_cfg_scale") is not None:
            kwargs["true_cfg_scale"] = self.cfg_scale(request)
        return kwargs

    def request_scalars(self, request: EditRequest) -> dict:
        return {"true_cfg_scale": self.cfg_scale(request)} if self.branches(request) > 1 else {}


FRONT_END = QwenEditFrontEnd
