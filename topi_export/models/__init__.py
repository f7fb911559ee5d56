"""Model-family registry and ``load_model``: turns ``--model`` (a built-in name or a local diffusers folder) into a
family adapter. Adding a family = one adapter module (models/base.py contract, exporting ``FAMILY``) + one line in
FAMILY_MODULES."""
from __future__ import annotations

import hashlib
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from topi_export.errors import TopiError
from topi_export.models.base import Family
from topi_export.plan import ModelIdentity
from topi_export.plan.manifest import config_digest
from topi_export.resources import resource

FAMILY_MODULES = [
    "topi_export.models.flux_kontext",
    "topi_export.models.flux2",
    "topi_export.models.qwen_edit",
]
ASSETS = resource("assets")
# Trained built-in models shipped as diffusers folders under assets/ (name -> folder name).
ASSET_MODELS = {"kontext-digits": "kontext-digits", "flux2-pick": "flux2-pick",
                "kontext-canvas": "kontext-canvas",  # relevance inside one reference; held out from policy tuning
                "kontext-texture": "kontext-texture",  # random detail: curved trajectories
                "kontext-mottle": "kontext-mottle"}  # mid-schedule random detail; held out from step-reuse tuning
DEFAULT_MODEL = "flux2-pick"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def families() -> list[type[Family]]:
    return [importlib.import_module(m).FAMILY for m in FAMILY_MODULES]


def family_named(name: str) -> type[Family]:
    for fam in families():
        if fam.name == name:
            return fam
    raise TopiError(f"unknown model family {name!r}: this topi-export serves {', '.join(f.name for f in families())}")


def family_for_class(cls_name: str) -> type[Family]:
    for fam in families():
        if cls_name in fam.model_classes:
            return fam
    served = sorted(c for f in families() for c in f.model_classes)
    raise TopiError(f"unsupported model class {cls_name!r}: supported classes are {', '.join(served)}")


def pipeline_index(path) -> dict | None:
    """A diffusers pipeline folder's model_index.json (None: not a pipeline folder)."""
    from topi_export.fsutil import read_json_file

    index = Path(str(path)) / "model_index.json"
    if not os.path.lexists(index):
        return None
    data = read_json_file(index, "pipeline index", "re-save the pipeline with save_pretrained", follow_symlinks=True)
    if not isinstance(data, dict) or not isinstance(data.get("_class_name"), str):
        raise TopiError(f"{index} names no pipeline class (_class_name): re-save the pipeline with save_pretrained")
    return data


def front_end_for(path):
    """The family front end (models/frontend.py) that drives the diffusers pipeline in folder `path`."""
    index = pipeline_index(path)
    if index is None:
        raise TopiError(f"{path} is not a diffusers pipeline folder (no model_index.json): pass the folder a "
                        f"pipeline was saved to with save_pretrained")
    name = index["_class_name"]
    for fam in families():
        if name in fam.pipelines and fam.front_end:
            return importlib.import_module(fam.front_end).FRONT_END(Path(str(path)), index)
    served = sorted(p for f in families() if f.front_end for p in f.pipelines)
    raise TopiError(f"{path} holds a {name}, which topi-export does not drive: pipelines with a front end are "
                    f"{', '.join(served)}")


def builtin_names() -> list[str]:
    names = [n for f in families() for n in f.builtins]
    return names + [n for n, folder in ASSET_MODELS.items() if (ASSETS / folder / "config.json").exists()]


def adapter_for(identity: ModelIdentity, kv_model: bool = False) -> Family:
    """A weightless adapter from a manifest's identity: enough for conditioning, layouts and schedulers."""
    return family_named(identity.family)(identity.config, kv_model=kv_model)


def pipeline_class(spec) -> str | None:
    """The ``_class_name`` of a pipeline folder's model_index.json, when --model is one."""
    from topi_export.fsutil import read_json_file

    path = Path(str(spec)) / "model_index.json"
    if not os.path.lexists(path):
        return None
    index = read_json_file(path, "pipeline index", "fix or remove the pipeline's model_index.json",
                           follow_symlinks=True)
    return index.get("_class_name") if isinstance(index, dict) else None


@dataclass
class LoadedModel:
    family: Family
    source: str
    config_hash: str
    weights_hash: str
    model_class: str
    dtype: str = "fp32"
    adapters: tuple = ()  # lora.Adapter fused into the weights
    fused_params: frozenset = frozenset()  # the parameters the adapters changed

    @property
    def adapter(self) -> Family:
        return self.family

    def identity(self) -> ModelIdentity:
        f = self.family
        return ModelIdentity(self.source, f.name, self.model_class, self.config_hash, self.weights_hash, f.num_layers,
                             dict(f.config), tuple(a.to_json() for a in self.adapters))


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
    """Weights identity of an in-memory model (the seeded built-ins), independent of the load dtype."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().cpu().float().numpy().tobytes())
    return h.hexdigest()[:16]


def resolve_model_dir(path: Path) -> Path:
    if (path / "transformer" / "config.json").exists():
        return path / "transformer"
    if (path / "config.json").exists():
        return path
    raise TopiError(f"model folder {path} has no config.json (nor transformer/config.json): pass a diffusers "
                    f"transformer folder, a pipeline folder, or one of {', '.join(builtin_names())}")


def scheduler_config_for(spec) -> dict | None:
    """A pipeline folder's scheduler/scheduler_config.json, when --model is one."""
    from topi_export.fsutil import read_json_file

    path = Path(str(spec)) / "scheduler" / "scheduler_config.json"
    if not os.path.lexists(path):
        return None
    config = read_json_file(path, "scheduler config", "fix or remove the pipeline's scheduler config",
                            follow_symlinks=True)  # Hugging Face snapshots link to their blobs
    if not isinstance(config, dict):
        raise TopiError(f"{path} is not a JSON object: fix or remove the pipeline's scheduler config")
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _read_config(folder: Path) -> dict:
    from topi_export.fsutil import read_json_file

    config = read_json_file(folder / "config.json", "model config", "re-save the model with save_pretrained",
                            follow_symlinks=True)  # Hugging Face snapshots link to their blobs
    if not isinstance(config, dict):
        raise TopiError(f"{folder / 'config.json'} is not a JSON object: re-save the model with save_pretrained")
    return config


def _check_config(cls, config: dict, folder) -> None:
    """Refuse configs whose sizes are nonsense before diffusers builds them (it would drop checkpoint tensors)."""
    for key in ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim", "in_channels"):
        v = config.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "num_single_layers" else 1)):
            raise TopiError(f"{folder / 'config.json'}: '{key}' is {v!r}, not a valid size: re-save the model with "
                            f"save_pretrained")


def _load_dir(path: Path, dtype: torch.dtype):
    folder = resolve_model_dir(path)
    config = _read_config(folder)
    cls_name = config.get("_class_name")
    fam = family_for_class(str(cls_name))
    _check_config(cls_name, config, folder)
    if not any(f.endswith(".safetensors") for f in os.listdir(folder)):
        raise TopiError(f"no .safetensors weights in {folder}: topi-export loads safetensors only "
                        f"(save with save_pretrained(..., safe_serialization=True))")
    cls = fam.model_class()
    try:
        return cls.from_pretrained(folder, use_safetensors=True, torch_dtype=dtype, low_cpu_mem_usage=True), folder
    except Exception as exc:  # corrupt or truncated weights
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TopiError(f"cannot load weights from {folder}: {first}: re-save the model with save_pretrained")


def build_builtin(name: str, dtype: torch.dtype = torch.float32):
    for fam in families():
        if name in fam.builtins:
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model = fam.model_class()(**fam.builtins[name]())
            return model if dtype == torch.float32 else torch.nn.Module.to(model, dtype)
    raise KeyError(name)


def load_model(spec: str | os.PathLike | None = None, dtype: str = "fp32", adapters=(),
               kv_model: bool | None = None) -> LoadedModel:
    """A built-in name or a local diffusers folder -> LoadedModel (family adapter around the model, identity).
    dtype: the precision the weights are held in (fp32 for the CPU reference; bf16/fp16 builds never hold an
    fp32 copy). adapters: lora.Adapter to fuse into the weights (the identity keeps the base weights' hash and
    records them). kv_model: run the model with its family's reference-K/V-cache attention (a KV-trained model);
    None: when --model is a pipeline folder of one of the family's ``kv_pipelines``."""
    if dtype not in DTYPES:
        raise TopiError(f"precision {dtype!r}: choose one of {', '.join(DTYPES)}")
    spec = str(spec or DEFAULT_MODEL)
    torch_dtype = DTYPES[dtype]
    in_memory = {n for f in families() for n in f.builtins}
    if spec in in_memory:
        model = build_builtin(spec, torch.float32)
        w_hash = weights_hash(model)
        if torch_dtype != torch.float32:
            model = torch.nn.Module.to(model, torch_dtype)  # seeded built-ins keep no fp32 modules
    else:
        folder = ASSET_MODELS.get(spec)
        path = ASSETS / folder if folder else Path(spec)
        if not path.exists():
            raise TopiError(f"model {spec!r} not found: pass a local diffusers folder or one of "
                            f"{', '.join(builtin_names())}")
        model, weights_dir = _load_dir(path, torch_dtype)
        w_hash = files_hash(weights_dir)
    cls_name = type(model).__name__
    fam = family_for_class(cls_name)
    fused = set()
    if adapters:
        from topi_export.lora import fuse

        fused = fuse(fam, model, adapters)
    model.requires_grad_(False)
    if kv_model is None:
        kv_model = pipeline_class(spec) in fam.kv_pipelines if fam.kv_pipelines else False
    family = fam(dict(model.config), model, kv_model=kv_model)
    return LoadedModel(family, spec, config_digest(model.config, type(model)), w_hash, cls_name, dtype,
                       tuple(adapters), frozenset(fused))
