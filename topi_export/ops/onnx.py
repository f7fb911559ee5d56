"""ONNX side of the ``topi`` ops: schemas (so the dynamo exporter and onnx.checker know them), translations
for ``torch.onnx.export(custom_translation_table=...)``, and the model-local FunctionProto bodies in standard
ONNX ops that give their exact meaning to any runtime without a ``topi`` kernel (ORT, TensorRT without the
plugin). Nodes carry ``plugin_namespace`` / ``plugin_version`` so TensorRT's parser finds the plugin.

The torch op ``topi::influence_score`` exports as TWO nodes, so that no runtime ever holds the
[B, H, Nx, S] attention matrix (1.7 GB in fp16 per pivotal layer at FLUX.1 Kontext 1024x1024):

    query_lse(q_target [B,H,Nx,D], k [B,H,S,D]) -> lse [B,H,Nx] float32
        base-e log-sum-exp of each target query's scaled logits q.k/sqrt(D) over all S keys
    context_influence(q_target, k, v_ctx [B,H,Nc,D], lse) -> influence [B,Nc] (dtype of q_target)
        sum_h ||v_j^h|| * (1/Nx) sum_i exp(q_i.k_j/sqrt(D) - lse_i) for the LAST Nc keys j

Their function bodies loop over query chunks of c = min(Nx, chunk) rows (``Loop``), so the largest
intermediate is [B, H, c, S]. Queries (and lse, with a large value so the padded rows add exp(-huge)=0)
are padded to a multiple of c: every iteration has the same shapes, as TensorRT loops require.

Both take an optional last input ``key_mask`` [B, S] float (0 = a key the model masks out, e.g. Qwen's text
padding): a masked key takes no probability (it is left out of the lse, and a masked context key has influence
0). A graph's nodes either all have it or none do (a family masks every layer or none): the model-local
function of each op is the masked or the unmasked body accordingly (``attach_functions``), and masked nodes
carry ``plugin_version`` "2", the TensorRT plugins with the extra input (topi_export/kernels/trt_plugins.py).
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper
from onnx.defs import OpSchema

from topi_export.errors import TopiError
from topi_export.ops.reference import QUERY_CHUNK

DOMAIN = "topi"
VERSION = 1
PLUGIN_ATTRS = {"plugin_namespace": DOMAIN, "plugin_version": "1"}
MASKED_PLUGIN_ATTRS = {"plugin_namespace": DOMAIN, "plugin_version": "2"}  # the nodes with a key_mask input
MASKABLE = ("query_lse", "context_influence")
MIN_OPSET = 18  # ReduceMax / ReduceL2 with axes as an input
_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
# lse of the padded query rows: exp(logit - PAD_LSE) underflows to 0 for any finite fp32 logit
PAD_LSE = 1.0e30


# ----------------------------------------------------------------------------------------- schemas
def _dims(type_proto, idx):
    tt = type_proto.tensor_type
    if not tt.HasField("shape"):
        return None
    dims = list(tt.shape.dim)
    return [dims[i] for i in idx] if len(dims) == 4 else None


def _set_output(ctx, elem_type, dims):
    out = onnx.TypeProto()
    out.tensor_type.elem_type = elem_type
    if dims is not None:
        out.tensor_type.shape.SetInParent()
        for d in dims:
            out.tensor_type.shape.dim.add().CopyFrom(d)
    ctx.set_output_type(0, out)


def _infer_query_lse(ctx):
    _set_output(ctx, TensorProto.FLOAT, _dims(ctx.get_input_type(0), (0, 1, 2)))


def _infer_context_influence(ctx):
    q, v = ctx.get_input_type(0), ctx.get_input_type(2)
    qd, vd = _dims(q, (0,)), _dims(v, (2,))
    _set_output(ctx, q.tensor_type.elem_type, qd + vd if qd is not None and vd is not None else None)


def _schemas():
    F = OpSchema.FormalParameter
    attrs = [OpSchema.Attribute(name, OpSchema.AttrType.STRING, "TensorRT plugin lookup") for name in PLUGIN_ATTRS]
    t = [("T", _FLOATS, "float types")]
    mask = F("key_mask", "tensor(float)", "[B,S]: 0 = a masked key (no probability)",
             param_option=OpSchema.FormalParameterOption.Optional)
    lse = OpSchema("query_lse", DOMAIN, VERSION,
                   doc="log-sum-exp over all (unmasked) keys of each target query's logits q.k/sqrt(D), float32 "
                       "[B,H,Nx]",
                   inputs=[F("q_target", "T"), F("k", "T"), mask], outputs=[F("lse", "tensor(float)")],
                   type_constraints=t, attributes=attrs)
    lse.set_type_and_shape_inference_function(_infer_query_lse)
    ctx = OpSchema("context_influence", DOMAIN, VERSION,
                   doc="ToPi influence of the last Nc keys given the target queries' log-sum-exps, [B,Nc]",
                   inputs=[F("q_target", "T"), F("k", "T"), F("v_ctx", "T"), F("lse", "tensor(float)"), mask],
                   outputs=[F("influence", "T")], type_constraints=t, attributes=attrs)
    ctx.set_type_and_shape_inference_function(_infer_context_influence)
    gather = OpSchema("token_gather", DOMAIN, VERSION, doc="x[:, keep_idx]",
                      inputs=[F("x", "T"), F("keep_idx", "tensor(int64)")], outputs=[F("y", "T")],
                      type_constraints=t, attributes=attrs)
    return [lse, ctx, gather]


def register_schemas() -> None:
    for schema in _schemas():
        if not onnx.defs.has(schema.name, schema.domain):
            onnx.defs.register_schema(schema)


def translation_table() -> dict:
    """torch op -> onnxscript function emitting ``topi`` nodes (influence: query_lse then context_influence)."""
    import onnxscript
    import torch
    from onnxscript import FLOAT, INT64

    import topi_export.ops  # noqa: F401  (registers the torch ops)

    register_schemas()
    topi = onnxscript.values.Opset(DOMAIN, VERSION)
    op = onnxscript.opset18

    def influence_score(q_target: FLOAT, k: FLOAT, v_ctx: FLOAT, key_mask: FLOAT | None = None) -> FLOAT:
        if key_mask is None:
            lse = topi.query_lse(q_target, k, **PLUGIN_ATTRS)
            return topi.context_influence(q_target, k, v_ctx, lse, **PLUGIN_ATTRS)
        key_mask = op.Cast(key_mask, to=TensorProto.FLOAT)
        lse = topi.query_lse(q_target, k, key_mask, **MASKED_PLUGIN_ATTRS)
        return topi.context_influence(q_target, k, v_ctx, lse, key_mask, **MASKED_PLUGIN_ATTRS)

    def token_gather(x: FLOAT, keep_idx: INT64) -> FLOAT:
        return topi.token_gather(x, keep_idx, **PLUGIN_ATTRS)

    return {torch.ops.topi.influence_score.default: influence_score,
            torch.ops.topi.token_gather.default: token_gather}


# ----------------------------------------------------------------------------------------- bodies
class _Body:
    """Node list with short constructors; names are prefixed so a Loop body never shadows its function."""

    def __init__(self, prefix=""):
        self.prefix, self.nodes = prefix, []

    def __call__(self, op, inputs, name=None, **attrs):
        out = name or f"{self.prefix}{op.lower()}{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, list(inputs), [out], **attrs))
        return out

    def i64(self, *vals, scalar=False):
        shape = [] if scalar else [len(vals)]
        return self("Constant", [], value=helper.make_tensor("v", TensorProto.INT64, shape, list(vals)))

    def f32(self, val):
        return self("Constant", [], value=helper.make_tensor("v", TensorProto.FLOAT, [], [val]))


class _Chunks:
    """Query chunking shared by both bodies. Scalars nx, c = max(min(nx, chunk), 1), n = ceil(nx / c)
    (the trip count), pad = n*c - nx; 1-D shapes bh = [B, H] and bhnc = [B, H, n, c]; q (float32,
    prescaled by 1/sqrt(D)) padded to n*c rows and split: qc [B, H, n, c, D]."""

    def __init__(self, b, q, chunk):
        shape = b("Shape", [q])
        self.nx = b("Gather", [shape, b.i64(2, scalar=True)], axis=0)
        d = b("Cast", [b("Gather", [shape, b.i64(3, scalar=True)], axis=0)], to=TensorProto.FLOAT)
        qs = b("Mul", [b("Cast", [q], to=TensorProto.FLOAT), b("Reciprocal", [b("Sqrt", [d])])])
        self.c = b("Max", [b("Min", [self.nx, b.i64(chunk, scalar=True)]), b.i64(1, scalar=True)])
        self.n = b("Div", [b("Sub", [b("Add", [self.nx, self.c]), b.i64(1, scalar=True)]), self.c])
        self.pad = b("Sub", [b("Mul", [self.n, self.c]), self.nx])
        pads = b("Concat", [b.i64(0, 0, 0, 0, 0, 0), _vec(b, self.pad), b.i64(0)], axis=0)
        # shapes spelled out with allowzero=1: TensorRT warns about a run-time dim that might be a "copy" 0
        self.bh = b("Shape", [q], start=0, end=2)
        self.bhnc = b("Concat", [self.bh, _vec(b, self.n), _vec(b, self.c)], axis=0)
        self.qc = b("Reshape", [b("Pad", [qs, pads]), b("Concat", [self.bhnc, b("Shape", [q], start=3)], axis=0)],
                    allowzero=1)


def _vec(b, scalar):
    return b("Unsqueeze", [scalar, b.i64(0)])


def _loop_graph(name, body, inputs, outputs):
    vi = helper.make_tensor_value_info
    return helper.make_graph(body.nodes, name,
                             [vi(n, t, s) for n, t, s in inputs], [vi(n, t, s) for n, t, s in outputs])


def _true(b):
    # TensorRT-RTX's parser rejects a Loop without a condition input (""); with this one it warns that a
    # condition is set, harmless since it is always true
    return b("Constant", [], value=helper.make_tensor("v", TensorProto.BOOL, [], [True]))


def _is_masked(b, mask):
    """key_mask == 0 (a masked key), bool, same shape."""
    return b("Equal", [b("Cast", [mask], to=TensorProto.FLOAT), b.f32(0.0)])


def _query_lse(opset, chunk, masked=False):
    b = _Body("lse_")
    ch = _Chunks(b, "q_target", chunk)
    kt = b("Transpose", [b("Cast", ["k"], to=TensorProto.FLOAT)], perm=[0, 1, 3, 2])  # [B,H,D,S]
    if masked:  # -inf on the masked keys' logits: exp(-inf - max) = 0, as the model's masked softmax
        bias = b("Where", [_is_masked(b, "key_mask"), b.f32(float("-inf")), b.f32(0.0)])
        bias = b("Unsqueeze", [bias, b.i64(1, 2)])  # [B,1,1,S]

    # loop body: the lse of chunk i (rows i*c .. i*c+c-1). Chunks are taken by Gather: a Slice starting at
    # the iteration number does not build in TensorRT-RTX 1.7.
    lb = _Body("lse_loop_")
    logits = lb("MatMul", [lb("Gather", [ch.qc, "lse_loop_i"], axis=2), kt])  # [B,H,c,S]: the largest tensor
    if masked:
        logits = lb("Add", [logits, bias])
    m = lb("ReduceMax", [logits, lb.i64(-1)], keepdims=1)
    total = lb("ReduceSum", [lb("Exp", [lb("Sub", [logits, m])]), lb.i64(-1)], keepdims=1)
    lse_c = lb("Add", [lb("Log", [total]), m])  # [B,H,c,1]
    lb("Identity", ["lse_loop_cond_in"], name="lse_loop_cond_out")
    # 1-D per iteration, so the scan output is [n, B*H*c] in every runtime (the ONNX reference evaluator
    # concatenates higher-rank scan outputs along axis 0 where ORT and TensorRT stack them)
    lb("Reshape", [lse_c, lb.i64(-1)], name="lse_loop_out")
    body = _loop_graph("query_lse_chunk", lb,
                       [("lse_loop_i", TensorProto.INT64, []), ("lse_loop_cond_in", TensorProto.BOOL, [])],
                       [("lse_loop_cond_out", TensorProto.BOOL, []), ("lse_loop_out", TensorProto.FLOAT, [None])])
    scan = b("Loop", [ch.n, _true(b)], body=body)  # [n, B*H*c]
    nbhc = b("Concat", [_vec(b, ch.n), ch.bh, _vec(b, ch.c)], axis=0)
    per_chunk = b("Transpose", [b("Reshape", [scan, nbhc], allowzero=1)], perm=[1, 2, 0, 3])  # [B,H,n,c]
    rows = b("Reshape", [per_chunk, b("Concat", [ch.bh, b.i64(-1)], axis=0)], allowzero=1)  # [B,H,n*c]
    b("Slice", [rows, b.i64(0), _vec(b, ch.nx), b.i64(2)], name="lse")
    inputs = ["q_target", "k"] + (["key_mask"] if masked else [])
    return helper.make_function(DOMAIN, "query_lse", inputs, ["lse"], b.nodes,
                                [helper.make_opsetid("", opset)], attributes=list(PLUGIN_ATTRS))


def _context_influence(opset, chunk, masked=False):
    b = _Body("ci_")
    ch = _Chunks(b, "q_target", chunk)
    nc = b("Shape", ["v_ctx"], start=2, end=3)
    kc = b("Slice", [b("Cast", ["k"], to=TensorProto.FLOAT), b("Neg", [nc]), b.i64(2**62), b.i64(2)])
    kct = b("Transpose", [kc], perm=[0, 1, 3, 2])  # context keys [B,H,D,Nc]
    lse_pads = b("Concat", [b.i64(0, 0, 0, 0, 0), _vec(b, ch.pad)], axis=0)
    lse = b("Pad", [b("Cast", ["lse"], to=TensorProto.FLOAT), lse_pads, b.f32(PAD_LSE)])
    lsec = b("Reshape", [lse, ch.bhnc], allowzero=1)  # [B,H,n,c]
    vnorm = b("ReduceL2", [b("Cast", ["v_ctx"], to=TensorProto.FLOAT), b.i64(3)], keepdims=0)  # [B,H,Nc]
    if masked:  # a masked context key takes no probability: its terms are zeroed through its value norm
        ctx_mask = b("Slice", ["key_mask", b("Neg", [nc]), b.i64(2**62), b.i64(1)])  # [B,Nc]
        keep = b("Where", [_is_masked(b, ctx_mask), b.f32(0.0), b.f32(1.0)])
        vnorm = b("Mul", [vnorm, b("Unsqueeze", [keep, b.i64(1)])])
    zero = helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])
    acc0 = b("ConstantOfShape", [b("Shape", [vnorm])], value=zero)  # [B,H,Nc]: the loop-carried column sums

    # loop body: acc += sum over the rows of chunk i of exp(logit - lse)
    lb = _Body("ci_loop_")
    logits = lb("MatMul", [lb("Gather", [ch.qc, "ci_loop_i"], axis=2), kct])  # [B,H,c,Nc]
    lse_c = lb("Unsqueeze", [lb("Gather", [lsec, "ci_loop_i"], axis=2), lb.i64(-1)])  # [B,H,c,1]
    colsum = lb("ReduceSum", [lb("Exp", [lb("Sub", [logits, lse_c])]), lb.i64(2)], keepdims=0)
    lb("Identity", ["ci_loop_cond_in"], name="ci_loop_cond_out")
    lb("Add", ["ci_loop_acc_in", colsum], name="ci_loop_acc_out")
    acc_type = (TensorProto.FLOAT, [None] * 3)
    body = _loop_graph("context_influence_chunk", lb,
                       [("ci_loop_i", TensorProto.INT64, []), ("ci_loop_cond_in", TensorProto.BOOL, []),
                        ("ci_loop_acc_in", *acc_type)],
                       [("ci_loop_cond_out", TensorProto.BOOL, []), ("ci_loop_acc_out", *acc_type)])
    acc = b("Loop", [ch.n, _true(b), acc0], body=body)
    total = b("ReduceSum", [b("Mul", [acc, vnorm]), b.i64(1)], keepdims=0)  # [B,Nc]
    mean = b("Div", [total, b("Cast", [ch.nx], to=TensorProto.FLOAT)])
    b("CastLike", [mean, "q_target"], name="influence")
    inputs = ["q_target", "k", "v_ctx", "lse"] + (["key_mask"] if masked else [])
    return helper.make_function(DOMAIN, "context_influence", inputs, ["influence"],
                                b.nodes, [helper.make_opsetid("", opset)], attributes=list(PLUGIN_ATTRS))


def _token_gather(opset):
    return helper.make_function(
        DOMAIN, "token_gather", ["x", "keep_idx"], ["y"],
        [helper.make_node("Gather", ["x", "keep_idx"], ["y"], axis=1)],
        [helper.make_opsetid("", opset)], attributes=list(PLUGIN_ATTRS))


def function_protos(opset: int, chunk: int | None = None, masked: bool = False) -> list[onnx.FunctionProto]:
    """Bodies in the default domain at the model's opset (ONNX Runtime requires them to match).

    chunk: target queries per loop iteration (default ``QUERY_CHUNK``); the largest intermediate is
    [B, H, min(Nx, chunk), S] float32. masked: the influence bodies take the key_mask input."""
    if opset < MIN_OPSET:
        raise TopiError(f"the topi function bodies need ONNX opset >= {MIN_OPSET}, the model has {opset}: "
                        f"export with opset_version={MIN_OPSET} or later")
    chunk = QUERY_CHUNK if chunk is None else int(chunk)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return [_query_lse(opset, chunk, masked), _context_influence(opset, chunk, masked), _token_gather(opset)]


def _has_mask(node) -> bool:
    return node.op_type in MASKABLE and len([i for i in node.input if i]) > (2 if node.op_type == "query_lse" else 4)


def graph_has_key_mask(model: onnx.ModelProto) -> bool:
    """True when the graph's influence nodes take the key_mask input (TensorRT: register the masked plugins)."""
    return any(_has_mask(n) for n in model.graph.node if n.domain == DOMAIN)


def attach_functions(model: onnx.ModelProto, chunk: int | None = None) -> onnx.ModelProto:
    """Add the function bodies the graph uses (and the topi opset import) to an exported model, once."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    nodes = [n for n in model.graph.node if n.domain == DOMAIN]
    used = {n.op_type for n in nodes}
    arity = {_has_mask(n) for n in nodes if n.op_type in MASKABLE}
    if len(arity) > 1:
        raise TopiError("the graph mixes influence nodes with and without a key_mask input, but a model holds one "
                        "body per op: give every influence node of the graph a mask (all ones where nothing is "
                        "masked) or none")
    have = {(f.domain, f.name) for f in model.functions}
    for fn in function_protos(opset, chunk, masked=arity == {True}) if used else []:
        if fn.name in used and (fn.domain, fn.name) not in have:
            model.functions.append(fn)
    if used and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, VERSION))
    return model
