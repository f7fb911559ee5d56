"""`edit` and `encode` (runtime/pipeline.py, models/*_pipeline.py) with real diffusers pipelines built from tiny
local components (tests/tiny_pipelines.py): FluxKontextPipeline, Flux2KleinPipeline, QwenImageEditPlusPipeline.

The pipelines' resolution rules make ~1 megapixel references and targets; the tests shrink the rules' constants
in the pipeline modules (the front ends read the same module globals, so the prediction still follows the
pipeline) and pass small --width/--height."""
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli

pytest.importorskip("transformers", reason="the pipelines' text encoders need transformers (pip install '.[edit]')")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def small_rules():
    import diffusers.pipelines.flux.pipeline_flux_kontext as kontext
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kontext, "PREFERRED_KONTEXT_RESOLUTIONS", [(64, 48), (64, 64), (48, 64)])
        mp.setattr(plus, "VAE_IMAGE_SIZE", 64 * 64)
        mp.setattr(plus, "CONDITION_IMAGE_SIZE", 56 * 56)
        yield


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    import tiny_pipelines as tp

    root = tmp_path_factory.mktemp("pipelines")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"kontext": tp.kontext_pipeline(root / "kontext"), "klein": tp.klein_pipeline(root / "klein"),
                "qwen": tp.qwen_edit_plus_pipeline(root / "qwen")}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    out = {}
    for name, (w, h), seed in (("wide", (80, 60), 1), ("square", (64, 64), 2), ("flat", (96, 64), 3)):
        out[name] = root / f"{name}.png"
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(out[name])
    return out


CASES = {  # family -> (images, extra flags, the same call in Python)
    "kontext": (["wide"], ["--width", "64", "--height", "64", "--guidance", "3.0"],
                dict(height=64, width=64, max_area=64 * 64, guidance_scale=3.0)),
    "klein": (["square", "flat"], [], {}),
    "qwen": (["square", "flat"], ["--negative-prompt", " ", "--true-cfg-scale", "3.0", "--width", "64", "--height",
                                  "64"], dict(negative_prompt=" ", true_cfg_scale=3.0, height=64, width=64)),
}
PROMPT = "make it blue"


def _edit(pipes, images, family, tmp_path, capsys, *extra):
    names, flags, _ = CASES[family]
    out = tmp_path / f"{family}.png"
    args = ["edit", "--model", str(pipes[family]), *sum((["--image", str(images[n])] for n in names), []),
            "--prompt", PROMPT, "--steps", "4", "--update-interval", "2", "--seed", "3", "--out", str(out),
            "--save-latents", str(tmp_path / f"{family}.safetensors"), "-q", *flags, *extra]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    return out, tmp_path / f"{family}.safetensors", stdout, err


def _python_pipeline(pipes, images, family, transformer):
    """The same edit written by hand: the family's pipeline class, the drop-in as its transformer."""
    import diffusers
    from PIL import Image

    folder = pipes[family]
    index = json.loads((folder / "model_index.json").read_text())
    cls = getattr(diffusers, index["_class_name"])
    extra = {}
    if family == "qwen":
        from topi_export.models.qwen_edit_pipeline import load_processor

        extra["processor"] = load_processor(folder / "processor")
    pipe = cls.from_pretrained(folder, transformer=None, **extra)
    pipe.transformer = transformer
    pipe.set_progress_bar_config(disable=True)
    names, _, kwargs = CASES[family]
    pics = [Image.open(images[n]).convert("RGB") for n in names]
    seen = {}

    def keep(p, i, t, kw):
        seen["latents"] = kw["latents"]
        return {}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pipe(image=pics[0] if family == "kontext" else pics, prompt=PROMPT, num_inference_steps=4,
                   generator=torch.Generator().manual_seed(3), callback_on_step_end=keep, **kwargs).images[0]
    return out, seen["latents"]


@pytest.mark.parametrize("family", ["kontext", "klein", "qwen"])
def test_edit_equals_the_pipeline_with_the_dropin(pipes, images, family, tmp_path, capsys):
    from PIL import Image
    from safetensors.torch import load_file

    from topi_export import TopiTransformer

    out, latents, stdout, _ = _edit(pipes, images, family, tmp_path, capsys, "--ratio", "0.5")
    assert "anchors at [0, 2]" in stdout and "pruned steps keep" in stdout
    tr = TopiTransformer(model=str(pipes[family]), ratio=0.5, update_interval=2, seed=3)
    ref_image, ref_latents = _python_pipeline(pipes, images, family, tr)
    torch.testing.assert_close(load_file(str(latents))["latents"], ref_latents.float(), rtol=0, atol=1e-6)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(ref_image))
    # the front end's decoder (`run --png` pictures) decodes latents as the pipeline does
    from topi_export.runtime.pipeline import latent_decoder

    grid = tr.runner.layout.target_grid
    decoded = latent_decoder(pipes[family], required=True)(load_file(str(latents))["latents"], grid)
    assert np.abs(np.asarray(decoded, np.int16) - np.asarray(ref_image, np.int16)).max() <= 1


@pytest.mark.parametrize("family", ["kontext", "qwen"])
def test_edit_with_the_pruning_residual_equals_the_pipeline_with_the_dropin(pipes, images, family, tmp_path, capsys):
    """`edit --pruning-residual on` (Qwen: true CFG, the pipeline calls each guidance branch separately and each
    keeps its own residual) gives the latents of the pipeline with TopiTransformer(pruning_residual=True), and they
    differ from the edit without it."""
    from safetensors.torch import load_file

    from topi_export import TopiTransformer

    _, latents, stdout, _ = _edit(pipes, images, family, tmp_path, capsys, "--ratio", "0.5", "--pruning-residual",
                                  "on")
    assert "2 anchors measured the pruning residual" in stdout
    tr = TopiTransformer(model=str(pipes[family]), ratio=0.5, update_interval=2, seed=3, pruning_residual=True)
    _, ref_latents = _python_pipeline(pipes, images, family, tr)
    with_residual = load_file(str(latents))["latents"]
    torch.testing.assert_close(with_residual, ref_latents.float(), rtol=0, atol=1e-6)
    _, plain, _, _ = _edit(pipes, images, family, tmp_path / "plain", capsys, "--ratio", "0.5")
    assert not torch.equal(load_file(str(plain))["latents"], with_residual)


@pytest.mark.parametrize("family", ["kontext", "qwen"])
def test_compare_at_ratio_zero_gives_identical_images(pipes, images, family, tmp_path, capsys):
    from PIL import Image

    out, _, stdout, _ = _edit(pipes, images, family, tmp_path, capsys, "--ratio", "0", "--compare")
    report = json.loads(out.with_name(f"{out.stem}.json").read_text())
    assert report["psnr_db"] is None and report["ssim"] == 1.0  # PSNR inf (identical) is null in strict JSON
    assert set(report["time_s"]) == {"topi", "dense"} and isinstance(report["speedup"], float)
    assert report["pipeline"] and report["selection"]["ratio"] == 0.0
    strip = Image.open(out.with_name(f"{out.stem}_compare.png"))
    assert strip.width > 3 * Image.open(out).width // 2 and "PSNR inf" in stdout


def test_compare_at_a_prune_ratio_reports_a_difference(pipes, images, tmp_path, capsys):
    out, _, _, _ = _edit(pipes, images, "kontext", tmp_path, capsys, "--ratio", "0.5", "--compare")
    report = json.loads(out.with_name(f"{out.stem}.json").read_text())
    assert report["psnr_db"] is not None and report["ssim"] < 1.0
    assert any(r["kind"] == "pruned" for r in report["schedule"])


@pytest.mark.parametrize("family", ["kontext", "qwen"])
def test_encode_then_run_equals_edit_latents(pipes, images, family, tmp_path, capsys):
    from safetensors.torch import load_file

    _, latents, _, _ = _edit(pipes, images, family, tmp_path, capsys, "--ratio", "0.5")
    names, flags, _ = CASES[family]
    inputs = tmp_path / "in.safetensors"
    code, _, err = run_cli(["encode", "--model", str(pipes[family]),
                            *sum((["--image", str(images[n])] for n in names), []), "--prompt", PROMPT, "--seed", "3",
                            "--out", str(inputs), *flags], capsys)
    assert code == 0, err
    code, _, err = run_cli(["run", "--model", str(pipes[family]), "--inputs", str(inputs), "--steps", "4",
                            "--update-interval", "2", "--ratio", "0.5", "--out", str(tmp_path / "run.safetensors"),
                            "-q"], capsys)
    assert code == 0, err
    torch.testing.assert_close(load_file(str(tmp_path / "run.safetensors"))["latents"],
                               load_file(str(latents))["latents"], rtol=0, atol=1e-5)


def test_encode_refuses_a_second_branch_the_inputs_file_cannot_hold(pipes, images, tmp_path, capsys):
    """Flux2KleinPipeline (not distilled) runs CFG with an empty negative prompt; a FLUX.2 inputs file holds one
    branch: refused, and --guidance 1 (no CFG) encodes."""
    args = ["encode", "--model", str(pipes["klein"]), "--image", str(images["square"]), "--prompt", PROMPT]
    code, _, err = run_cli(args + ["--out", str(tmp_path / "a.safetensors")], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "--guidance 1" in errors[0] and not (tmp_path / "a.safetensors").exists()
    code, _, err = run_cli(args + ["--guidance", "1", "--out", str(tmp_path / "b.safetensors")], capsys)
    assert code == 0, err


# --- engines ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kontext_engines(pipes, tmp_path_factory):
    """ONNX Runtime engines from the pipeline folder: its text length (512) and its pixels per token (16)."""
    out = tmp_path_factory.mktemp("kontext-engines") / "e"
    code, _, err = run_cli(["build", "--model", str(pipes["kontext"]), "--resolutions", "64x64:64x48",
                            "--ratio-buckets", "0.5", "--engine-dir", str(out)])
    assert code == 0, err
    return out


def test_build_from_a_pipeline_takes_its_text_length_and_pixels(kontext_engines):
    from topi_export import Layout, read_manifest

    assert read_manifest(kontext_engines).layouts == (Layout(512, (4, 4), ((3, 4),)),)


def test_edit_with_engines_equals_edit_with_torch(pipes, images, kontext_engines, tmp_path, capsys):
    from safetensors.torch import load_file

    from topi_export.runtime.loop import rel_l2

    _, torch_latents, _, _ = _edit(pipes, images, "kontext", tmp_path / "t", capsys, "--ratio", "0.5")
    _, ort_latents, stdout, _ = _edit(pipes, images, "kontext", tmp_path / "o", capsys, "--ratio", "0.5",
                                      "--engine-dir", str(kontext_engines))
    assert "pruned steps keep [6]" in stdout
    assert rel_l2(load_file(str(ort_latents))["latents"], load_file(str(torch_latents))["latents"]) <= 1e-4


def test_edit_refuses_engines_of_another_shape_before_encoding(pipes, images, kontext_engines, tmp_path, capsys,
                                                               monkeypatch):
    """A 64x80 (portrait) image snaps to a 48x64 reference: refused in pixels, naming the build that fits,
    before any text encoder or VAE runs."""
    from PIL import Image

    from topi_export.runtime import pipeline as P

    monkeypatch.setattr(P, "run_pipeline", lambda *a, **k: pytest.fail("the pipeline ran"))
    tall = tmp_path / "tall.png"
    Image.fromarray(np.zeros((80, 60, 3), np.uint8)).save(tall)
    code, _, err = run_cli(["edit", "--model", str(pipes["kontext"]), "--image", str(tall), "--prompt", PROMPT,
                            "--width", "64", "--height", "64", "--engine-dir", str(kontext_engines),
                            "--out", str(tmp_path / "x.png")], capsys)
    line = err.strip().splitlines()
    assert code == 2 and len(line) == 1, err
    assert "64x64:64x48" in line[0] and "--resolutions 64x64:48x64 --text-tokens 512" in line[0]


def test_edit_refuses_engines_of_another_model(pipes, images, ort_engine_dir, tmp_path, capsys):
    code, _, err = run_cli(["edit", "--model", str(pipes["kontext"]), "--image", str(images["wide"]),
                            "--prompt", PROMPT,
                            "--width", "64", "--height", "64", "--engine-dir", str(ort_engine_dir),
                            "--out", str(tmp_path / "x.png")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "another flux-kontext model" in err
    assert f"--model {pipes['kontext']} --resolutions 64x64:64x48 --text-tokens 512" in err


def _manifest(**kw):
    from types import SimpleNamespace

    from topi_export import Layout

    base = dict(root=Path("E"), batch=1, layouts=(Layout(512, (4, 4), ((3, 4),)),),
                model=SimpleNamespace(family="flux-kontext", config_hash="c", weights_hash="w", adapters=()))
    base.update(kw)
    return SimpleNamespace(**base)


def test_check_fit_names_family_text_and_branches(pipes):
    from types import SimpleNamespace

    from topi_export import Layout
    from topi_export.errors import BadInput
    from topi_export.models import front_end_for
    from topi_export.models.frontend import PipelineShape
    from topi_export.runtime.pipeline import check_fit

    front = front_end_for(pipes["kontext"])
    shape = PipelineShape((64, 64), ((64, 48),), 16, 512)
    check_fit(front, _manifest(), shape, identity=("c", "w"))  # fits
    other = SimpleNamespace(family="flux2", config_hash="c", weights_hash="w", adapters=())
    with pytest.raises(BadInput, match="holds flux2 engines"):
        check_fit(front, _manifest(model=other), shape)
    with pytest.raises(BadInput, match="512 text tokens, the engines hold 8"):
        check_fit(front, _manifest(layouts=(Layout(8, (4, 4), ((3, 4),)),)), shape)
    with pytest.raises(BadInput, match="2 guidance branches.*--cfg"):
        check_fit(front, _manifest(), PipelineShape((64, 64), ((64, 48),), 16, 512, branches=2))
    many = tuple(Layout(512, (g, g), ((g, g),)) for g in range(1, 8))
    with pytest.raises(BadInput, match="and 3 more"):
        check_fit(front, _manifest(layouts=many), shape)


def test_kontext_front_end_follows_the_pipelines_rules(pipes, monkeypatch):
    """FluxKontextPipeline with an 800x600 reference and no size: a 1024x1024 target and a 1184x880 (55x74-token)
    reference (the real preferred resolutions, 16 pixels per token with the 4-block VAE)."""
    import diffusers.pipelines.flux.pipeline_flux_kontext as kontext
    from PIL import Image

    from topi_export.models import front_end_for
    from topi_export.models.flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS
    from topi_export.models.frontend import EditRequest

    monkeypatch.setattr(kontext, "PREFERRED_KONTEXT_RESOLUTIONS", list(PREFERRED_KONTEXT_RESOLUTIONS))
    front = front_end_for(pipes["kontext"])
    shape = front.shape(EditRequest([Image.new("RGB", (800, 600))], "x"))
    assert shape.target_px == (1024, 1024) and shape.refs_px == ((1184, 880),) and shape.text_tokens == 512
    assert shape.layout.ref_grids == ((55, 74),) and shape.resolutions() == "1024x1024:1184x880"
    from topi_export import Layout
    from topi_export.builder import image_size_layouts  # build --image-sizes: the same rules

    lays = image_size_layouts("800x600; 800x600", front, pipes["kontext"], None)
    assert lays == (Layout(512, (64, 64), ((55, 74),)),)


def test_resolutions_accept_target_reference_layouts():
    from topi_export import Layout
    from topi_export.builder import resolution_layouts
    from topi_export.errors import TopiError
    from topi_export.models.flux2 import Flux2, tiny_config

    fam = Flux2(tiny_config())
    lays = resolution_layouts("1024x1024:1104x944,1024x1024; 512x512", fam, references=2, text_tokens=512)
    assert lays == (Layout(512, (64, 64), ((59, 69), (64, 64))), Layout(512, (32, 32), ((32, 32), (32, 32))))
    assert resolution_layouts("64x64:64x48", fam, pixels_per_token=8) == (Layout(8, (8, 8), ((6, 8),)),)
    with pytest.raises(TopiError, match="use 1008x1008"):
        resolution_layouts("1010x1010", fam)
    with pytest.raises(TopiError, match="names no reference"):
        resolution_layouts("64x64:", fam)


def test_a_flag_of_another_family_is_refused(pipes, images, tmp_path, capsys):
    code, _, err = run_cli(["edit", "--model", str(pipes["kontext"]), "--image", str(images["wide"]),
                            "--prompt", PROMPT,
                            "--negative-prompt", " ", "--out", str(tmp_path / "x.png")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--negative-prompt is not an option" in err


def test_missing_front_end_package_is_one_line_naming_the_extra(pipes, images, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    code, _, err = run_cli(["edit", "--model", str(pipes["kontext"]), "--image", str(images["wide"]),
                            "--prompt", PROMPT,
                            "--out", str(tmp_path / "x.png")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "topi-export[edit]" in err


def test_generic_code_names_no_pipeline():
    """Which pipeline a folder holds and how it is called belong to the family modules (models/)."""
    pattern = re.compile(r"FluxKontextPipeline|Flux2Pipeline|Flux2KleinPipeline|QwenImageEdit\w*Pipeline|"
                         r"PREFERRED_KONTEXT|VAE_IMAGE_SIZE|CONDITION_IMAGE_SIZE|max_area|max_sequence_length|"
                         r"negative_prompt|true_cfg|guidance_scale|Qwen2VLProcessor|LoraLoaderMixin")
    generic = ["runtime/pipeline.py", "runtime/images.py", "commands/edit.py", "commands/encode.py",
               "commands/refit.py", "refitting.py", "lora.py", "progress.py", "export/weights_map.py"]
    offenders = [f"{rel}:{i}: {line.strip()}" for rel in generic
                 for i, line in enumerate((ROOT / "topi_export" / rel).read_text().splitlines(), 1)
                 if pattern.search(line)]
    assert not offenders, "\n".join(offenders)


def test_edit_with_a_lora_compares_against_the_pipeline_with_the_adapter(pipes, images, tmp_path, capsys):
    """`edit --lora` fuses the adapter into the ToPi model; --compare gives it, unfused, to the unmodified
    pipeline: at ratio 0 the images agree to float rounding of fused vs unfused weights (and differ from the base
    model's)."""
    pytest.importorskip("peft")
    from PIL import Image

    from test_lora import make_lora

    lora = make_lora(tmp_path / "style.safetensors", 21)
    out, _, stdout, err = _edit(pipes, images, "kontext", tmp_path, capsys, "--ratio", "0", "--compare",
                                "--lora", f"{lora}:0.7")
    assert "LoRA style.safetensors x0.7" in err
    report = json.loads(out.with_name(f"{out.stem}.json").read_text())
    assert (report["psnr_db"] is None or report["psnr_db"] > 60) and report["ssim"] > 0.9999
    assert report["adapters"][0]["scale"] == 0.7
    base, _, _, _ = _edit(pipes, images, "kontext", tmp_path / "base", capsys, "--ratio", "0")
    assert not np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(base)))
