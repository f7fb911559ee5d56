"""What a person sees (topi_export/progress.py, runtime/visualize.py, commands/run.py): progress as log lines when
stderr is not a terminal, per-stage build times, the run summary's tau note, titled strips with the ground truth
and decoded panels."""
import numpy as np
import pytest
import torch

from conftest import run_cli
from topi_export.plan import Layout


def test_progress_reaches_a_log_when_not_a_terminal(capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    code, _, err = run_cli(["run", "--model", "tiny-kontext", "--steps", "3", "--ratio", "0.5"], capsys)
    assert code == 0, err
    lines = [line for line in err.splitlines() if "step 3/3" in line]
    assert lines and lines[0][:2].isdigit() and lines[0][2] == ":"  # timestamped
    code, _, err = run_cli(["run", "--model", "tiny-kontext", "--steps", "3", "-q"], capsys)
    assert code == 0 and "step" not in err


def test_progress_modes(monkeypatch):
    import io

    from topi_export.progress import Progress, mode

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert mode(True, Tty()) == "bar" and mode(True, io.StringIO()) == "log" and mode(False, Tty()) == "off"
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert mode(True, io.StringIO()) == "off"
    monkeypatch.delenv("TQDM_DISABLE")
    log = io.StringIO()
    with Progress(4, "demo", stream=log) as bar:
        for _ in range(4):
            bar.update()
    assert "demo: step 1/4" in log.getvalue() and "demo: step 4/4" in log.getvalue()


def test_stage_times_are_per_stage(monkeypatch):
    from topi_export import builder

    clock = iter([0.0, 0.0, 10.0, 10.0, 13.0])  # a fake clock: stage 1 takes 10 s, stage 2 takes 3 s
    monkeypatch.setattr(builder.time, "perf_counter", lambda: next(clock))
    lines = []
    stages = builder.Stages(2, lines.append)
    stages("first")
    stages("second")
    stages.finish()
    assert lines == ["[1/2] first", "[1/2] done in 10.0 s", "[2/2] second", "[2/2] done in 3.0 s"]


def test_summary_says_when_tau_fell_back_to_unpruned(capsys):
    code, out, err = run_cli(["run", "--model", "tiny-kontext", "--steps", "2", "--tau", "0.9999",
                              "--ratio-buckets", "0.9", "-q"], capsys)
    assert code == 0, err
    assert "tau 0.9999 over buckets [0.9], policy" in out and "tiny-kontext (flux-kontext) on torch" in out
    assert "ran unpruned" in err


def _inputs(truth: bool):
    from topi_export.models import load_model

    data = load_model("tiny-kontext").family.synthetic_inputs(Layout(8, (4, 4), ((4, 4),)), 0)
    if truth:
        data.target_latents = torch.randn(1, 16, 16)
    return data


def test_strip_titles_and_ground_truth(tmp_path):
    from PIL import Image

    from topi_export.runtime.visualize import save_strip

    widths = []
    for truth in (False, True):
        data = _inputs(truth)
        path = tmp_path / f"s{truth}.png"
        save_strip(path, data, torch.randn(1, 16, 16), torch.randn(1, 16, 16), torch.arange(6))
        widths.append(Image.open(path).width)
    assert widths[1] > widths[0] * 5 // 4  # a fourth panel: the ground truth
    calls = []

    def decode(latents, grid):
        calls.append(tuple(grid))
        return Image.new("RGB", (grid[1] * 16, grid[0] * 16), (200, 10, 10))

    save_strip(tmp_path / "d.png", _inputs(True), torch.randn(1, 16, 16), torch.randn(1, 16, 16), None, decode=decode)
    assert calls == [(4, 4)] * 4  # the reference, dense, ToPi and the ground truth, each decoded
    strip = np.asarray(Image.open(tmp_path / "d.png"))
    assert (strip[..., 0] == 200).any()


def test_image_psnr_and_ssim():
    from PIL import Image

    from topi_export.runtime.images import image_psnr, image_ssim

    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-12, 12, a.shape), 0, 255).astype(np.uint8)
    A, B = Image.fromarray(a), Image.fromarray(b)
    assert image_psnr(A, A) == float("inf") and image_ssim(A, A) == 1.0
    mse = ((a / 255.0 - b / 255.0) ** 2).mean()
    assert abs(image_psnr(A, B) - 10 * np.log10(1 / mse)) < 1e-9
    metrics = pytest.importorskip("skimage.metrics")
    want = metrics.structural_similarity(a, b, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False, data_range=255)
    assert abs(image_ssim(A, B) - want) < 1e-9
