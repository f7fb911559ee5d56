"""Calibration profiles and method settings. Method settings for a model: from a calibration profile (verified against the model), else a shipped profile
made for this model's config, else the family's published setting (scaled to depth where the model differs)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from topi_export.errors import TopiError
from topi_export.plan import MethodSettings
from topi_export.plan.profile import SCHEMA as PROFILE_SCHEMA, read_profile  # noqa: F401
from topi_export.resources import resource
from topi_export.artifacts.versions import tool_versions

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


# --- writing profiles (topi-export calibrate) ------------------------------------------------------------
REUSE_RULES = {
    "rollout": "step reuse (method/reuse.py, measure rollout): e_i = RMS(x_final(reuse i) - x_final) / range(x_final), "
               "x_final(reuse i) the full unpruned run of a sample with step i alone reusing the previous velocity "
               "(order 0) or the linear extrapolation in sigma of the previous two (order 1), finished to the end; "
               "density_i = the worst (aggregate worst, the default; aggregate mean: the mean) over samples of e_i / "
               "(|sigma_{i-1} - sigma_i| |sigma_i - sigma_{i+1}|); at run "
               "time a step's predicted error is the density at its sigma times those widths, the k-th step of a "
               "run of reused steps carries the errors of the run so far, and auto takes the most steps (the "
               "cheapest such plan) whose predicted final error stays within threshold (10^(-budget dB / 20)) with "
               "runs of at most max_consecutive; anchors, the first protect_first and the last protect_last steps are always "
               "computed",
    "velocity": "step reuse (method/reuse.py, measure velocity): density_i = ||v_i - v~_i|| / ||v_i|| / |sigma_i - "
                "sigma_{i-1}| averaged over full unpruned runs of the samples, v~_i the previous velocity (order 0) "
                "or the linear extrapolation in sigma of the previous two (order 1); at run time the predicted "
                "error of reusing a step is the density at its sigma times its width; auto reuses while the "
                "accumulated predicted error stays within threshold and at most max_consecutive steps in a row; "
                "anchors, the first protect_first and the last protect_last steps are always computed"}


def describe_set(samples, timesteps, *, files=None, seed=0) -> dict:
    """The calibration_set block of a profile."""
    samples = list(samples)
    if files:
        description = f"{len(files)} inputs file(s): {', '.join(str(f) for f in files)}"
    else:
        description = f"synthetic seeded set, seed {seed}, {len(samples)} samples"
    return {"description": description, "files": [str(f) for f in files] if files else None, "seed": seed,
            "num_samples": len(samples),
            "samples": [{"source": s.source, **s.layout.to_json(),
                         "x0": "target_latents" if s.target_latents is not None else "reference_latents"}
                        for s in samples],
            "timesteps": [float(t) for t in timesteps]}


def build_profile(result, identity, calibration_set: dict, *, command: str | None = None) -> dict:
    """The profile JSON (plan/profile.py schema) of a CalibrationResult; identity: plan.ModelIdentity."""
    from topi_export.plan.profile import SCHEMA

    return {
        "schema": SCHEMA,
        "model": {"class": identity.model_class, "family": identity.family, "config_hash": identity.config_hash,
                  "weights_hash": identity.weights_hash, "num_layers": identity.num_layers,
                  "layer_groups": [list(g) for g in result.layer_groups], "source": str(identity.source)},
        "pivotal_layers": [int(v) for v in result.pivotal_layers],
        "prune_start": int(result.prune_start),
        "update_interval": int(result.update_interval),
        "top_k": int(result.top_k),
        "sensitivity": {"mean": list(result.mean), "std": list(result.std), "layer_names": list(result.layer_names),
                        "ranking": list(result.ranking), "by_timestep": list(result.by_timestep)},
        "rules": {**result.rules,
                  **({"reuse": REUSE_RULES[result.reuse.measure]} if result.reuse is not None else {})},
        **({"reuse": result.reuse.to_json()} if result.reuse is not None else {}),
        "calibration_set": calibration_set,
        "measured": True,
        "command": command,
        "versions": tool_versions(packages=("topi-export", "torch", "diffusers")),
    }


def write_profile(path, result, identity, calibration_set: dict, *, command: str | None = None) -> dict:
    """Write the versioned profile JSON atomically; returns the profile."""
    import json

    from topi_export.fsutil import atomic_write_bytes

    profile = build_profile(result, identity, calibration_set, command=command)
    atomic_write_bytes(path, (json.dumps(profile, indent=2) + "\n").encode())
    return profile
