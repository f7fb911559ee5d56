"""LoRA (topi_export/lora.py): adapters made with peft on tiny-kontext, fused before export (`build --lora`),
recorded in the manifest, run by the PyTorch backend (`run --lora`), swapped without re-exporting (`refit`)."""
import json
import warnings

import pytest
import torch

from conftest import run_cli
from topi_export.plan import Layout

pytest.importorskip("peft", reason="LoRA needs peft (pip install '.[lora]')")

LAYOUT = Layout(8, (4, 4), ((4, 4),))
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp"]


def make_lora(path, seed: int, targets=TARGETS):
    """A LoRA for tiny-kontext made with peft (random A and B: it changes the output), saved as diffusers saves
    FLUX LoRAs (transformer.* keys)."""
    import diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from topi_export.models import build_builtin

    model = build_builtin("tiny-kontext")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False),
                          adapter_name="x")
    state = get_peft_model_state_dict(model, adapter_name="x")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        diffusers.FluxKontextPipeline.save_lora_weights(path.parent, transformer_lora_layers=state,
                                                        weight_name=path.name, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return make_lora(root / "a.safetensors", 11), make_lora(root / "b.safetensors", 12)


def _build(out, *loras_):
    from topi_export import build_engines

    return build_engines(model="tiny-kontext", layouts=(LAYOUT,), ratio_buckets="0.5", engine_dir=out,
                         loras=tuple(loras_), echo=lambda s: None)


@pytest.fixture(scope="module")
def engines(loras, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-engines")
    a, b = loras
    return {"a": _build(root / "a", f"{a}:0.8"), "b": _build(root / "b", str(b))}


def _data(seed=4):
    from topi_export.models import load_model

    return load_model("tiny-kontext").family.synthetic_inputs(LAYOUT, seed)


def _unfused_reference(lora, scale, data, steps):
    """The diffusers model with the adapter as peft layers (unfused), called as FluxKontextPipeline calls it."""
    from topi_export.lora import attach, parse_adapter
    from topi_export.models import build_builtin
    from topi_export.models.flux_kontext import FluxKontext

    model = build_builtin("tiny-kontext").eval()
    attach(FluxKontext, model, [parse_adapter(f"{lora}:{scale}")])
    family = FluxKontext(dict(model.config))
    sched = family.make_scheduler(steps, data.layout)
    latents = data.initial_noise(0)
    with torch.no_grad():
        for t in sched.timesteps:
            v = family.pipeline_call(model, latents, data.reference_latents, (t / 1000).reshape(1).float(), data)
            latents = sched.step(v, t, latents, return_dict=False)[0]
    return latents


def test_fused_engine_equals_the_model_with_the_adapter(engines, loras):
    from topi_export import denoise, open_session
    from topi_export.runtime.loop import rel_l2

    data = _data()
    s = open_session(engine_dir=engines["a"], update_interval=2)
    dense = denoise(s.engine, s.family, data, steps=4, mode="dense")
    ref = _unfused_reference(loras[0], 0.8, data, 4)
    assert rel_l2(dense.latents, ref) <= 1e-4
    full = denoise(s.engine, s.family, data, steps=4, mode="full")
    assert rel_l2(full.latents, ref) <= 1e-4
    base = _unfused_reference(loras[0], 0.0, data, 4)  # the adapter matters at this scale
    assert rel_l2(base, ref) > 1e-2


def test_run_lora_with_torch_equals_the_fused_engine(engines, loras, tmp_path, capsys):
    from safetensors.torch import load_file

    from topi_export.artifacts.inputs import save_inputs
    from topi_export.runtime.loop import rel_l2

    data = _data(5)
    data.noise = data.initial_noise(5)
    save_inputs(tmp_path / "in.safetensors", data)
    common = ["--inputs", str(tmp_path / "in.safetensors"), "--steps", "4", "--update-interval", "2", "--ratio",
              "0.5", "-q"]
    code, out, err = run_cli(["run", "--model", "tiny-kontext", "--lora", f"{loras[0]}:0.8", *common,
                              "--out", str(tmp_path / "t.safetensors"), "--json", str(tmp_path / "t.json")], capsys)
    assert code == 0, err
    assert "LoRA a.safetensors x0.8" in out
    code, _, err = run_cli(["run", "--engine-dir", str(engines["a"]), *common, "--out", str(tmp_path / "o.safetensors"),
                            "--json", str(tmp_path / "o.json")], capsys)
    assert code == 0, err
    for name in ("t", "o"):
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert [(a["file"], a["scale"]) for a in report["adapters"]] == [("a.safetensors", 0.8)]
    assert rel_l2(load_file(str(tmp_path / "o.safetensors"))["latents"],
                  load_file(str(tmp_path / "t.safetensors"))["latents"]) <= 1e-4


def test_manifest_records_each_adapter(engines, loras):
    import hashlib

    from topi_export import read_manifest

    m = read_manifest(engines["a"])
    sha = hashlib.sha256(loras[0].read_bytes()).hexdigest()
    assert m.model.adapters == ({"file": "a.safetensors", "sha256": sha, "scale": 0.8},)
    plain = read_manifest(engines["b"]).model
    assert plain.weights_hash == m.model.weights_hash  # the base weights' identity; the adapters are beside it


def test_run_lora_on_engines_is_refused_naming_refit(engines, loras, capsys):
    code, _, err = run_cli(["run", "--engine-dir", str(engines["a"]), "--lora", str(loras[1]), "--steps", "2", "-q"],
                           capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "topi-export refit" in err


def test_reference_of_lora_engines_needs_the_same_adapters(engines, loras, capsys):
    code, _, err = run_cli(["check", "--engine-dir", str(engines["a"])], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "fused with LoRA a.safetensors x0.8" in err
    code, out, err = run_cli(["check", "--engine-dir", str(engines["a"]), "--lora", f"{loras[0]}:0.8"], capsys)
    assert code == 0, err


def test_refit_equals_a_fresh_build(engines, loras, tmp_path, capsys):
    """refit A -> B writes a new weights file beside the same graphs, and runs like `build --lora B`."""
    from topi_export import denoise, open_session, read_manifest
    from topi_export.runtime.loop import rel_l2

    out = tmp_path / "a-to-b"
    code, _, err = run_cli(["refit", "--engine-dir", str(engines["a"]), "--lora", str(loras[1]), "--out", str(out)],
                           capsys)
    assert code == 0, err
    src, new, fresh = (read_manifest(p) for p in (engines["a"], out, engines["b"]))
    assert new.model.adapters == fresh.model.adapters
    for rel in ("onnx/topi.onnx", "onnx/dense.onnx"):  # the same graphs
        assert new.files[rel] == src.files[rel]
    assert new.files["onnx/weights.data"] != src.files["onnx/weights.data"]
    data = _data(6)
    runs = []
    for path in (out, engines["b"]):
        s = open_session(engine_dir=path, update_interval=2)
        runs.append(denoise(s.engine, s.family, data, steps=4, selector=s.selector(data, ratio=0.5)).latents)
    assert rel_l2(runs[0], runs[1]) <= 1e-6


def test_refit_to_no_adapter_restores_the_base_model(engines, tmp_path, capsys):
    from topi_export import denoise, open_session
    from topi_export.runtime.loop import rel_l2

    out = tmp_path / "base"
    code, _, err = run_cli(["refit", "--engine-dir", str(engines["a"]), "--out", str(out)], capsys)
    assert code == 0, err
    data = _data(7)
    ort = open_session(engine_dir=out, update_interval=2)
    ref = open_session(model="tiny-kontext", update_interval=2)
    got = denoise(ort.engine, ort.family, data, steps=3, mode="dense").latents
    want = denoise(ref.engine, ref.family, data, steps=3, mode="dense").latents
    assert rel_l2(got, want) <= 1e-4


def test_refit_refuses_adapters_for_folded_weights(engines, tmp_path, capsys):
    """A LoRA on a layer whose weight the exporter folded away (not stored as itself) cannot be refitted."""
    from topi_export.export import weights_map

    slots, _ = weights_map.read_refit_map(engines["a"] / weights_map.REFIT_MAP)
    with pytest.raises(Exception, match="not stored as themselves"):
        weights_map.new_values([s for s in slots if "to_q" not in s.params[0][0]],
                               {"transformer_blocks.0.attn.to_q.weight"}, {}, "fp32", ["onnx/topi.onnx"])


def test_tensorrt_refit_refuses_engines_built_without_refittable(tmp_path):
    from types import SimpleNamespace

    from topi_export.backends.base import RefitJob
    from topi_export.backends.tensorrt.refitting import refit
    from topi_export.errors import BadInput

    m = SimpleNamespace(root=tmp_path, target={"weights": "engine"}, files={}, graphs={}, precision="bf16")
    with pytest.raises(BadInput, match="--refittable"):
        refit(RefitJob(m, tmp_path, (), frozenset(), {}), "tensorrt-rtx")


def test_missing_peft_is_one_line_naming_the_extra(loras, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    code, _, err = run_cli(["build", "--model", "tiny-kontext", "--target-grid", "4x4", "--lora", str(loras[0]),
                            "--engine-dir", str(tmp_path / "e")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "topi-export[lora]" in err


@pytest.mark.tensorrt_rtx
def test_tensorrt_rtx_refittable_build_without_a_gpu_is_refused(loras, tmp_path, capsys):
    """TensorRT-RTX 1.7.1 builds no refittable engine ahead of time without a GPU (its compiler needs CUDA): the
    build probe refuses --refittable in one line instead of failing in the middle of the build."""
    pytest.importorskip("tensorrt_rtx")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refittable build may succeed")
    code, _, err = run_cli(["build", "--model", "tiny-kontext", "--target-grid", "4x4", "--ratio-buckets", "0.5",
                            "--backend", "tensorrt-rtx", "--refittable", "--no-dense-baseline",
                            "--engine-dir", str(tmp_path / "rtx")], capsys)
    assert code == 2 and "--refittable" in err.strip().splitlines()[-1]
    assert not (tmp_path / "rtx").exists()
