"""Put the build precision into an ONNX graph (for strongly typed TensorRT networks): matrix products in
fp16/bf16, numerically sensitive ops and the ``topi`` ops in fp32, graph I/O fp32."""
from __future__ import annotations


from topi_export.errors import TopiError

PRECISIONS = ("fp32", "fp16", "bf16")

# Ops that start low precision (the matrix products carry the FLOPs).
LOW_PRECISION_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum"})
# Ops kept in fp32: normalisations, softmax, reductions, transcendental functions (RoPE, timestep embedding).
FP32_OPS = frozenset({
    "Softmax", "LogSoftmax", "LayerNormalization", "RMSNormalization", "GroupNormalization",
    "InstanceNormalization", "BatchNormalization", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1",
    "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceProd", "Pow", "Sqrt", "Reciprocal", "Exp", "Log",
    "Sin", "Cos", "Tan", "Erf", "CumSum", "Range", "Resize", "TopK", "RandomNormalLike", "RandomUniformLike"})
# Ops that accept any input type and need no cast.
TYPE_AGNOSTIC_OPS = frozenset({"Shape", "Size", "Cast"})


def _low_tensor(array, elem_type, name):
    """An fp32 numpy array as an fp16/bf16 TensorProto (round to nearest even, via torch)."""
    import numpy as np
    import torch
    from onnx import TensorProto

    t = torch.from_numpy(np.array(array, dtype=np.float32, copy=True))
    if elem_type == TensorProto.BFLOAT16:
        raw = t.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    else:
        raw = t.to(torch.float16).numpy().tobytes()
    out = TensorProto(name=name, data_type=elem_type, dims=list(array.shape))
    out.raw_data = raw
    return out


def autocast_onnx(model, precision: str):
    """Rewrite an fp32 ONNX model for a strongly typed fp16/bf16 build; returns (model, stats).

    Graph inputs and outputs stay fp32 (casts at the edges), so the runtime binds the same tensors at every
    precision. Matrix products (LOW_PRECISION_OPS) run in the low type, FP32_OPS and every non-standard-domain
    node (the ``topi`` ops) in fp32, any other op in the low type when one of its float inputs already is.
    Initializers are converted once per precision they are used in; other casts are explicit Cast nodes
    (TensorRT folds casts of constants). The model is modified in place."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if precision == "fp32":
        return model, {"precision": "fp32", "casts": 0, "low_nodes": 0, "fp32_nodes": 0}
    low = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}.get(precision)
    if low is None:
        raise TopiError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    FLOAT = TensorProto.FLOAT
    g = model.graph
    for node in g.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise TopiError(f"{precision} autocast does not handle control flow (node {node.name} {node.op_type}); "
                            f"build with --precision fp32")

    inits = {i.name: i for i in g.initializer}

    def known_types(graph):
        types = {vi.name: vi.type.tensor_type.elem_type
                 for vi in list(graph.value_info) + list(g.input) + list(g.output)}
        types.update({name: init.data_type for name, init in inits.items()})
        return types

    orig = known_types(g)
    if any(o and o not in orig for n in g.node for o in n.output):
        orig = known_types(onnx.shape_inference.infer_shapes(model).graph)
    const_out = set()  # outputs of Constant nodes: flexible like initializers
    for node in g.node:
        if node.op_type == "Constant":
            const_out.update(node.output)
    missing = [o for n in g.node for o in n.output if o and o not in orig]
    if missing:
        raise TopiError(f"{precision} autocast needs the type of every tensor; ONNX shape inference left "
                        f"{len(missing)} unknown (e.g. {missing[0]}): build with --precision fp32")

    cur = {vi.name: FLOAT for vi in g.input if vi.type.tensor_type.elem_type == FLOAT}
    new_nodes, cast_cache, low_inits = [], {}, {}
    stats = {"precision": precision, "casts": 0, "low_nodes": 0, "fp32_nodes": 0, "low_initializers": 0}
    graph_outputs = {o.name for o in g.output}
    renamed = {}

    def is_float(name):
        return bool(name) and orig.get(name) == FLOAT

    def converted(name, want):
        """name as a tensor of type want (FLOAT or low)."""
        if name in inits and name not in cur:  # initializer: convert the data once
            if want == FLOAT:
                return name
            if name not in low_inits:
                arr = numpy_helper.to_array(inits[name])
                new = _low_tensor(arr, low, f"{name}__{precision}")
                g.initializer.append(new)
                low_inits[name] = new.name
                stats["low_initializers"] += 1
            return low_inits[name]
        have = cur.get(name, FLOAT)
        if have == want:
            return name
        key = (name, want)
        if key not in cast_cache:
            out = f"{name}__to_{'fp32' if want == FLOAT else precision}"
            new_nodes.append(helper.make_node("Cast", [name], [out], to=want, name=f"autocast_{out}"))
            cur[out] = want
            cast_cache[key] = out
            stats["casts"] += 1
        return cast_cache[key]

    for node in g.node:
        node_inputs = [renamed.get(i, i) for i in node.input]
        del node.input[:]
        node.input.extend(node_inputs)
        float_in = [i for i in node.input if is_float(i)]
        if node.op_type in TYPE_AGNOSTIC_OPS or node.op_type == "Constant":
            want = None
        elif node.domain not in ("", "ai.onnx") or node.op_type in FP32_OPS:
            want = FLOAT
        elif node.op_type in LOW_PRECISION_OPS:
            want = low
        else:
            live = [i for i in float_in if not (i in inits and i not in cur) and i not in const_out]
            want = low if any(cur.get(i, FLOAT) == low for i in live) else FLOAT
        if want is not None:
            for j, name in enumerate(node.input):
                if is_float(name):
                    node.input[j] = converted(name, want)
            stats["low_nodes" if want == low else "fp32_nodes"] += 1
        for j, out in enumerate(node.output):
            if not out:
                continue
            if node.op_type == "Cast" or want is None or orig.get(out) != FLOAT:
                cur[out] = orig.get(out)
                continue
            cur[out] = want
            if want == low and out in graph_outputs:  # rename; a Cast back to fp32 takes the output's name
                lp = f"{out}__{precision}"
                node.output[j] = lp
                renamed[out] = lp
                cur[lp], cur[out] = low, FLOAT
        new_nodes.append(node)

    for out in g.output:  # keep I/O fp32
        src = renamed.get(out.name)
        if src is not None:
            new_nodes.append(helper.make_node("Cast", [src], [out.name], to=FLOAT, name=f"autocast_out_{out.name}"))
            stats["casts"] += 1
    del g.node[:]
    g.node.extend(new_nodes)
    # value_info: record the new types; drop stale entries of renamed tensors
    for vi in g.value_info:
        t = cur.get(vi.name)
        if t is not None and vi.type.tensor_type.elem_type == FLOAT and t == low:
            vi.type.tensor_type.elem_type = low
    # drop initializers no node reads any more (fully converted)
    used = {i for n in g.node for i in n.input} | {x.name for x in g.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return model, stats


