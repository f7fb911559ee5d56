"""From images and a prompt to an edited image (`edit`) or an inputs file (`encode`), generic over families.

The family's front end (models/frontend.py) recognises, loads and calls its own diffusers pipeline; here that
pipeline runs with its transformer replaced by the ToPi drop-in (runtime/diffusers_transformer.py), a progress bar
per step, the final latents captured, and an engine directory checked against the shapes the pipeline will make
before any text encoder or VAE runs. `encode` runs the same pipeline up to its first transformer call and keeps
what that call receives: exactly the tensors a generation needs (artifacts/inputs.py)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from topi_export.errors import BackendUnavailable, BadInput, TopiError

EXTRA_HINT = "pip install 'topi-export[edit]'"
MAX_LISTED = 4  # built layouts named in a refusal


def require_packages() -> None:
    """The front end runs the pipelines' text encoders and image processors: transformers and Pillow."""
    import importlib.util

    for module, what in (("transformers", "the text encoders"), ("PIL", "image files")):
        if importlib.util.find_spec(module) is None:
            raise BackendUnavailable(f"`edit` and `encode` need the Python package '{module}' for {what}: "
                                     f"{EXTRA_HINT}")


def loading_bars(show: bool) -> None:
    """diffusers' and transformers' own loading bars: on a terminal with progress shown, else off (they would
    fill a log with carriage returns)."""
    from topi_export.progress import mode

    on = show and mode(True) == "bar"
    for module in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            import importlib

            logging = importlib.import_module(module)
            (logging.enable_progress_bar if on else logging.disable_progress_bar)()
        except ImportError:
            pass


def open_front_end(folder):
    from topi_export.models import front_end_for

    path = Path(str(folder))
    if not path.is_dir():
        raise BadInput(f"--model {folder}: no such folder: pass a local diffusers pipeline folder (saved with "
                       f"save_pretrained)")
    return front_end_for(path)


def load_images(paths) -> tuple[list, tuple[str, ...]]:
    """PIL images (RGB) from files, with one-line errors."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise BadInput(f"--image {p}: no such file")
        try:
            with Image.open(path) as img:
                images.append(img.convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise BadInput(f"--image {p} is not an image Pillow can read ({type(exc).__name__}): pass a PNG or "
                           f"JPEG file") from None
    return images, tuple(str(p) for p in paths)


# --- does an engine directory fit? ---------------------------------------------------------------------
def transformer_identity(front) -> tuple[str, str]:
    """(config_hash, weights_hash) of the pipeline's transformer, computed as `build` records them, without
    loading its weights."""
    from topi_export.models import _read_config, family_for_class, files_hash, resolve_model_dir
    from topi_export.plan.manifest import config_digest

    import inspect

    folder = resolve_model_dir(front.folder)
    config = _read_config(folder)
    cls = family_for_class(str(config.get("_class_name"))).model_class()
    # the loaded model's config = __init__'s defaults + config.json (a saved config may omit newer keys)
    params = inspect.signature(cls.__init__).parameters
    full = {k: p.default for k, p in params.items() if k != "self" and p.default is not inspect.Parameter.empty}
    full.update({k: v for k, v in config.items() if k in params})
    return config_digest(full, cls), files_hash(folder)


def build_hint(front, shape, adapters=()) -> str:
    """The build command whose engines serve this pipeline call."""
    flags = f"--resolutions {shape.resolutions()} --text-tokens {shape.text_tokens}"
    if shape.branches > 1:
        flags += " --cfg"
    flags += "".join(f" --lora {a.flag()}" for a in adapters)
    return f"`topi-export build --model {front.folder} {flags}`"


def check_fit(front, manifest, shape, *, identity=None, adapters=()) -> None:
    """Refuse, in one line naming the build that would fit, an engine directory that does not serve this pipeline
    call: another family, another model, other shapes (after the pipeline's snapping), references or text length,
    or fewer guidance branches."""
    from topi_export.models import family_named
    from topi_export.models.frontend import layout_pixels

    m = manifest
    hint = build_hint(front, shape, adapters)
    if m.model.family != front.family:
        raise BadInput(f"{m.root} holds {m.model.family} engines but {front.folder} is a {front.class_name} "
                       f"({front.family}): build its engines with {hint}")
    if identity is not None and (m.model.config_hash, m.model.weights_hash) != tuple(identity):
        raise BadInput(f"{m.root} was built from another {front.family} model (config {m.model.config_hash}, weights "
                       f"{m.model.weights_hash}; this pipeline's transformer: config {identity[0]}, weights "
                       f"{identity[1]}): build its engines with {hint}")
    want = shape.layout
    pads = family_named(front.family).pads_text
    fits = [lay for lay in m.layouts if lay.target_grid == want.target_grid and lay.ref_grids == want.ref_grids
            and (lay.text_tokens == want.text_tokens or (pads and lay.text_tokens > want.text_tokens))]
    if not fits:
        ppt = shape.pixels_per_token
        served = [layout_pixels(lay, ppt) for lay in m.layouts]
        more = f" and {len(served) - MAX_LISTED} more" if len(served) > MAX_LISTED else ""
        same_grids = [lay for lay in m.layouts
                      if lay.target_grid == want.target_grid and lay.ref_grids == want.ref_grids]
        why = (f"{want.text_tokens} text tokens, the engines hold {', '.join(str(b.text_tokens) for b in same_grids)}"
               if same_grids else f"{len(shape.refs_px)} reference(s) at {shape.resolutions()}")
        raise BadInput(f"{m.root} serves {'; '.join(served[:MAX_LISTED])}{more} (pixels of this pipeline) but "
                       f"{front.class_name} makes {shape.describe()} from these images ({why}): build with {hint}")
    if shape.branches > m.batch:
        raise BadInput(f"this call runs {shape.branches} guidance branches (true CFG with a negative prompt) but "
                       f"{m.root} was built for {m.batch}: build with {hint}")


# --- running a pipeline -----------------------------------------------------------------------------------
@dataclass
class PipelineRun:
    image: object  # PIL image
    latents: torch.Tensor | None  # the final latents the pipeline decodes (packed, as `run` returns them)
    time_s: float  # the whole pipeline call
    transformer_s: float  # inside the transformer
    layouts: list = field(default_factory=list)  # the layout of every transformer call (checked against the plan)


class _Watch:
    """Times the transformer, reads each call's layout with the family's parse_call, shows progress per step and
    keeps the latents of the last step (callback_on_step_end, which every served pipeline offers)."""

    def __init__(self, family, steps: int, desc: str, progress: bool):
        from topi_export.progress import Progress

        self.family, self.bar = family, Progress(steps, desc, enabled=progress)
        self.transformer_s, self.latents, self.layouts, self._t = 0.0, None, [], None

    def attach(self, module):
        def pre(mod, args, kwargs):
            if args:
                kwargs = dict(kwargs, hidden_states=args[0])
            try:
                self.layouts.append(self.family.parse_call(dict(kwargs))[2].layout)
            except (TopiError, KeyError, TypeError, AttributeError):
                self.layouts.append(None)
            self._t = time.perf_counter()

        def post(mod, args, kwargs, output):
            self.transformer_s += time.perf_counter() - self._t

        return [module.register_forward_pre_hook(pre, with_kwargs=True),
                module.register_forward_hook(post, with_kwargs=True)]

    def on_step_end(self, pipe, step, timestep, callback_kwargs):
        self.latents = callback_kwargs.get("latents")
        self.bar.update(1)
        return {}


def run_pipeline(front, pipe, request, *, desc: str, progress: bool = True) -> PipelineRun:
    """One call of the pipeline for this request (seeded), PIL out."""
    import warnings

    from topi_export.models import family_named

    kwargs = front.call_kwargs(request)
    family = family_named(front.family)(dict(pipe.transformer.config))
    watch = _Watch(family, request.steps, desc, progress)
    hooks = watch.attach(pipe.transformer)
    pipe.set_progress_bar_config(disable=True)  # one bar per step, ours (a log line per step off a terminal)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            out = pipe(**kwargs, num_inference_steps=request.steps,
                       generator=torch.Generator().manual_seed(int(request.seed) % (1 << 63)),
                       callback_on_step_end=watch.on_step_end, callback_on_step_end_tensor_inputs=["latents"],
                       output_type="pil")
    except TopiError:
        raise
    except ValueError as exc:  # the pipeline's own argument checks
        raise BadInput(f"{front.class_name}: {str(exc).strip().splitlines()[0]}") from None
    finally:
        watch.bar.close()
        for h in hooks:
            h.remove()
    elapsed = time.perf_counter() - start
    latents = None if watch.latents is None else watch.latents.detach().float().cpu()
    return PipelineRun(out.images[0], latents, elapsed, watch.transformer_s, watch.layouts)


def check_planned(shape, layouts, family) -> None:
    """Every transformer call had the planned grids (and no more text than planned): the front end's shape rules
    are the pipeline's."""
    want = shape.layout
    for lay in layouts:
        if lay is None:
            continue
        if lay.target_grid != want.target_grid or lay.ref_grids != want.ref_grids or lay.text_tokens > want.text_tokens:
            raise TopiError(f"the pipeline made {lay.describe()} but its front end planned {want.describe()}: the "
                            f"{family} front end (models/) does not match this diffusers version's resolution rules")


def latent_decoder(folder, *, required: bool = False):
    """(latents [1, N, C], grid) -> PIL image through a pipeline folder's VAE, as its pipeline decodes; None when
    the folder is not a pipeline with a front end or the front end's packages are missing (unless required)."""
    from topi_export.models import pipeline_index

    try:
        if pipeline_index(folder) is None:
            raise BadInput(f"--vae {folder}: not a diffusers pipeline folder (no model_index.json)")
        require_packages()
        front = open_front_end(folder)
        vae = front.load_vae()
    except (TopiError, ImportError, OSError):
        if required:
            raise
        return None

    def decode(latents, grid):
        with torch.inference_mode():
            return front.decode(vae, latents.float(), tuple(grid))

    return decode


def unmodified_transformer(front, dtype=None):
    """The pipeline folder's own transformer, loaded by its diffusers class (the reference of `edit --compare`)."""
    import diffusers

    entry = front.index.get("transformer") or [None, None]
    cls = getattr(diffusers, str(entry[1]), None)
    if cls is None:
        raise BadInput(f"{front.folder}/model_index.json names transformer class {entry[1]!r}, which diffusers "
                       f"does not have: re-save the pipeline")
    return cls.from_pretrained(front.folder / "transformer", dtype=dtype or torch.float32,
                               use_safetensors=True).eval()


def load_adapters(front, transformer, adapters) -> None:
    """LoRA adapters on the unmodified transformer, unfused and active at their scales (lora.attach)."""
    from topi_export.lora import attach
    from topi_export.models import family_named

    attach(family_named(front.family), transformer, adapters)


# --- encode: the tensors of the first transformer call --------------------------------------------------------
class _Stop(Exception):
    pass


class CaptureTransformer(torch.nn.Module):
    """Stands in for the transformer and records what the pipeline passes to it in the first step (each guidance
    branch's call, named by diffusers' cache_context), then stops the pipeline: no denoising, no decoding."""

    def __init__(self, config: dict, out_channels: int):
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        self.config = FrozenDict(config)
        self.out_channels = out_channels
        self.calls = []  # (branch name or None, kwargs)
        self._branch = None

    @property
    def dtype(self):
        return torch.float32

    @property
    def device(self):
        return torch.device("cpu")

    def cache_context(self, name, **kwargs):
        from contextlib import contextmanager

        @contextmanager
        def named():
            before, self._branch = self._branch, name
            try:
                yield
            finally:
                self._branch = before

        return named()

    def forward(self, *args, return_dict: bool = True, **kwargs):
        if args:
            kwargs.setdefault("hidden_states", args[0])
        if self.calls and self._branch in (None, "cond"):  # the second step begins: everything is recorded
            raise _Stop()
        self.calls.append((self._branch, {k: v for k, v in kwargs.items()}))
        h = kwargs["hidden_states"]
        out = torch.zeros(h.shape[0], h.shape[1], self.out_channels, dtype=h.dtype)
        return (out,) if not return_dict else type("Out", (), {"sample": out})()


def encode_request(front, request, *, dtype=None, progress: bool = True):
    """The pipeline's request tensors (artifacts/inputs.py): run it up to its first denoising step with a
    capturing transformer; the family parses each branch's call (parse_call) and the branch tensors are merged by
    the family's tensor specs (a branch-1 tensor takes the branch-0 tensor of the same graph input)."""
    import warnings

    from topi_export.models import _read_config, family_named, resolve_model_dir

    fam_cls = family_named(front.family)
    config = _read_config(resolve_model_dir(front.folder))
    family = fam_cls({k: v for k, v in config.items() if not k.startswith("_")})
    capture = CaptureTransformer(config, family.out_channels)
    pipe = front.load(transformer=capture, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            pipe(**front.call_kwargs(request), num_inference_steps=max(2, request.steps),
                 generator=torch.Generator().manual_seed(int(request.seed) % (1 << 63)), output_type="latent")
    except _Stop:
        pass
    except ValueError as exc:
        raise BadInput(f"{front.class_name}: {str(exc).strip().splitlines()[0]}") from None
    if not capture.calls:
        raise TopiError(f"{front.class_name} never called its transformer: nothing to encode")
    return merge_branches(family, capture.calls, front.request_scalars(request), front.class_name)


def merge_branches(family, calls, scalars: dict, source: str):
    """One request from the branch calls of one step: branch 0's tensors, each later branch's tensors under the
    names the family's specs give that branch, the first call's latents as the noise."""
    from topi_export.models.base import Family  # noqa: F401 - the contract parse_call follows

    names = {"cond": 0, "uncond": 1, None: 0}
    parsed = {}
    noise = None
    for branch, kwargs in calls:
        index = names.get(branch)
        if index is None:
            raise TopiError(f"{source} names a transformer call {branch!r}: not a guidance branch the front end knows")
        latents, _, data = family.parse_call(dict(kwargs))
        parsed.setdefault(index, data)
        if noise is None:
            noise = latents[:1].float().clone()
    first = parsed[0]
    tensors, merged_scalars = dict(first.tensors), {**first.scalars, **scalars}
    specs = family.tensor_specs()
    for index, data in parsed.items():
        if index == 0:
            continue
        branch_specs = [s for s in specs if s.branch == index]
        if not branch_specs:
            raise BadInput(f"this {source} call runs a second guidance branch, which a {family.name} inputs file "
                           f"cannot hold (one branch): turn the pipeline's guidance off for `encode` (e.g. "
                           f"--guidance 1) or run `edit`")
        for s in branch_specs:
            twin = next((t for t in specs if t.branch == 0 and t.graph == s.graph and t.role == s.role), None)
            if twin is not None and twin.name in data.tensors:
                tensors[s.name] = data.tensors[twin.name]
    from dataclasses import replace

    out = replace(first, tensors=tensors, scalars=merged_scalars, noise=noise, source=source)
    return out.with_layout(out.layout.with_text_tokens(family.text_tokens(out)))
