"""Export (docs/design.md, "Graphs"): the ``topi`` graph and the ``dense`` baseline graph of a family, with dynamic
token dimensions, sharing one weights file.

topi:  latents [B,Nx,C], context [B,Nc,C], timestep [B], keep_idx [K], score_idx [Q], <family conditioning>
       -> velocity [B,Nx,C_out], influence [1,K] (batch row 0: the positive branch decides the kept set)
       One graph serves every step: an anchor passes every context index and every target query (velocity and
       influence over the full sequence); a pruned step passes the bucket's kept indices and one scored query (the
       influence output is then a by-product of ~1/Nx of the anchor's scoring work); the unpruned in-engine step
       passes every index and one query. So a deployment holds the weights once.
dense: latents, context, timestep, <family conditioning> -> velocity: the same model with no topi ops, no gather
       (the plain model a user would otherwise deploy; every reported speedup is against it).

Reference K/V cache (docs/design.md, "Reference K/V cache"), exported for ``ref_kv`` builds:
extract: latents, context, timestep, score_idx, <conditioning> -> velocity, ref_kv [L,2,B,H,Nc,D], influence [B,Nc]
       The full sequence (a KV model's step 0, or an anchor of approximate reuse) that also returns every layer's
       context keys and values (after QK-norm and RoPE).
cached: latents, timestep, ref_kv, keep_idx, score_idx, <conditioning> -> velocity, influence [B,K]
       Text and target tokens only, attending to the cached context keys/values (from L0 on to the kept ones,
       gathered inside); influence is scored over the cached keys (every target query at an anchor, one otherwise).
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import torch

from topi_export.plan import GraphEntry, GraphTensor, Layout, MethodSettings
from topi_export.plan.manifest import GRAPHS, KEEP_PROFILED, REQUIRED_GRAPHS, STATE  # noqa: F401

GRAPH_KINDS = GRAPHS  # export order (the first graph's data file becomes the weights file)
KV_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def ref_kv_tensor(family, dtype: str = "float32") -> GraphTensor:
    """The reference K/V cache: every layer's context keys and values (after QK-norm and RoPE)."""
    return GraphTensor("ref_kv", (family.num_layers, 2, "B", family.heads, "Nc", family.head_dim), dtype)


def graph_kinds(ref_kv: str | None, dense: bool) -> tuple[str, ...]:
    """The graphs a build exports: ``topi`` for ToPi over the full sequence; ``extract`` + ``cached`` for a
    reference K/V cache (an exact KV model needs no ``topi`` graph); ``dense``, the baseline."""
    return REQUIRED_GRAPHS[ref_kv] + (("dense",) if dense else ())
WEIGHTS_FILE = "weights.data"
STATIC_DIMS = set()
INLINE_BYTES = 1 << 20  # initializers at least this large go to the shared weights file


def graph_tensors(family, kind: str, kv_dtype: str = "float32") -> GraphEntry:
    """The inputs and outputs of graph ``kind`` of a family (names, symbolic dims, dtypes): what the export
    produces and every backend feeds. kv_dtype: the reference K/V cache's dtype (the build precision's)."""
    c_in, c_out = family.in_channels, family.out_channels
    inputs = [GraphTensor("latents", ("B", "Nx", c_in), "float32"), GraphTensor("context", ("B", "Nc", c_in), "float32"),
              GraphTensor("timestep", ("B",), "float32")]
    outputs = [GraphTensor("velocity", ("B", "Nx", c_out), "float32")]
    keep, score = GraphTensor("keep_idx", ("K",), "int64"), GraphTensor("score_idx", ("Q",), "int64")
    if kind == "topi":
        inputs += [keep, score]
        outputs.append(GraphTensor("influence", (1, "K"), "float32"))
    elif kind == "extract":
        inputs.append(score)
        outputs += [ref_kv_tensor(family, kv_dtype), GraphTensor("influence", (1, "Nc"), "float32")]
    elif kind == "cached":
        inputs = [inputs[0], inputs[2], ref_kv_tensor(family, kv_dtype), keep, score]
        outputs.append(GraphTensor("influence", (1, "K"), "float32"))
    return GraphEntry(file=f"{kind}.onnx", inputs=tuple(inputs) + tuple(family.graph_inputs()), outputs=tuple(outputs))


def example_feed(family, inputs, layout: Layout, kind: str, *, keep: int | None = None, queries: int | None = None,
                 batch: int | None = None) -> dict:
    """Graph inputs (name -> tensor) for a request: latents from its noise, every context index unless `keep`."""
    cond = family.conditioning(inputs, layout)
    b = batch or family.branches(inputs)
    gen = torch.Generator().manual_seed(0)
    feed = {"latents": torch.randn(b, layout.num_target, family.in_channels, generator=gen),
            "context": inputs.reference_latents.float().expand(b, -1, -1).contiguous(),
            "timestep": torch.full((b,), 0.5)}
    nc = layout.num_ctx
    feed["keep_idx"] = torch.arange(nc) if keep is None else torch.linspace(0, nc - 1, keep).round().long()
    feed["score_idx"] = torch.arange(layout.num_target if queries is None else queries)
    kv_dtype = KV_DTYPES[family.model.dtype] if family.model is not None else "float32"
    if kind == "cached":  # any keys and values of the right shape: export traces shapes, not values
        feed["ref_kv"] = torch.randn(family.num_layers, 2, b, family.heads, nc, family.head_dim, generator=gen).to(
            next(k for k, v in KV_DTYPES.items() if v == kv_dtype))
    tensors = graph_tensors(family, kind, kv_dtype).inputs
    for t in tensors:
        v = cond.get(t.name)
        if v is not None:  # branches batched: conditioning with a batch dim must match the latents'
            feed[t.name] = v.expand(b, *v.shape[1:]).contiguous() if t.dims[:1] == ("B",) and v.shape[0] != b else v
    return {t.name: feed[t.name] for t in tensors}


class _Graph(torch.nn.Module):
    def __init__(self, family, settings: MethodSettings, kind: str, names):
        super().__init__()
        self.model = family.model  # registered so the parameters become initializers (same names in both graphs)
        self.family, self.kind, self.names = family, kind, list(names)
        self.pivotal, self.prune_start = tuple(settings.pivotal_layers), int(settings.prune_start)

    def run(self, latents, context=None, timestep=None, keep_idx=None, score_idx=None, ref_kv=None, **cond):
        if self.kind == "dense":
            velocity, _ = self.family.forward(latents, context, timestep, cond)
            return velocity.float()
        if self.kind == "extract":
            velocity, influence, kv = self.family.forward(latents, context, timestep, cond, score_idx=score_idx,
                                                          influence_layers=self.pivotal, record_kv=True)
            return velocity.float(), kv, influence.float()
        if self.kind == "cached":
            velocity, influence = self.family.forward(latents, None, timestep, cond, ref_kv=ref_kv, keep_idx=keep_idx,
                                                      score_idx=score_idx, prune_start=self.prune_start,
                                                      influence_layers=self.pivotal)
            return velocity.float(), influence.float()
        velocity, influence = self.family.forward(latents, context, timestep, cond, keep_idx=keep_idx,
                                                  score_idx=score_idx, prune_start=self.prune_start,
                                                  influence_layers=self.pivotal)
        return velocity.float(), influence.float()


def graph_module(family, settings: MethodSettings, kind: str, names) -> torch.nn.Module:
    """A module whose forward takes exactly the graph's input names (torch.export binds inputs by signature)."""
    import inspect

    def forward(self, *args, **kwargs):
        return self.run(**dict(zip(self.names, args)), **kwargs)

    param = inspect.Parameter
    forward.__signature__ = inspect.Signature(
        [param("self", param.POSITIONAL_OR_KEYWORD)] + [param(n, param.POSITIONAL_OR_KEYWORD) for n in names])
    cls = type(f"{kind.capitalize()}Graph", (_Graph,), {"forward": forward})
    return cls(family, settings, kind, names).eval()


def _dynamic_shapes(feed: dict, tensors) -> dict:
    from torch.export import Dim

    dims = {}
    for t in tensors:
        if t.name not in feed:
            continue
        spec = {}
        for axis, d in enumerate(t.dims):
            if isinstance(d, str) and d not in STATIC_DIMS:
                spec[axis] = Dim.AUTO
        dims[t.name] = spec or None
    return dims


def cast_double_to_float(model: onnx.ModelProto) -> int:
    """TensorRT has little float64 support: turn any double casts/initializers/constants into float32."""
    from onnx import TensorProto, numpy_helper

    changed = 0

    def fix_graph(graph):
        nonlocal changed
        for init in graph.initializer:
            if init.data_type == TensorProto.DOUBLE and not init.external_data:
                init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype("float32"), init.name))
                changed += 1
        for node in graph.node:
            for attr in node.attribute:
                if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.DOUBLE:
                    attr.i = TensorProto.FLOAT
                    changed += 1
                if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.DOUBLE:
                    attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype("float32"),
                                                            attr.t.name))
                    changed += 1
                if attr.type == onnx.AttributeProto.GRAPH:
                    fix_graph(attr.g)
        for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
            if vi.type.tensor_type.elem_type == TensorProto.DOUBLE:
                vi.type.tensor_type.elem_type = TensorProto.FLOAT
                changed += 1

    fix_graph(model.graph)
    return changed


def export_graph(family, settings: MethodSettings, inputs, layout: Layout, kind: str, path: Path) -> GraphEntry:
    """Export one graph to `path` (+ `path`.data with its large initializers), streaming the weights from the
    model (no second copy in memory); then add the topi function bodies and check it."""
    from topi_export.ops.onnx import attach_functions, register_schemas, translation_table

    register_schemas()
    entry = graph_tensors(family, kind, KV_DTYPES[family.model.dtype])
    in_t, out_t = entry.inputs, entry.outputs
    # non-trivial example sizes so export does not specialise a dimension to 1
    keep = max(2, layout.num_ctx - 1) if kind in KEEP_PROFILED else None
    feed = example_feed(family, inputs, layout, kind, keep=keep, queries=max(2, layout.num_target - 1), batch=2)
    module = graph_module(family, settings, kind, list(feed))
    out_names = [t.name for t in out_t]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(module, (), kwargs=feed, dynamo=True, dynamic_shapes=_dynamic_shapes(feed, in_t),
                                    input_names=list(feed), output_names=out_names,
                                    custom_translation_table=translation_table(), verbose=False, optimize=True)
    path = Path(path)
    program.save(str(path), external_data=True)
    del program
    model = onnx.load(str(path), load_external_data=False)
    attach_functions(model)
    cast_double_to_float(model)
    model.producer_name = "topi-export"
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path), full_check=False)
    return GraphEntry(file=path.name, inputs=in_t, outputs=out_t, onnx=path.name)


def _external(init) -> dict:
    return {e.key: e.value for e in init.external_data}


def share_weights(out_dir: Path, graph_files: list[str]) -> dict:
    """Make every graph read its initializers from ONE file, ``weights.data``: the first graph's data file is
    renamed to it (no copy); an initializer of a later graph whose bytes are already there (same parameter, or the
    same folded constant under another name) points into it; the rest is appended. Returns {"file", "bytes"}."""
    import hashlib
    import os

    out_dir = Path(out_dir)
    target = out_dir / WEIGHTS_FILE
    index = {}  # (sha256 of the bytes, length) -> offset in weights.data

    def digest(f, offset, length):
        f.seek(offset)
        h = hashlib.sha256()
        left = length
        while left > 0:
            chunk = f.read(min(1 << 24, left))
            if not chunk:
                raise OSError("external data file is shorter than its initializers say")
            h.update(chunk)
            left -= len(chunk)
        return h.hexdigest(), length

    for i, name in enumerate(graph_files):
        path = out_dir / name
        model = onnx.load(str(path), load_external_data=False)
        ext_inits = [t for t in _all_initializers(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
        locations = {_external(t)["location"] for t in ext_inits}
        if i == 0 and len(locations) == 1:  # the first graph's file becomes the shared one as it is
            os.replace(out_dir / locations.pop(), target)
            with open(target, "rb") as f:
                for t in ext_inits:
                    ext = _external(t)
                    off, length = int(ext.get("offset", 0)), int(ext["length"])
                    index.setdefault(digest(f, off, length), off)
                    _set_external(t, off, length)
        else:
            sources = {}
            with open(target, "ab") as dst:
                for t in ext_inits:
                    ext = _external(t)
                    loc, off, length = ext["location"], int(ext.get("offset", 0)), int(ext["length"])
                    src = sources.setdefault(loc, open(out_dir / loc, "rb"))
                    key = digest(src, off, length)
                    if key not in index:
                        src.seek(off)
                        index[key] = dst.tell()
                        _copy(src, dst, length)
                    _set_external(t, index[key], length)
            for loc, f in sources.items():
                f.close()
                if loc != WEIGHTS_FILE:
                    (out_dir / loc).unlink(missing_ok=True)
        onnx.save_model(model, str(path))
    if not target.exists():
        target.write_bytes(b"")
    return {"file": WEIGHTS_FILE, "bytes": target.stat().st_size}


def _set_external(init, offset: int, length: int) -> None:
    del init.external_data[:]
    for k, v in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
        e = init.external_data.add()
        e.key, e.value = k, v


def _copy(src, dst, length: int, chunk: int = 1 << 24) -> None:
    while length > 0:
        data = src.read(min(chunk, length))
        if not data:
            raise OSError("external data file is shorter than its initializers say")
        dst.write(data)
        length -= len(data)


def _all_initializers(graph):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_initializers(attr.g)


def export_graphs(family, settings: MethodSettings, inputs, layout: Layout, out_dir, *, dense: bool = True,
                  progress=None, ref_kv: str | None = None) -> tuple[dict, dict]:
    """Export the graphs of ``graph_kinds(ref_kv, dense)`` into out_dir with one shared weights file.
    Returns ({kind: GraphEntry}, weights info)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    graphs = {}
    for kind in graph_kinds(ref_kv, dense):
        if progress:
            progress(f"export {kind} graph")
        graphs[kind] = export_graph(family, settings, inputs, layout, kind, out_dir / f"{kind}.onnx")
    weights = share_weights(out_dir, [g.file for g in graphs.values()])
    return graphs, weights
