"""ONNX side of the topi ops (topi_export/ops/onnx.py): influence exported as query_lse + context_influence
whose function bodies loop over query chunks, so no tensor of size heads x target x keys exists; checked
against the float64 oracle in ONNX Runtime, by shape walks, and by a TensorRT-RTX ahead-of-time build."""
import numpy as np
import onnx
import onnx.inliner
import pytest
import torch
from onnx import TensorProto, helper

from topi_export.errors import TopiError
from topi_export.ops import influence_score, influence_score_materialized, token_gather
from topi_export.ops.onnx import (MASKED_PLUGIN_ATTRS, PLUGIN_ATTRS, attach_functions, function_protos,
                                  register_schemas, translation_table)

OPSET = 20
# distinct primes: a tensor of H*NX*S elements is then unambiguous (D = 4 is no factor of it; D < CHUNK
# so that the largest tensor is a chunk of scores)
H, NX, S, NC, D = 3, 37, 71, 29, 4
CHUNK = 8  # lowered from QUERY_CHUNK so small shapes run several loop iterations


def _model(chunk=CHUNK, dtype=TensorProto.FLOAT, shapes=None, masked=False):
    """query_lse -> context_influence (+ token_gather) as a model, with the bodies attached; masked: both influence
    nodes take the key mask input "m" [B, S]."""
    register_schemas()
    shapes = shapes or {}
    vi = helper.make_tensor_value_info
    mask, attrs = (["m"], MASKED_PLUGIN_ATTRS) if masked else ([], PLUGIN_ATTRS)
    nodes = [helper.make_node("query_lse", ["q", "k"] + mask, ["lse"], domain="topi", **attrs),
             helper.make_node("context_influence", ["q", "k", "v", "lse"] + mask, ["influence"], domain="topi",
                              **attrs),
             helper.make_node("token_gather", ["x", "keep_idx"], ["y"], domain="topi", **PLUGIN_ATTRS)]
    inputs = [vi(n, dtype, shapes.get(n, ["B", "H", f"N{n}", "D"])) for n in "qkv"]
    inputs += [vi("x", dtype, ["B", "N", "C"]), vi("keep_idx", TensorProto.INT64, ["K"])]
    if masked:
        inputs.append(vi("m", TensorProto.FLOAT, ["B", "Nk"]))
    outputs = [vi("influence", dtype, ["B", "Nv"]), vi("lse", TensorProto.FLOAT, ["B", "H", "Nq"]),
               vi("y", dtype, ["B", "K", "C"])]
    model = helper.make_model(helper.make_graph(nodes, "topi_ops", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("topi", 1)])
    model.functions.extend(function_protos(OPSET, chunk, masked=masked))
    onnx.checker.check_model(model, full_check=True)
    return model


def _inputs(b, h, nx, s, nc, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) * 1.5 for n in (nx, s, nc))
    x = torch.randn(b, nc + 3, 5, generator=g)
    keep = torch.randperm(nc + 3, generator=g)[:nc].sort().values
    return q, k, v, x, keep


def _run(session, q, k, v, x, keep, np_dtype=np.float32, mask=None):
    feed = {"q": q.numpy().astype(np_dtype), "k": k.numpy().astype(np_dtype), "v": v.numpy().astype(np_dtype),
            "x": x.numpy().astype(np_dtype), "keep_idx": keep.numpy()}
    if mask is not None:
        feed["m"] = mask.numpy().astype(np.float32)
    return dict(zip(["influence", "lse", "y"], session.run(["influence", "lse", "y"], feed)))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _session(model):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


# B, H, Nx, S, Nc, D with CHUNK = 8: Nx < c, Nx == c, Nx not a multiple of c (5 chunks), one query, Nc == S
SHAPES = [(2, 3, 5, 40, 13, 16), (1, 2, 8, 30, 11, 32), (2, 3, 37, 71, 29, 16), (1, 1, 1, 9, 4, 16),
          (1, 2, 19, 23, 23, 8)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_onnxruntime_equals_the_float64_oracle(shape):
    session = _session(_model())
    q, k, v, x, keep = _inputs(*shape)
    got = _run(session, q, k, v, x, keep)
    assert got["influence"].shape == (shape[0], shape[4]) and got["influence"].dtype == np.float32
    assert _rel(got["influence"], influence_score_materialized(q, k, v)) < 1e-5
    lse = torch.logsumexp(q.double() @ k.double().transpose(-1, -2) / shape[5] ** 0.5, dim=-1)
    assert got["lse"].shape == tuple(lse.shape) and _rel(got["lse"], lse) < 1e-5
    np.testing.assert_array_equal(got["y"], token_gather(x, keep).numpy())


def _key_mask(b, s, nc, seed=0):
    """[B, S] 0/1: a different run of masked keys per batch row (as text padding), a masked context key in row 0."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, s)
    for row in range(b):
        start = int(torch.randint(0, max(1, s - nc - 3), (1,), generator=g))
        mask[row, start:start + 3 + row] = 0
    mask[0, s - nc + 1] = 0
    return mask


@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: "x".join(map(str, s)))
def test_masked_bodies_equal_the_op_and_the_oracle(shape):
    b, h, nx, s, nc, d = shape
    q, k, v, x, keep = _inputs(*shape)
    mask = _key_mask(b, s, nc)
    got = _run(_session(_model(masked=True)), q, k, v, x, keep, mask=mask)
    want = influence_score(q, k, v, mask)
    assert _rel(got["influence"], want) < 1e-5
    assert _rel(got["influence"], influence_score_materialized(q, k, v, mask)) < 1e-5
    assert got["influence"][0, 1] == 0  # the masked context key (key S - Nc + 1) takes no probability
    logits = (q.double() @ k.double().transpose(-1, -2) / d ** 0.5).masked_fill(mask[:, None, None] == 0, -np.inf)
    assert _rel(got["lse"], torch.logsumexp(logits, dim=-1)) < 1e-5
    # the mask matters: without it the answer differs (so the comparison above can fail)
    assert _rel(influence_score(q, k, v), want) > 1e-3
    # an all-ones mask is no mask
    ones = _run(_session(_model(masked=True)), q, k, v, x, keep, mask=torch.ones(b, s))
    assert _rel(ones["influence"], influence_score_materialized(q, k, v)) < 1e-5


@pytest.mark.parametrize("chunk", [CHUNK, 1024], ids=["chunked", "one-chunk"])
def test_padding_the_prompt_leaves_the_bodies_influence_unchanged(chunk):
    """A prompt of 6 text keys padded to 16 (the padding masked, as Qwen's processor masks it): the masked bodies
    give the influence of the unpadded sequence through the unmasked bodies, and so does the torch op."""
    g = torch.Generator().manual_seed(7)
    b, h, nx, nc, d, n_text, n_pad = 2, 3, 19, 13, 16, 6, 10
    q = torch.randn(b, h, nx, d, generator=g) * 1.5
    text, pad, target, ctx = (torch.randn(b, h, n, d, generator=g) * 1.5 for n in (n_text, n_pad, nx, nc))
    v = torch.randn(b, h, nc, d, generator=g)
    k6, k16 = torch.cat([text, target, ctx], 2), torch.cat([text, pad, target, ctx], 2)
    mask = torch.ones(b, k16.shape[2])
    mask[:, n_text:n_text + n_pad] = 0
    x, keep = torch.randn(b, nc + 3, 5, generator=g), torch.arange(nc)
    plain = _run(_session(_model(chunk)), q, k6, v, x, keep)["influence"]
    padded = _run(_session(_model(chunk, masked=True)), q, k16, v, x, keep, mask=mask)["influence"]
    assert _rel(padded, plain) <= 1e-5
    assert _rel(influence_score(q, k16, v, mask), influence_score(q, k6, v)) <= 1e-5
    # the padding scored as attended keys takes probability from the context: the comparison above can fail
    leaky = _run(_session(_model(chunk)), q, k16, v, x, keep)["influence"]
    assert _rel(leaky, plain) > 1e-3


def test_a_graph_mixing_masked_and_unmasked_influence_is_refused():
    model = _model(masked=True)
    del model.functions[:]
    node = helper.make_node("query_lse", ["q", "k"], ["lse2"], domain="topi", **PLUGIN_ATTRS)
    model.graph.node.append(node)
    with pytest.raises(TopiError, match="mixes influence nodes"):
        attach_functions(model)


def test_default_chunk_and_many_chunks_agree():
    """The default chunk (one iteration here) and chunk=1 (one query per iteration) give the same result."""
    q, k, v, x, keep = _inputs(1, 2, 11, 50, 17, 16, seed=3)
    ref = influence_score_materialized(q, k, v)
    for chunk in (None, 1, 4):
        assert _rel(_run(_session(_model(chunk)), q, k, v, x, keep)["influence"], ref) < 1e-5


def test_fp16_inputs_in_onnxruntime():
    import onnxruntime as ort

    q, k, v, x, keep = _inputs(1, 2, 21, 40, 13, 16, seed=1)
    try:
        got = _run(_session(_model(dtype=TensorProto.FLOAT16)), q, k, v, x, keep, np.float16)
    except (ort.capi.onnxruntime_pybind11_state.NotImplemented, ort.capi.onnxruntime_pybind11_state.Fail) as e:
        pytest.skip(f"ONNX Runtime's CPU EP does not run this fp16 graph: {str(e).splitlines()[0]}")
    assert got["influence"].dtype == np.float16 and got["lse"].dtype == np.float32
    # fp32 maths on the fp16-rounded inputs: what is left is the fp16 output rounding
    q16, k16, v16 = (t.half() for t in (q, k, v))
    assert _rel(got["influence"], influence_score_materialized(q16, k16, v16)) < 2e-3


# ------------------------------------------------------------------------- no heads x target x keys tensor
def _static_shapes(b=1):
    return {"q": [b, H, NX, D], "k": [b, H, S, D], "v": [b, H, NC, D]}


def _big_tensors(graph):
    """(name, dims) of every rank >= 3 value with all dims known whose size is H*NX*S, Loop bodies included."""
    found = []
    for vi in list(graph.value_info) + list(graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        if len(dims) >= 3 and None not in dims and int(np.prod(dims)) == H * NX * S:
            found.append((vi.name, dims))
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                found += _big_tensors(attr.g)
    return found


def _known_rank3(graph):
    n = sum(1 for vi in graph.value_info if len(vi.type.tensor_type.shape.dim) >= 3
            and all(d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim))
    return n + sum(_known_rank3(a.g) for node in graph.node for a in node.attribute
                   if a.type == onnx.AttributeProto.GRAPH)


def test_inferred_shapes_hold_no_heads_x_target_x_keys_tensor():
    inlined = onnx.inliner.inline_local_functions(_model(shapes=_static_shapes()))
    assert not inlined.functions and not [n for n in inlined.graph.node if n.domain == "topi"]
    inferred = onnx.shape_inference.infer_shapes(inlined, strict_mode=True, data_prop=True)
    assert _known_rank3(inferred.graph) >= 10  # the walk sees real shapes (queries, keys, values, norms)
    assert _big_tensors(inferred.graph) == []

    # the walk does flag a body that materialises the scores (as the single-node body did)
    q, k = (helper.make_tensor_value_info(n, TensorProto.FLOAT, _static_shapes()[n]) for n in "qk")
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"]),
             helper.make_node("ReduceMax", ["scores"], ["m"], keepdims=0)]
    full = helper.make_model(helper.make_graph(nodes, "full", [q, k], [helper.make_tensor_value_info(
        "m", TensorProto.FLOAT, None)]), opset_imports=[helper.make_opsetid("", OPSET)])
    assert _big_tensors(onnx.shape_inference.infer_shapes(full).graph) == [("scores", [1, H, NX, S])]


def test_evaluated_tensors_stay_below_one_query_chunk(monkeypatch):
    """Run the inlined graph in ONNX's reference evaluator and record the shape of every value it produces,
    Loop bodies included: the largest is the [B, H, chunk, S] logits of one chunk."""
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    seen = []
    check = OpRun._check_and_fix_outputs  # every operator's results pass through it

    def recording(self, res):
        res = check(self, res)
        seen.extend((self.op_type, r.shape) for r in res if hasattr(r, "shape"))
        return res

    monkeypatch.setattr(OpRun, "_check_and_fix_outputs", recording)
    q, k, v, x, keep = _inputs(1, H, NX, S, NC, D)
    model = onnx.inliner.inline_local_functions(_model(shapes=_static_shapes()))
    feed = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "x": x.numpy(), "keep_idx": keep.numpy()}
    influence, lse, _ = ReferenceEvaluator(model).run(None, feed)
    assert _rel(influence, influence_score_materialized(q, k, v)) < 1e-5
    big = [(op, shape) for op, shape in seen if len(shape) >= 3 and np.prod(shape) >= H * NX * S]
    assert big == []
    largest = max(int(np.prod(shape)) for _, shape in seen)
    assert largest == H * CHUNK * S and ("MatMul", (1, H, CHUNK, S)) in seen


# ------------------------------------------------------------------------- export, schemas, attach
class _Tiny(torch.nn.Module):
    def forward(self, q, k, v, x, keep_idx):
        return influence_score(q, k, v), token_gather(x, keep_idx)


def test_torch_export_emits_two_influence_nodes_with_bodies():
    import logging
    import warnings

    q, k, v, x, keep = _inputs(1, 2, 13, 31, 11, 16)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(_Tiny(), (q, k, v, x, keep), dynamo=True, opset_version=OPSET,
                                    custom_translation_table=translation_table(), verbose=False)
    model = attach_functions(attach_functions(program.model_proto))  # twice: still one copy of each
    topi = [n for n in model.graph.node if n.domain == "topi"]
    assert [n.op_type for n in topi] == ["query_lse", "context_influence", "token_gather"]
    for n in topi:
        assert {a.name: a.s.decode() for a in n.attribute} == PLUGIN_ATTRS
    assert topi[0].output[0] == topi[1].input[3]  # lse feeds context_influence
    assert sorted(f.name for f in model.functions) == ["context_influence", "query_lse", "token_gather"]
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets["topi"] == 1 and all(f.opset_import[0].version == opsets[""] for f in model.functions)
    onnx.checker.check_model(model, full_check=True)
    session = _session(model)
    names = [i.name for i in session.get_inputs()]
    infl, y = session.run(None, dict(zip(names, (t.numpy() for t in (q, k, v, x, keep)))))
    assert _rel(infl, influence_score_materialized(q, k, v)) < 1e-5
    np.testing.assert_array_equal(y, token_gather(x, keep).numpy())


class _TinyMasked(torch.nn.Module):
    def forward(self, q, k, v, m):
        return influence_score(q, k, v, m)


def test_torch_export_with_a_key_mask_emits_masked_nodes_equal_to_the_op():
    import logging
    import warnings

    q, k, v, _, _ = _inputs(2, 2, 13, 31, 11, 16)
    mask = _key_mask(2, 31, 11, seed=4)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(_TinyMasked(), (q, k, v, mask), dynamo=True, opset_version=OPSET,
                                    custom_translation_table=translation_table(), verbose=False)
    model = attach_functions(program.model_proto)
    topi = [n for n in model.graph.node if n.domain == "topi"]
    assert [(n.op_type, len(n.input)) for n in topi] == [("query_lse", 3), ("context_influence", 5)]
    for n in topi:
        assert {a.name: a.s.decode() for a in n.attribute} == MASKED_PLUGIN_ATTRS
    assert [len(f.input) for f in model.functions] == [3, 5]
    onnx.checker.check_model(model, full_check=True)
    session = _session(model)
    names = [i.name for i in session.get_inputs()]
    (infl,) = session.run(None, dict(zip(names, (t.numpy() for t in (q, k, v, mask)))))
    assert _rel(infl, influence_score(q, k, v, mask)) < 1e-5


def test_schemas_infer_output_types_and_shapes():
    from onnx.shape_inference import infer_node_outputs

    register_schemas()
    t = helper.make_tensor_type_proto
    half = TensorProto.FLOAT16
    types = {"q": t(half, [2, 3, "nx", 16]), "k": t(half, [2, 3, 40, 16]), "v": t(half, [2, 3, "nc", 16]),
             "lse": t(TensorProto.FLOAT, [2, 3, "nx"])}
    lse = infer_node_outputs(onnx.defs.get_schema("query_lse", 1, "topi"),
                             helper.make_node("query_lse", ["q", "k"], ["lse"], domain="topi", **PLUGIN_ATTRS),
                             types)["lse"]
    assert lse == t(TensorProto.FLOAT, [2, 3, "nx"])
    node = helper.make_node("context_influence", ["q", "k", "v", "lse"], ["y"], domain="topi", **PLUGIN_ATTRS)
    assert infer_node_outputs(onnx.defs.get_schema("context_influence", 1, "topi"), node, types)["y"] == \
        t(half, [2, "nc"])
    assert onnx.defs.has("token_gather", "topi")


def test_attach_functions_adds_only_what_the_graph_uses():
    node = helper.make_node("token_gather", ["x", "i"], ["y"], domain="topi", **PLUGIN_ATTRS)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2]),
                                            helper.make_tensor_value_info("i", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2])])
    model = attach_functions(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]))
    assert [f.name for f in model.functions] == ["token_gather"]
    assert {o.domain: o.version for o in model.opset_import} == {"": 19, "topi": 1}
    assert model.functions[0].opset_import[0].version == 19


def test_opset_below_18_is_refused():
    with pytest.raises(TopiError, match="opset >= 18"):
        function_protos(17)


# ------------------------------------------------------------------------- TensorRT-RTX
@pytest.mark.tensorrt_rtx
@pytest.mark.parametrize("dtype,masked", [(TensorProto.FLOAT, False), (TensorProto.FLOAT16, False),
                                          (TensorProto.FLOAT, True)], ids=["fp32", "fp16", "fp32-masked"])
def test_tensorrt_rtx_parses_and_builds_ahead_of_time(dtype, masked):
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx not installed (pip install tensorrt-rtx-cu13)")
    log = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(log)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, log)
    assert parser.parse(_model(dtype=dtype, masked=masked).SerializeToString()), [parser.get_error(i).desc()
                                                                    for i in range(parser.num_errors)]
    layer_types = {network.get_layer(i).type for i in range(network.num_layers)}
    assert trt.LayerType.TRIP_LIMIT in layer_types  # the bodies were inlined, loops and all
    assert not {t for t in layer_types if t.name.startswith("PLUGIN")}
    config = builder.create_builder_config()
    config.num_compute_capabilities = 1
    config.set_compute_capability(trt.ComputeCapability.SM89, 0)
    fixed = {"q": (1, H, NX, D), "k": (1, H, S, D), "v": (1, H, NC, D), "x": (1, 9, 5), "keep_idx": (4,),
             **({"m": (1, S)} if masked else {})}
    profiles = [{n: (s, s, s) for n, s in fixed.items()},  # static
                {**{n: (s, s, s) for n, s in fixed.items()}, "q": ((1, H, 1, D), (1, H, NX, D), (1, H, 64, D))}]
    for shapes in profiles:  # a range of Nx: trip count and chunk size resolved at run time
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    assert engine is not None and engine.nbytes > 0
