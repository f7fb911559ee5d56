"""The model-family contract: a made-up third family (tests/fake_family.py: one module) plus one registry line goes
through build and run on ONNX Runtime; generic code never names a family."""
import json
import re
from pathlib import Path

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


def test_generic_code_never_names_a_family():
    """Only topi_export/models/ knows the families (and their diffusers classes and position ids)."""
    pattern = re.compile(r"FluxTransformer2DModel|Flux2Transformer2DModel|QwenImageTransformer2DModel|kontext_ids|"
                         r"single_transformer_blocks|txt_ids|img_ids|img_shapes|num_double")
    offenders = []
    for path in sorted((ROOT / "topi_export").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("topi_export/models/"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{rel}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
