"""Write calibration/flux.1-kontext-dev.json: the published ToPi setting for FLUX.1 Kontext [dev].

Not measured here: pivotal layers {13, 18, 31} of 57, prune start L0 = 10, update interval dT = 10 are
the ToPi paper's figures. The profile binds to FLUX.1 Kontext [dev]'s transformer config (config_hash of
FluxTransformer2DModel built on the meta device, so no weights are needed) and to any weights of that
config (weights_hash null). Usage: python scripts/make_published_profile.py [--out PATH]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

KONTEXT_DEV_CONFIG = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                          attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                          pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56])
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "calibration" / "flux.1-kontext-dev.json"


def kontext_dev_config_hash() -> str:
    from diffusers import FluxTransformer2DModel

    from topi_export.models import config_hash

    with torch.device("meta"):
        model = FluxTransformer2DModel(**KONTEXT_DEV_CONFIG)
    return config_hash(model.config)


def published_profile() -> dict:
    from topi_export.method.calibration import versions
    from topi_export.method.defaults import (PUBLISHED_DEPTH, PUBLISHED_PIVOTAL, PUBLISHED_PRUNE_START,
                                             PUBLISHED_UPDATE_INTERVAL)
    from topi_export.runtime.settings import PROFILE_SCHEMA

    source = "published (ToPi paper), not measured here"
    return {
        "schema": PROFILE_SCHEMA,
        "model": {"class": "FluxTransformer2DModel", "config_hash": kontext_dev_config_hash(), "weights_hash": None,
                  "num_layers": PUBLISHED_DEPTH, "num_double": KONTEXT_DEV_CONFIG["num_layers"],
                  "source": source, "name": "black-forest-labs/FLUX.1-Kontext-dev (transformer)",
                  "config": KONTEXT_DEV_CONFIG},
        "pivotal_layers": list(PUBLISHED_PIVOTAL),
        "prune_start": PUBLISHED_PRUNE_START,
        "update_interval": PUBLISHED_UPDATE_INTERVAL,
        "top_k": len(PUBLISHED_PIVOTAL),
        "sensitivity": None,
        "rules": {"pivotal_layers": f"{source}: the paper's pivotal layers for FLUX.1 Kontext [dev]",
                  "prune_start": f"{source}: the first {PUBLISHED_PRUNE_START} of {PUBLISHED_DEPTH} layers see the "
                                 f"full context",
                  "update_interval": f"{source}: anchor every {PUBLISHED_UPDATE_INTERVAL} steps"},
        "calibration_set": {"description": "none: values copied from the ToPi paper, not measured by topi-export"},
        "measured": False,
        "command": "python scripts/make_published_profile.py",
        "versions": versions(),
    }


def main() -> None:
    from topi_export.commands.common import write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    write_json(args.out, published_profile())
    print(f"published profile -> {args.out}")


if __name__ == "__main__":
    main()
