"""The denoising loop, generic over families and backends: the family's scheduler and guidance, the temporal
controller's plan (method/schedule.py), the step runner (runtime/steps.py). ``mode``: "topi" (the ToPi schedule),
"full" (every step unpruned through the ToPi graph) or "dense" (every step through the plain dense model: the
baseline). ``ref_kv`` (docs/design.md, "Reference K/V cache"): "exact" for a KV-trained model (step 0 extracts the
references' keys/values, every later step attends to them), "reuse" for the approximate reuse of any model (every
anchor extracts); with mode "full" that is the unpruned cached loop."""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from topi_export.backends.base import state_bytes
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
    ref_kv: str | None = None  # the reference K/V mode the loop ran ("exact" | "reuse")
    cache_bytes: int = 0  # bytes of the reference K/V cache the engine held (0 without one)

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
            desc: str | None = None, reuse: ReusePlan = OFF, on_step=None, ref_kv: str | None = None,
            start: tuple[int, torch.Tensor] | None = None, pruning_residual: bool = False) -> RunResult:
    """One generation. The engine is bound to the request's conditioning here. ``reuse``: the steps that reuse a
    velocity instead of calling the engine (method/reuse.py; ignored by the baselines). ``on_step(step, sigma,
    velocity)``: called with every step's guided velocity (calibration records trajectories with it). ref_kv None:
    a KV-trained model's exact cache (the dense mode recomputes the references every step), no cache otherwise.
    ``start`` (step, latents): a baseline run resumed at that step from those latents (calibration's rollouts).
    ``pruning_residual``: every anchor also runs the kept set on its input and the pruned steps until the next anchor
    add the difference (docs/design.md, "Pruning residual")."""
    check_mode(mode)
    first = 0
    if start is not None:
        if mode == "topi":
            raise TopiError("only a baseline run (mode full or dense) can resume mid-schedule: the ToPi schedule "
                            "needs its anchors")
        first = int(start[0])
    if ref_kv is None and family.kv_model and mode != "dense":
        ref_kv = "exact"
    if mode == "topi" and selector is None:
        raise BadInput("the ToPi schedule needs a selector (ratio or tau)")
    check_steps(steps)
    layout = inputs.layout
    batch = family.branches(inputs)
    engine.bind(family.conditioning(inputs, layout), inputs.reference_latents, layout)
    latents = inputs.initial_noise(seed) if start is None else start[1]
    sched = family.make_scheduler(steps, layout, scheduler_config)
    sched.set_begin_index(first)
    controller = TemporalController(selector if mode == "topi" else None, update_interval, layout.num_ctx,
                                    layout.ref_grids, baseline="dense" if mode == "dense" else "full", reuse=reuse,
                                    ref_kv=ref_kv, start=first, residual=pruning_residual,
                                    num_steps=steps)
    runner = StepRunner(engine, controller, layout, guide=lambda v: family.guide(v.float(), inputs))
    records = []
    began = time.perf_counter()
    with torch.inference_mode(), host_threads(engine), _progress(steps - first, desc or mode, progress) as bar:
        for step, t in enumerate(sched.timesteps):
            if step < first:
                continue
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
    elapsed = time.perf_counter() - began
    cache = sum(state_bytes(st) for st in runner.states.values()) if controller.ref_kv else 0
    return RunResult(latents, tuple(records), elapsed, dict(runner.kept), controller.ref_kv, cache)


def warmup(engine, family, inputs, keeps=(), dense: bool = False, ref_kv: str | None = None) -> None:
    """One call of each step kind so lazy initialisation stays out of the timings."""
    batch = family.branches(inputs)
    engine.bind(family.conditioning(inputs, inputs.layout), inputs.reference_latents, inputs.layout)
    x = inputs.initial_noise(0).expand(batch, -1, -1).contiguous()
    t = torch.full((batch,), 0.5)
    with torch.inference_mode():
        if ref_kv != "exact":  # an exact KV model runs no topi graph
            engine.anchor(x, t)
            engine.full(x, t)
            for keep in keeps:
                if keep < inputs.layout.num_ctx:
                    engine.pruned(x, t, torch.arange(keep))
        if ref_kv is not None:  # reference K/V cache (docs/design.md)
            engine.extract(x, t)
            engine.cached(x, t, None, score=True)
            engine.cached(x, t)
            for keep in keeps:
                if keep < inputs.layout.num_ctx:
                    engine.cached(x, t, torch.arange(keep))
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
                  max_consecutive=None, measure: str = "rollout", budget_db=None, aggregate=None,
                  progress: bool = False):
    """The step-reuse criterion of a model from full, unpruned runs of its PyTorch reference on the calibration
    samples, recording every step's guided velocity. ``measure`` "rollout" (method/reuse.py rollout_criterion): for
    every step and both orders, the run that reuses that step alone is finished from there, and the change of its
    final latents measured (about steps^2 extra model calls per sample). "velocity" (measure_criterion): the
    relative velocity change between steps, no extra calls. ``aggregate`` (rollout): how the samples' errors combine
    (method/reuse.py rollout_criterion)."""
    from topi_export.backends import get_backend, model_backend
    from topi_export.backends.base import EngineSource
    from topi_export.method import reuse as R

    if measure not in R.MEASURES:
        raise BadInput(f"--reuse-measure {measure!r}: one of {', '.join(R.MEASURES)}")
    settings = family.default_settings()
    engine = get_backend(model_backend()).open_engine(EngineSource(None, family, settings))
    per_sample, errors, errors1, sigmas = [], [], [], None
    with _progress(len(samples) * (steps if measure == "rollout" else 1), "reuse errors", progress) as bar:
        for i, data in enumerate(samples):
            seen = []
            final = denoise(engine, family, data, steps=steps, seed=seed + i, mode="full",
                            scheduler_config=scheduler_config,
                            on_step=lambda step, sigma, velocity: seen.append((sigma, velocity))).latents
            sigmas = [s for s, _ in seen]
            per_sample.append([v for _, v in seen])
            if measure == "rollout":
                e0, e1 = _rollout_errors(engine, family, data, steps, seed + i, scheduler_config, seen, final,
                                         bar)
                errors.append(e0)
                errors1.append(e1)
    if measure == "velocity":
        kwargs = {k: v for k, v in (("threshold", threshold), ("max_consecutive", max_consecutive)) if v is not None}
        return R.measure_criterion(per_sample, sigmas, **kwargs)
    kwargs = {k: v for k, v in (("budget_db", budget_db), ("max_consecutive", max_consecutive),
                                ("aggregate", aggregate)) if v is not None}
    return R.rollout_criterion(errors, errors1, sigmas, **kwargs)


def _rollout_errors(engine, family, data, steps, seed, scheduler_config, seen, final, bar):
    """Final error (RMS over the range of ``final``) of reusing each step alone, order 0 and order 1: the latents
    of the full run before the step (replayed with the scheduler's Euler update), the reused velocity moves them
    over the step, the full run finishes from there."""
    from topi_export.method.reuse import extrapolate

    sched = family.make_scheduler(steps, data.layout, scheduler_config)
    sig = [float(v) for v in sched.sigmas]  # steps + 1 values, the last the end of the schedule
    rng = float(final.max() - final.min()) or 1.0
    x = data.initial_noise(seed).float()
    e0, e1 = [0.0], [0.0]  # step 0 has nothing to reuse
    for step in range(steps):
        if step > 0:
            history = [(sig[k], seen[k][1].float()) for k in range(max(0, step - 2), step)]
            for order, out in ((0, e0), (1, e1)):
                moved = x + (sig[step + 1] - sig[step]) * extrapolate(history, sig[step], order)
                end = moved if step + 1 == steps else denoise(engine, family, data, steps=steps, seed=seed,
                                                              mode="full", scheduler_config=scheduler_config,
                                                              start=(step + 1, moved.to(final.dtype))).latents
                out.append(float(((end.double() - final.double()) ** 2).mean().sqrt()) / rng)
            bar.update(1)
        x = x + (sig[step + 1] - sig[step]) * seen[step][1].float()
    bar.update(1)
    return e0, e1