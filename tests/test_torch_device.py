"""The PyTorch backend on another device: clear errors without a GPU; CUDA equals the CPU reference."""
import pytest
import torch

from conftest import run_cli


def test_cuda_without_gpu_is_refused(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    code, _, err = run_cli(["run", "--model", "tiny-kontext", "--device", "cuda", "-q"], capsys)
    assert code == 2 and "no CUDA GPU" in err


def test_low_precision_on_cpu_is_refused(capsys):
    code, _, err = run_cli(["run", "--model", "tiny-kontext", "--dtype", "bf16", "-q"], capsys)
    assert code == 2 and "fp32" in err


def test_bench_device_needs_torch_backend(tmp_path, capsys):
    code, _, err = run_cli(["bench", "--model", "tiny-kontext", "--backend", "onnxruntime", "--dtype", "bf16",
                            "--json", str(tmp_path / "b.json"), "-q"], capsys)
    assert code == 2 and "--backend torch" in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_cuda_run_equals_cpu_reference():
    from topi_export import open_session
    from topi_export.runtime.loop import rel_l2

    results = {}
    for device, dtype in (("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "bf16")):
        s = open_session(model="kontext-digits", device=device, dtype=dtype)
        data = s.load_inputs(None)
        results[(device, dtype)] = s.denoise(data, steps=12, selector=s.selector(data, ratio=0.5), update_interval=4)
    cpu = results[("cpu", "fp32")]
    assert rel_l2(results[("cuda", "fp32")].latents, cpu.latents) < 1e-3
    assert rel_l2(results[("cuda", "bf16")].latents, cpu.latents) < 0.1
    assert cpu.kept == results[("cuda", "fp32")].kept  # same influence -> same kept tokens
