"""Export (one topi graph + a dense baseline sharing one weights file), ONNX Runtime parity, manifests, builds."""
import json

import onnx
import pytest
import torch

from conftest import run_cli
from topi_export.errors import TopiError
from topi_export.plan import Layout


def test_graphs_carry_topi_nodes_functions_and_no_float64(ort_engine_dir):
    m = json.loads((ort_engine_dir / "manifest.json").read_text())
    pivotal = len(m["calibration"]["pivotal_layers"])
    topi = onnx.load(str(ort_engine_dir / "onnx" / "topi.onnx"), load_external_data=False)
    ops = [n.op_type for n in topi.graph.node if n.domain == "topi"]
    assert sorted(ops) == sorted(["query_lse", "context_influence"] * pivotal + ["token_gather"] * 3 +
                                 ["token_gather"] * sum(1 for v in m["calibration"]["pivotal_layers"]
                                                        if v < m["calibration"]["prune_start"]))
    for n in topi.graph.node:
        if n.domain == "topi":
            assert {a.name: a.s.decode() for a in n.attribute} == {"plugin_namespace": "topi", "plugin_version": "1"}
    assert {f.name for f in topi.functions} == {"query_lse", "context_influence", "token_gather"}
    opsets = {o.domain: o.version for o in topi.opset_import}
    assert opsets["topi"] == 1 and all(f.opset_import[0].version == opsets[""] for f in topi.functions)
    dense = onnx.load(str(ort_engine_dir / "onnx" / "dense.onnx"), load_external_data=False)
    assert not [n for n in dense.graph.node if n.domain == "topi"] and not dense.functions
    for model in (topi, dense):
        doubles = [n for n in model.graph.node if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.DOUBLE]
        assert not doubles and all(i.data_type != onnx.TensorProto.DOUBLE for i in model.graph.initializer)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in topi.graph.input}
    for name in ("keep_idx", "score_idx"):
        assert isinstance(dims[name][0], str)  # dynamic: one graph for every bucket, anchors and pruned steps
    assert all(isinstance(d, str) for d in dims["latents"][:2] + dims["context"][:2])  # any resolution, batch


def test_one_weights_file_for_both_graphs(ort_engine_dir, tiny):
    """The engine directory holds the weights once: both graphs read one shared file."""
    onnx_dir = ort_engine_dir / "onnx"
    assert sorted(p.name for p in onnx_dir.iterdir()) == ["dense.onnx", "topi.onnx", "weights.data"]
    inline = 0
    for name in ("topi.onnx", "dense.onnx"):
        model = onnx.load(str(onnx_dir / name), load_external_data=False)
        for init in model.graph.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                assert {e.key: e.value for e in init.external_data}["location"] == "weights.data"
            else:
                inline += len(init.raw_data)
    weight_bytes = sum(p.numel() * p.element_size() for p in tiny.family.model.parameters())
    stored = (onnx_dir / "weights.data").stat().st_size + inline
    assert weight_bytes <= stored <= 1.15 * weight_bytes


def test_influence_graph_has_no_heads_x_target_x_keys_tensor(ort_engine_dir):
    """Inline the topi functions and run the graph in ONNX's reference evaluator at prime token counts, recording
    every intermediate value: no tensor of rank >= 3 holds heads x target x keys elements (the influence bodies
    loop over query chunks; tests/test_ops_onnx.py checks inside the loops)."""
    import numpy as np
    from onnx import inliner
    from onnx.reference import ReferenceEvaluator

    from topi_export.runtime.session import open_session

    model = inliner.inline_local_functions(onnx.load(str(ort_engine_dir / "onnx" / "topi.onnx")))
    s = open_session(engine_dir=ort_engine_dir)
    heads, layout = 2, Layout(7, (1, 13), ((1, 17),))
    data = s.family.synthetic_inputs(layout, 0)
    feed = {k: v.numpy() for k, v in s.family.conditioning(data).items()}
    feed.update(latents=np.random.default_rng(0).standard_normal((1, 13, 16), dtype=np.float32),
                context=data.reference_latents.numpy(), timestep=np.array([0.5], np.float32),
                keep_idx=np.arange(17), score_idx=np.arange(13))
    values = ReferenceEvaluator(model).run(None, feed, intermediate=True)
    shapes = [np.shape(v) for v in values.values() if hasattr(v, "shape")]
    assert len(shapes) > 500 and (1, heads, 13, 16) in shapes  # the scored queries were seen
    bad = heads * 13 * (7 + 13 + 17)
    assert not [sh for sh in shapes if len(sh) >= 3 and int(np.prod(sh)) == bad]


def test_manifest_contents(ort_engine_dir):
    from topi_export.artifacts.manifest import read_manifest

    m = read_manifest(ort_engine_dir)
    assert m.backend == "onnxruntime" and m.model.family == "flux-kontext" and m.batch == 1
    assert [(p.ratio, p.keep) for p in m.profiles] == [(0.0, 64), (0.3, 45), (0.5, 32)]
    assert set(m.graphs) == {"topi", "dense"} and m.weights["file"] == "onnx/weights.data"
    assert set(m.files) == {"onnx/topi.onnx", "onnx/dense.onnx", "onnx/weights.data", "refit_map.json"}
    raw = json.loads((ort_engine_dir / "manifest.json").read_text())
    assert raw["format"] == "topi-engines/3" and all(len(f["sha256"]) == 64 for f in raw["files"].values())
    assert len(raw["manifest_sha256"]) == 64


@pytest.mark.parametrize("mode", [dict(ratio=0.5), dict(ratio=0.3), dict(tau=0.6, buckets=(0.3, 0.5))])
def test_onnxruntime_equals_torch_step_by_step(tiny, ort_engine_dir, mode):
    from topi_export.method.selection import Selector
    from topi_export.runtime.loop import denoise, rel_l2
    from topi_export.runtime.session import open_session

    ort = open_session(engine_dir=ort_engine_dir)
    ref = open_session(engine_dir=ort_engine_dir, backend="torch")
    data = ort.family.synthetic_inputs(Layout(8, (8, 8), ((8, 8),)), 3)
    sel = Selector(64, ratio=mode.get("ratio", 0.0), tau=mode.get("tau"), buckets=mode.get("buckets", ()),
                   grids=((8, 8),))
    got, want = (denoise(s.engine, s.family, data, steps=12, update_interval=5, selector=sel) for s in (ort, ref))
    assert [(s.kind, s.keep) for s in got.schedule] == [(s.kind, s.keep) for s in want.schedule]
    assert rel_l2(got.latents, want.latents) <= 1e-4
    dense = denoise(ort.engine, ort.family, data, steps=4, mode="dense")
    assert rel_l2(dense.latents, denoise(ref.engine, ref.family, data, steps=4, mode="dense").latents) <= 1e-4


def test_dense_baseline_equals_the_unmodified_diffusers_model(ort_engine_dir):
    """The dense graph under ONNX Runtime == the untouched diffusers model called as FluxKontextPipeline calls it."""
    from topi_export.models import build_builtin
    from topi_export.runtime.session import open_session

    s = open_session(engine_dir=ort_engine_dir)
    data = s.family.synthetic_inputs(Layout(8, (8, 8), ((8, 8),)), 4)
    s.engine.bind(s.family.conditioning(data), data.reference_latents, data.layout)
    latents = torch.randn(1, 64, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.42])
    got = s.engine.dense(latents, t)
    with torch.no_grad():
        want = s.family.pipeline_call(build_builtin("tiny-kontext").eval(), latents, data.reference_latents, t, data)
    assert float((got - want).norm() / want.norm()) <= 1e-4


def test_run_from_engine_dir_reports_speedup_against_the_dense_baseline(ort_engine_dir, tmp_path, capsys):
    code, out, err = run_cli(["run", "--engine-dir", str(ort_engine_dir), "--steps", "4", "--compare", "-q",
                              "--json", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["backend"] == "onnxruntime" and rep["baseline"] == "dense"
    assert rep["speedup"] == pytest.approx(rep["time_s"]["dense"] / rep["time_s"]["topi"])
    assert [r["graph"] for r in rep["schedule"]] == ["anchor", "pruned", "pruned", "pruned"]
    assert all(r["keep_per_reference"] == [r["keep"]] for r in rep["schedule"])
    assert "dense (baseline)" in out
    code, _, err = run_cli(["run", "--engine-dir", str(ort_engine_dir), "--ratio", "0.4", "-q"], capsys)
    assert code == 2 and "not a compiled bucket" in err


def test_inputs_of_another_shape_are_refused(ort_engine_dir):
    from topi_export.runtime.session import open_session

    session = open_session(engine_dir=ort_engine_dir)
    data = session.family.synthetic_inputs(Layout(8, (4, 4), ((4, 4),)), 0)
    with pytest.raises(TopiError, match="serves only t8-x8x8-c8x8"):
        session.check_inputs(data)


def test_multi_resolution_engine_dir_serves_listed_shapes_only(tmp_path, capsys):
    from topi_export.runtime.session import open_session

    eng = tmp_path / "multi"
    code, _, err = run_cli(["build", "--model", "tiny-kontext", "--resolutions", "128x128,160x96",
                            "--no-dense-baseline", "--engine-dir", str(eng)], capsys)
    assert code == 0, err
    s = open_session(engine_dir=eng)
    assert [lay.describe() for lay in s.manifest.layouts] == ["t8-x8x8-c8x8", "t8-x6x10-c6x10"]
    assert len(s.manifest.profiles) == 2 * 3
    for grid in ((8, 8), (6, 10)):
        data = s.family.synthetic_inputs(Layout(8, grid, (grid,)), 0)
        s.check_inputs(data)
        sel = s.selector(data, ratio=0.5)
        res = s.denoise(data, steps=3, selector=sel)
        assert res.schedule[1].keep == grid[0] * grid[1] // 2
    with pytest.raises(TopiError, match="serves only t8-x8x8-c8x8, t8-x6x10-c6x10"):
        s.check_inputs(s.family.synthetic_inputs(Layout(8, (4, 4), ((4, 4),)), 0))
    code, _, err = run_cli(["build", "--model", "tiny-kontext", "--resolutions", "100x100", "--engine-dir",
                            str(tmp_path / "x")], capsys)
    assert code == 2 and "multiple of 16" in err


def test_interrupted_build_leaves_nothing_behind(tmp_path, monkeypatch):
    import topi_export.export as export
    from topi_export import builder

    def interrupted_export(family, settings, inputs, layout, out_dir, **kw):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "topi.onnx").write_bytes(b"half-written")
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "export_graphs", interrupted_export)
    (tmp_path / "out").mkdir()
    with pytest.raises(KeyboardInterrupt):
        builder.build_engines(model="tiny-kontext", engine_dir=str(tmp_path / "out" / "e"), echo=lambda s: None,
                              layouts=(Layout(4, (2, 2), ((2, 2),)),))
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("args,needle", [
    (["--ratio-buckets", "0.5,0.3"], "ascending"),
    (["--ratio-buckets", "0.3,1.2"], "outside (0, 1)"),
    (["--ratio-buckets", "0.3,0.3"], "duplicate"),
    (["--ratio-buckets", "0.3,0.301"], "both keep"),
    (["--backend", "nope"], "unknown build backend"),
    (["--target-grid", "8by8"], "HxW"),
    (["--build-dynamic-shape"], "dynamic token dimensions"),
    (["--tau", "5"], "outside (0, 1]"),
    (["--policy", "topi-dither"], "renamed"),
    (["--precision", "bf16"], "onnxruntime builds fp32"),
])
def test_build_refuses_bad_arguments(tmp_path, capsys, args, needle):
    code, _, err = run_cli(["build", "--model", "tiny-kontext", "--engine-dir", str(tmp_path / "e")] + args, capsys)
    assert code == 2 and needle in err, err
    assert not (tmp_path / "e").exists()


def test_existing_engine_dir_needs_force(ort_engine_dir, capsys):
    code, _, err = run_cli(["build", "--model", "tiny-kontext", "--engine-dir", str(ort_engine_dir)], capsys)
    assert code == 2 and "--force" in err


def test_build_and_run_from_a_saved_model_directory(tmp_path, capsys):
    from topi_export.models import build_builtin

    build_builtin("tiny-kontext").save_pretrained(tmp_path / "model", safe_serialization=True)
    eng = tmp_path / "eng"
    code, _, err = run_cli(["build", "--model", str(tmp_path / "model"), "--ratio-buckets", "0.3,0.5",
                            "--target-grid", "4x4", "--engine-dir", str(eng), "--onnx-dir", str(tmp_path / "cache")],
                           capsys)
    assert code == 0, err
    assert json.loads((eng / "manifest.json").read_text())["model"]["source"] == str(tmp_path / "model")
    code, out, err = run_cli(["run", "--engine-dir", str(eng), "--steps", "3", "--compare", "-q"], capsys)
    assert code == 0 and "ToPi" in out, err
    # the reference loads the saved folder when the user names it: a path recorded in an engine directory is not
    # followed on its own
    code, out, err = run_cli(["check", "--engine-dir", str(eng)], capsys)
    assert code == 2 and "pass --model" in err
    code, out, err = run_cli(["check", "--engine-dir", str(eng), "--model", str(tmp_path / "model")], capsys)
    assert code == 0 and "all 6 comparisons pass" in out, err
    # the --onnx-dir cache is reused for the same model and settings (by hash), at another shape
    code, _, err = run_cli(["build", "--model", str(tmp_path / "model"), "--ratio-buckets", "0.5", "--target-grid",
                            "2x2", "--engine-dir", str(tmp_path / "eng2"), "--onnx-dir", str(tmp_path / "cache")], capsys)
    assert code == 0 and "reuse the ONNX graphs" in err, err


def test_kontext_preferred_resolutions_from_one_engine_directory(tmp_path, capsys):
    """`--resolutions kontext-preferred`: the 17 resolutions FluxKontextPipeline snaps to, one ONNX Runtime
    engine directory (dynamic graphs), served at one of them and refused at an unlisted one."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    from topi_export.runtime.session import open_session

    eng = tmp_path / "pref"
    code, _, err = run_cli(["build", "--model", "tiny-kontext", "--resolutions", "kontext-preferred", "--text-tokens",
                            "8", "--ratio-buckets", "0.5", "--no-dense-baseline", "--engine-dir", str(eng)], capsys)
    assert code == 0, err
    s = open_session(engine_dir=eng)
    grids = [(h // 16, w // 16) for w, h in PREFERRED_KONTEXT_RESOLUTIONS]
    assert [lay.target_grid for lay in s.manifest.layouts] == grids and len(grids) == 17
    smallest = min(grids, key=lambda g: g[0] * g[1])
    data = s.family.synthetic_inputs(Layout(8, smallest, (smallest,)), 0)
    res = s.denoise(s.check_inputs(data), steps=2, selector=s.selector(data, ratio=0.5))
    assert res.schedule[1].keep == smallest[0] * smallest[1] // 2
    with pytest.raises(TopiError, match="serves only"):
        s.check_inputs(s.family.synthetic_inputs(Layout(8, (64, 64), ((32, 32),)), 0))
