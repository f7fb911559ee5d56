"""The denoising loop of FluxKontextPipeline (FlowMatchEulerDiscreteScheduler, sigmas linspace(1, 1/N, N),
dynamic shift mu from the target token count, transformer timestep = t / 1000), driven by the ToPi plan."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from topi_export.errors import TopiError
from topi_export.method import Selector, make_plan

SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def calculate_shift(num_target: int) -> float:
    """FluxKontextPipeline's calculate_shift: the dynamic time shift mu for this many target tokens."""
    c = SCHEDULER_CONFIG
    m = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
    return num_target * m + c["base_shift"] - m * c["base_image_seq_len"]


def make_scheduler(steps: int, num_target: int):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=calculate_shift(num_target))
    sched.set_begin_index(0)
    return sched


@dataclass
class RunResult:
    latents: torch.Tensor
    schedule: list = field(default_factory=list)
    time_s: float = 0.0
    kept: dict = field(default_factory=dict)  # anchor step -> kept context indices (None = all)


def _progress(total, desc, enabled):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, unit="step")


def denoise(engine, inputs, *, steps: int, seed: int = 0, selector: Selector | None = None,
            update_interval: int = 10, progress: bool = False, desc: str = "topi") -> RunResult:
    """selector None = the unpruned baseline (every step full). Otherwise the ToPi schedule."""
    engine.bind(inputs)
    latents = inputs.initial_noise(seed)
    sched = make_scheduler(steps, inputs.layout.num_target)
    plan = make_plan(steps, update_interval)
    keep_idx, ratio, keep = None, 0.0, inputs.layout.num_ctx
    records, kept = [], {}
    start = time.perf_counter()
    with torch.inference_mode(), _progress(steps, desc, progress) as bar:
        for sp, t in zip(plan, sched.timesteps):
            timestep = (t / 1000).reshape(1).to(torch.float32)
            t0 = time.perf_counter()
            if selector is None:
                kind = "full"
                velocity = engine.full(latents, timestep)
            elif sp.kind == "anchor":
                kind = "anchor"
                velocity, influence = engine.anchor(latents, timestep)
                if not torch.isfinite(influence).all():
                    raise TopiError(f"influence at step {sp.step} is not finite: the model produced NaN/Inf; "
                                    f"check the inputs and weights")
                keep_idx, ratio, keep = selector.select(influence, sp.step)
                kept[sp.step] = None if keep_idx is None else keep_idx.tolist()
            elif keep_idx is None:
                kind = "pruned"
                velocity = engine.full(latents, timestep)
            else:
                kind = "pruned"
                velocity = engine.pruned(latents, timestep, keep_idx)
            if not torch.isfinite(velocity).all():
                raise TopiError(f"step {sp.step} ({kind}) produced NaN/Inf: check inputs, weights and precision")
            latents = sched.step(velocity, t, latents, return_dict=False)[0]
            dt = time.perf_counter() - t0
            graph = kind if kind == "anchor" or (kind == "pruned" and keep_idx is not None) else "full"
            rec = {"step": sp.step, "kind": kind, "graph": graph,
                   "keep": keep if kind != "full" else inputs.layout.num_ctx,
                   "bucket": ratio if kind != "full" else 0.0, "time_s": dt}
            records.append(rec)
            bar.update(1)
    return RunResult(latents, records, time.perf_counter() - start, kept)


def warmup(engine, inputs, keep: int | None = None) -> None:
    """One call of each graph so that lazy initialisation stays out of the timings."""
    engine.bind(inputs)
    latents = inputs.initial_noise(0)
    t = torch.tensor([0.5])
    with torch.inference_mode():
        engine.anchor(latents, t)
        engine.full(latents, t)
        if keep and keep < inputs.layout.num_ctx:
            engine.pruned(latents, t, torch.arange(keep))


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    rng = float(ref.max() - ref.min())
    mse = float(((x.double() - ref.double()) ** 2).mean())
    if mse == 0:
        return math.inf
    return 10 * math.log10(rng * rng / mse)


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))
