"""The inputs file of ``run`` / ``bench`` / Triton: safetensors with reference_latents [1,Nc,C],
prompt_embeds [1,T,D], pooled_prompt_embeds [1,P], optional noise [1,Nx,C], guidance [1],
target_latents [1,Nx,C] (ground truth, for benchmarks); metadata target_grid / reference_grid "HxW"."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from topi_export.errors import TopiError
from topi_export.models import Layout

REQUIRED = {"reference_latents": 3, "prompt_embeds": 3, "pooled_prompt_embeds": 2}
OPTIONAL = {"noise": 3, "guidance": 1, "target_latents": 3}
DEFAULT_GUIDANCE = 2.5  # FluxKontextPipeline's default guidance_scale


@dataclass
class Inputs:
    reference_latents: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    layout: Layout
    noise: torch.Tensor | None = None
    guidance: torch.Tensor | None = None
    target_latents: torch.Tensor | None = None
    source: str = "synthetic"

    def initial_noise(self, seed: int) -> torch.Tensor:
        if self.noise is not None:
            return self.noise.clone()
        gen = torch.Generator().manual_seed(seed)
        c = self.reference_latents.shape[-1]
        return torch.randn(1, self.layout.num_target, c, generator=gen)

    def guidance_tensor(self) -> torch.Tensor:
        return self.guidance if self.guidance is not None else torch.tensor([DEFAULT_GUIDANCE])

    def with_grid(self, target_grid=None) -> "Inputs":
        return replace(self, layout=replace(self.layout, target_grid=target_grid or self.layout.target_grid))


def parse_grid(text: str, what: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in str(text).lower().split("x"))
        if h > 0 and w > 0:
            return h, w
    except ValueError:
        pass
    raise TopiError(f"bad {what} {text!r}: write it as HxW in tokens, e.g. 32x32")


def _square(n: int, what: str) -> tuple[int, int]:
    side = math.isqrt(n)
    if side * side != n:
        raise TopiError(f"{what} has {n} tokens, not a square: add the metadata key "
                        f"'{'target_grid' if what == 'target' else 'reference_grid'}' = 'HxW' to the inputs file")
    return side, side


def load_inputs(path, adapter=None) -> Inputs:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise TopiError(f"inputs file {path} not found: pass a .safetensors file with reference_latents, "
                        f"prompt_embeds and pooled_prompt_embeds")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise TopiError(f"cannot read inputs file {path} ({type(exc).__name__}): it is not a valid safetensors "
                        f"file; re-save it with safetensors.torch.save_file")
    for name, rank in {**REQUIRED, **OPTIONAL}.items():
        if name not in tensors:
            if name in REQUIRED:
                raise TopiError(f"inputs file {path} has no tensor '{name}': it needs "
                                f"{', '.join(REQUIRED)} (see README, inputs file)")
            continue
        t = tensors[name]
        if t.dim() != rank:
            raise TopiError(f"'{name}' in {path} has shape {list(t.shape)}, expected rank {rank} "
                            f"({'[1, N, C]' if rank == 3 else '[1, P]' if rank == 2 else '[1]'})")
        if t.shape[0] != 1:
            raise TopiError(f"'{name}' in {path} has batch {t.shape[0]}: topi-export runs batch 1 per request")
        if not torch.isfinite(t.float()).all():
            raise TopiError(f"'{name}' in {path} contains NaN or Inf: regenerate the inputs file")
        tensors[name] = t.float()
    ref, noise = tensors["reference_latents"], tensors.get("noise")
    target = tensors.get("target_latents")
    num_target = (noise if noise is not None else target if target is not None else ref).shape[1]
    for name in ("noise", "target_latents"):
        if name in tensors and tensors[name].shape[-1] != ref.shape[-1]:
            raise TopiError(f"'{name}' has {tensors[name].shape[-1]} channels but reference_latents has "
                            f"{ref.shape[-1]}: both are packed latents of the same model")
        if name in tensors and tensors[name].shape[1] != num_target:
            raise TopiError(f"'{name}' has {tensors[name].shape[1]} tokens, expected {num_target} target tokens")
    target_grid = parse_grid(meta["target_grid"], "target_grid") if "target_grid" in meta else _square(num_target, "target")
    ref_grid = parse_grid(meta["reference_grid"], "reference_grid") if "reference_grid" in meta else _square(ref.shape[1], "reference")
    if target_grid[0] * target_grid[1] != num_target:
        raise TopiError(f"target_grid {target_grid} does not match {num_target} target tokens: fix the metadata")
    if ref_grid[0] * ref_grid[1] != ref.shape[1]:
        raise TopiError(f"reference_grid {ref_grid} does not match {ref.shape[1]} reference tokens: fix the metadata")
    inputs = Inputs(ref, tensors["prompt_embeds"], tensors["pooled_prompt_embeds"],
                    Layout(tensors["prompt_embeds"].shape[1], target_grid, ref_grid),
                    noise=noise, guidance=tensors.get("guidance"), target_latents=target, source=str(path))
    if adapter is not None:
        check_inputs(inputs, adapter)
    return inputs


def check_inputs(inputs: Inputs, adapter) -> None:
    checks = [("reference_latents", inputs.reference_latents.shape[-1], adapter.in_channels, "channels"),
              ("prompt_embeds", inputs.prompt_embeds.shape[-1], adapter.text_dim, "features"),
              ("pooled_prompt_embeds", inputs.pooled_prompt_embeds.shape[-1], adapter.pooled_dim, "features")]
    for name, got, want, unit in checks:
        if got != want:
            raise TopiError(f"'{name}' has {got} {unit} but the model expects {want}: the inputs were made for "
                            f"another model")


def synthetic_inputs(adapter, seed: int = 0, target_grid=(8, 8), ref_grid=None, text_tokens: int = 8) -> Inputs:
    """Seeded random conditioning: lets ``run`` work with no inputs file (smoke tests, benchmarks)."""
    ref_grid = ref_grid or target_grid
    gen = torch.Generator().manual_seed(seed)
    nc = ref_grid[0] * ref_grid[1]
    return Inputs(torch.randn(1, nc, adapter.in_channels, generator=gen),
                  torch.randn(1, text_tokens, adapter.text_dim, generator=gen),
                  torch.randn(1, adapter.pooled_dim, generator=gen),
                  Layout(text_tokens, tuple(target_grid), tuple(ref_grid)), source=f"synthetic(seed={seed})")


def default_inputs(model_source: str, adapter, seed: int = 0) -> Inputs:
    """The embedded model's first held-out sample if it ships one, else a seeded synthetic input."""
    from topi_export.models import BUILTINS

    folder = BUILTINS.get(model_source)
    sample = folder / "samples" / "sample_0.safetensors" if folder else None
    if sample is not None and sample.exists():
        return load_inputs(sample, adapter)
    return synthetic_inputs(adapter, seed)
