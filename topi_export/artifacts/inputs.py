"""The inputs file of ``run`` / ``bench`` / ``calibrate`` / Triton: safetensors holding

    reference_latents [1, sum of Nc_i, C]   every reference's packed latents, concatenated in order (required)
    <family tensors>                        declared by the family's tensor_specs (plan/tensors.py): text
                                            embeddings [1, T, D], masks [1, T] (bool, integer or float 0/1),
                                            pooled embeddings [1, P], scalars [1] (or as string metadata)
    noise [1, Nx, C]                        initial latents (optional; seeded otherwise)
    target_latents [1, Nx, C]               ground truth for benchmarks (optional)

and string metadata ``target_grid`` = "HxW" and ``reference_grids`` = "HxW,HxW,..." (``reference_grid`` for one
reference). Without grids, square grids are assumed for the target and a single reference."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from topi_export.errors import BadInput
from topi_export.plan import Layout, parse_grid, parse_grids
from topi_export.request import Inputs

LATENTS = {"reference_latents": True, "noise": False, "target_latents": False}
GRID_KEYS = ("target_grid", "reference_grid", "reference_grids")


def _square(n: int, what: str, key: str) -> tuple[int, int]:
    side = math.isqrt(n)
    if side * side != n:
        raise BadInput(f"{what} has {n} tokens, not a square: add the metadata key '{key}' = 'HxW' to the inputs file")
    return side, side


def _check_tensor(name, t, rank, where, mask=False):
    if t.dim() != rank:
        raise BadInput(f"'{name}' in {where} has shape {list(t.shape)}, expected rank {rank}")
    if t.shape[0] != 1:
        raise BadInput(f"'{name}' in {where} has batch {t.shape[0]}: topi-export runs batch 1 per request")
    if mask:  # the pipelines' text encoders return int64 masks; bool and float 0/1 are as good
        if t.is_complex():
            raise BadInput(f"mask '{name}' in {where} is complex: save the attention mask (1 = token, 0 = padding)")
        t = t.float()
    elif not t.is_floating_point():
        raise BadInput(f"'{name}' in {where} has dtype {str(t.dtype).replace('torch.', '')}, expected a float tensor: "
                       f"re-save it as float32")
    if not torch.isfinite(t.float()).all():
        raise BadInput(f"'{name}' in {where} contains NaN or Inf: regenerate the inputs file")
    return t.float()


def _scalar(spec, tensors, meta, where):
    name = spec.name
    if name in tensors:
        t = tensors[name]
        if t.numel() != 1 or not t.is_floating_point():
            raise BadInput(f"'{name}' in {where} must be one float value, got shape {list(t.shape)} {t.dtype}")
        v = float(t.reshape(-1)[0])
    elif name in meta:
        try:
            v = float(meta[name])
        except ValueError:
            raise BadInput(f"metadata '{name}' in {where} is {meta[name]!r}, not a number") from None
    else:
        return None
    lo, hi = spec.bounds
    if not math.isfinite(v) or not lo <= v <= hi:
        raise BadInput(f"'{name}' in {where} is {v}, outside {lo:g}..{hi:g}")
    return v


def inputs_from_tensors(tensors: dict, meta: dict, family, source: str = "request") -> Inputs:
    """Validate named tensors (+ string metadata) against the family's tensor specs -> Inputs."""
    where = source
    for name, required in LATENTS.items():
        if name not in tensors:
            if required:
                raise BadInput(f"{where} has no tensor '{name}': see README, inputs file")
            continue
        tensors[name] = _check_tensor(name, tensors[name], 3, where)
    specs = family.tensor_specs()
    extra, scalars = {}, {}
    for s in specs:
        if s.role == "scalar":
            v = _scalar(s, tensors, meta, where)
            if v is not None:
                scalars[s.name] = v
        elif s.name in tensors:
            extra[s.name] = _check_tensor(s.name, tensors[s.name], s.rank, where, mask=s.role == "mask")
        elif s.required:
            need = ", ".join(["reference_latents"] + [r.name for r in specs if r.required])
            raise BadInput(f"{where} has no tensor '{s.name}': {family.name} needs {need} (see README, inputs file)")
    ref = tensors["reference_latents"]
    noise, target = tensors.get("noise"), tensors.get("target_latents")
    num_target = (noise if noise is not None else target if target is not None else None)
    for name in ("noise", "target_latents"):
        t = tensors.get(name)
        if t is not None and t.shape[-1] != ref.shape[-1]:
            raise BadInput(f"'{name}' has {t.shape[-1]} channels but reference_latents has {ref.shape[-1]}: both are "
                           f"packed latents of the same model")
    if noise is not None and target is not None and noise.shape[1] != target.shape[1]:
        raise BadInput(f"'target_latents' has {target.shape[1]} tokens but 'noise' has {noise.shape[1]}")
    if ref.shape[1] < 1:
        raise BadInput(f"'reference_latents' in {where} has no tokens: give at least one reference")
    if "reference_grids" in meta:
        ref_grids = parse_grids(meta["reference_grids"], "reference_grids")
    elif "reference_grid" in meta:
        ref_grids = (parse_grid(meta["reference_grid"], "reference_grid"),)
    else:
        ref_grids = (_square(ref.shape[1], "the reference", "reference_grids"),)
    if sum(h * w for h, w in ref_grids) != ref.shape[1]:
        raise BadInput(f"reference grids {','.join(f'{h}x{w}' for h, w in ref_grids)} hold "
                       f"{sum(h * w for h, w in ref_grids)} tokens but reference_latents has {ref.shape[1]}: fix the "
                       f"metadata")
    if "target_grid" in meta:
        target_grid = parse_grid(meta["target_grid"], "target_grid")
    elif num_target is not None:
        target_grid = _square(num_target.shape[1], "the target", "target_grid")
    else:
        target_grid = ref_grids[0]
    if num_target is not None and target_grid[0] * target_grid[1] != num_target.shape[1]:
        raise BadInput(f"target_grid {target_grid[0]}x{target_grid[1]} does not match {num_target.shape[1]} target "
                       f"tokens: fix the metadata")
    declared = {s.name for s in specs}
    inputs = Inputs(Layout(1, target_grid, ref_grids), ref, extra, scalars, noise=noise, target_latents=target,
                    source=source, meta={k: v for k, v in meta.items() if k not in GRID_KEYS and k not in declared})
    inputs = inputs.with_layout(inputs.layout.with_text_tokens(family.text_tokens(inputs)))
    family.check_inputs(inputs)
    return inputs


# A request's tensors are at most this large: checked from the file's header, before any tensor is read (an
# inputs file of [1, 2^26, 16] reference latents would otherwise take 12 GB before its grid is refused).
MAX_ELEMENTS = 1 << 28


def load_inputs(path, family) -> Inputs:
    import os
    import stat

    from safetensors import safe_open

    from topi_export.plan.layout import MAX_TOKENS

    path = Path(path)
    try:
        st = os.stat(path)
    except OSError:
        raise BadInput(f"inputs file {path} not found: pass a .safetensors file with reference_latents and the "
                       f"model's conditioning tensors (README, inputs file)") from None
    if not stat.S_ISREG(st.st_mode):
        raise BadInput(f"inputs file {path} is not a regular file (a directory, FIFO or device): pass a .safetensors "
                       f"file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            for k, shape in shapes.items():
                n = math.prod(shape)
                if n > MAX_ELEMENTS or (k in LATENTS and len(shape) == 3 and shape[1] > MAX_TOKENS):
                    raise BadInput(f"'{k}' in {path} has shape {list(shape)}: more than a request can hold (at most "
                                   f"{MAX_TOKENS} tokens of latents, {MAX_ELEMENTS} values per tensor)")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except BadInput:
        raise
    except Exception as exc:  # noqa: BLE001 - anything unreadable is the same user error
        raise BadInput(f"cannot read inputs file {path} ({type(exc).__name__}): it is not a valid safetensors file; "
                       f"re-save it with safetensors.torch.save_file") from None
    return inputs_from_tensors(tensors, meta, family, source=str(path))


def save_inputs(path, inputs: Inputs) -> None:
    """Write an inputs file (atomically) that load_inputs reads back identically."""
    from safetensors.torch import save

    from topi_export.fsutil import atomic_write_bytes
    from topi_export.plan import grid_text

    tensors = {"reference_latents": inputs.reference_latents, **inputs.tensors}
    for name in ("noise", "target_latents"):
        if getattr(inputs, name) is not None:
            tensors[name] = getattr(inputs, name)
    for name, value in inputs.scalars.items():
        tensors[name] = torch.tensor([float(value)])
    meta = {"target_grid": grid_text(inputs.layout.target_grid),
            "reference_grids": ",".join(grid_text(g) for g in inputs.layout.ref_grids),
            **{k: str(v) for k, v in inputs.meta.items()}}
    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))


def sample_files(source: str) -> list[Path]:
    """The held-out samples shipped with a built-in trained model (none for other models)."""
    from topi_export.models import ASSET_MODELS, ASSETS

    folder = ASSET_MODELS.get(str(source))
    if not folder:
        return []
    return sorted((ASSETS / folder / "samples").glob("sample_*.safetensors"), key=lambda p: int(p.stem.split("_")[-1]))


def default_inputs(source: str, family, seed: int = 0, layout: Layout | None = None) -> Inputs:
    """The built-in model's first held-out sample (when it matches `layout`), else seeded synthetic inputs."""
    files = sample_files(source)
    if files:
        data = load_inputs(files[0], family)
        if layout is None or data.layout == layout:
            return data
    layout = layout or Layout(family.text_tokens_default, (8, 8), ((8, 8),))
    return family.synthetic_inputs(layout, seed)
