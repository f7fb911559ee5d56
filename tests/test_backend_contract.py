"""One step-engine contract for every backend (backends/base.py): the same anchor / full / pruned / dense calls,
the same shapes, parity with the PyTorch reference. Backends that cannot run here skip with the reason."""
import importlib.util

import pytest
import torch

from topi_export.backends import BACKENDS, get_backend
from topi_export.plan import Layout


def _runnable(name):
    if name in ("torch", "onnxruntime"):
        return None
    if not torch.cuda.is_available():
        return f"{name} engines run on an NVIDIA GPU and none is visible here"
    module = "tensorrt_rtx" if name == "tensorrt-rtx" else "tensorrt"
    if importlib.util.find_spec(module) is None:
        return f"the {module} module is not installed"
    return f"needs a {name} engine directory built on this GPU (scripts/trt_gpu_check.sh)"


def test_every_backend_declares_the_contract():
    for name in BACKENDS:
        module = get_backend(name)
        be = module.BACKEND
        assert be.name == name and be.precisions and callable(module.open_engine)
        assert be.builds == callable(getattr(module, "build", None))


@pytest.mark.parametrize("name", BACKENDS)
def test_step_engine_contract(name, ort_engine_dir):
    reason = _runnable(name)
    if reason:
        pytest.skip(reason)
    from topi_export.runtime.session import open_session

    session = open_session(engine_dir=ort_engine_dir, backend=name)
    reference = open_session(engine_dir=ort_engine_dir, backend="torch")
    assert session.engine.name == name
    data = session.family.synthetic_inputs(Layout(8, (8, 8), ((8, 8),)), 7)
    cond = session.family.conditioning(data)
    for s in (session, reference):
        s.engine.bind(cond, data.reference_latents, data.layout)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 64, 16, generator=g), torch.tensor([0.6])
    keep = torch.tensor(sorted(torch.randperm(64, generator=g)[:32].tolist()))
    with torch.inference_mode():
        (v, infl), (rv, rinfl) = session.engine.anchor(x, t), reference.engine.anchor(x, t)
        assert v.shape == (1, 64, 16) and infl.shape == (1, 64)
        outs = {"anchor": (v, rv), "influence": (infl, rinfl),
                "full": (session.engine.full(x, t), reference.engine.full(x, t)),
                "pruned": (session.engine.pruned(x, t, keep), reference.engine.pruned(x, t, keep)),
                "dense": (session.engine.dense(x, t), reference.engine.dense(x, t))}
    for kind, (got, want) in outs.items():
        assert got.dtype == torch.float32 and got.shape == want.shape, kind
        assert float((got - want).norm() / want.norm()) <= 1e-4, kind
    torch.testing.assert_close(outs["full"][0], outs["dense"][0], rtol=0, atol=1e-5)  # same model, unpruned
    assert not torch.allclose(outs["pruned"][0], outs["full"][0])


def test_onnxruntime_holds_one_session_until_the_baseline_is_asked_for(ort_engine_dir):
    """A deployment opens the topi graph only: the weights are held once in memory."""
    from topi_export.runtime.session import open_session

    s = open_session(engine_dir=ort_engine_dir)
    data = s.family.synthetic_inputs(Layout(8, (8, 8), ((8, 8),)), 0)
    s.denoise(data, steps=3, selector=s.selector(data, ratio=0.5))
    assert set(s.engine.sessions) == {"topi"}
    s.denoise(data, steps=1, mode="dense")
    assert set(s.engine.sessions) == {"topi", "dense"}


@pytest.mark.parametrize("name,inside", [("onnxruntime", 1), ("torch", None)])
def test_loop_caps_torch_threads_only_around_engines_that_run_elsewhere(name, inside, ort_engine_dir, monkeypatch):
    """An ONNX Runtime loop runs its host work on one torch thread (an idle OpenMP pool spinning beside ONNX
    Runtime's threads slows its steps); the torch backend keeps torch's threads; both restore them afterwards."""
    from topi_export.runtime.session import open_session

    s = open_session(engine_dir=ort_engine_dir, backend=name)
    data = s.family.synthetic_inputs(Layout(8, (8, 8), ((8, 8),)), 0)
    seen, call = [], s.engine._call
    monkeypatch.setattr(s.engine, "_call", lambda *a: seen.append(torch.get_num_threads()) or call(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        s.denoise(data, steps=3, selector=s.selector(data, ratio=0.5))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen == [inside or 2] * 3
