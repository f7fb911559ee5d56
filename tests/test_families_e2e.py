"""Every command on the new families: FLUX.2 with three references and Qwen-Image-Edit with true CFG go through
calibrate, build (ONNX Runtime and TensorRT-RTX ahead of time), run, check, bench and triton via the CLI."""
import importlib.util
import json

import pytest

from conftest import run_cli

RTX = importlib.util.find_spec("tensorrt_rtx") is not None
needs_rtx = pytest.mark.skipif(not RTX, reason="tensorrt-rtx is not installed (pip install 'topi-export[tensorrt-rtx]')")
REFS = ["--target-grid", "4x4", "--ref-grids", "4x4,4x4,2x4", "--text-tokens", "4"]


@pytest.fixture(scope="module")
def flux2_engines(tmp_path_factory):
    out = tmp_path_factory.mktemp("flux2") / "ort"
    code, _, err = run_cli(["build", "--model", "tiny-flux2", *REFS, "--ratio-buckets", "0.3,0.5",
                            "--engine-dir", str(out)])
    assert code == 0, err
    return out


def test_flux2_three_references_through_every_command(flux2_engines, tmp_path, capsys):
    code, out, err = run_cli(["calibrate", "--model", "tiny-flux2", "--samples", "1", "--grid", "4x4", "--ref-grid",
                              "4x4,4x4,2x4", "--text-tokens", "4", "--timesteps", "0.7", "--out",
                              str(tmp_path / "cal.json"), "-q"], capsys)
    assert code == 0, err
    profile = json.loads((tmp_path / "cal.json").read_text())
    assert profile["model"]["family"] == "flux2" and profile["calibration_set"]["samples"][0]["reference_grids"] == [
        [4, 4], [4, 4], [2, 4]]
    code, out, err = run_cli(["run", "--engine-dir", str(flux2_engines), "--steps", "4", "--update-interval", "2",
                              "--compare", "-q", "--json", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["family"] == "flux2" and rep["baseline"] == "dense" and len(rep["layout"]["reference_grids"]) == 3
    assert all(len(r["keep_per_reference"]) == 3 and sum(r["keep_per_reference"]) == r["keep"] for r in rep["schedule"])
    assert "FLUX.1 Kontext published setting" in rep["method"]["source"]  # no FLUX.2 setting exists: labelled
    code, out, err = run_cli(["check", "--engine-dir", str(flux2_engines)], capsys)
    assert code == 0 and "comparisons pass" in out, err
    code, out, err = run_cli(["bench", "--model", "tiny-flux2", "--target-grid", "4x4", "--ref-grids", "4x4,4x4,2x4",
                              "--text-tokens", "4", "--ratio-buckets", "0.5", "--steps", "3", "--policies", "topi",
                              "--json", str(tmp_path / "b.json"), "-q"], capsys)
    assert code == 0, err
    pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] is not installed")
    code, out, err = run_cli(["triton", "--engine-dir", str(flux2_engines), "--out", str(tmp_path / "repo")], capsys)
    assert code == 0, err
    assert (tmp_path / "repo" / "topi_topi" / "1" / "model.onnx").is_file()


@needs_rtx
def test_flux2_tensorrt_rtx_ahead_of_time(tmp_path, capsys):
    code, _, err = run_cli(["build", "--model", "tiny-flux2", *REFS, "--ratio-buckets", "0.5", "--backend",
                            "tensorrt-rtx", "--compute-capability", "SM89", "--engine-dir", str(tmp_path / "rtx")],
                           capsys)
    assert code == 0, err
    m = json.loads((tmp_path / "rtx" / "manifest.json").read_text())
    assert m["model"]["family"] == "flux2" and (tmp_path / "rtx" / "topi.engine").is_file()
    assert [(p["ratio"], p["keep"]) for p in m["profiles"]] == [(0.0, 40), (0.5, 20)]


@needs_rtx
def test_qwen_edit_true_cfg_tensorrt_rtx_ahead_of_time(tmp_path, capsys):
    code, _, err = run_cli(["build", "--model", "tiny-qwen-edit", "--target-grid", "4x4", "--ref-grids", "4x4,4x4",
                            "--text-tokens", "6", "--ratio-buckets", "0.3,0.5", "--backend", "tensorrt-rtx",
                            "--compute-capability", "SM89", "--engine-dir", str(tmp_path / "rtx")], capsys)
    assert code == 0, err
    m = json.loads((tmp_path / "rtx" / "manifest.json").read_text())
    assert m["guidance"] == "true-cfg" and m["batch"] == 2 and len(m["profiles"]) == 3
