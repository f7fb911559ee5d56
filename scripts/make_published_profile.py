"""Write topi_export/calibration/flux.1-kontext-dev.json: the published ToPi setting for FLUX.1 Kontext [dev]
(or, with --model qwen-image-edit, topi_export/calibration/qwen-image-edit.json for Qwen-Image-Edit).

Not measured here: pivotal layers {13, 18, 31} of 57, prune start L0 = 10, update interval dT = 10 are
the ToPi paper's figures. The profile binds to FLUX.1 Kontext [dev]'s transformer config (config_hash of
FluxTransformer2DModel built on the meta device, so no weights are needed) and to any weights of that
config (weights_hash null).

Qwen-Image-Edit: pivotal layers {35, 37, 42} of 60 and dT = 10 are the paper's; the paper gives no prune-start
layer, so L0 = round(10 * 60 / 57) = 11 (FLUX.1 Kontext's published L0 at the same relative depth). The config is
diffusers' QwenImageTransformer2DModel defaults (Qwen-Image's architecture, which the edit checkpoints share); the
hash covers every init argument of that class (QWEN_IMAGE_EDIT_CONFIG below).

Usage: python scripts/make_published_profile.py [--model flux.1-kontext-dev|qwen-image-edit] [--out PATH]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

KONTEXT_DEV_CONFIG = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                          attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                          pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56])
# QwenImageTransformer2DModel's init arguments in diffusers 0.42.1 at their defaults (Qwen-Image's architecture:
# patch 2, 64 packed channels in, 16 out, 60 dual-stream blocks, 24 heads x 128, text 3584, RoPE axes 16/56/56).
QWEN_IMAGE_EDIT_CONFIG = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                              num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                              axes_dims_rope=[16, 56, 56], zero_cond_t=False, use_additional_t_cond=False,
                              use_layer3d_rope=False)
CALIBRATION = Path(__file__).resolve().parents[1] / "topi_export" / "calibration"
DEFAULT_OUT = CALIBRATION / "flux.1-kontext-dev.json"
OUTS = {"flux.1-kontext-dev": DEFAULT_OUT, "qwen-image-edit": CALIBRATION / "qwen-image-edit.json"}


def kontext_dev_config_hash() -> str:
    from diffusers import FluxTransformer2DModel

    from topi_export.plan.manifest import config_digest as config_hash

    with torch.device("meta"):
        model = FluxTransformer2DModel(**KONTEXT_DEV_CONFIG)
    return config_hash(model.config)


def published_profile() -> dict:
    from topi_export.artifacts.versions import tool_versions
    from topi_export.models.flux_kontext import FluxKontext
    from topi_export.artifacts.settings import PROFILE_SCHEMA

    pub = FluxKontext.published  # the paper's setting, owned by the family adapter
    PUBLISHED_DEPTH, PUBLISHED_PIVOTAL = pub.depth, pub.pivotal_layers
    PUBLISHED_PRUNE_START, PUBLISHED_UPDATE_INTERVAL = pub.prune_start, pub.update_interval
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
        "versions": tool_versions(packages=("topi-export", "torch", "diffusers")),
    }


def qwen_image_edit_config_hash() -> str:
    from diffusers import QwenImageTransformer2DModel

    from topi_export.plan.manifest import config_digest as config_hash

    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**QWEN_IMAGE_EDIT_CONFIG)
    return config_hash(model.config)


def qwen_image_edit_profile() -> dict:
    from topi_export.artifacts.versions import tool_versions
    from topi_export.models.qwen_edit import QwenImageEdit
    from topi_export.plan.profile import SCHEMA

    pub = QwenImageEdit.published
    depth = QWEN_IMAGE_EDIT_CONFIG["num_layers"]
    source = "published (ToPi paper), not measured here"
    fields = ", ".join(QWEN_IMAGE_EDIT_CONFIG)
    return {
        "schema": SCHEMA,
        "model": {"class": "QwenImageTransformer2DModel", "family": QwenImageEdit.name,
                  "config_hash": qwen_image_edit_config_hash(), "weights_hash": None, "num_layers": depth,
                  "layer_groups": [["block", 0, depth]], "source": source,
                  "name": "Qwen/Qwen-Image-Edit (transformer)", "config": QWEN_IMAGE_EDIT_CONFIG,
                  "config_hash_covers": f"topi_export.models.config_hash over QwenImageTransformer2DModel's config "
                                        f"(diffusers 0.42.1, built on the meta device) with exactly these fields: "
                                        f"{fields}; a checkpoint whose config.json adds other keys hashes "
                                        f"differently and gets the family's published setting instead (the same "
                                        f"values)"},
        "pivotal_layers": list(pub.pivotal_layers),
        "prune_start": pub.prune_start,
        "update_interval": pub.update_interval,
        "top_k": len(pub.pivotal_layers),
        "sensitivity": None,
        "rules": {"pivotal_layers": f"{source}: the paper's pivotal layers for Qwen-Image-Edit",
                  "prune_start": f"not published and not measured here: the paper gives no prune-start layer for "
                                 f"Qwen-Image-Edit; FLUX.1 Kontext's published L0 = 10 of 57 at the same relative "
                                 f"depth, round(10 * {depth} / 57) = {pub.prune_start}",
                  "update_interval": f"{source}: anchor every {pub.update_interval} steps"},
        "calibration_set": {"description": "none: values copied from the ToPi paper (prune start derived as "
                                           "stated in rules), not measured by topi-export"},
        "measured": False,
        "command": "python scripts/make_published_profile.py --model qwen-image-edit",
        "versions": tool_versions(packages=("topi-export", "torch", "diffusers")),
    }


PROFILES = {"flux.1-kontext-dev": published_profile, "qwen-image-edit": qwen_image_edit_profile}


def main() -> None:
    from topi_export.commands.common import write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(PROFILES), default="flux.1-kontext-dev")
    parser.add_argument("--out", type=Path, default=None, help="default: calibration/<model>.json")
    args = parser.parse_args()
    out = args.out or OUTS[args.model]
    write_json(out, PROFILES[args.model]())
    print(f"published profile -> {out}")


if __name__ == "__main__":
    main()
