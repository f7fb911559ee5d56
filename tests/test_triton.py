"""`topi-export triton`: schema-valid repositories for ONNX Runtime and (described) TensorRT engine
directories, refusals, atomic writing, and the BLS loop adapter's logic with ONNX Runtime standing in
for Triton's model calls. Nothing here runs Triton."""
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli

pytest.importorskip("tritonclient.grpc.model_config_pb2",
                    reason="needs tritonclient[grpc] (pip install 'topi-export[triton]')")


def _config(path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())


def _rehash(engine_dir: Path, data: dict) -> dict:
    from topi_export.runtime.manifest import file_entries

    rels = [str(p.relative_to(engine_dir)) for p in sorted(engine_dir.rglob("*"))
            if p.is_file() and p.name != "manifest.json"]
    data["files"] = file_entries(engine_dir, rels)
    (engine_dir / "manifest.json").write_text(json.dumps(data, indent=2))
    return data


def _described_tensorrt_dir(ort_engine_dir: Path, dst: Path, backend="tensorrt") -> Path:
    """A TensorRT engine directory described by its manifest: the real portable ONNX graphs, placeholder
    plan files (TensorRT cannot be installed here) whose sha256 the manifest records."""
    data = json.loads((ort_engine_dir / "manifest.json").read_text())
    dst.mkdir(parents=True)
    shutil.copytree(ort_engine_dir / "onnx", dst / "onnx")
    for kind in ("anchor", "pruned"):
        (dst / f"{kind}.engine").write_bytes(f"placeholder {kind} TensorRT plan".encode())
    module = backend.replace("-", "_")
    data["backend"] = backend
    data["precision"] = "fp16"
    # as backends/tensorrt/ records them: one anchor profile, one pruned profile per bucket
    data["graphs"] = {"anchor": {"file": "anchor.engine", "onnx": "onnx/anchor.onnx", "profiles": [{"index": 0}]},
                      "pruned": {"file": "pruned.engine", "onnx": "onnx/pruned.onnx",
                                 "profiles": [{"index": b["profile"], "ratio": b["ratio"], "keep": b["keep"]}
                                              for b in data["buckets"]]}}
    data["target"] = {"module": module, "version": "10.13.0", "compute_capabilities": ["SM90"], "gpu": "NVIDIA H100",
                      "plugins": "topi"}
    data["versions"][module] = "10.13.0"
    _rehash(dst, data)
    return dst


# --- repositories ----------------------------------------------------------------------------------------------
def test_onnxruntime_repository_layout_and_schema(ort_engine_dir, tmp_path, capsys):
    from topi_export.runtime.manifest import sha256_file

    repo = tmp_path / "repo"
    code, out, err = run_cli(["triton", "--engine-dir", str(ort_engine_dir), "--out", str(repo), "--instances", "2",
                              "--kind", "cpu"], capsys)
    assert code == 0, err
    assert "repository ->" in out and "tritonserver --model-repository" in out
    assert sorted(p.name for p in repo.iterdir()) == ["README.md", "topi_anchor", "topi_loop", "topi_pruned"]
    manifest = json.loads((ort_engine_dir / "manifest.json").read_text())
    for kind in ("anchor", "pruned"):
        d = repo / f"topi_{kind}"
        assert sorted(p.name for p in d.iterdir()) == ["1", "config.pbtxt"]
        assert [p.name for p in (d / "1").iterdir()] == ["model.onnx"]
        # the portable graph, byte for byte
        assert sha256_file(d / "1" / "model.onnx") == manifest["files"][f"onnx/{kind}.onnx"]["sha256"]
        cfg = _config(d / "config.pbtxt")
        assert cfg.name == f"topi_{kind}" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 0
        assert [(g.kind, g.count, list(g.profile)) for g in cfg.instance_group] == [(2, 2, [])]  # KIND_CPU == 2
        dims = {i.name: list(i.dims) for i in cfg.input}
        assert dims["hidden_states"] == [1, 128, 16] and dims["encoder_hidden_states"] == [1, 8, 32]
        assert ("keep_idx" in dims) == (kind == "pruned")
    assert _config(repo / "topi_pruned" / "config.pbtxt").input[-1].data_type == 9  # TYPE_INT64
    assert [o.name for o in _config(repo / "topi_anchor" / "config.pbtxt").output] == ["velocity", "influence"]
    loop = _config(repo / "topi_loop" / "config.pbtxt")
    assert loop.backend == "python" and loop.name == "topi_loop"
    assert {i.name: i.optional for i in loop.input} == {
        "reference_latents": False, "prompt_embeds": False, "pooled_prompt_embeds": False, "noise": True,
        "guidance": True, "steps": True, "seed": True, "ratio": True, "tau": True, "update_interval": True,
        "policy": True}
    assert [o.name for o in loop.output] == ["latents", "schedule"]
    engines = json.loads(loop.parameters["topi_engines"].string_value)
    assert engines["anchor"]["model"] == "topi_anchor" and engines["full_via"] == "pruned"
    assert (repo / "topi_loop" / "1" / "model.py").read_text() == (
        Path(__import__("topi_export").__file__).parent / "serving" / "bls_model.py").read_text()
    assert (repo / "topi_loop" / "manifest.json").read_bytes() == (ort_engine_dir / "manifest.json").read_bytes()
    assert "pip install topi-export" in (repo / "README.md").read_text()


def test_tensorrt_repository_from_described_manifest(ort_engine_dir, tmp_path, capsys):
    """A TensorRT engine directory described by manifest + placeholder plans (no TensorRT here)."""
    eng = _described_tensorrt_dir(ort_engine_dir, tmp_path / "trt")
    repo = tmp_path / "repo"
    code, out, err = run_cli(["triton", "--engine-dir", str(eng), "--out", str(repo), "--name", "kontext"], capsys)
    assert code == 0, err
    for kind in ("anchor", "pruned"):
        d = repo / f"kontext_{kind}"
        assert [p.name for p in (d / "1").iterdir()] == ["model.plan"]
        assert (d / "1" / "model.plan").read_bytes() == (eng / f"{kind}.engine").read_bytes()
        cfg = _config(d / "config.pbtxt")
        assert cfg.platform == "tensorrt_plan" and cfg.instance_group[0].kind == 1  # KIND_GPU
    pruned = _config(repo / "kontext_pruned" / "config.pbtxt")
    # every bucket's profile is listed: Triton picks the one matching the keep_idx length
    assert list(pruned.instance_group[0].profile) == ["0", "1"]
    assert list(next(i for i in pruned.input if i.name == "keep_idx").dims) == [-1]
    assert list(_config(repo / "kontext_anchor" / "config.pbtxt").instance_group[0].profile) == []
    loop = _config(repo / "kontext_loop" / "config.pbtxt")
    engines = json.loads(loop.parameters["topi_engines"].string_value)
    assert engines["pruned"]["model"] == "kontext_pruned" and engines["full_via"] == "anchor"
    assert "TensorRT 10.13.0" in (repo / "README.md").read_text()
    # TensorRT plans need GPU instances
    code, _, err = run_cli(["triton", "--engine-dir", str(eng), "--out", str(tmp_path / "cpu"), "--kind", "cpu"],
                           capsys)
    assert code == 2 and "GPU" in err and not (tmp_path / "cpu").exists()


def test_tensorrt_profiles_that_do_not_match_the_buckets_are_refused(ort_engine_dir, tmp_path, capsys):
    eng = _described_tensorrt_dir(ort_engine_dir, tmp_path / "trt")
    data = json.loads((eng / "manifest.json").read_text())
    data["graphs"]["pruned"]["profiles"] = data["graphs"]["pruned"]["profiles"][:1]
    _rehash(eng, data)
    code, _, err = run_cli(["triton", "--engine-dir", str(eng), "--out", str(tmp_path / "repo")], capsys)
    assert code == 2 and "optimization profiles" in err and not (tmp_path / "repo").exists()


def test_tensorrt_rtx_engine_dir_is_refused(ort_engine_dir, tmp_path, capsys):
    eng = _described_tensorrt_dir(ort_engine_dir, tmp_path / "rtx", backend="tensorrt-rtx")
    code, _, err = run_cli(["triton", "--engine-dir", str(eng), "--out", str(tmp_path / "repo")], capsys)
    assert code == 2 and "TensorRT-RTX" in err and "TensorRT plans" in err
    assert not (tmp_path / "repo").exists()


def test_tampered_engine_file_is_refused(ort_engine_dir, tmp_path, capsys):
    eng = tmp_path / "eng"
    shutil.copytree(ort_engine_dir, eng)
    with open(eng / "onnx" / "pruned.onnx", "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    code, _, err = run_cli(["triton", "--engine-dir", str(eng), "--out", str(tmp_path / "repo")], capsys)
    assert code == 2 and "sha256" in err
    assert not (tmp_path / "repo").exists() and list(tmp_path.glob(".repo*")) == []


def test_copy_mismatch_and_failures_leave_nothing_half_written(ort_engine_dir, tmp_path, monkeypatch):
    from topi_export.errors import TopiError
    from topi_export.serving import triton_repo

    repo = tmp_path / "repo"
    triton_repo.generate_repository(ort_engine_dir, repo, kind="cpu")
    before = sorted(str(p.relative_to(repo)) for p in repo.rglob("*"))
    with pytest.raises(TopiError, match="already exists"):
        triton_repo.generate_repository(ort_engine_dir, repo)

    def corrupt(src, dst):
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(b"not the engine")
        return "copied"

    monkeypatch.setattr(triton_repo, "_place", corrupt)
    with pytest.raises(TopiError, match="after it was copied"):
        triton_repo.generate_repository(ort_engine_dir, repo, force=True)
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) == before  # old repository untouched
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]  # no temp directory left behind
    monkeypatch.undo()
    triton_repo.generate_repository(ort_engine_dir, repo, name="other", force=True)
    assert sorted(p.name for p in repo.iterdir()) == ["README.md", "other_anchor", "other_loop", "other_pruned"]


@pytest.mark.parametrize("args, needle", [
    (["--max-batch-size", "4"], "batch 1"),
    (["--instances", "0"], "--instances"),
    (["--name", "a/b"], "--name"),
])
def test_bad_options_are_refused(ort_engine_dir, tmp_path, capsys, args, needle):
    code, _, err = run_cli(["triton", "--engine-dir", str(ort_engine_dir), "--out", str(tmp_path / "r"), *args], capsys)
    assert code == 2 and needle in err and not (tmp_path / "r").exists()


def test_missing_tritonclient_is_a_clear_error(ort_engine_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tritonclient.grpc.model_config_pb2", None)
    code, _, err = run_cli(["triton", "--engine-dir", str(ort_engine_dir), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "pip install 'topi-export[triton]'" in err


# --- the BLS adapter's loop logic, ONNX Runtime standing in for Triton ----------------------------------------
class _OrtStandIn:
    """Serves the repository's engine models with ONNX Runtime (CPU), keyed by Triton model name."""

    def __init__(self, repo: Path):
        import onnxruntime as ort

        from topi_export.backends.onnxruntime import providers

        self.providers = providers()  # the providers `run` uses (CUDA where onnxruntime-gpu is installed)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.log_severity_level = 3
        self.sessions = {d.name: ort.InferenceSession(str(d / "1" / "model.onnx"), so, providers=self.providers)
                         for d in repo.iterdir() if (d / "1" / "model.onnx").exists()}
        self.calls = []

    def __call__(self, model_name, inputs, outputs):
        self.calls.append((model_name, {k: v.shape for k, v in inputs.items()}))
        return dict(zip(outputs, self.sessions[model_name].run(outputs, inputs)))


def _fake_pb_utils(standin):
    """The few names of Triton's ``triton_python_backend_utils`` the generated model.py uses."""
    pb = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name, array):
            self._name, self._array = name, np.asarray(array)

        def name(self):
            return self._name

        def as_numpy(self):
            return self._array

        def is_cpu(self):
            return True

    class TritonError:
        def __init__(self, message):
            self._message = message

        def message(self):
            return self._message

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self._outputs, self._error = output_tensors, error

        def output_tensors(self):
            return self._outputs

        def has_error(self):
            return self._error is not None

        def error(self):
            return self._error

    class InferenceRequest:
        def __init__(self, model_name=None, requested_output_names=(), inputs=(), **kwargs):
            self.model_name, self.outputs, self._inputs = model_name, list(requested_output_names), list(inputs)

        def inputs(self):
            return self._inputs

        def exec(self):  # BLS call: ONNX Runtime stands in for Triton's engine models
            try:
                result = standin(self.model_name, {t.name(): t.as_numpy() for t in self._inputs}, self.outputs)
            except Exception as exc:
                return InferenceResponse([], TritonError(str(exc)))
            return InferenceResponse([Tensor(k, v) for k, v in result.items()])

    def get_input_tensor_by_name(request, name):
        return next((t for t in request.inputs() if t.name() == name), None)

    def get_output_tensor_by_name(response, name):
        return next((t for t in response.output_tensors() if t.name() == name), None)

    pb.Tensor, pb.TritonError, pb.InferenceResponse = Tensor, TritonError, InferenceResponse
    pb.InferenceRequest = InferenceRequest
    pb.get_input_tensor_by_name, pb.get_output_tensor_by_name = get_input_tensor_by_name, get_output_tensor_by_name
    return pb


def _load_generated_model(repo: Path, loop: str, pb, monkeypatch):
    from google.protobuf import json_format

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    spec = importlib.util.spec_from_file_location("generated_topi_loop_model", repo / loop / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    config = json_format.MessageToJson(_config(repo / loop / "config.pbtxt"), preserving_proto_field_name=True)
    model.initialize({"model_config": config, "model_repository": str(repo / loop), "model_version": "1",
                      "model_name": loop, "model_instance_kind": "CPU", "model_instance_name": f"{loop}_0"})
    return model


@pytest.mark.parametrize("options", [
    {"ratio": 0.5, "update_interval": 2, "steps": 5, "seed": 3},
    {"tau": 0.5, "update_interval": 2, "steps": 4, "seed": 1},
    {"ratio": 0.0, "steps": 2, "seed": 0},
], ids=["ratio", "tau", "unpruned"])
def test_loop_logic_matches_run_with_ort_standing_in_for_triton(ort_engine_dir, tmp_path, capsys, monkeypatch,
                                                                options):
    """The generated model.py (the real file, with a fake pb_utils) drives runtime.loop.denoise through
    TritonEngine; ONNX Runtime serves the repository's model files. Same latents as `run --engine-dir`.
    A test of the loop logic, not of Triton."""
    repo = tmp_path / "repo"
    run_cli(["triton", "--engine-dir", str(ort_engine_dir), "--out", str(repo), "--kind", "cpu"], capsys)
    g = torch.Generator().manual_seed(7)
    tensors = {"reference_latents": torch.randn(1, 64, 16, generator=g),
               "prompt_embeds": torch.randn(1, 8, 32, generator=g),
               "pooled_prompt_embeds": torch.randn(1, 16, generator=g), "guidance": torch.tensor([3.0])}
    save_file(tensors, str(tmp_path / "in.safetensors"))

    args = ["run", "--engine-dir", str(ort_engine_dir), "--inputs", str(tmp_path / "in.safetensors"), "-q",
            "--out", str(tmp_path / "run.safetensors"), "--json", str(tmp_path / "run.json")]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    expected = load_file(str(tmp_path / "run.safetensors"))["latents"]
    expected_schedule = json.loads((tmp_path / "run.json").read_text())["schedule"]

    standin = _OrtStandIn(repo)
    pb = _fake_pb_utils(standin)
    model = _load_generated_model(repo, "topi_loop", pb, monkeypatch)
    wire = {"steps": np.int32, "seed": np.int64, "ratio": np.float32, "tau": np.float32, "update_interval": np.int32}
    request = pb.InferenceRequest(model_name="topi_loop", inputs=[
        *(pb.Tensor(k, v.numpy()) for k, v in tensors.items()),
        *(pb.Tensor(k, np.array([v], dtype=wire[k])) for k, v in options.items())])
    (response,) = model.execute([request])
    assert not response.has_error(), response.error().message()
    latents = torch.from_numpy(pb.get_output_tensor_by_name(response, "latents").as_numpy())
    report = json.loads(pb.get_output_tensor_by_name(response, "schedule").as_numpy()[0].decode())

    strip = lambda s: [{k: v for k, v in r.items() if k != "time_s"} for r in s]  # noqa: E731
    assert strip(report["schedule"]) == strip(expected_schedule)
    assert latents.shape == expected.shape == (1, 64, 16)
    # On the CPU provider the portable graph optimized at load is the same graph as `run`'s *.ort.onnx:
    # bit-identical. On the CUDA provider `run` executes the CPU-optimized file, so allow kernel rounding.
    tol = 0 if standin.providers == ["CPUExecutionProvider"] else 1e-4
    torch.testing.assert_close(latents, expected, rtol=tol, atol=tol)
    assert {name for name, _ in standin.calls} == {"topi_anchor", "topi_pruned"}
    keeps = {shapes["keep_idx"][0] for name, shapes in standin.calls if name == "topi_pruned"}
    assert keeps == {r["keep"] for r in expected_schedule if r["step"] % options.get("update_interval", 10)}


def test_loop_request_errors_are_error_responses(ort_engine_dir, tmp_path, capsys, monkeypatch):
    repo = tmp_path / "repo"
    run_cli(["triton", "--engine-dir", str(ort_engine_dir), "--out", str(repo), "--kind", "cpu"], capsys)
    pb = _fake_pb_utils(_OrtStandIn(repo))
    model = _load_generated_model(repo, "topi_loop", pb, monkeypatch)
    base = [pb.Tensor("reference_latents", np.zeros((1, 64, 16), np.float32)),
            pb.Tensor("prompt_embeds", np.zeros((1, 8, 32), np.float32)),
            pb.Tensor("pooled_prompt_embeds", np.zeros((1, 16), np.float32)),
            pb.Tensor("steps", np.array([1], np.int32))]
    bad_ratio = pb.InferenceRequest(inputs=[*base, pb.Tensor("ratio", np.array([0.4], np.float32))])
    missing = pb.InferenceRequest(inputs=base[1:])
    good = pb.InferenceRequest(inputs=base)
    r1, r2, r3 = model.execute([bad_ratio, missing, good])
    assert r1.has_error() and "not a compiled bucket" in r1.error().message()
    assert r2.has_error() and "reference_latents" in r2.error().message()
    assert not r3.has_error()


def test_full_steps_via_anchor_for_tensorrt_style_engines(ort_engine_dir, tmp_path, capsys):
    """full_via='anchor' (TensorRT: the pruned plan has no full-context profile) gives the unpruned velocity."""
    from topi_export.runtime.inputs import synthetic_inputs
    from topi_export.runtime.manifest import read_manifest
    from topi_export.runtime.session import _Dims
    from topi_export.serving.triton_engine import TritonEngine

    repo = tmp_path / "repo"
    run_cli(["triton", "--engine-dir", str(ort_engine_dir), "--out", str(repo), "--kind", "cpu"], capsys)
    m = read_manifest(ort_engine_dir)
    data = synthetic_inputs(_Dims(m.data["model"]), 0, m.layout.target_grid, m.layout.ref_grid, m.layout.text_tokens)
    standin = _OrtStandIn(repo)
    via_anchor, via_pruned = TritonEngine(standin, full_via="anchor"), TritonEngine(standin, full_via="pruned")
    for e in (via_anchor, via_pruned):
        e.bind(data)
    latents, t = data.initial_noise(0), torch.tensor([0.7])
    standin.calls.clear()
    a = via_anchor.full(latents, t)
    assert [name for name, _ in standin.calls] == ["topi_anchor"]
    torch.testing.assert_close(a, via_pruned.full(latents, t), rtol=1e-4, atol=1e-5)


def test_docs_client_example_against_the_adapter(ort_engine_dir, tmp_path, capsys, monkeypatch):
    """Runs the tritonclient example of docs/triton.md with a fake gRPC client that hands the request to the
    generated model.py (ONNX Runtime standing in for the engine models): the saved latents equal `run`'s."""
    import re

    import tritonclient.grpc as grpcclient
    from tritonclient.grpc import service_pb2
    from tritonclient.utils import serialize_byte_tensor, triton_to_np_dtype

    repo = tmp_path / "repo"
    run_cli(["triton", "--engine-dir", str(ort_engine_dir), "--out", str(repo), "--kind", "cpu"], capsys)
    standin = _OrtStandIn(repo)
    pb = _fake_pb_utils(standin)
    model = _load_generated_model(repo, "topi_loop", pb, monkeypatch)

    class FakeClient:
        def __init__(self, url, *args, **kwargs):
            self.url = url

        def infer(self, model_name, inputs, outputs=None, **kwargs):
            assert model_name == "topi_loop"
            tensors = [pb.Tensor(i.name(), np.frombuffer(i._get_content(), dtype=triton_to_np_dtype(i.datatype()))
                                 .reshape(i.shape())) for i in inputs]
            (response,) = model.execute([pb.InferenceRequest(model_name=model_name, inputs=tensors)])
            assert not response.has_error(), response.error().message()
            msg = service_pb2.ModelInferResponse(model_name=model_name)
            for name in [o._get_tensor().name for o in outputs]:
                array = pb.get_output_tensor_by_name(response, name).as_numpy()
                is_bytes = array.dtype == np.object_
                msg.outputs.add(name=name, datatype="BYTES" if is_bytes else "FP32", shape=list(array.shape))
                msg.raw_output_contents.append(serialize_byte_tensor(array).item() if is_bytes else array.tobytes())
            return grpcclient.InferResult(msg)

    monkeypatch.setattr(grpcclient, "InferenceServerClient", FakeClient)
    docs = (Path(__file__).resolve().parents[1] / "docs" / "triton.md").read_text()
    code = re.search(r"## Client example.*?```python\n(.*?)```", docs, re.S).group(1)
    g = torch.Generator().manual_seed(5)
    save_file({"reference_latents": torch.randn(1, 64, 16, generator=g),
               "prompt_embeds": torch.randn(1, 8, 32, generator=g),
               "pooled_prompt_embeds": torch.randn(1, 16, generator=g)}, str(tmp_path / "inputs.safetensors"))
    monkeypatch.chdir(tmp_path)
    code = code.replace("STEPS, SEED, RATIO = 28, 0, 0.5", "STEPS, SEED, RATIO = 3, 2, 0.3")
    exec(compile(code, "docs/triton.md", "exec"), {"__name__": "docs_example"})
    rc, _, err = run_cli(["run", "--engine-dir", str(ort_engine_dir), "--inputs", "inputs.safetensors", "--steps", "3",
                          "--seed", "2", "--ratio", "0.3", "-q", "--out", "run.safetensors"], capsys)
    assert rc == 0, err
    tol = 0 if standin.providers == ["CPUExecutionProvider"] else 1e-4
    torch.testing.assert_close(load_file("latents.safetensors")["latents"], load_file("run.safetensors")["latents"],
                               rtol=tol, atol=tol)
