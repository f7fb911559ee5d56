"""anchor: full sequence -> (velocity, influence over context). pruned: + keep_idx (dynamic length) ->
velocity, gathering kept context tokens at L0. One pruned graph serves every ratio bucket."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import torch

from topi_export.models import kontext_ids

GRAPHS = ("anchor", "pruned")
EXTERNAL_DATA_BYTES = 1_800_000_000  # below protobuf's 2 GB limit, with headroom for the graph itself


class _Graph(torch.nn.Module):
    def __init__(self, adapter, layout, settings, kind):
        super().__init__()
        self.model = adapter.model  # registered so parameters become initializers
        self.adapter, self.kind = adapter, kind
        self.num_target = layout.num_target
        self.pivotal = tuple(settings["pivotal_layers"])
        self.prune_start = int(settings["prune_start"])

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance=None, keep_idx=None):
        kw = dict(num_target=self.num_target, rope_fp32=True)
        if self.kind == "anchor":
            velocity, influence = self.adapter.forward(hidden_states, encoder_hidden_states, pooled_projections,
                                                       timestep, img_ids, txt_ids, guidance,
                                                       influence_layers=self.pivotal, **kw)
            return velocity, influence
        velocity, _ = self.adapter.forward(hidden_states, encoder_hidden_states, pooled_projections, timestep,
                                           img_ids, txt_ids, guidance, keep_idx=keep_idx,
                                           prune_layer=self.prune_start, **kw)
        return velocity


def graph_io(adapter, layout, kind: str):
    """Example inputs (name -> tensor) and output names of a graph at this layout."""
    txt_ids, img_ids = kontext_ids(layout)
    gen = torch.Generator().manual_seed(0)
    c = adapter.in_channels
    inputs = {
        "hidden_states": torch.randn(1, layout.num_target + layout.num_ctx, c, generator=gen),
        "encoder_hidden_states": torch.randn(1, layout.text_tokens, adapter.text_dim, generator=gen),
        "pooled_projections": torch.randn(1, adapter.pooled_dim, generator=gen),
        "timestep": torch.tensor([0.5]),
        "img_ids": img_ids,
        "txt_ids": txt_ids,
    }
    if adapter.guidance_embeds:
        inputs["guidance"] = torch.tensor([2.5])
    if kind == "pruned":
        inputs["keep_idx"] = torch.arange(0, layout.num_ctx, 2)
    outputs = ["velocity", "influence"] if kind == "anchor" else ["velocity"]
    return inputs, outputs


def cast_double_to_float(model: onnx.ModelProto) -> int:
    """TensorRT has little float64 support: turn any double casts/initializers/constants into float32."""
    from onnx import TensorProto, numpy_helper

    changed = 0

    def fix_graph(graph):
        nonlocal changed
        for init in graph.initializer:
            if init.data_type == TensorProto.DOUBLE:
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


def save_model(model: onnx.ModelProto, path: Path) -> None:
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if size > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def export_graph(adapter, layout, settings, kind: str, path: Path) -> dict:
    from topi_export.ops.onnx import attach_functions, translation_table

    inputs, outputs = graph_io(adapter, layout, kind)
    dynamic = {name: None for name in inputs}
    if kind == "pruned":
        dynamic["keep_idx"] = {0: torch.export.Dim("keep", min=1, max=layout.num_ctx)}
    module = _Graph(adapter, layout, settings, kind).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(module, (), kwargs=inputs, dynamo=True, dynamic_shapes=dynamic,
                                    input_names=list(inputs), output_names=outputs,
                                    custom_translation_table=translation_table(), verbose=False,
                                    optimize=True)
    model = program.model_proto
    attach_functions(model)
    casts = cast_double_to_float(model)
    model.producer_name = "topi-export"
    save_model(model, path)
    onnx.checker.check_model(str(path), full_check=True)
    return {"inputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                       for k, v in inputs.items()},
            "outputs": outputs, "double_casts_fixed": casts}


def export_graphs(adapter, layout, settings, out_dir, progress=None) -> dict:
    from topi_export.ops.onnx import register_schemas

    register_schemas()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {}
    for kind in GRAPHS:
        if progress:
            progress(f"export {kind} graph")
        info[kind] = export_graph(adapter, layout, settings, kind, out_dir / f"{kind}.onnx")
    return info
