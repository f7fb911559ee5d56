"""scripts/measure_curvature.py: its run without reuse is the runtime's full-mode loop, the runtime's reuse step
kind skips the model at the listed steps, and a run writes the documented JSON."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "measure_curvature.py"


@pytest.fixture(scope="module")
def mod():
    spec = importlib.util.spec_from_file_location("measure_curvature", SCRIPT)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def test_parse_steps(mod):
    assert mod.parse_steps("4-26:2", 28) == list(range(4, 27, 2))
    assert mod.parse_steps("3-25:2", 28) == [3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25]
    assert mod.parse_steps("5,2", 8) == [2, 5]
    with pytest.raises(SystemExit):
        mod.parse_steps("0,3", 8)  # step 0 has nothing to reuse
    with pytest.raises(SystemExit):
        mod.parse_steps("4-28:2", 28)


def test_trajectory_is_the_runtime_loop_and_reuse_skips_calls(mod):
    from topi_export import open_session

    session = open_session(model="tiny-kontext")
    data = session.load_inputs()
    normal = mod.trajectory(session, data, 6)
    want = session.denoise(data, steps=6, mode="full").latents
    assert torch.allclose(normal, want, rtol=1e-5, atol=1e-6)

    calls, kinds = [], ("anchor", "full", "pruned")
    originals = {k: getattr(session.engine, k) for k in kinds}
    for k, fn in originals.items():
        setattr(session.engine, k, lambda *a, _fn=fn, _k=k, **kw: calls.append(_k) or _fn(*a, **kw))
    try:
        reused = mod.trajectory(session, data, 6, reuse=[2, 4])
    finally:
        for k, fn in originals.items():
            setattr(session.engine, k, fn)
    assert len(calls) == 4 and not torch.equal(reused, normal)  # 6 steps, 2 reused: 4 transformer calls


def test_main_writes_json(mod, tmp_path):
    out = tmp_path / "curv.json"
    threads = torch.get_num_threads()
    try:
        result = mod.main(["--models", "kontext-digits", "--samples", "1", "--steps", "5", "--reuse", "2",
                           "--reuse", "2-3", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    assert data["schema"] == "topi-curvature/3" and data["steps"] == 5
    assert data["models"]["kontext-digits"]["command"].startswith("python scripts/measure_curvature.py --models")
    assert data["patterns"] == {"reuse 2": {"reuse_steps": [2], "computed_steps": 4},
                                "reuse 2, 3": {"reuse_steps": [2, 3], "computed_steps": 3}}
    m = data["models"]["kontext-digits"]
    assert m["samples"] == 1
    for k in data["patterns"]:
        assert math.isfinite(m[k]["reuse_psnr_mean"]) and m[k]["reuse_psnr_min"] == m[k]["reuse_psnr_mean"]
    # More reuse, further from the normal run (measured: 66.6 dB reusing step 2, 55.0 dB reusing steps 2 and 3).
    assert m["reuse 2, 3"]["reuse_psnr_mean"] < m["reuse 2"]["reuse_psnr_mean"]
    # against the ground truth too (the held-out sample has its target): the normal run's is the runtime's psnr
    from topi_export import open_session
    from topi_export.artifacts.inputs import sample_files
    from topi_export.runtime.loop import psnr

    session = open_session(model="kontext-digits")
    sample = session.load_inputs(sample_files("kontext-digits")[0])
    normal = mod.trajectory(session, sample, 5)
    assert m["normal"]["truth_psnr_mean"] == pytest.approx(psnr(normal, sample.target_latents), abs=1e-3)
    assert all(math.isfinite(m[k]["truth_psnr_min"]) for k in data["patterns"])


def test_auto_column_is_the_models_calibrated_plan(mod, tmp_path):
    from topi_export import open_session

    threads = torch.get_num_threads()
    try:
        result = mod.main(["--models", "kontext-digits", "--samples", "1", "--steps", "12", "--reuse", "auto",
                           "--reuse", "auto:70", "--budgets", "40,70,300", "--json", ""])
    finally:
        torch.set_num_threads(threads)
    m = result["models"]["kontext-digits"]
    assert result["patterns"] == {"reuse auto": {"reuse_steps": "auto", "computed_steps": None},
                                  "reuse auto 70 dB": {"reuse_steps": "auto:70", "computed_steps": None}}
    session = open_session(model="kontext-digits")
    from topi_export.artifacts.inputs import sample_files

    want = session.reuse_plan(session.load_inputs(sample_files("kontext-digits")[0]), steps=12, reuse="auto")
    assert m["per_sample"][0]["auto"]["steps"] == list(want.steps) and want.steps
    assert math.isfinite(m["reuse auto"]["reuse_psnr_mean"])
    by = m["auto_by_budget"]  # the shipped profile's budget is 40 dB; a tighter one never reuses more
    assert by["40"]["reused"] == len(want.steps) >= by["70"]["reused"] >= by["300"]["reused"] == 0
    assert by["300"]["predicted_db"] is None and by["40"]["predicted_db"] >= 40
    # the auto:70 column runs the plan the 70 dB budget makes
    assert m["reuse auto 70 dB"]["reused"] == [by["70"]["reused"]]
    assert len(m["per_sample"][0]["plans"]["reuse auto 70 dB"]["steps"]) == by["70"]["reused"]
    with pytest.raises(SystemExit):
        mod.main(["--models", "kontext-digits", "--samples", "1", "--reuse", "auto:x", "--json", ""])


def test_update_keeps_other_models_of_the_same_procedure(mod, tmp_path):
    out = tmp_path / "curv.json"
    out.write_text(json.dumps({"schema": "topi-curvature/3", "steps": 4, "patterns": {"reuse 2": {"reuse_steps": [2]}},
                               "models": {"other": {"command": "earlier", "samples": 8, "per_edit": {},
                                                    "reuse 2": {"reuse_psnr_mean": 50.0, "reuse_psnr_min": 49.0}}}}))
    threads = torch.get_num_threads()
    try:
        mod.main(["--models", "kontext-digits", "--samples", "1", "--steps", "4", "--reuse", "2", "--json", str(out),
                  "--update"])
        data = json.loads(out.read_text())
        assert set(data["models"]) == {"other", "kontext-digits"} and data["models"]["other"]["command"] == "earlier"
        with pytest.raises(SystemExit):  # another procedure: the old entries would not be comparable
            mod.main(["--models", "kontext-digits", "--samples", "1", "--steps", "4", "--reuse", "3", "--json",
                      str(out), "--update"])
    finally:
        torch.set_num_threads(threads)


def test_calibration_option_replaces_the_shipped_profile(mod, tmp_path):
    """--calibration: the auto column plans with the given profile (a model folder ships none)."""
    from topi_export.resources import resource

    raw = json.loads(resource("calibration", "kontext-digits.json").read_text())
    raw["reuse"]["threshold"] = 10 ** (-70 / 20)  # a 70 dB budget
    path = tmp_path / "digits-70.json"
    path.write_text(json.dumps(raw))
    threads = torch.get_num_threads()
    try:
        result = mod.main(["--models", "kontext-digits", "--samples", "1", "--steps", "12", "--reuse", "auto",
                           "--budgets", "40,70", "--calibration", str(path), "--json", ""])
    finally:
        torch.set_num_threads(threads)
    m = result["models"]["kontext-digits"]
    auto = m["per_sample"][0]["auto"]
    assert str(path) in auto["why"] and len(auto["steps"]) == m["auto_by_budget"]["70"]["reused"]
    assert m["auto_by_budget"]["70"]["reused"] < m["auto_by_budget"]["40"]["reused"]
