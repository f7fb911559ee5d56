"""Offline calibration (docs/design.md, "The method"): per-layer context sensitivity -> pivotal layers, prune start L0, dT.

Sensitivity of layer l on one (sample, timestep t):

    s_l = ||v_full - v_drop_l||_2 / ||v_full||_2   over the target tokens

where v is the predicted velocity of the adapter's forward at the noisy latents
x_t = (1 - t) * x0 + t * noise (flow matching; the model is called with timestep t, as the Kontext
pipeline passes t / 1000), and v_drop_l removes the context keys/values from layer l's attention only.
The profile stores the mean and std of s_l over samples x timesteps.
"""
from __future__ import annotations

import io
import math
import time

import torch
import torch.nn.functional as F

from topi_export.errors import TopiError
from topi_export.plan.results import CalibrationResult

# The FLUX.1 Kontext published setting the rules are anchored to (ToPi paper): L0 = 10 of 57 layers, dT = 10.
PUBLISHED_DEPTH, PUBLISHED_PRUNE_START, PUBLISHED_UPDATE_INTERVAL = 57, 10, 10

DEFAULT_TIMESTEPS = (0.9, 0.6, 0.3)
DEFAULT_TOP_K = 3
# Share of the total mean sensitivity the leading (never pruned) layers must hold. 10/57: a flat
# sensitivity profile over FLUX.1 Kontext's 57 layers then gives the published L0 = 10.
PRUNE_START_FRACTION = PUBLISHED_PRUNE_START / PUBLISHED_DEPTH

RULES = {
    "sensitivity": ("s_l = ||v_full - v_drop_l||_2 / ||v_full||_2 over the target tokens; v_drop_l removes the "
                    "context keys/values from layer l's attention only (every other layer unchanged); velocities "
                    "at x_t = (1 - t) * x0 + t * noise with model timestep t (x0 = the sample's target_latents, "
                    "else its reference latents resized to the target grid); mean and std over samples x timesteps"),
    "pivotal_layers": "the top_k layers by mean sensitivity (ties: the lower layer), listed ascending",
    "prune_start": (f"L0 = the smallest l >= 1 such that layers 0..l-1 hold at least {PUBLISHED_PRUNE_START}/"
                    f"{PUBLISHED_DEPTH} of the total mean sensitivity (a flat profile gives the published L0 = 10 "
                    f"of 57), but no later than the first pivotal layer (every pivotal layer then runs on the kept "
                    f"set, as in the published setting 10 < 13), clamped to 1..L-1"),
    "update_interval": (f"not measured: the published ToPi setting dT = {PUBLISHED_UPDATE_INTERVAL} unless given "
                        f"(--update-interval)"),
}


def check_timesteps(timesteps) -> list[float]:
    out = [float(t) for t in timesteps]
    if not out:
        raise TopiError("no calibration timesteps: pass e.g. --timesteps 0.9,0.6,0.3 (values in (0, 1])")
    bad = [t for t in out if not (math.isfinite(t) and 0.0 < t <= 1.0)]
    if bad:
        raise TopiError(f"calibration timesteps {bad} are outside (0, 1]: pass noise levels such as 0.9,0.6,0.3")
    return out


def clean_latents(inputs) -> torch.Tensor:
    """x0 of a calibration sample: its target_latents, else its first reference's latents on the target grid."""
    if inputs.target_latents is not None:
        return inputs.target_latents.float()
    layout = inputs.layout
    ref = inputs.references()[0].float()
    if tuple(layout.ref_grids[0]) == tuple(layout.target_grid):
        return ref
    rh, rw = layout.ref_grids[0]
    img = ref[0].T.reshape(1, -1, rh, rw)
    img = F.interpolate(img, size=tuple(layout.target_grid), mode="bilinear", align_corners=False)
    return img.reshape(1, img.shape[1], -1).transpose(1, 2).contiguous()


def prune_start_rule(mean, pivotal, fraction: float = PRUNE_START_FRACTION) -> int:
    n = len(mean)
    if n < 2:
        return 0
    total = float(sum(mean))
    l0 = n - 1
    if total > 0:
        acc = 0.0
        for layer in range(n):
            acc += float(mean[layer])
            if acc >= fraction * total * (1 - 1e-9):
                l0 = layer + 1
                break
    if pivotal:
        l0 = min(l0, min(pivotal))
    return max(1, min(n - 1, l0))


def positive_branch(family, cond: dict) -> dict:
    """The conditioning of the first (positive) guidance branch: calibration measures the prompt's own pass."""
    batched = {t.name for t in family.graph_inputs() if t.dims[:1] == ("B",)}
    return {k: (v[:1] if k in batched else v) for k, v in cond.items()}


def calibrate(family, samples, timesteps=DEFAULT_TIMESTEPS, top_k: int = DEFAULT_TOP_K, progress: bool = False, *,
              seed: int = 0, update_interval: int = PUBLISHED_UPDATE_INTERVAL) -> CalibrationResult:
    """Measure every layer's context sensitivity over samples x timesteps; pick pivotal layers, L0, dT.

    family: a models.base.Family with weights; samples: ``Inputs``; a sample without ``noise`` draws it from
    seed + its index. Deterministic for fixed samples and seed.
    """
    from topi_export.progress import progress_bar

    samples = list(samples)
    timesteps = check_timesteps(timesteps)
    n_layers = family.num_layers
    if not samples:
        raise TopiError("empty calibration set: pass --inputs FILE or --samples N >= 1")
    if not 1 <= int(top_k) <= n_layers:
        raise TopiError(f"--top-k {top_k} is outside 1..{n_layers} (the model has {n_layers} layers)")
    if not 1 <= int(update_interval) <= 1000:
        raise TopiError(f"--update-interval {update_interval} is outside 1..1000 (published: {PUBLISHED_UPDATE_INTERVAL})")
    top_k = int(top_k)
    values = torch.zeros(len(samples), len(timesteps), n_layers, dtype=torch.float64)
    total = len(samples) * len(timesteps) * (n_layers + 1)
    start = time.perf_counter()
    with torch.inference_mode(), progress_bar(total, "calibrate", progress, unit="pass") as bar:
        for i, s in enumerate(samples):
            cond = positive_branch(family, family.conditioning(s, s.layout))
            x0 = clean_latents(s)
            noise = s.noise.float() if s.noise is not None else s.initial_noise(seed + i)
            context = s.reference_latents.float()
            for j, t in enumerate(timesteps):
                xt = (1.0 - t) * x0 + t * noise
                timestep = torch.tensor([t], dtype=torch.float32)

                def velocity(drop=None):
                    v, _ = family.forward(xt, context, timestep, cond, drop_context_layer=drop)
                    bar.update(1)
                    return v.double()

                full = velocity()
                if not torch.isfinite(full).all():
                    raise TopiError(f"the model produced NaN/Inf on calibration sample {i} ({s.source}) at t={t}: "
                                    f"check the inputs and weights")
                norm = full.norm().clamp_min(1e-30)
                for layer in range(n_layers):
                    values[i, j, layer] = (full - velocity(layer)).norm() / norm
    flat = values.reshape(-1, n_layers)
    mean = flat.mean(0)
    std = flat.std(0, unbiased=False)
    # ranking: mean descending, ties to the lower layer (stable sort over ascending indices)
    ranking = sorted(range(n_layers), key=lambda layer: (-float(mean[layer]), layer))
    pivotal = sorted(ranking[:top_k])
    mean_l, std_l = [float(v) for v in mean], [float(v) for v in std]
    return CalibrationResult(
        num_layers=n_layers, layer_groups=tuple(tuple(g) for g in family.layer_groups()),
        layer_names=tuple(family.layer_name(layer) for layer in range(n_layers)), timesteps=tuple(timesteps),
        num_samples=len(samples), mean=tuple(mean_l), std=tuple(std_l),
        by_timestep=tuple({"timestep": t, "mean": [float(v) for v in values[:, j].mean(0)]}
                          for j, t in enumerate(timesteps)),
        values=values.tolist(), ranking=tuple(ranking), top_k=top_k, pivotal_layers=tuple(pivotal),
        prune_start=prune_start_rule(mean_l, pivotal), update_interval=int(update_interval), rules=dict(RULES),
        seed=seed, forward_passes=total, elapsed_s=time.perf_counter() - start)
