"""The package installs whole: a wheel of this checkout, installed into a fresh virtual environment outside the
checkout, builds and runs the embedded default model with the same method settings (its shipped calibration
profile) and the same latents as the checkout. No top-level package but topi_export."""
import json
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 1500  # installing the dependencies takes most of it (pip's cache makes it quick after the first time)


def _run(cmd, cwd, env=None):
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, ROOT], ROOT)
    (path,) = dist.glob("topi_export-*.whl")
    return path


def test_wheel_holds_the_package_data_and_no_other_top_level_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"topi_export"}
    for want in ("topi_export/calibration/flux2-pick.json", "topi_export/calibration/kontext-digits.json",
                 "topi_export/assets/flux2-pick/diffusion_pytorch_model.safetensors",
                 "topi_export/assets/flux2-pick/samples/sample_0.safetensors",
                 "topi_export/kernels/triton_kernels.py", "topi_export/kernels/trt_plugins.py",
                 "topi_export/serving/bls_model.py"):
        assert want in names, want


def test_wheel_in_a_fresh_environment_builds_and_runs_like_the_checkout(wheel, tmp_path):
    from topi_export.artifacts.settings import method_settings
    from topi_export.models import load_model
    from topi_export.runtime.session import open_session

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    _run([py, "-m", "pip", "install", "-q", wheel], tmp_path, env)
    work = tmp_path / "work"  # outside the checkout: nothing of it is importable from here
    work.mkdir()
    cli = env_dir / "bin" / "topi-export"
    _run([cli, "build", "--ratio-buckets", "0.3,0.5", "--engine-dir", "eng"], work, env)
    _run([cli, "run", "--engine-dir", "eng", "--steps", "4", "-q", "--json", "r.json", "--out", "lat.safetensors"],
         work, env)
    where = _run([py, "-c", "import topi_export, pathlib; print(pathlib.Path(topi_export.__file__).parent)"], work,
                 env).strip()
    assert Path(where).is_relative_to(env_dir) and not Path(where).is_relative_to(ROOT)

    report = json.loads((work / "r.json").read_text())
    loaded = load_model()  # the checkout's default model and its shipped profile
    settings = method_settings(loaded.identity(), loaded.family.default_settings())
    assert settings.provenance == "measured"
    assert report["method"]["pivotal_layers"] == list(settings.pivotal_layers)
    assert report["method"]["prune_start"] == settings.prune_start and report["method"]["provenance"] == "measured"
    # the checkout runs the wheel's engines to the same latents
    session = open_session(engine_dir=work / "eng")
    data = session.load_inputs()
    ours = session.denoise(data, steps=4, selector=session.selector(data))
    from safetensors.torch import load_file

    torch.testing.assert_close(load_file(work / "lat.safetensors")["latents"], ours.latents, rtol=0, atol=1e-6)
