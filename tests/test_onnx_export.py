"""Export (topi custom ops with function bodies), ONNX Runtime parity, manifest checks, atomic builds."""
import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from conftest import run_cli
from topi_export.errors import TopiError


def _single_op_model(op, inputs, opset=20):
    from onnx import TensorProto, helper

    from topi_export.ops.onnx import PLUGIN_ATTRS, function_protos

    node = helper.make_node(op, [n for n, _ in inputs], ["y"], domain="topi", **PLUGIN_ATTRS)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, t, None) for n, t in inputs],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("topi", 1)])
    model.functions.extend(f for f in function_protos(opset) if f.name == op)
    return model


def test_function_bodies_equal_the_torch_ops_on_random_shapes():
    import onnxruntime as ort
    from onnx import TensorProto

    from topi_export.ops import influence_score, token_gather

    g = torch.Generator().manual_seed(0)
    infl = ort.InferenceSession(_single_op_model("influence_score", [("q", TensorProto.FLOAT), ("k", TensorProto.FLOAT),
                                                                     ("v", TensorProto.FLOAT)]).SerializeToString())
    gath = ort.InferenceSession(_single_op_model("token_gather", [("x", TensorProto.FLOAT),
                                                                  ("i", TensorProto.INT64)]).SerializeToString())
    for _ in range(5):
        b, h, nx, nc, t, d = (int(v) for v in torch.randint(1, 9, (6,), generator=g))
        d *= 4
        q, k, v = (torch.randn(b, h, n, d, generator=g) for n in (nx, t + nx + nc, nc))
        (got,) = infl.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})
        np.testing.assert_allclose(got, influence_score(q, k, v).numpy(), rtol=1e-5, atol=1e-6)
        x = torch.randn(b, nc + 3, d, generator=g)
        idx = torch.randperm(nc + 3, generator=g)[:nc].sort().values
        (got,) = gath.run(None, {"x": x.numpy(), "i": idx.numpy()})
        np.testing.assert_array_equal(got, token_gather(x, idx).numpy())


def test_graphs_carry_topi_nodes_functions_and_no_float64(ort_engine_dir):
    for kind, op, count in (("anchor", "influence_score", 3), ("pruned", "token_gather", 3)):
        path = ort_engine_dir / "onnx" / f"{kind}.onnx"
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        nodes = [n for n in model.graph.node if n.domain == "topi"]
        assert [n.op_type for n in nodes] == [op] * count  # pivotal layers / (hidden, cos, sin) gathers
        for n in nodes:
            attrs = {a.name: a.s.decode() for a in n.attribute}
            assert attrs == {"plugin_namespace": "topi", "plugin_version": "1"}
        assert [f.name for f in model.functions] == [op] and model.functions[0].domain == "topi"
        opsets = {o.domain: o.version for o in model.opset_import}
        assert opsets["topi"] == 1 and model.functions[0].opset_import[0].version == opsets[""]
        doubles = [n for n in model.graph.node if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.DOUBLE]
        assert not doubles and all(i.data_type != onnx.TensorProto.DOUBLE for i in model.graph.initializer)
    pruned = onnx.load(str(ort_engine_dir / "onnx" / "pruned.onnx"))
    keep = [i for i in pruned.graph.input if i.name == "keep_idx"][0]
    assert keep.type.tensor_type.shape.dim[0].dim_param  # dynamic length: one graph for every bucket


def test_manifest_contents(ort_engine_dir):
    m = json.loads((ort_engine_dir / "manifest.json").read_text())
    assert m["format"] == "topi-engines/1" and m["backend"] == "onnxruntime"
    assert m["buckets"] == [{"ratio": 0.3, "keep": 45, "profile": 0}, {"ratio": 0.5, "keep": 32, "profile": 1}]
    assert set(m["calibration"]) >= {"pivotal_layers", "prune_start", "update_interval"}
    assert {"anchor.ort.onnx", "pruned.ort.onnx", "onnx/anchor.onnx", "onnx/pruned.onnx"} <= set(m["files"])
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    assert m["model"]["weights_hash"] and m["versions"]["onnxruntime"]


@pytest.mark.parametrize("mode", [dict(ratio=0.5), dict(ratio=0.3), dict(tau=0.6, buckets=(0.3, 0.5))])
def test_onnxruntime_equals_torch_step_by_step(tiny, tiny_settings, ort_engine_dir, mode):
    from topi_export.backends.onnxruntime import OrtEngine
    from topi_export.backends.torch import TorchEngine
    from topi_export.method import Selector
    from topi_export.runtime.inputs import synthetic_inputs
    from topi_export.runtime.loop import denoise, rel_l2
    from topi_export.runtime.manifest import read_manifest

    manifest = read_manifest(ort_engine_dir)
    data = synthetic_inputs(tiny.adapter, 3, (8, 8))
    kw = dict(steps=12, update_interval=5)
    results = []
    for engine in (TorchEngine(tiny.adapter, manifest.settings), OrtEngine(manifest)):
        sel = Selector(64, ratio=mode.get("ratio", 0.0), tau=mode.get("tau"), buckets=mode.get("buckets", ()),
                       grid=(8, 8))
        results.append(denoise(engine, data, selector=sel, **kw))
    ref, got = results
    assert [(s["kind"], s["keep"]) for s in got.schedule] == [(s["kind"], s["keep"]) for s in ref.schedule]
    assert rel_l2(got.latents, ref.latents) <= 1e-4


def test_run_from_engine_dir_cli(ort_engine_dir, tmp_path, capsys):
    code, out, err = run_cli(["run", "--engine-dir", str(ort_engine_dir), "--steps", "4", "--compare", "-q",
                              "--json", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["backend"] == "onnxruntime" and rep["schedule"][1]["graph"] == "pruned"
    code, _, err = run_cli(["run", "--engine-dir", str(ort_engine_dir), "--ratio", "0.4", "-q"], capsys)
    assert code == 2 and "not a compiled bucket" in err


def _copy(src, tmp_path):
    dst = tmp_path / "eng"
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("tamper,needle", [
    (lambda d: open(d / "pruned.ort.onnx", "ab").write(b"x"), "does not match its sha256"),
    (lambda d: (d / "anchor.ort.onnx").unlink(), "is missing"),
    (lambda d: _edit(d, lambda m: m["files"]["onnx/anchor.onnx"].update(sha256="0" * 64)), "does not match its sha256"),
    (lambda d: _edit(d, lambda m: m["buckets"][0].update(keep=40)), "does not match its ratio"),
    (lambda d: _edit(d, lambda m: m["buckets"].reverse()), "not ascending"),
    (lambda d: (d / "manifest.json").write_text("{"), "not valid JSON"),
    (lambda d: (d / "manifest.json").unlink(), "no manifest.json"),
])
def test_tampered_engine_dir_is_refused(ort_engine_dir, tmp_path, capsys, tamper, needle):
    d = _copy(ort_engine_dir, tmp_path)
    tamper(d)
    code, _, err = run_cli(["run", "--engine-dir", str(d), "--steps", "2", "-q"], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def _edit(d, fn):
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m))


def test_inputs_of_another_shape_are_refused(ort_engine_dir, capsys):
    from topi_export.runtime.manifest import open_engine_session
    from topi_export.runtime.inputs import synthetic_inputs

    session = open_engine_session(ort_engine_dir)
    from topi_export.runtime.session import _Dims

    data = synthetic_inputs(_Dims(session.model_info), 0, (4, 4))
    with pytest.raises(TopiError, match="was built for"):
        session.manifest.check_layout(data.layout)


def test_interrupted_build_leaves_nothing_behind(tmp_path, monkeypatch):
    import topi_export.export as export
    from topi_export import builder

    def interrupted_export(adapter, layout, settings, out_dir, progress=None):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "anchor.onnx").write_bytes(b"half-written")
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "export_graphs", interrupted_export)
    with pytest.raises(KeyboardInterrupt):
        builder.build_engines(model="tiny-kontext", engine_dir=tmp_path / "out" / "e", echo=lambda s: None,
                              layout=_small_layout())
    assert list((tmp_path / "out").iterdir()) == []


def _small_layout():
    from topi_export.models import Layout

    return Layout(4, (2, 2), (2, 2))


@pytest.mark.parametrize("args,needle", [
    (["--ratio-buckets", "0.5,0.3"], "ascending"),
    (["--ratio-buckets", "0.3,1.2"], "outside (0, 1)"),
    (["--ratio-buckets", "0.3,0.3"], "duplicate"),
    (["--backend", "nope"], "unknown build backend"),
    (["--target-grid", "8by8"], "HxW"),
    (["--build-dynamic-shape"], "static per shape"),
])
def test_build_refuses_bad_arguments(tmp_path, capsys, args, needle):
    code, _, err = run_cli(["build", "--model", "tiny-kontext", "--engine-dir", str(tmp_path / "e")] + args, capsys)
    assert code == 2 and needle in err, err
    assert not (tmp_path / "e").exists()


def test_existing_engine_dir_needs_force(ort_engine_dir, capsys):
    code, _, err = run_cli(["build", "--model", "tiny-kontext", "--engine-dir", str(ort_engine_dir)], capsys)
    assert code == 2 and "--force" in err


def test_external_data_graphs_build_check_and_serve(tmp_path, monkeypatch, capsys):
    """Graphs over the protobuf limit are saved with external data; the ORT-optimized copies, the checks,
    the runtime and the Triton repository must all follow. The limit is lowered so tiny-kontext crosses it."""
    import topi_export.export.graphs as graphs
    from topi_export.builder import build_engines

    monkeypatch.setattr(graphs, "EXTERNAL_DATA_BYTES", 1000)
    out = build_engines(model="tiny-kontext", layout=_small_layout(), engine_dir=tmp_path / "e", echo=lambda s: None)
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert {"onnx/anchor.onnx.data", "onnx/pruned.onnx.data", "anchor.ort.onnx.data", "pruned.ort.onnx.data"} <= set(files)
    assert onnx.load(str(out / "onnx" / "anchor.onnx"), load_external_data=False).graph.initializer[0].data_location == 1
    code, stdout, err = run_cli(["check", "--engine-dir", str(out)], capsys)
    assert code == 0 and "all 5 comparisons pass" in stdout, err
    pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] not installed")
    code, _, err = run_cli(["triton", "--engine-dir", str(out), "--out", str(tmp_path / "repo")], capsys)
    assert code == 0, err
    assert (tmp_path / "repo" / "topi_anchor" / "1" / "anchor.onnx.data").is_file()


def test_build_and_run_from_a_saved_model_directory(tmp_path, capsys):
    from topi_export.models import build_builtin

    build_builtin("tiny-kontext").save_pretrained(tmp_path / "model", safe_serialization=True)
    eng = tmp_path / "eng"
    code, _, err = run_cli(["build", "--model", str(tmp_path / "model"), "--ratio-buckets", "0.3,0.5",
                            "--target-grid", "4x4", "--engine-dir", str(eng)], capsys)
    assert code == 0, err
    assert json.loads((eng / "manifest.json").read_text())["model"]["source"] == str(tmp_path / "model")
    code, out, err = run_cli(["run", "--engine-dir", str(eng), "--steps", "3", "--compare", "-q"], capsys)
    assert code == 0 and "ToPi" in out, err
    code, out, err = run_cli(["check", "--engine-dir", str(eng)], capsys)  # reference loads the saved folder
    assert code == 0 and "all 5 comparisons pass" in out, err
