"""Calibration (docs/design.md, "The method"): context sensitivity per layer, pivotal layers, L0, the profile and its CLI."""
from __future__ import annotations

import json

import pytest
import torch

from topi_export.cli import main
from topi_export.errors import TopiError
from topi_export.artifacts.settings import describe_set, write_profile
from topi_export.method.calibration import calibrate, prune_start_rule
from topi_export.runtime.visualize import plot_profile
from topi_export.models import load_model, weights_hash
from topi_export.plan import Layout
from topi_export.artifacts.settings import PROFILE_SCHEMA, method_settings, read_profile


def _raw(path):
    return json.loads(path.read_text())


def _settings(loaded, calibration=None):
    return method_settings(loaded.identity(), loaded.family.default_settings(), calibration)

TS = (0.9, 0.5)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the tiny model is latency-bound: extra intra-op threads only contend on shared cores
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _tiny():
    return load_model("tiny-kontext")


def _samples(adapter, n=1, seed=0, grid=(4, 4)):
    return [adapter.synthetic_inputs(Layout(4, grid, (grid,)), seed + i) for i in range(n)]


def _blocks(adapter):
    m = adapter.model
    return list(m.transformer_blocks) + list(m.single_transformer_blocks)


def _blind(adapter, layer):
    """Make layer's attention output independent of its keys/values: all value projections zero, so the
    attention output is exactly 0 with or without the context tokens."""
    attn = _blocks(adapter)[layer].attn
    with torch.no_grad():
        for name in ("to_v", "add_v_proj"):
            proj = getattr(attn, name, None)
            if proj is not None:
                proj.weight.zero_()
                proj.bias.zero_()


def _cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Kontext transformer with other weights than tiny-kontext, saved with save_pretrained."""
    from diffusers import FluxTransformer2DModel

    from topi_export.models.flux_kontext import tiny_config

    path = tmp_path_factory.mktemp("model") / "tiny-other"
    with torch.random.fork_rng():
        torch.manual_seed(1)
        FluxTransformer2DModel(**tiny_config()).save_pretrained(path, safe_serialization=True)
    return path


# (a) a layer made blind to the context has ~0 sensitivity -------------------------------------------
def test_blind_layers_have_zero_sensitivity():
    adapter = _tiny().adapter
    blind = (0, adapter.num_double + 1)  # one double-stream and one single-stream block
    for layer in blind:
        _blind(adapter, layer)
    result = calibrate(adapter, _samples(adapter), TS, top_k=2)
    for layer in blind:
        assert result.mean[layer] < 1e-6 and result.std[layer] < 1e-6
        assert layer not in result.pivotal_layers
    others = [v for layer, v in enumerate(result.mean) if layer not in blind]
    assert min(others) > 1e-4


# (b) a layer made to depend strongly on the context ranks first ---------------------------------------
def test_context_heavy_layer_ranks_first():
    adapter = _tiny().adapter
    base = calibrate(adapter, _samples(adapter), TS, top_k=1)
    weakest = base.ranking[-1]
    attn = _blocks(adapter)[weakest].attn
    with torch.no_grad():
        attn.to_v.weight.mul_(20)
        attn.to_v.bias.mul_(20)
    result = calibrate(adapter, _samples(adapter), TS, top_k=1)
    assert result.ranking[0] == weakest
    assert list(result.pivotal_layers) == [weakest]
    assert result.mean[weakest] > 2 * sorted(result.mean)[-2]


# (c) profile round trip, accepted by method_settings for the same model -------------------------------
def test_profile_round_trip(tmp_path):
    loaded = _tiny()
    samples = _samples(loaded.adapter, n=2)
    result = calibrate(loaded.adapter, samples, TS, top_k=2, seed=5, update_interval=7)
    path = tmp_path / "p.json"
    written = write_profile(path, result, loaded.identity(), describe_set(samples, TS, seed=5))
    profile = _raw(path)
    assert profile == json.loads(json.dumps(written))
    assert profile["schema"] == PROFILE_SCHEMA and profile["measured"] is True
    model = profile["model"]
    assert model["config_hash"] == loaded.config_hash and model["weights_hash"] == loaded.weights_hash
    assert (model["num_layers"], model["class"], model["family"]) == (6, "FluxTransformer2DModel", "flux-kontext")
    assert model["layer_groups"] == [["double", 0, 2], ["single", 2, 6]]
    sens = profile["sensitivity"]
    assert len(sens["mean"]) == len(sens["std"]) == len(sens["layer_names"]) == 6
    assert sens["layer_names"][:3] == ["double[0]", "double[1]", "single[0]"]
    assert set(profile["rules"]) >= {"pivotal_layers", "prune_start", "update_interval"}
    assert profile["calibration_set"]["description"] == "synthetic seeded set, seed 5, 2 samples"
    assert profile["calibration_set"]["timesteps"] == list(TS)
    assert set(profile["versions"]) >= {"topi-export", "torch", "diffusers"}
    settings = _settings(loaded, calibration=path)
    assert list(settings.pivotal_layers) == list(result.pivotal_layers) == sorted(result.ranking[:2])
    assert settings.prune_start == result.prune_start
    assert settings.update_interval == 7
    assert settings.source == str(path) and settings.provenance == "measured"


# (d) a profile for another model (other weights) is refused by `run --calibration`, naming both hashes --
def test_run_refuses_profile_of_other_weights(tmp_path, capsys):
    loaded = _tiny()
    _blind(loaded.adapter, 1)
    other_hash = weights_hash(loaded.adapter.model)
    from dataclasses import replace

    identity = replace(loaded.identity(), weights_hash=other_hash, source="tiny-kontext (modified)")
    samples = _samples(loaded.adapter)
    path = tmp_path / "other.json"
    write_profile(path, calibrate(loaded.adapter, samples, TS), identity, describe_set(samples, TS))
    code, out, err = _cli(["run", "--model", "tiny-kontext", "--calibration", path, "--steps", "2", "-q"], capsys)
    tiny_hash = _tiny().weights_hash
    assert code == 2
    assert other_hash != tiny_hash and other_hash in err and tiny_hash in err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1


# (e) deterministic for a fixed seed --------------------------------------------------------------------
def test_deterministic_for_fixed_seed():
    adapter = _tiny().adapter
    a = calibrate(adapter, _samples(adapter, n=2, seed=3), TS, seed=3)
    b = calibrate(_tiny().adapter, _samples(adapter, n=2, seed=3), TS, seed=3)
    c = calibrate(adapter, _samples(adapter, n=2, seed=4), TS, seed=4)
    for key in ("values", "mean", "std", "ranking", "pivotal_layers", "prune_start"):
        assert getattr(a, key) == getattr(b, key)
    assert a.values != c.values


def test_prune_start_rule():
    flat = [1.0] * 57
    assert prune_start_rule(flat, [13, 18, 31]) == 10  # a flat profile gives the published L0
    assert prune_start_rule(flat, [4, 18, 31]) == 4  # never after the first pivotal layer
    assert prune_start_rule([5.0] + [0.1] * 9, [0, 1, 2]) == 1  # clamped to >= 1
    assert prune_start_rule([0.0] * 9 + [1.0], [9]) == 9
    assert prune_start_rule([0.0] * 6, [0]) == 1


# (f) the CLI on tiny-kontext and on a save_pretrained folder; run --calibration uses the profile -------
@pytest.mark.parametrize("which", ["tiny-kontext", "folder"])
def test_cli_calibrate_then_run(which, model_dir, tmp_path, capsys):
    model = "tiny-kontext" if which == "tiny-kontext" else str(model_dir)
    out = tmp_path / "calib" / "prof.json"
    code, stdout, err = _cli(["calibrate", "--model", model, "--samples", "1", "--grid", "4x4", "--text-tokens", "4",
                              "--timesteps", "0.9,0.5", "--top-k", "2", "--out", out, "--quiet"], capsys)
    assert code == 0, err
    assert out.is_file() and out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    profile = _raw(out)
    assert profile["model"]["source"] == model and len(profile["pivotal_layers"]) == 2
    assert "pivotal layers" in stdout and "prune start L0" in stdout and "rank" in stdout
    report = tmp_path / "run.json"
    code, stdout, err = _cli(["run", "--model", model, "--calibration", out, "--steps", "2", "--ratio", "0.5",
                              "--json", report, "-q"], capsys)
    assert code == 0, err
    method = json.loads(report.read_text())["method"]
    assert method["source"] == str(out)
    assert method["pivotal_layers"] == profile["pivotal_layers"] and method["prune_start"] == profile["prune_start"]
    if which == "folder":  # the folder's profile is bound to its weights: tiny-kontext refuses it
        code, _, err = _cli(["run", "--model", "tiny-kontext", "--calibration", out, "--steps", "2", "-q"], capsys)
        assert code == 2 and profile["model"]["weights_hash"] in err


def test_cli_calibrate_from_inputs_files(tmp_path, capsys):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    common = {"reference_latents": torch.randn(1, 16, 16, generator=g), "prompt_embeds": torch.randn(1, 4, 32, generator=g),
              "pooled_prompt_embeds": torch.randn(1, 16, generator=g)}
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({**common, "target_latents": torch.randn(1, 4, 16, generator=g)}, str(a), metadata={"target_grid": "2x2"})
    save_file({**common, "noise": torch.randn(1, 4, 16, generator=g)}, str(b))  # x0 = reference resized to 2x2
    out = tmp_path / "files.json"
    code, _, err = _cli(["calibrate", "--model", "tiny-kontext", "--inputs", a, "--inputs", b, "--timesteps", "1,0.4",
                         "--out", out, "-q"], capsys)
    assert code == 0, err
    cal = _raw(out)["calibration_set"]
    assert cal["files"] == [str(a), str(b)] and cal["num_samples"] == 2
    assert [s["x0"] for s in cal["samples"]] == ["target_latents", "reference_latents"]
    assert [s["target_grid"] for s in cal["samples"]] == [[2, 2], [2, 2]]


@pytest.mark.parametrize("args, needle", [
    (["--top-k", "7"], "--top-k 7"),
    (["--top-k", "0"], "--top-k': 0"),
    (["--timesteps", "0,0.5"], "outside (0, 1]"),
    (["--timesteps", "0.5,1.5"], "outside (0, 1]"),
    (["--timesteps", "a,b"], "bad --timesteps"),
    (["--inputs", "missing.safetensors"], "not found"),
    (["--samples", "0"], "'--samples': 0"),
])
def test_cli_bad_args(args, needle, tmp_path, capsys):
    args = [a.replace("missing.safetensors", str(tmp_path / "missing.safetensors")) for a in args]
    code, _, err = _cli(["calibrate", "--model", "tiny-kontext", "--out", tmp_path / "x.json", *args], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.json").exists()


def test_calibrate_rejects_bad_arguments():
    adapter = _tiny().adapter
    with pytest.raises(TopiError, match="top-k"):
        calibrate(adapter, _samples(adapter), TS, top_k=adapter.num_layers + 1)
    with pytest.raises(TopiError, match="outside"):
        calibrate(adapter, _samples(adapter), (0.0,))
    with pytest.raises(TopiError, match="empty"):
        calibrate(adapter, [], TS)


def test_shipped_profiles():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "topi_export" / "calibration"
    published = read_profile(root / "flux.1-kontext-dev.json")
    assert published.pivotal_layers == (13, 18, 31) and published.prune_start == 10
    assert published.update_interval == 10 and published.measured is False
    assert published.weights_hash is None and published.num_layers == 57
    assert published.settings().provenance == "published"
    tiny = _tiny()
    profile = read_profile(root / "tiny-kontext.json")
    assert profile.measured is True and profile.weights_hash == tiny.weights_hash
    settings = _settings(tiny)
    assert settings.source == "calibration/tiny-kontext.json" and settings.pivotal_layers == profile.pivotal_layers


def test_calibration_none_ignores_the_shipped_profile(tmp_path, capsys):
    """--calibration none: the family's default setting although a shipped profile matches (an uncalibrated user),
    and the report says so."""
    from conftest import run_cli

    tiny = _tiny()
    shipped, default = _settings(tiny), tiny.family.default_settings()
    assert shipped.source == "calibration/tiny-kontext.json" and shipped.pivotal_layers != default.pivotal_layers
    none = _settings(tiny, "none")
    assert (none.pivotal_layers, none.prune_start, none.provenance) == (
        default.pivotal_layers, default.prune_start, default.provenance)
    assert none.source.startswith("family default (--calibration none)")
    for command in (["run"], ["bench", "--ratio-buckets", "0.5", "--policies", "uniform", "--no-default-policy",
                              "--md", str(tmp_path / "b.md"), "--png", str(tmp_path / "b.png")]):
        out = tmp_path / f"{command[0]}.json"
        code, _, err = run_cli(command + ["--model", "tiny-kontext", "--calibration", "none", "--steps", "2", "-q",
                                          "--json", str(out)], capsys)
        assert code == 0, err
        method = json.loads(out.read_text())["method"]
        assert method["pivotal_layers"] == list(default.pivotal_layers) and method["source"] == none.source


def test_plot_profile_writes_png(tmp_path):
    from topi_export.plan.results import CalibrationResult

    result = CalibrationResult(
        num_layers=3, layer_groups=(("double", 0, 1), ("single", 1, 3)), layer_names=("a", "b", "c"),
        timesteps=(0.5,), num_samples=1, mean=(0.1, 0.3, 0.2), std=(0.01, 0.02, 0.0), by_timestep=(), values=(),
        ranking=(1, 2, 0), top_k=1, pivotal_layers=(1,), prune_start=1, update_interval=10, rules={}, seed=0,
        forward_passes=4)
    plot_profile(tmp_path / "p.png", result)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
