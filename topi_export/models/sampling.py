"""Flow-matching sampling shared by the families: diffusers' FlowMatchEulerDiscreteScheduler with the pipelines'
sigmas linspace(1, 1/N, N) and a dynamic time shift mu (each family computes mu as its pipeline does)."""
from __future__ import annotations

import numpy as np

from topi_export.errors import TopiError


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """diffusers' calculate_shift (FluxPipeline, FluxKontextPipeline, QwenImageEdit*Pipeline)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """diffusers' compute_empirical_mu (pipelines/flux2/pipeline_flux2.py), the FLUX.2 pipelines' time shift. Copied:
    importing it would import the pipeline module, which needs transformers (tests/test_flux2.py checks they agree)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


def shift_from_config(image_seq_len: int, config: dict) -> float:
    return calculate_shift(image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                           config.get("base_shift", 0.5), config.get("max_shift", 1.15))


def flow_match_scheduler(config: dict, steps: int, mu: float | None):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if steps < 1:
        raise TopiError(f"--steps {steps} must be >= 1")
    try:
        sched = FlowMatchEulerDiscreteScheduler.from_config(dict(config))
    except Exception as exc:  # noqa: BLE001 - a hand-edited scheduler_config.json
        raise TopiError(f"cannot build the scheduler from its config ({exc}): fix scheduler/scheduler_config.json")
    kwargs = {"mu": mu} if sched.config.get("use_dynamic_shifting") else {}
    sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), **kwargs)
    sched.set_begin_index(0)
    return sched
