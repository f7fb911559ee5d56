"""Method settings for a model: from a calibration profile (verified against the model), else a shipped profile
made for this model's config, else the family's published setting (scaled to depth where the model differs)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from topi_export.errors import TopiError
from topi_export.plan import MethodSettings
from topi_export.plan.profile import SCHEMA as PROFILE_SCHEMA, read_profile  # noqa: F401
from topi_export.resources import resource

SHIPPED = resource("calibration")
# --calibration none: the family's default setting even where a shipped profile matches (an uncalibrated user)
NO_CALIBRATION = "none"


def shipped_profile_for(identity):
    """A profile shipped in topi_export/calibration/ made for this model (weights-specific first, then config-wide)."""
    if not SHIPPED.is_dir():
        return None
    matches = []
    for path in sorted(SHIPPED.glob("*.json")):
        try:
            profile = read_profile(path)
            if profile.config_hash != identity.config_hash:
                continue
            profile.check_model(identity)
        except TopiError:
            continue
        matches.append((profile.weights_hash is None, str(path), profile))
    if not matches:
        return None
    return sorted(matches, key=lambda m: m[:2])[0][2]


def shipped_name(path) -> str:
    """A shipped profile as reports name it: calibration/NAME.json."""
    return f"calibration/{Path(path).name}"


def method_settings(identity, default: MethodSettings, calibration=None, update_interval=None,
                    prune_start=None) -> MethodSettings:
    """identity: plan.ModelIdentity; default: the family's setting (Family.default_settings())."""
    if calibration == NO_CALIBRATION:
        settings = replace(default, source=f"family default (--calibration none): {default.source}")
    elif calibration:
        profile = read_profile(calibration)
        profile.check_model(identity)
        settings = profile.settings()
    else:
        profile = shipped_profile_for(identity)
        settings = default if profile is None else replace(profile.settings(), source=shipped_name(profile.path))
    settings = settings.with_overrides(update_interval, prune_start)
    return settings.check(identity.num_layers)
