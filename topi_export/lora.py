"""LoRA adapters (README, "LoRA"): ``--lora FILE[:SCALE]`` files are read by the family's own diffusers LoRA loader
(``Family.lora_loader``, a diffusers loader mixin, which also converts the common non-diffusers formats), set
to their scales and fused into the transformer's weights with peft, so every backend runs plain weights: no LoRA op
in any graph. The model identity keeps the base weights' hash and adds each adapter's file name, sha256 and scale
(plan/manifest.py ModelIdentity.adapters); `refit` (commands/refit.py) swaps adapters without re-exporting."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

from topi_export.errors import BackendUnavailable, BadInput

EXTRA_HINT = "pip install 'topi-export[lora]'"
MAX_SCALE = 100.0


@dataclass(frozen=True)
class Adapter:
    path: str
    scale: float = 1.0
    sha256: str = ""

    @property
    def name(self) -> str:
        return Path(self.path).name

    def flag(self) -> str:
        return f"{self.path}:{self.scale:g}"

    def describe(self) -> str:
        return f"{self.name} x{self.scale:g}"

    def to_json(self) -> dict:
        return {"file": self.name, "sha256": self.sha256, "scale": self.scale}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def parse_adapter(text: str) -> Adapter:
    """'FILE' or 'FILE:SCALE' -> Adapter (hashed). A ':' whose tail is not a number belongs to the path."""
    text = str(text)
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
            path = head
        except ValueError:
            pass
    if not math.isfinite(scale) or abs(scale) > MAX_SCALE:
        raise BadInput(f"--lora {text}: scale {scale} is outside -{MAX_SCALE:g}..{MAX_SCALE:g}")
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"--lora {text}: no such file {path} (write FILE or FILE:SCALE, e.g. style.safetensors:0.8)")
    if p.suffix != ".safetensors":
        raise BadInput(f"--lora {text}: topi-export reads adapters from .safetensors files only (pickled .bin files "
                       f"can run code): convert it with safetensors")
    return Adapter(str(p), scale, _sha256(p))


def parse_adapters(texts) -> tuple[Adapter, ...]:
    adapters = tuple(parse_adapter(t) for t in texts or ())
    shas = [a.sha256 for a in adapters]
    if len(set(shas)) != len(shas):
        raise BadInput("the same LoRA file is given twice: give it once with the sum of its scales")
    return adapters


def same_adapters(adapters, recorded) -> bool:
    """Adapters given now against those an engine directory records (sha256 and scale, in order)."""
    return [(a.sha256, float(a.scale)) for a in adapters] == [(r.get("sha256"), float(r.get("scale", 0.0)))
                                                              for r in recorded]


def describe_recorded(recorded) -> str:
    return ", ".join(f"{r.get('file')} x{float(r.get('scale', 1.0)):g}" for r in recorded) or "none"


def require_peft() -> None:
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise BackendUnavailable(f"--lora fuses adapters with peft, which is not installed: {EXTRA_HINT}")


def _loader(family):
    import diffusers.loaders

    name = getattr(family, "lora_loader", None)
    cls = getattr(diffusers.loaders, name, None) if name else None
    if cls is None:
        raise BadInput(f"{family.name} declares no diffusers LoRA loader: LoRA is not supported for this family")

    class TransformerOnly(cls):
        """The loader mixin on the transformer alone (no pipeline, no text encoders: the adapters' text-encoder
        parts, if any, are not used by the engines)."""

        hf_device_map = None

        def __init__(self, transformer):
            self.transformer = transformer
            self.text_encoder = None
            self.components = {"transformer": transformer}

    return TransformerOnly


def fuse(family, model, adapters) -> set[str]:
    """Load every adapter into the diffusers transformer `model` at its scale and fuse them into its weights
    (peft); afterwards the model has plain modules and the fused weights. Returns the parameters that changed."""
    import torch

    if not adapters:
        return set()
    names = attach(family, model, adapters)
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [n for n, mod in model.named_modules() if isinstance(mod, BaseTunerLayer)]
    before = {f"{n}.{p}": t.detach().clone() for n in layers
              for p, t in model.get_submodule(n).get_base_layer().named_parameters(recurse=False)}
    model.fuse_lora(lora_scale=1.0, adapter_names=names)
    model.unload_lora()
    state = model.state_dict()
    return {k for k, t in before.items() if k in state and not torch.equal(state[k], t)}


def attach(family, model, adapters) -> list[str]:
    """Load every adapter into the diffusers transformer `model`, active at its scale, unfused (peft layers): the
    reference a diffusers user runs. Only the transformer's part of a LoRA file is used (the engines hold the
    transformer; a file's text-encoder layers, if any, are not applied). Returns the adapter names."""
    import logging
    import warnings

    require_peft()
    holder = _loader(family)(model)
    names = []
    for i, a in enumerate(adapters):
        name = f"topi_lora_{i}"
        quiet = logging.getLogger("diffusers")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # "no LoRA keys for the text encoder" is expected here
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                holder.load_lora_weights(a.path, adapter_name=name)
        except Exception as exc:  # noqa: BLE001 - any loader failure is this file's problem
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise BadInput(f"--lora {a.path}: the {family.name} LoRA loader cannot use it ({first}): pass a LoRA "
                           f"trained for this model") from None
        finally:
            quiet.setLevel(level)
        if not getattr(model, "peft_config", None) or name not in model.peft_config:
            raise BadInput(f"--lora {a.path}: no layer of this {family.name} transformer matched the file: pass a "
                           f"LoRA trained for this model")
        names.append(name)
    model.set_adapters(names, weights=[float(a.scale) for a in adapters])
    return names
