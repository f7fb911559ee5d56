"""The denoising loop, generic over families and backends: the family's scheduler and guidance, the temporal
controller's plan (method/schedule.py), the step runner (runtime/steps.py). ``mode``: "topi" (the ToPi schedule),
"full" (every step unpruned through the ToPi graph) or "dense" (every step through the plain dense model: the
baseline)."""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from topi_export.errors import BadInput, TopiError
from topi_export.method.schedule import TemporalController
from topi_export.plan.limits import check_mode, check_steps
from topi_export.plan.reuse import OFF, ReusePlan
from topi_export.runtime.steps import StepRunner


@dataclass(frozen=True)
class RunResult:
    latents: torch.Tensor
    schedule: tuple = ()  # plan.results.StepRecord per step
    time_s: float = 0.0
    kept: dict = field(default_factory=dict)  # anchor step -> kept context indices (None = all)

    def with_time(self, time_s: float) -> "RunResult":
        from dataclasses import replace

        return replace(self, time_s=time_s)


def _progress(total, desc, enabled):
    from topi_export.progress import progress_bar

    return progress_bar(total, desc, enabled)


@contextmanager
def host_threads(engine):
    """Limit torch's threads to the engine's ``host_threads`` for the duration of a loop (see backends/base.py)."""
    wanted, before = getattr(engine, "host_threads", None), torch.get_num_threads()
    if wanted is None or wanted >= before:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def schedule_sigmas(family, steps: int, layout, scheduler_config: dict | None = None) -> list[float]:
    """The noise level (sigma, = timestep / 1000) of every step of the family's schedule."""
    sched = family.make_scheduler(steps, layout, scheduler_config)
    return [float(t) / 1000 for t in sched.timesteps]


def denoise(engine, family, inputs, *, steps: int, seed: int = 0, selector=None, mode: str = "topi",
            update_interval: int = 10, scheduler_config: dict | None = None, progress: bool = False,
            desc: str | None = None, reuse: ReusePlan = OFF, on_step=None) -> RunResult:
    """One generation. The engine is bound to the request's conditioning here. ``reuse``: the steps that reuse a
    velocity instead of calling the engine (method/reuse.py; ignored by the baselines). ``on_step(step, sigma,
    velocity)``: called with every step's guided velocity (calibration records trajectories with it)."""
    check_mode(mode)
    if mode == "topi" and selector is None:
        raise BadInput("the ToPi schedule needs a selector (ratio or tau)")
    check_steps(steps)
    layout = inputs.layout
    batch = family.branches(inputs)
    engine.bind(family.conditioning(inputs, layout), inputs.reference_latents, layout)
    latents = inputs.initial_noise(seed)
    sched = family.make_scheduler(steps, layout, scheduler_config)
    controller = TemporalController(selector if mode == "topi" else None, update_interval, layout.num_ctx,
                                    layout.ref_grids, baseline="dense" if mode == "dense" else "full", reuse=reuse)
    runner = StepRunner(engine, controller, layout, guide=lambda v: family.guide(v.float(), inputs))
    records = []
    start = time.perf_counter()
    with torch.inference_mode(), host_threads(engine), _progress(steps, desc or mode, progress) as bar:
        for step, t in enumerate(sched.timesteps):
            timestep = (t / 1000).reshape(1).to(torch.float32).expand(batch).contiguous()
            x = latents.expand(batch, -1, -1).contiguous()
            velocity, record = runner.step(step, x, timestep)
            if not torch.isfinite(velocity).all():
                raise TopiError(f"step {step} ({record.graph}) produced NaN/Inf: check inputs, weights and precision")
            if on_step is not None:
                on_step(step, float(timestep[0]), velocity)
            latents = sched.step(velocity, t, latents, return_dict=False)[0]
            records.append(record)
            bar.update(1)
    return RunResult(latents, tuple(records), time.perf_counter() - start, dict(runner.kept))


def warmup(engine, family, inputs, keeps=(), dense: bool = False) -> None:
    """One call of each step kind so lazy initialisation stays out of the timings."""
    batch = family.branches(inputs)
    engine.bind(family.conditioning(inputs, inputs.layout), inputs.reference_latents, inputs.layout)
    x = inputs.initial_noise(0).expand(batch, -1, -1).contiguous()
    t = torch.full((batch,), 0.5)
    with torch.inference_mode():
        engine.anchor(x, t)
        engine.full(x, t)
        for keep in keeps:
            if keep < inputs.layout.num_ctx:
                engine.pruned(x, t, torch.arange(keep))
        if dense and engine.has_dense:
            engine.dense(x, t)


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    rng = float(ref.max() - ref.min())
    mse = float(((x.double() - ref.double()) ** 2).mean())
    if mse == 0:
        return math.inf
    return 10 * math.log10(rng * rng / mse) if rng > 0 else -math.inf


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def measure_reuse(family, samples, steps: int, *, seed: int = 0, scheduler_config=None, threshold=None,
                  max_consecutive=None):
    """The step-reuse criterion of a model (method/reuse.py measure_criterion) from full, unpruned runs of its
    PyTorch reference on the calibration samples, recording every step's guided velocity."""
    from topi_export.backends import get_backend, model_backend
    from topi_export.backends.base import EngineSource
    from topi_export.method import reuse as R

    settings = family.default_settings()
    engine = get_backend(model_backend()).open_engine(EngineSource(None, family, settings))
    per_sample, sigmas = [], None
    for i, data in enumerate(samples):
        seen = []
        denoise(engine, family, data, steps=steps, seed=seed + i, mode="full",
                on_step=lambda step, sigma, velocity: seen.append((sigma, velocity)))
        sigmas = [s for s, _ in seen]
        per_sample.append([v for _, v in seen])
    kwargs = {k: v for k, v in (("threshold", threshold), ("max_consecutive", max_consecutive)) if v is not None}
    return R.measure_criterion(per_sample, sigmas, **kwargs)
