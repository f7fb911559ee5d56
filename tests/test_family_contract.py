"""The model-family contract: a made-up third family (tests/fake_family.py: one module) plus one registry line goes
through build and run on ONNX Runtime; generic code never names a family."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_fake_family_from_one_module_and_one_registry_line(tmp_path, capsys, monkeypatch):
    import topi_export.models as registry

    monkeypatch.setattr(registry, "FAMILY_MODULES", registry.FAMILY_MODULES + ["fake_family"])  # the one line
    from fake_family import ToyFamily, ToyDiT

    loaded = registry.load_model("tiny-toy")
    assert isinstance(loaded.family, ToyFamily) and loaded.identity().family == "toy-dit"
    # the ToPi forward equals the plain model at ratio 0
    data = loaded.family.synthetic_inputs(__import__("topi_export").Layout(3, (2, 3), ((2, 2), (1, 3))), 0)
    x, t = torch.randn(1, 6, 8), torch.tensor([0.3])
    with torch.no_grad():
        v, infl = loaded.family.forward(x, data.reference_latents, t, loaded.family.conditioning(data),
                                        influence_layers=(1,))
        ref = loaded.family.pipeline_call(registry.build_builtin("tiny-toy"), x, data.reference_latents, t, data)
    assert isinstance(registry.build_builtin("tiny-toy"), ToyDiT)
    torch.testing.assert_close(v, ref, rtol=0, atol=1e-6)
    assert infl.shape == (1, 7)
    eng = tmp_path / "toy"
    code, _, err = run_cli(["build", "--model", "tiny-toy", "--target-grid", "4x4", "--ref-grids", "4x4,2x4",
                            "--text-tokens", "3", "--ratio-buckets", "0.5", "--engine-dir", str(eng)], capsys)
    assert code == 0, err
    code, out, err = run_cli(["run", "--engine-dir", str(eng), "--steps", "4", "--update-interval", "2", "--compare",
                              "-q", "--json", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["family"] == "toy-dit" and rep["baseline"] == "dense"
    assert [r["keep"] for r in rep["schedule"]] == [24, 12, 24, 12]
    assert all(sum(r["keep_per_reference"]) == r["keep"] for r in rep["schedule"])
    code, out, err = run_cli(["check", "--engine-dir", str(eng)], capsys)
    assert code == 0 and "all 5 comparisons pass" in out, err

    # its inputs file (its own tensor and scalar names, declared once in its tensor_specs) loads and runs
    from topi_export.artifacts.inputs import load_inputs, save_inputs

    request = loaded.family.synthetic_inputs(__import__("topi_export").Layout(3, (4, 4), ((4, 4), (2, 4))), 3)
    request.scalars["strength"] = 0.5
    save_inputs(tmp_path / "in.safetensors", request)
    back = load_inputs(tmp_path / "in.safetensors", loaded.family)
    assert set(back.tensors) == {"text_embeds"} and back.scalars == {"strength": 0.5}
    code, out, err = run_cli(["run", "--engine-dir", str(eng), "--inputs", str(tmp_path / "in.safetensors"),
                              "--steps", "4", "-q", "--out", str(tmp_path / "lat.safetensors")], capsys)
    assert code == 0, err
    from safetensors.torch import load_file

    ran = load_file(str(tmp_path / "lat.safetensors"))["latents"]

    # and it is served: the Triton loop model (ONNX Runtime standing in for Triton's engine models) gives run's latents
    pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs tritonclient[grpc]")
    import hashlib

    import onnxruntime as ort

    from topi_export.serving.triton_engine import open_loop_session, run_request
    from topi_export.serving.triton_repo import generate_repository

    repo = tmp_path / "repo"
    generate_repository(eng, repo, kind="cpu")
    sessions = {d.name: ort.InferenceSession(str(d / "1" / "model.onnx")) for d in repo.iterdir()
                if (d / "1" / "model.onnx").exists()}
    infer = lambda name, feed, outs: dict(zip(outs, sessions[name].run(outs, feed)))  # noqa: E731
    loop = open_loop_session(repo / "topi_loop", infer, {"topi": "topi_topi", "dense": "topi_dense"},
                             hashlib.sha256((repo / "topi_loop" / "manifest.json").read_bytes()).hexdigest())
    arrays = {"reference_latents": request.reference_latents.numpy(),
              "text_embeds": request.tensors["text_embeds"].numpy(), "strength": np.array([0.5], np.float32),
              "steps": np.array([4], np.int32), "reference_grids": np.array([b"4x4,2x4"], object),
              "target_grid": np.array([b"4x4"], object)}
    latents, _ = run_request(loop, arrays)
    torch.testing.assert_close(torch.from_numpy(latents), ran, rtol=0, atol=1e-5)


def test_generic_code_never_names_a_family():
    """Only topi_export/models/ knows the families (their diffusers classes, position ids, tensor names and
    guidance scalars)."""
    pattern = re.compile(r"FluxTransformer2DModel|Flux2Transformer2DModel|QwenImageTransformer2DModel|kontext_ids|"
                         r"single_transformer_blocks|txt_ids|img_ids|img_shapes|num_double|prompt_embeds|"
                         r"true_cfg_scale|encoder_hidden_states|pooled_projections|true-cfg")
    offenders = []
    for path in sorted((ROOT / "topi_export").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("topi_export/models/"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{rel}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_generic_code_never_names_a_backend():
    """Backends own their capabilities and options (backends/<name>.py): generic code asks BACKEND, never a name."""
    pattern = re.compile(r"[\"'](torch|onnxruntime|tensorrt|tensorrt-rtx|tensorrt_rtx)[\"']")
    offenders = []
    for path in sorted((ROOT / "topi_export").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(("topi_export/backends/", "topi_export/kernels/")):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if pattern.search(code) and "packages" not in code and "PACKAGES" not in code:
                offenders.append(f"{rel}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
