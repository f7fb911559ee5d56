"""Method settings for a run: pivotal layers, prune-start layer L0, update interval dT. From a
calibration profile (verified against the model) or the scaled published defaults."""
from __future__ import annotations

import json
from pathlib import Path

from topi_export.errors import TopiError
from topi_export.method.defaults import scaled_defaults

PROFILE_SCHEMA = "topi-calibration/1"
SHIPPED = Path(__file__).resolve().parents[2] / "calibration"


def read_profile(path) -> dict:
    path = Path(path)
    try:
        profile = json.loads(path.read_text())
    except FileNotFoundError:
        raise TopiError(f"calibration profile {path} not found: run `topi-export calibrate --out {path}` first")
    except (OSError, json.JSONDecodeError) as exc:
        raise TopiError(f"calibration profile {path} is not valid JSON ({exc}): re-run topi-export calibrate")
    if profile.get("schema") != PROFILE_SCHEMA:
        raise TopiError(f"calibration profile {path} has schema {profile.get('schema')!r}, expected "
                        f"{PROFILE_SCHEMA!r}: re-run topi-export calibrate")
    for key in ("model", "pivotal_layers", "prune_start", "update_interval"):
        if key not in profile:
            raise TopiError(f"calibration profile {path} lacks '{key}': re-run topi-export calibrate")
    return profile


def check_profile(profile: dict, identity: dict, path="profile") -> None:
    want = profile["model"]
    for key in ("config_hash", "weights_hash"):
        if want.get(key) is not None and want[key] != identity[key]:
            raise TopiError(f"calibration profile {path} was made for another model ({key} {want[key]} != "
                            f"{identity[key]} of {identity['source']}): calibrate this model with "
                            f"`topi-export calibrate --model {identity['source']}`")
    n = identity["num_layers"]
    layers = list(profile["pivotal_layers"]) + [profile["prune_start"]]
    if any(not 0 <= int(v) < n for v in layers):
        raise TopiError(f"calibration profile {path} names layers outside 0..{n - 1}: re-run topi-export calibrate")


def shipped_profile_for(identity: dict) -> tuple[dict, Path] | None:
    """A profile in calibration/ made for this model (weights-specific first, then config-wide)."""
    if not SHIPPED.is_dir():
        return None
    matches = []
    for path in sorted(SHIPPED.glob("*.json")):
        try:
            profile = read_profile(path)
            check_profile(profile, identity, path)
        except TopiError:
            continue
        if profile["model"].get("config_hash") != identity["config_hash"]:
            continue
        matches.append((profile["model"].get("weights_hash") is None, profile, path))
    if not matches:
        return None
    matches.sort(key=lambda m: m[0])
    return matches[0][1], matches[0][2]


def method_settings(identity: dict, calibration=None, update_interval=None, prune_start=None) -> dict:
    if calibration:
        profile = read_profile(calibration)
        check_profile(profile, identity, calibration)
        settings = {k: profile[k] for k in ("pivotal_layers", "prune_start", "update_interval")}
        settings["source"] = str(calibration)
    else:
        found = shipped_profile_for(identity)
        if found:
            profile, path = found
            settings = {k: profile[k] for k in ("pivotal_layers", "prune_start", "update_interval")}
            settings["source"] = str(path)
        else:
            settings = scaled_defaults(identity["num_layers"])
    if update_interval is not None:
        settings["update_interval"] = int(update_interval)
    if prune_start is not None:
        settings["prune_start"] = int(prune_start)
    settings["pivotal_layers"] = [int(v) for v in settings["pivotal_layers"]]
    return settings
