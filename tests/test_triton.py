"""`topi-export triton`: schema-valid repositories for an ONNX Runtime engine directory (built with the CLI) and a
TensorRT one (described by its manifest, not built), the refusals, and the BLS loop model's logic with ONNX Runtime
standing in for Triton's model calls. No tritonserver runs here (tests/test_triton_server.py runs one)."""
import dataclasses
import importlib.util
import json
import os
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli
from topi_export.fsutil import MARKER_FILE
from topi_export.serving.model_config import HEADER

pytest.importorskip("tritonclient.grpc.model_config_pb2",
                    reason="needs tritonclient[grpc] (pip install 'topi-export[triton]')")

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"8x8": (8, 8), "4x8": (4, 8)}  # the two layouts of the engine directory (--resolutions 128x128,128x64)


@pytest.fixture(scope="session")
def engine_dir(tmp_path_factory):
    """One ONNX Runtime engine directory of tiny-kontext serving two layouts (8x8 and 4x8 tokens, target and
    reference), with the dense baseline; built once with the CLI (about a minute here)."""
    out = tmp_path_factory.mktemp("triton-engines") / "tiny"
    code, _, err = run_cli(["build", "--model", "tiny-kontext", "--resolutions", "128x128,128x64",
                            "--ratio-buckets", "0.3,0.5", "--engine-dir", str(out)])
    assert code == 0, err
    return out


@pytest.fixture(scope="session")
def repo(engine_dir, tmp_path_factory):
    """The repository of engine_dir (CPU instances), shared read-only by the loop tests."""
    from topi_export.serving.triton_repo import generate_repository

    out = tmp_path_factory.mktemp("triton-repo") / "repo"
    generate_repository(engine_dir, out, kind="cpu")
    return out


def _config(path):
    return _config_text(Path(path).read_text())


def _config_text(text):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _rehash(engine: Path, data: dict) -> None:
    from topi_export.artifacts.manifest import sha256_file

    data["files"] = {str(p.relative_to(engine)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                     for p in sorted(engine.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    from topi_export.plan.manifest import DIGEST, manifest_digest

    data[DIGEST] = manifest_digest(data)  # the digest is recomputed too: the checks behind it must hold on their own
    (engine / "manifest.json").write_text(json.dumps(data, indent=2))


def _copy_engine_dir(engine_dir: Path, dst: Path) -> Path:
    shutil.copytree(engine_dir, dst, copy_function=shutil.copyfile)  # real copies: tests edit them
    return dst


def _inputs(grid, seed, path=None, grids_meta=True):
    """A request for a layout of engine_dir: tensors (+ the inputs file `run --inputs` reads)."""
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    tensors = {"reference_latents": torch.randn(1, n, 16, generator=g),
               "prompt_embeds": torch.randn(1, 8, 32, generator=g),
               "pooled_prompt_embeds": torch.randn(1, 16, generator=g), "guidance": torch.tensor([3.0])}
    if path is not None:
        meta = {"target_grid": f"{grid[0]}x{grid[1]}", "reference_grids": f"{grid[0]}x{grid[1]}"} if grids_meta else {}
        save_file(tensors, str(path), metadata=meta)
    return tensors


def _run(engine_dir, inputs_path, tmp_path, capsys, **options):
    """`topi-export run --engine-dir`: (latents, schedule records)."""
    args = ["run", "--engine-dir", str(engine_dir), "--inputs", str(inputs_path), "-q",
            "--out", str(tmp_path / "run.safetensors"), "--json", str(tmp_path / "run.json")]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    return load_file(str(tmp_path / "run.safetensors"))["latents"], json.loads((tmp_path / "run.json").read_text())


def _strip(schedule):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in schedule]


# --- the loop model with ONNX Runtime standing in for Triton ----------------------------------------------------
class _OrtStandIn:
    """Serves the repository's engine models with ONNX Runtime, as `run` opens them, keyed by Triton model name."""

    def __init__(self, repo: Path):
        import onnxruntime as ort

        from topi_export.backends.onnxruntime import providers, session_options

        self.providers = providers()
        self.sessions = {d.name: ort.InferenceSession(str(d / "1" / "model.onnx"), session_options(),
                                                      providers=self.providers)
                         for d in sorted(repo.iterdir()) if (d / "1" / "model.onnx").exists()}
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

        def exec(self):  # a BLS call: ONNX Runtime stands in for Triton's engine models
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


def _load_generated_model(repo: Path, pb, monkeypatch, loop="topi_loop"):
    """The repository's model.py, initialized as Triton's Python backend does (with a fake pb_utils)."""
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


def _request(pb, tensors: dict, **options):
    wire = {"steps": np.int32, "seed": np.uint64, "ratio": np.float32, "tau": np.float32, "update_interval": np.int32,
            "reuse_order": np.int32}
    items = [pb.Tensor(k, v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in tensors.items()]
    for k, v in options.items():
        array = np.array([v.encode()], dtype=np.object_) if isinstance(v, str) else np.array([v], dtype=wire[k])
        items.append(pb.Tensor(k, array))
    return pb.InferenceRequest(model_name="topi_loop", inputs=items)


def _answer(pb, response):
    assert not response.has_error(), response.error().message()
    latents = torch.from_numpy(pb.get_output_tensor_by_name(response, "latents").as_numpy())
    return latents, json.loads(pb.get_output_tensor_by_name(response, "schedule").as_numpy()[0].decode())


# --- repositories -----------------------------------------------------------------------------------------------
def test_onnxruntime_repository_layout_and_schema(engine_dir, tmp_path, capsys):
    from topi_export.fsutil import made_by_topi_export

    out = tmp_path / "repo"
    code, stdout, err = run_cli(["triton", "--engine-dir", str(engine_dir), "--out", str(out), "--instances", "2",
                                 "--kind", "cpu"], capsys)
    assert code == 0, err
    assert "repository ->" in stdout and "tritonserver --model-repository" in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(["README.md", "topi_dense", "topi_loop", "topi_topi",
                                                              MARKER_FILE])
    assert "topi-export" in (out / "README.md").read_text().splitlines()[0] and made_by_topi_export(out)
    for kind in ("topi", "dense"):
        d = out / f"topi_{kind}"
        assert sorted(p.name for p in d.iterdir()) == ["1", "config.pbtxt"]
        assert sorted(p.name for p in (d / "1").iterdir()) == ["model.onnx", "weights.data"]
        # the portable graph and the one weights file, byte for byte (hard links on one file system)
        assert (d / "1" / "model.onnx").read_bytes() == (engine_dir / "onnx" / f"{kind}.onnx").read_bytes()
        assert os.path.samefile(d / "1" / "weights.data", engine_dir / "onnx" / "weights.data")
        cfg = _config(d / "config.pbtxt")
        assert cfg.name == f"topi_{kind}" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 0
        assert [(g.kind, g.count, list(g.profile)) for g in cfg.instance_group] == [(2, 2, [])]  # KIND_CPU == 2
        dims = {i.name: list(i.dims) for i in cfg.input}
        # token dims dynamic, channels fixed, batch explicit
        assert dims["latents"] == [-1, -1, 16] and dims["encoder_hidden_states"] == [-1, -1, 32]
        assert dims["rope_cos"] == [-1, 16] and dims["pooled_projections"] == [-1, 16]
        assert ("keep_idx" in dims) == ("score_idx" in dims) == (kind == "topi")
    topi = _config(out / "topi_topi" / "config.pbtxt")
    assert {i.name: i.data_type for i in topi.input}["keep_idx"] == 9  # TYPE_INT64
    assert [o.name for o in topi.output] == ["velocity", "influence"]
    assert [o.name for o in _config(out / "topi_dense" / "config.pbtxt").output] == ["velocity"]

    loop = _config(out / "topi_loop" / "config.pbtxt")
    assert loop.backend == "python" and loop.name == "topi_loop" and loop.max_batch_size == 0
    assert [(g.kind, g.count) for g in loop.instance_group] == [(2, 2)]
    inputs = {i.name: (i.optional, list(i.dims)) for i in loop.input}
    assert inputs["reference_latents"] == (False, [1, -1, 16])
    assert inputs["prompt_embeds"] == (False, [1, -1, 32]) and inputs["pooled_prompt_embeds"] == (False, [1, 16])
    assert all(inputs[n][0] for n in ("noise", "guidance", "steps", "seed", "ratio", "tau", "reuse", "reuse_order",
                                      "update_interval", "policy", "mode", "target_grid", "reference_grids",
                                      "ref_kv", "pruning_residual"))
    assert len(inputs) == 18 and [o.name for o in loop.output] == ["latents", "schedule"]
    assert json.loads(loop.parameters["topi_models"].string_value) == {"topi": "topi_topi", "dense": "topi_dense"}
    assert (out / "topi_loop" / "1" / "model.py").read_bytes() == (
        ROOT / "topi_export" / "serving" / "bls_model.py").read_bytes()
    assert (out / "topi_loop" / "manifest.json").read_bytes() == (engine_dir / "manifest.json").read_bytes()
    assert "pip wheel --no-deps" in (out / "README.md").read_text()  # not on an index: from the checkout or a wheel
    assert all(not line.startswith("#") or line == HEADER for d in out.iterdir() if (d / "config.pbtxt").exists()
               for line in (d / "config.pbtxt").read_text().splitlines())


def test_python_engine_models_repository(engine_dir, repo, tmp_path, capsys):
    """--engine-models python: every engine model is a Python-backend model (ort_engine_model.py) over the same
    graph and weights, with the platform model's name, tensors, dims and instances; the loop model is unchanged."""
    out = tmp_path / "repo"
    code, stdout, err = run_cli(["triton", "--engine-dir", str(engine_dir), "--out", str(out), "--kind", "cpu",
                                 "--engine-models", "python", "--ort-threads", "1"], capsys)
    assert code == 0, err
    assert "topi-export serve --repo" in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in repo.iterdir())
    template = (ROOT / "topi_export" / "serving" / "ort_engine_model.py").read_bytes()
    for kind in ("topi", "dense"):
        d = out / f"topi_{kind}"
        assert sorted(p.name for p in (d / "1").iterdir()) == ["model.onnx", "model.py", "weights.data"]
        assert (d / "1" / "model.py").read_bytes() == template
        assert os.path.samefile(d / "1" / "weights.data", engine_dir / "onnx" / "weights.data")
        ours, platform = _config(d / "config.pbtxt"), _config(repo / f"topi_{kind}" / "config.pbtxt")
        assert ours.backend == "python" and not ours.platform and platform.platform == "onnxruntime_onnx"
        assert (ours.name, ours.max_batch_size, list(ours.input), list(ours.output), list(ours.instance_group)) == (
            platform.name, platform.max_batch_size, list(platform.input), list(platform.output),
            list(platform.instance_group))
        assert dict((k, v.string_value) for k, v in ours.parameters.items()) == {"intra_op_num_threads": "1"}
    assert _config(out / "topi_loop" / "config.pbtxt") == _config(repo / "topi_loop" / "config.pbtxt")
    assert (out / "topi_loop" / "1" / "model.py").read_bytes() == (repo / "topi_loop" / "1" / "model.py").read_bytes()
    assert "ort_engine_model.py" in (out / "README.md").read_text()


def test_config_pbtxt_takes_no_text_from_the_model_path(engine_dir, tmp_path, capsys):
    """A model path with a newline and quotes (what `build --model PATH` records as model.source) once closed the
    header comment and added a parameters block to every config, which still parsed. Configs are now ModelConfig
    messages written by text_format with a fixed comment: the path appears in no config, each config reads back
    as exactly the message built, and the README quotes it escaped."""
    evil = ('/models/x"\n}\n\nparameters { key: "EXECUTION_ENV_PATH" value { string_value: "/tmp/evil" } }\n'
            '# "it\'s"')
    eng = _copy_engine_dir(engine_dir, tmp_path / "eng")
    data = json.loads((eng / "manifest.json").read_text())
    data["model"]["source"] = evil
    _rehash(eng, data)
    for flavour in ("platform", "python"):
        out = tmp_path / flavour
        code, _, err = run_cli(["triton", "--engine-dir", str(eng), "--out", str(out), "--kind", "cpu",
                                "--engine-models", flavour], capsys)
        assert code == 0, err
        for name in ("topi_topi", "topi_dense", "topi_loop"):
            text = (out / name / "config.pbtxt").read_text()
            assert "EXECUTION_ENV_PATH" not in text and "/tmp/evil" not in text and "/models/x" not in text
            assert [line for line in text.splitlines() if line.startswith("#")] == [HEADER]
            cfg = _config(out / name / "config.pbtxt")
            assert "EXECUTION_ENV_PATH" not in cfg.parameters and cfg.name == name
        assert json.dumps(evil) in (out / "README.md").read_text()


def test_config_text_is_the_message(tmp_path):
    """config_text renders with text_format and parses back to the same message; a name or parameter holding
    quotes and newlines is escaped, never new syntax."""
    from topi_export.serving.model_config import config_text, model_config
    from topi_export.serving.triton_engine import Wire

    cfg = model_config('m"\n}', inputs=[Wire("x\ny", "TYPE_FP32", (1, -1), optional=True)],
                       outputs=[Wire("z", "TYPE_STRING", (1,), optional=False)], backend="python",
                       parameters={'k"': 'v\n}\nparameters { key: "EXECUTION_ENV_PATH" }'})
    text = config_text(cfg)
    back = _config_text(text)
    assert back == cfg and list(back.parameters) == ['k"'] and back.input[0].optional
    assert [line for line in text.splitlines() if line.startswith("parameters")] == ["parameters {"]


@pytest.mark.parametrize("options", [
    {"ratio": 0.5, "update_interval": 2, "steps": 5, "seed": 3},
    {"tau": 0.5, "update_interval": 2, "steps": 4, "seed": 1},
    {"ratio": 0.0, "steps": 2, "seed": 0},
    {"ratio": 0.5, "update_interval": 4, "steps": 8, "seed": 2, "reuse": "3", "reuse_order": 1},
], ids=["ratio", "tau", "unpruned", "reuse"])
def test_loop_model_matches_run_with_ort_standing_in_for_triton(engine_dir, repo, tmp_path, capsys, monkeypatch,
                                                                options):
    """The generated model.py (the real file, a fake pb_utils) drives runtime.loop.denoise through TritonEngine;
    ONNX Runtime serves the repository's model files. Same latents and schedule as `run --engine-dir`. A test of
    the loop logic, not of Triton. The request sends no grids: 64 reference tokens fit one served layout."""
    tensors = _inputs(LAYOUTS["8x8"], 7, tmp_path / "in.safetensors")
    expected, report = _run(engine_dir, tmp_path / "in.safetensors", tmp_path, capsys, **options)

    standin = _OrtStandIn(repo)
    pb = _fake_pb_utils(standin)
    model = _load_generated_model(repo, pb, monkeypatch)
    (response,) = model.execute([_request(pb, tensors, **options)])
    latents, schedule = _answer(pb, response)
    assert _strip(schedule["schedule"]) == _strip(report["schedule"])
    anchors = [r for r in schedule["schedule"] if r["kind"] == "anchor"]
    assert anchors and all("kept_influence" in r and r["keep_per_reference"] == [64] for r in anchors)
    assert latents.shape == expected.shape == (1, 64, 16)
    # the same portable graph with the same session options as `run`: bit-identical on the CPU provider
    tol = 0 if standin.providers == ["CPUExecutionProvider"] else 1e-4
    torch.testing.assert_close(latents, expected, rtol=tol, atol=tol)
    # exactly the inputs the topi graph declares, every step through <name>_topi
    declared = {t["name"] for t in json.loads((engine_dir / "manifest.json").read_text())["graphs"]["topi"]["inputs"]}
    assert {name for name, _ in standin.calls} == {"topi_topi"}
    assert all(set(shapes) == declared for _, shapes in standin.calls)
    keeps = [shapes["keep_idx"][0] for _, shapes in standin.calls]
    assert keeps == [r["keep"] for r in report["schedule"] if r["kind"] != "reuse"]  # a reused step calls nothing
    assert schedule["reuse"] == report["reuse"]


def test_loop_model_serves_every_built_layout(engine_dir, repo, tmp_path, capsys, monkeypatch):
    """One repository, two layouts: a 4x8 request with target_grid / reference_grids equals `run` on an inputs
    file with those grids; the same request without grids is resolved from its token counts; dense and full modes
    equal the session's baseline runs; a layout the engines do not serve is an error response."""
    from topi_export.runtime.session import open_session

    tensors = _inputs(LAYOUTS["4x8"], 11, tmp_path / "in.safetensors")
    expected, report = _run(engine_dir, tmp_path / "in.safetensors", tmp_path, capsys, ratio=0.3, steps=3, seed=4,
                            update_interval=2)
    pb = _fake_pb_utils(_OrtStandIn(repo))
    model = _load_generated_model(repo, pb, monkeypatch)
    opts = {"ratio": 0.3, "steps": 3, "seed": 4, "update_interval": 2}
    with_grids = _request(pb, tensors, target_grid="4x8", reference_grids="4x8", **opts)
    without = _request(pb, tensors, **opts)
    dense = _request(pb, tensors, steps=2, seed=4, mode="dense")
    full = _request(pb, tensors, steps=2, seed=4, mode="full")
    unserved = _request(pb, _inputs((6, 6), 1), steps=1)
    r_grids, r_without, r_dense, r_full, r_unserved = model.execute([with_grids, without, dense, full, unserved])
    for response in (r_grids, r_without):
        latents, schedule = _answer(pb, response)
        assert schedule["layout"] == {"text_tokens": 8, "target_grid": [4, 8], "reference_grids": [[4, 8]]}
        assert _strip(schedule["schedule"]) == _strip(report["schedule"])
        torch.testing.assert_close(latents, expected, rtol=0, atol=0)
    session = open_session(engine_dir=engine_dir)
    data = session.load_inputs(tmp_path / "in.safetensors")
    for response, mode in ((r_dense, "dense"), (r_full, "full")):
        latents, schedule = _answer(pb, response)
        assert {r["graph"] for r in schedule["schedule"]} == {mode}
        torch.testing.assert_close(latents, session.denoise(data, steps=2, seed=4, mode=mode).latents, rtol=0, atol=0)
    assert r_unserved.has_error() and "serves only" in r_unserved.error().message()


def test_request_grids_default_to_the_only_fitting_layout(engine_dir):
    """Grids omitted: the one served layout with the request's token counts (the only layout of a one-layout
    directory, even when it is not square); ambiguous counts ask for the grids."""
    from topi_export.errors import TopiError
    from topi_export.models import adapter_for
    from topi_export.plan import Layout
    from topi_export.artifacts.manifest import read_manifest
    from topi_export.serving.triton_engine import parse_request

    m = read_manifest(engine_dir, verify_files=False)
    family = adapter_for(m.model)
    arrays = {k: v.numpy() for k, v in _inputs(LAYOUTS["4x8"], 0).items()}
    one = dataclasses.replace(m, layouts=(Layout(8, (4, 8), ((4, 8),)),))
    data, opts = parse_request(arrays, one, family)
    assert data.layout == Layout(8, (4, 8), ((4, 8),)) and opts.steps == 28 and opts.mode == "topi"
    two = dataclasses.replace(m, layouts=(Layout(8, (4, 8), ((4, 8),)), Layout(8, (8, 4), ((8, 4),))))
    with pytest.raises(TopiError, match="send 'target_grid'"):
        parse_request(arrays, two, family)
    data, _ = parse_request({**arrays, "target_grid": np.array([b"8x4"], np.object_)}, two, family)
    assert data.layout.ref_grids == ((8, 4),)


def test_loop_request_errors_are_error_responses(repo, monkeypatch):
    pb = _fake_pb_utils(_OrtStandIn(repo))
    model = _load_generated_model(repo, pb, monkeypatch)
    good = _inputs(LAYOUTS["8x8"], 2)
    nan = dict(good, prompt_embeds=torch.full((1, 8, 32), float("nan")))
    bad = {
        "not a compiled bucket": _request(pb, good, ratio=0.4, steps=1),
        "reference_latents": _request(pb, {k: v for k, v in good.items() if k != "reference_latents"}, steps=1),
        "'steps' is 0, outside 1..1000": _request(pb, good, steps=0),
        "'update_interval' is 1001": _request(pb, good, update_interval=1001),
        "'seed' is -1": pb.InferenceRequest(inputs=[*_request(pb, good).inputs(),
                                                    pb.Tensor("seed", np.array([-1], np.int64))]),
        "either 'ratio' or 'tau'": _request(pb, good, ratio=0.5, tau=0.5),
        "outside [0, 1)": _request(pb, good, ratio=1.5),
        "'tau' is 1.5": _request(pb, good, tau=1.5),
        "unknown policy": _request(pb, good, policy="best"),
        "'mode' is 'fast'": _request(pb, good, mode="fast"),
        "NaN": _request(pb, nan, steps=1),
        "model expects 16": _request(pb, dict(good, reference_latents=torch.zeros(1, 64, 8)), steps=1),
        "bad target_grid": _request(pb, good, target_grid="eight", steps=1),
        "send an integer": pb.InferenceRequest(inputs=[*_request(pb, good).inputs(),
                                                       pb.Tensor("steps", np.array([2.5], np.float32))]),
    }
    responses = model.execute([*bad.values(), _request(pb, good, steps=1)])
    for needle, response in zip(bad, responses):
        assert response.has_error() and needle in response.error().message(), (needle, response.error())
    assert not responses[-1].has_error()  # one bad request does not take the others down


def test_docs_client_example_against_the_adapter(engine_dir, repo, tmp_path, capsys, monkeypatch):
    """Runs the tritonclient example of docs/triton.md with a fake gRPC client that hands the request to the
    generated model.py (ONNX Runtime standing in for the engine models): the saved latents equal `run`'s."""
    import re

    import tritonclient.grpc as grpcclient
    from tritonclient.grpc import service_pb2
    from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor, triton_to_np_dtype

    pb = _fake_pb_utils(_OrtStandIn(repo))
    model = _load_generated_model(repo, pb, monkeypatch)

    def array(i):
        if i.datatype() == "BYTES":
            return deserialize_bytes_tensor(i._get_content()).reshape(i.shape())
        return np.frombuffer(i._get_content(), dtype=triton_to_np_dtype(i.datatype())).reshape(i.shape())

    class FakeClient:
        def __init__(self, url, *args, **kwargs):
            self.url = url

        def infer(self, model_name, inputs, outputs=None, **kwargs):
            assert model_name == "topi_loop"
            declared = {i.name: i.data_type for i in _config(repo / "topi_loop" / "config.pbtxt").input}
            from tritonclient.grpc import model_config_pb2

            for i in inputs:  # what tritonserver checks: declared names and types
                assert model_config_pb2.DataType.Name(declared[i.name()]) == "TYPE_" + {
                    "BYTES": "STRING"}.get(i.datatype(), i.datatype())
            tensors = [pb.Tensor(i.name(), array(i)) for i in inputs]
            (response,) = model.execute([pb.InferenceRequest(model_name=model_name, inputs=tensors)])
            assert not response.has_error(), response.error().message()
            msg = service_pb2.ModelInferResponse(model_name=model_name)
            for name in [o._get_tensor().name for o in outputs]:
                out = pb.get_output_tensor_by_name(response, name).as_numpy()
                is_bytes = out.dtype == np.object_
                msg.outputs.add(name=name, datatype="BYTES" if is_bytes else "FP32", shape=list(out.shape))
                msg.raw_output_contents.append(serialize_byte_tensor(out).item() if is_bytes else out.tobytes())
            return grpcclient.InferResult(msg)

    monkeypatch.setattr(grpcclient, "InferenceServerClient", FakeClient)
    docs = (ROOT / "docs" / "triton.md").read_text()
    code = re.search(r"## Client example.*?```python\n(.*?)```", docs, re.S).group(1)
    assert "STEPS, SEED, RATIO = 28, 0, 0.5" in code
    code = code.replace("STEPS, SEED, RATIO = 28, 0, 0.5", "STEPS, SEED, RATIO = 3, 2, 0.3")
    monkeypatch.chdir(tmp_path)
    _inputs(LAYOUTS["4x8"], 5, tmp_path / "inputs.safetensors")  # grids travel as BYTES inputs
    exec(compile(code, "docs/triton.md", "exec"), {"__name__": "docs_example"})
    expected, _ = _run(engine_dir, tmp_path / "inputs.safetensors", tmp_path, capsys, steps=3, seed=2, ratio=0.3)
    torch.testing.assert_close(load_file("latents.safetensors")["latents"], expected, rtol=0, atol=0)


def test_bls_model_imports_without_triton():
    spec = importlib.util.spec_from_file_location("bls_template", ROOT / "topi_export" / "serving" / "bls_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.pb_utils is None and hasattr(module, "TritonPythonModel")


# --- writing safely -----------------------------------------------------------------------------------------------
def test_force_replaces_only_a_tool_made_repository(engine_dir, tmp_path, capsys):
    out = tmp_path / "repo"
    assert run_cli(["triton", "--engine-dir", str(engine_dir), "--out", str(out), "--kind", "cpu"], capsys)[0] == 0
    code, _, err = run_cli(["triton", "--engine-dir", str(engine_dir), "--out", str(out)], capsys)
    assert code == 2 and "already exists" in err and "--force" in err
    code, _, err = run_cli(["triton", "--engine-dir", str(engine_dir), "--out", str(out), "--name", "other",
                            "--force"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(["README.md", "other_dense", "other_loop", "other_topi",
                                                              MARKER_FILE])

    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "README.md").write_text("# my models\n")
    (mine / "sub" / "data.bin").write_bytes(b"keep me")
    before = _tree(mine)
    code, _, err = run_cli(["triton", "--engine-dir", str(engine_dir), "--out", str(mine), "--force"], capsys)
    assert code == 2 and "not made by topi-export" in err and _tree(mine) == before
    code, _, err = run_cli(["triton", "--engine-dir", str(engine_dir), "--out", str(engine_dir / "repo")], capsys)
    assert code == 2 and "engine directory" in err and not (engine_dir / "repo").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "repo"]  # no staging directory left


def test_tampered_engine_file_is_refused(engine_dir, tmp_path, capsys):
    eng = _copy_engine_dir(engine_dir, tmp_path / "eng")
    with open(eng / "onnx" / "weights.data", "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    code, _, err = run_cli(["triton", "--engine-dir", str(eng), "--out", str(tmp_path / "repo")], capsys)
    assert code == 2 and "sha256" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eng"]


def test_paths_outside_the_engine_directory_are_refused(engine_dir, tmp_path, capsys):
    """A manifest naming a file outside the engine directory, and a graph whose external data points outside
    (../../etc/passwd, which exists next to the engine directory here): refused, nothing outside is linked."""
    import onnx

    outside = tmp_path / "etc" / "passwd"
    outside.parent.mkdir()
    outside.write_bytes(b"root:x:0:0\n")
    (tmp_path / "outside.onnx").write_bytes((engine_dir / "onnx" / "topi.onnx").read_bytes())

    eng = _copy_engine_dir(engine_dir, tmp_path / "a" / "eng")
    data = json.loads((eng / "manifest.json").read_text())
    data["graphs"]["topi"]["file"] = data["graphs"]["topi"]["onnx"] = "../../outside.onnx"
    _rehash(eng, data)
    data["files"]["../../outside.onnx"] = data["files"]["onnx/topi.onnx"]
    from topi_export.plan.manifest import DIGEST, manifest_digest

    data[DIGEST] = manifest_digest(data)
    (eng / "manifest.json").write_text(json.dumps(data))
    code, _, err = run_cli(["triton", "--engine-dir", str(eng), "--out", str(tmp_path / "a" / "repo")], capsys)
    assert code == 2 and "leaves the directory" in err

    eng = _copy_engine_dir(engine_dir, tmp_path / "b" / "eng")
    graph = onnx.load(str(eng / "onnx" / "topi.onnx"), load_external_data=False)
    tensor = next(t for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    next(e for e in tensor.external_data if e.key == "location").value = "../../etc/passwd"
    onnx.save(graph, str(eng / "onnx" / "topi.onnx"))
    _rehash(eng, json.loads((eng / "manifest.json").read_text()))
    code, _, err = run_cli(["triton", "--engine-dir", str(eng), "--out", str(tmp_path / "b" / "repo")], capsys)
    assert code == 2 and "external-data location" in err and "leaves the directory" in err

    for d in ("a", "b"):
        assert sorted(p.name for p in (tmp_path / d).iterdir()) == ["eng"]
    assert outside.stat().st_nlink == 1 and (tmp_path / "outside.onnx").stat().st_nlink == 1


# --- TensorRT -------------------------------------------------------------------------------------------------------
def _described_tensorrt_dir(engine_dir: Path, dst: Path, backend="tensorrt") -> Path:
    """A TensorRT engine directory DESCRIBED by its manifest, not built (data-center TensorRT cannot be installed
    here): the real ONNX graphs, placeholder plan files for the topi and dense engines whose sha256 the manifest
    records, and the graph entries of the ONNX export (the TensorRT engines take the same tensors)."""
    data = json.loads((engine_dir / "manifest.json").read_text())
    dst.mkdir(parents=True)
    shutil.copytree(engine_dir / "onnx", dst / "onnx")
    for kind in ("topi", "dense"):
        (dst / f"{kind}.plan").write_bytes(f"placeholder {kind} TensorRT plan".encode())
        data["graphs"][kind]["file"] = f"{kind}.plan"
    data.update(backend=backend, precision="fp16",
                target={"gpu": "NVIDIA H100", "compute_capabilities": ["SM90"], "plugins": "topi"})
    data["versions"][backend.replace("-", "_")] = "10.13.0"
    _rehash(dst, data)
    return dst


def test_tensorrt_repository_from_described_manifest(engine_dir, tmp_path, capsys):
    """Described, not built: instance_group lists every optimization profile of the topi plan (2 layouts x
    (anchor + 2 buckets) = 6) and one per layout for the dense plan, so Triton picks the profile by shape."""
    eng = _described_tensorrt_dir(engine_dir, tmp_path / "trt")
    out = tmp_path / "repo"
    code, _, err = run_cli(["triton", "--engine-dir", str(eng), "--out", str(out), "--name", "kontext"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(["README.md", "kontext_dense", "kontext_loop",
                                                              "kontext_topi", MARKER_FILE])
    profiles = {"topi": [str(i) for i in range(6)], "dense": ["0", "1"]}
    for kind in ("topi", "dense"):
        d = out / f"kontext_{kind}"
        assert [p.name for p in (d / "1").iterdir()] == ["model.plan"]
        assert (d / "1" / "model.plan").read_bytes() == (eng / f"{kind}.plan").read_bytes()
        cfg = _config(d / "config.pbtxt")
        assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 0
        assert [(g.kind, list(g.profile)) for g in cfg.instance_group] == [(1, profiles[kind])]  # KIND_GPU == 1
        dims = {i.name: list(i.dims) for i in cfg.input}
        assert dims["latents"] == [-1, -1, 16] and dims["rope_sin"] == [-1, 16]
    loop = _config(out / "kontext_loop" / "config.pbtxt")
    assert json.loads(loop.parameters["topi_models"].string_value) == {"topi": "kontext_topi",
                                                                      "dense": "kontext_dense"}
    assert "10.13.0" in (out / "README.md").read_text()
    code, _, err = run_cli(["triton", "--engine-dir", str(eng), "--out", str(tmp_path / "cpu"), "--kind", "cpu"],
                           capsys)
    assert code == 2 and "GPU" in err and not (tmp_path / "cpu").exists()
    code, _, err = run_cli(["triton", "--engine-dir", str(eng), "--out", str(tmp_path / "py"), "--engine-models",
                            "python"], capsys)
    assert code == 2 and "--engine-models platform" in err and not (tmp_path / "py").exists()


def test_tensorrt_rtx_engine_dir_is_refused(engine_dir, tmp_path, capsys):
    eng = _described_tensorrt_dir(engine_dir, tmp_path / "rtx", backend="tensorrt-rtx")
    code, _, err = run_cli(["triton", "--engine-dir", str(eng), "--out", str(tmp_path / "repo")], capsys)
    assert code == 2 and "TensorRT-RTX" in err and "--backend tensorrt" in err
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("args, needle", [
    (["--instances", "0"], "--instances"),
    (["--name", "a/b"], "--name"),
    (["--ort-threads", "2"], "--ort-threads"),
    (["--engine-models", "python", "--ort-threads", "0"], "--ort-threads"),
])
def test_bad_options_are_refused(engine_dir, tmp_path, capsys, args, needle):
    code, _, err = run_cli(["triton", "--engine-dir", str(engine_dir), "--out", str(tmp_path / "r"), *args], capsys)
    assert code == 2 and needle in err and not (tmp_path / "r").exists()


def test_missing_tritonclient_is_a_clear_error(engine_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tritonclient.grpc.model_config_pb2", None)
    code, _, err = run_cli(["triton", "--engine-dir", str(engine_dir), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "pip install 'topi-export[triton]'" in err and not (tmp_path / "r").exists()
