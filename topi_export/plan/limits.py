"""Limits and range checks shared by the CLI, the runtime and the Triton loop model (one definition each)."""
from __future__ import annotations

import math

from topi_export.errors import BadInput

MAX_STEPS = 1000  # denoising steps: more is a typo, and each step is a full model call
MAX_UPDATE_INTERVAL = 1000
MAX_SEED = (1 << 64) - 1
RESIDUAL_CHOICES = {"off": False, "on": True}  # the pruning residual (runtime/steps.py), as flags and requests
MODES = ("topi", "full", "dense")  # the ToPi schedule, every step unpruned through the topi graph, the dense baseline


def check_tau(tau, what: str = "--tau") -> float:
    """tau is the fraction of the total influence the kept set holds: (0, 1]."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (math.isfinite(tau) and 0.0 < tau <= 1.0):
        raise BadInput(f"{what} is {tau}, outside (0, 1]: it is the fraction of the total influence kept")
    return float(tau)


def check_steps(steps, what: str = "--steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise BadInput(f"{what} {steps} is outside 1..{MAX_STEPS}")
    return steps


def check_update_interval(update_interval, what: str = "--update-interval") -> int:
    if (isinstance(update_interval, bool) or not isinstance(update_interval, int)
            or not 1 <= update_interval <= MAX_UPDATE_INTERVAL):
        raise BadInput(f"{what} {update_interval} is outside 1..{MAX_UPDATE_INTERVAL} (steps between anchor "
                       f"re-scorings)")
    return update_interval


def check_mode(mode, what: str = "mode") -> str:
    if mode not in MODES:
        raise BadInput(f"{what} is {mode!r}: one of {', '.join(MODES)}")
    return mode


def parse_residual(value, what: str = "--pruning-residual") -> bool:
    """'on' | 'off' -> whether the anchors measure the pruning residual."""
    if value not in RESIDUAL_CHOICES:
        raise BadInput(f"{what} is {value!r}: give on or off")
    return RESIDUAL_CHOICES[value]
