"""Defaults when no calibration profile is given: the published FLUX.1 Kontext setting
(pivotal {13, 18, 31} of 57 layers, prune start L0 = 10 of 57, dT = 10) scaled to the model's depth."""
from __future__ import annotations

PUBLISHED_DEPTH = 57
PUBLISHED_PIVOTAL = (13, 18, 31)
PUBLISHED_PRUNE_START = 10
PUBLISHED_UPDATE_INTERVAL = 10


def scaled_defaults(num_layers: int) -> dict:
    if num_layers == PUBLISHED_DEPTH:
        pivotal = list(PUBLISHED_PIVOTAL)
        prune_start = PUBLISHED_PRUNE_START
    else:
        pivotal = []
        for layer in PUBLISHED_PIVOTAL:
            want = min(num_layers - 1, round(layer * num_layers / PUBLISHED_DEPTH))
            # rounding can collide on shallow models: take the nearest free layer
            for cand in sorted(range(num_layers), key=lambda c: (abs(c - want), c)):
                if cand not in pivotal:
                    pivotal.append(cand)
                    break
        pivotal = sorted(pivotal)
        prune_start = max(1, min(num_layers - 1, round(PUBLISHED_PRUNE_START * num_layers / PUBLISHED_DEPTH)))
    return {"pivotal_layers": pivotal, "prune_start": prune_start, "update_interval": PUBLISHED_UPDATE_INTERVAL,
            "source": "published FLUX.1 Kontext setting scaled to depth"}
