"""ONNX side of the ``topi`` ops: schemas (so the dynamo exporter and onnx.checker know them), translations
for ``torch.onnx.export(custom_translation_table=...)``, and the model-local FunctionProto bodies in standard
ONNX ops that give their exact meaning to any runtime without a ``topi`` kernel (ORT, TensorRT without the
plugin). Nodes carry ``plugin_namespace`` / ``plugin_version`` so TensorRT's parser finds the plugin."""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper
from onnx.defs import OpSchema

DOMAIN = "topi"
VERSION = 1
PLUGIN_ATTRS = {"plugin_namespace": DOMAIN, "plugin_version": "1"}
_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def _schemas():
    F = OpSchema.FormalParameter
    attrs = [OpSchema.Attribute(name, OpSchema.AttrType.STRING, "TensorRT plugin lookup") for name in PLUGIN_ATTRS]
    t = [("T", _FLOATS, "float types")]
    return [
        OpSchema("influence_score", DOMAIN, VERSION, doc="ToPi influence of context tokens",
                 inputs=[F("q_target", "T"), F("k", "T"), F("v_ctx", "T")], outputs=[F("influence", "T")],
                 type_constraints=t, attributes=attrs),
        OpSchema("token_gather", DOMAIN, VERSION, doc="x[:, keep_idx]",
                 inputs=[F("x", "T"), F("keep_idx", "tensor(int64)")], outputs=[F("y", "T")],
                 type_constraints=t, attributes=attrs),
    ]


def register_schemas() -> None:
    for schema in _schemas():
        if not onnx.defs.has(schema.name, schema.domain):
            onnx.defs.register_schema(schema)


def translation_table() -> dict:
    """torch op -> onnxscript function emitting one opaque ``topi`` node."""
    import onnxscript
    import torch
    from onnxscript import FLOAT, INT64

    import topi_export.ops  # noqa: F401  (registers the torch ops)

    register_schemas()
    topi = onnxscript.values.Opset(DOMAIN, VERSION)

    def influence_score(q_target: FLOAT, k: FLOAT, v_ctx: FLOAT) -> FLOAT:
        return topi.influence_score(q_target, k, v_ctx, **PLUGIN_ATTRS)

    def token_gather(x: FLOAT, keep_idx: INT64) -> FLOAT:
        return topi.token_gather(x, keep_idx, **PLUGIN_ATTRS)

    return {torch.ops.topi.influence_score.default: influence_score,
            torch.ops.topi.token_gather.default: token_gather}


def function_protos(opset: int) -> list[onnx.FunctionProto]:
    """Bodies in the default domain at the model's opset (ONNX Runtime requires them to match)."""
    c = helper.make_node
    i64 = lambda name, vals: c("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(vals)], vals))  # noqa: E731
    influence = helper.make_function(
        DOMAIN, "influence_score", ["q_target", "k", "v_ctx"], ["influence"],
        [
            c("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
            c("MatMul", ["q_target", "kt"], ["logits"]),
            c("Shape", ["q_target"], ["d"], start=3, end=4),
            c("CastLike", ["d", "q_target"], ["d_f"]),
            c("Sqrt", ["d_f"], ["sqrt_d"]),
            c("Div", ["logits", "sqrt_d"], ["scaled"]),
            c("Softmax", ["scaled"], ["probs"], axis=-1),
            c("Shape", ["v_ctx"], ["nc"], start=2, end=3),
            c("Neg", ["nc"], ["start"]),
            i64("end", [2**62]),
            i64("ax_key", [3]),
            c("Slice", ["probs", "start", "end", "ax_key"], ["p_ctx"]),
            i64("ax_query", [2]),
            c("ReduceMean", ["p_ctx", "ax_query"], ["attn"], keepdims=0),
            c("ReduceL2", ["v_ctx", "ax_key"], ["vnorm"], keepdims=0),
            c("Mul", ["attn", "vnorm"], ["per_head"]),
            i64("ax_head", [1]),
            c("ReduceSum", ["per_head", "ax_head"], ["influence"], keepdims=0),
        ],
        [helper.make_opsetid("", opset)], attributes=list(PLUGIN_ATTRS))
    gather = helper.make_function(
        DOMAIN, "token_gather", ["x", "keep_idx"], ["y"],
        [c("Gather", ["x", "keep_idx"], ["y"], axis=1)],
        [helper.make_opsetid("", opset)], attributes=list(PLUGIN_ATTRS))
    return [influence, gather]


def attach_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Add the function bodies (and the topi opset import) to an exported model, once."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    have = {(f.domain, f.name) for f in model.functions}
    for fn in function_protos(opset):
        if fn.name in used and (fn.domain, fn.name) not in have:
            model.functions.append(fn)
    if used and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, VERSION))
    return model
