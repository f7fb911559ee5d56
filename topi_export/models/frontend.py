"""The pipeline front end of a family (docs/design.md, "Pipelines"): how a local diffusers pipeline folder of that
family is recognised, loaded and called from images and a prompt, and which shapes it will make of them.

`edit`, `encode` and `build --model PIPELINE_DIR` (commands/, runtime/pipeline.py) run every family's own pipeline
(text encoders, VAE and image processing in torch) through this contract and never name a pipeline class; a
family declares its front end with one attribute (``Family.front_end``, a module exporting ``FRONT_END``).

The shapes are known before any encoder runs (``shape``), from the images' sizes, the pipeline's resolution rules
(read from its own module where it keeps them) and its VAE config, so an engine directory that does not fit is
refused before minutes of text encoding and VAE work."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from topi_export.errors import BadInput, TopiError
from topi_export.plan import Layout


@dataclass(frozen=True)
class CallOption:
    """A family's own flag of `edit` / `encode`: ``--flag`` sets the pipeline call's keyword ``kwarg``.
    default None: the pipeline's own default. ``kind`` is float or str."""

    flag: str
    kwarg: str
    kind: type = float
    help: str = ""

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


@dataclass
class EditRequest:
    """One edit as a user asks for it: PIL images (one per reference), a prompt, the loop settings, and the values
    of the family's CallOptions that were given (by kwarg)."""

    images: list
    prompt: str
    steps: int = 28
    seed: int = 0
    width: int | None = None
    height: int | None = None
    options: dict = field(default_factory=dict)
    names: tuple = ()  # the images' file names, for messages


def px(size) -> str:
    return f"{size[0]}x{size[1]}"


@dataclass(frozen=True)
class PipelineShape:
    """What the pipeline will make of a request: pixel sizes (width, height) of the target and of each reference
    after its resizing and snapping, the pixels per packed token, and the text length of the longest guidance
    branch."""

    target_px: tuple
    refs_px: tuple
    pixels_per_token: int
    text_tokens: int
    branches: int = 1

    @property
    def layout(self) -> Layout:
        p = self.pixels_per_token
        grid = lambda wh: (wh[1] // p, wh[0] // p)  # noqa: E731 - (width, height) px -> (H, W) tokens
        return Layout(self.text_tokens, grid(self.target_px), tuple(grid(r) for r in self.refs_px))

    def resolutions(self) -> str:
        """The `build --resolutions` value that serves this shape: TARGET:REF,REF in pixels."""
        return f"{px(self.target_px)}:{','.join(px(r) for r in self.refs_px)}"

    def describe(self) -> str:
        refs = ", ".join(px(r) for r in self.refs_px)
        return f"a {px(self.target_px)} target with reference(s) {refs} and {self.text_tokens} text tokens"


def layout_pixels(layout: Layout, pixels_per_token: int) -> str:
    """A built layout in the pixels of a pipeline: TARGET:REF,REF (+ text tokens)."""
    p = pixels_per_token
    wh = lambda g: f"{g[1] * p}x{g[0] * p}"  # noqa: E731
    return f"{wh(layout.target_grid)}:{','.join(wh(g) for g in layout.ref_grids)} ({layout.text_tokens} text)"


class PipelineFrontEnd:
    """Base class. Subclasses name the pipeline classes they serve and implement the shape rules and the call."""

    family: str = ""  # the family's name (models/<family>.py FAMILY.name)
    pipelines: tuple[str, ...] = ()  # diffusers pipeline classes (model_index.json "_class_name")
    options: tuple[CallOption, ...] = ()
    max_images: int | None = None  # None: any number of references

    def __init__(self, folder: Path, index: dict):
        self.folder = Path(folder)
        self.index = index
        self.class_name = str(index.get("_class_name"))

    # --- without weights -----------------------------------------------------------------------------
    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.class_name)

    def component_config(self, name: str) -> dict:
        """A component's config.json (e.g. the VAE's), read without loading it."""
        from topi_export.fsutil import read_json_file

        path = self.folder / name / "config.json"
        if not path.exists():
            raise BadInput(f"{self.folder} has no {name}/config.json: pass a complete {self.class_name} folder "
                           f"(saved with save_pretrained)")
        config = read_json_file(path, f"{name} config", f"re-save the pipeline's {name}", follow_symlinks=True)
        if not isinstance(config, dict):
            raise BadInput(f"{path} is not a JSON object: re-save the pipeline's {name}")
        return config

    def call_default(self, name: str):
        """A keyword default of the pipeline's __call__ (e.g. max_sequence_length), read from its signature."""
        import inspect

        try:
            cls = self.pipeline_class()
        except (ImportError, AttributeError):  # the pipeline modules need transformers (the [edit] extra)
            return None
        param = inspect.signature(cls.__call__).parameters.get(name)
        return None if param is None else param.default

    def pixels_per_token(self) -> int:
        """Pixels along one side of a packed token: the VAE's factor times the 2x2 packing."""
        raise NotImplementedError

    def text_tokens(self) -> int:
        """The text length the pipeline makes (the longest it makes, for families whose length depends on the
        prompt): the default text length of `build --model PIPELINE_DIR`."""
        raise NotImplementedError

    def check_images(self, request: EditRequest) -> None:
        if not request.images:
            raise BadInput("give at least one reference image with --image FILE")
        if self.max_images is not None and len(request.images) > self.max_images:
            raise BadInput(f"{self.class_name} takes {self.max_images} reference image(s), got {len(request.images)}: "
                           f"pass fewer --image files or use a multi-reference pipeline")

    def shape(self, request: EditRequest) -> PipelineShape:
        """The shapes the pipeline will make of this request (before any encoder runs)."""
        raise NotImplementedError

    def branches(self, request: EditRequest) -> int:
        """Guidance branches the engines must batch per call (2 for a true-CFG family that runs the negative
        prompt); pipelines that make one transformer call per branch through the drop-in need 1."""
        return 1

    # --- with weights --------------------------------------------------------------------------------
    def load(self, *, transformer=None, dtype=None):
        """The pipeline with every component but the transformer (``transformer`` replaces it; None: loads the
        folder's own)."""
        return self.from_pretrained(transformer, dtype)

    def from_pretrained(self, transformer=None, dtype=None, **components):
        """from_pretrained without loading the transformer when another one replaces it (diffusers refuses a
        replacement that is not a ModelMixin, so the slot is loaded empty and filled afterwards)."""
        import torch

        kwargs = {"dtype": dtype or torch.float32, **components}
        if transformer is not None:
            kwargs["transformer"] = None
        pipe = self.pipeline_class().from_pretrained(self.folder, **kwargs)
        if transformer is not None:
            pipe.transformer = transformer
        return pipe

    def call_kwargs(self, request: EditRequest) -> dict:
        """The pipeline call for this request, without generator, steps, output type and callbacks."""
        raise NotImplementedError

    def request_scalars(self, request: EditRequest) -> dict:
        """Scalars an inputs file records that the transformer call does not carry (e.g. a true-CFG scale)."""
        return {}

    # --- pictures of latents ---------------------------------------------------------------------------------
    def load_vae(self, dtype=None):
        """The pipeline's VAE alone (pictures of latents: `run --png`)."""
        import diffusers
        import torch

        entry = self.index.get("vae") or [None, None]
        cls = getattr(diffusers, str(entry[1]), None)
        if cls is None:
            raise BadInput(f"{self.folder}/model_index.json names no VAE class diffusers has ({entry[1]!r})")
        return cls.from_pretrained(self.folder / "vae", dtype=dtype or torch.float32).eval()

    def decode(self, vae, latents, grid):
        """Packed latents [1, H*W, C] of a token grid (H, W), as the transformer sees them (references too) -> a
        PIL image, decoded as the pipeline decodes its result."""
        raise NotImplementedError

    @staticmethod
    def to_pil(image):
        from diffusers.image_processor import VaeImageProcessor

        return VaeImageProcessor().postprocess(image.float(), output_type="pil")[0]


def option_value(request: EditRequest, kwarg: str, default=None):
    value = request.options.get(kwarg)
    return default if value is None else value


def both_or_neither(request: EditRequest) -> None:
    if (request.width is None) != (request.height is None):
        raise BadInput("give both --width and --height, or neither (the pipeline's resolution rules then apply)")


def floor_to(value: int, multiple: int) -> int:
    return int(value) // multiple * multiple


def check_px(size, ppt: int, what: str) -> None:
    if size[0] < ppt or size[1] < ppt:
        raise TopiError(f"{what} would be {px(size)} pixels, smaller than one {ppt}-pixel token: use a larger image "
                        f"or --width/--height")
