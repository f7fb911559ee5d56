"""`topi-export run` through the CLI: output table, JSON contract, model folders, and bad inputs."""
import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_cli


def _write_inputs(path, nx=16, nc=16, c=16, t=8, d=32, p=16, metadata=None, **override):
    g = torch.Generator().manual_seed(0)
    tensors = {"reference_latents": torch.randn(1, nc, c, generator=g),
               "prompt_embeds": torch.randn(1, t, d, generator=g),
               "pooled_prompt_embeds": torch.randn(1, p, generator=g),
               "noise": torch.randn(1, nx, c, generator=g)}
    tensors.update(override)
    tensors = {k: v for k, v in tensors.items() if v is not None}
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_run_compare_prints_table_and_writes_json(tmp_path, capsys):
    inputs = _write_inputs(tmp_path / "in.safetensors", metadata={"target_grid": "4x4", "reference_grid": "4x4"})
    code, out, err = run_cli(["run", "--model", "tiny-kontext", "--inputs", str(inputs), "--steps", "6",
                              "--ratio", "0.5", "--update-interval", "3", "--compare", "--quiet",
                              "--json", str(tmp_path / "r.json"), "--out", str(tmp_path / "lat.safetensors")], capsys)
    assert code == 0, err
    assert "speedup" in out and "PSNR" in out and "ToPi" in out
    report = json.loads((tmp_path / "r.json").read_text())
    for key in ("speedup", "psnr_db", "rel_l2", "time_s", "schedule"):
        assert key in report
    assert set(report["time_s"]) == {"topi", "dense"} and report["baseline"] == "dense"
    assert report["speedup"] == report["time_s"]["dense"] / report["time_s"]["topi"]
    assert [s["kind"] for s in report["schedule"]] == ["anchor", "pruned", "pruned"] * 2
    assert [s["keep"] for s in report["schedule"]] == [16, 8, 8] * 2
    assert all(s["keep_per_reference"] == [s["keep"]] for s in report["schedule"])
    anchors = [s for s in report["schedule"] if s["kind"] == "anchor"]
    assert all(s["selected_keep"] == 8 and 0 < s["kept_influence"] <= 1 for s in anchors)
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "lat.safetensors"))["latents"].shape == (1, 16, 16)


def test_run_without_compare_has_no_fidelity_keys(tmp_path, capsys):
    code, _, err = run_cli(["run", "--model", "tiny-kontext", "--steps", "2", "-q", "--json", str(tmp_path / "r.json")],
                           capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert "speedup" not in report and "psnr_db" not in report and report["schedule"]


def test_run_on_saved_model_directory(tmp_path, capsys):
    from topi_export.models import build_builtin

    model = build_builtin("tiny-kontext")
    model.save_pretrained(tmp_path / "pipe" / "transformer", safe_serialization=True)  # pipeline-folder layout
    code, out, err = run_cli(["run", "--model", str(tmp_path / "pipe"), "--steps", "3", "--compare", "-q"], capsys)
    assert code == 0, err
    assert "ToPi" in out


def test_tau_mode(tmp_path, capsys):
    code, out, err = run_cli(["run", "--model", "tiny-kontext", "--steps", "3", "--tau", "0.5",
                              "--ratio-buckets", "0.3,0.5", "-q", "--json", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    keeps = {s["keep"] for s in json.loads((tmp_path / "r.json").read_text())["schedule"]}
    assert keeps <= {32, 45, 64}


def _bad(tmp_path, name, **kw):
    return _write_inputs(tmp_path / f"{name}.safetensors", **kw)


@pytest.mark.parametrize("case,args_fn,needle", [
    ("missing file", lambda p: ["--inputs", str(p / "nope.safetensors")], "not found"),
    ("corrupt file", lambda p: ["--inputs", str(_corrupt(p))], "not a valid safetensors"),
    ("missing tensor", lambda p: ["--inputs", str(_bad(p, "m", prompt_embeds=None))], "no tensor 'prompt_embeds'"),
    ("wrong rank", lambda p: ["--inputs", str(_bad(p, "r", reference_latents=torch.randn(16, 16)))], "rank 3"),
    ("channel mismatch", lambda p: ["--inputs", str(_bad(p, "c", reference_latents=torch.randn(1, 16, 12),
                                                              noise=torch.randn(1, 16, 12)))], "expects 16"),
    ("nan", lambda p: ["--inputs", str(_bad(p, "n", noise=torch.full((1, 16, 16), float("nan"))))], "NaN"),
    ("ratio 1", lambda p: ["--ratio", "1.0"], "outside [0, 1)"),
    ("ratio negative", lambda p: ["--ratio", "-0.2"], "outside [0, 1)"),
    ("missing model", lambda p: ["--model", str(p / "no-model")], "not found"),
    ("bad buckets", lambda p: ["--tau", "0.5", "--ratio-buckets", "0.5,0.3"], "ascending"),
])
def test_bad_input_gives_one_line_error(tmp_path, capsys, case, args_fn, needle):
    args = ["run", "--steps", "2", "-q"] + args_fn(tmp_path)
    if "--model" not in args:
        args += ["--model", "tiny-kontext"]
    code, out, err = run_cli(args, capsys)
    assert code == 2, (case, out, err)
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (case, err)


def _corrupt(p):
    path = p / "corrupt.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    return path


def test_unsupported_model_class_lists_supported(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    code, _, err = run_cli(["run", "--model", str(tmp_path / "m"), "-q"], capsys)
    assert code == 2 and "FluxTransformer2DModel" in err


def test_help_lists_commands_without_heavy_imports(capsys):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "topi_export.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "build" in out.stdout and "run" in out.stdout
    probe = subprocess.run([sys.executable, "-c", "import topi_export.cli, sys; print('torch' in sys.modules)"],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "False"  # the CLI entry imports no heavy backend


def test_png_strip(tmp_path, capsys):
    from PIL import Image

    png = tmp_path / "strip.png"
    code, out, err = run_cli(["run", "--model", "tiny-kontext", "--steps", "2", "--compare", "-q", "--png", str(png)],
                             capsys)
    assert code == 0, err
    img = Image.open(png)
    # three square panels side by side (reference, dense, ToPi) under a title bar
    assert img.size[0] > 2.5 * img.size[1] and img.size[1] < img.size[0] // 3 + 40
    code, _, err = run_cli(["run", "--model", "tiny-kontext", "--steps", "2", "-q", "--png", str(png)], capsys)
    assert code == 2 and "--compare" in err
