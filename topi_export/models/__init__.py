"""Model registry: ``load_model`` turns ``--model`` (a built-in name or a local diffusers folder) into an
adapter. Adding an architecture = one adapter class + one line in ADAPTERS."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from topi_export.errors import TopiError
from topi_export.models.flux_kontext import FluxKontextAdapter, Layout, kontext_ids, mid_config, tiny_config  # noqa: F401

ADAPTERS = {"FluxTransformer2DModel": FluxKontextAdapter}
ASSETS = Path(__file__).resolve().parent.parent / "assets"
# Built-in models: name -> folder under assets/ (trained, shipped) or None (seeded, built in memory).
BUILTINS = {"tiny-kontext": None, "mid-kontext": None, "kontext-digits": ASSETS / "kontext-digits"}
IN_MEMORY = {"tiny-kontext": tiny_config, "mid-kontext": mid_config}
DEFAULT_MODEL = "kontext-digits" if (ASSETS / "kontext-digits" / "config.json").exists() else "tiny-kontext"


@dataclass
class LoadedModel:
    adapter: FluxKontextAdapter
    source: str
    config_hash: str
    weights_hash: str

    def identity(self) -> dict:
        a = self.adapter
        return {"source": self.source, "class": a.model_class, "adapter": a.name, "config_hash": self.config_hash,
                "weights_hash": self.weights_hash, "num_layers": a.num_layers, "num_double": a.num_double}


def config_hash(config) -> str:
    keep = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    blob = json.dumps(keep, sort_keys=True, default=list).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def files_hash(folder: Path) -> str:
    """Weights identity of a saved model: its safetensors files, streamed (no tensor conversion at start-up)."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def weights_hash(model: torch.nn.Module) -> str:
    """Weights identity of an in-memory model (the seeded built-ins)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().cpu().float().numpy().tobytes())
    return h.hexdigest()[:16]


def build_builtin(name: str = "tiny-kontext"):
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return FluxTransformer2DModel(**IN_MEMORY[name]())


def _resolve_dir(path: Path) -> Path:
    if (path / "transformer" / "config.json").exists():
        return path / "transformer"
    if (path / "config.json").exists():
        return path
    raise TopiError(f"model folder {path} has no config.json (nor transformer/config.json): pass a diffusers "
                    f"transformer folder, a pipeline folder, or one of {', '.join(BUILTINS)}")


def _load_dir(path: Path):
    folder = _resolve_dir(path)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TopiError(f"cannot read {folder / 'config.json'} ({exc}): re-save the model with save_pretrained")
    cls_name = config.get("_class_name")
    if cls_name not in ADAPTERS:
        raise TopiError(f"unsupported model class {cls_name!r} in {folder}: supported classes are "
                        f"{', '.join(sorted(ADAPTERS))}")
    if not any(f.endswith(".safetensors") for f in os.listdir(folder)):
        raise TopiError(f"no .safetensors weights in {folder}: topi-export loads safetensors only "
                        f"(save with save_pretrained(..., safe_serialization=True))")
    import diffusers

    cls = getattr(diffusers, cls_name)
    try:
        return cls.from_pretrained(folder, use_safetensors=True, torch_dtype=torch.float32, low_cpu_mem_usage=False)
    except Exception as exc:  # corrupt or truncated weights
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TopiError(f"cannot load weights from {folder}: {first}: re-save the model with save_pretrained")


def load_model(spec: str | os.PathLike | None = None) -> LoadedModel:
    spec = str(spec or DEFAULT_MODEL)
    if spec in IN_MEMORY:
        model = build_builtin(spec)
        w_hash = weights_hash(model)
    else:
        path = BUILTINS.get(spec) or Path(spec)
        path = Path(path)
        if not path.exists():
            raise TopiError(f"model {spec!r} not found: pass a local diffusers folder or one of "
                            f"{', '.join(n for n in BUILTINS if BUILTINS[n] is None or BUILTINS[n].exists())}")
        model = _load_dir(path)
        w_hash = files_hash(_resolve_dir(path))
    cls_name = type(model).__name__
    if cls_name not in ADAPTERS:
        raise TopiError(f"unsupported model class {cls_name!r}: supported classes are {', '.join(sorted(ADAPTERS))}")
    model.requires_grad_(False)
    adapter = ADAPTERS[cls_name](model)
    return LoadedModel(adapter, spec, config_hash(model.config), w_hash)
