"""A Python-backend engine model: an ONNX graph of an engine directory served by ort_engine_model.py.

    REPO/<name>/config.pbtxt     backend "python"; the inputs and outputs of the graph, as the onnxruntime_onnx
                                 platform model declares them (token dims -1, fixed dims as numbers, batch explicit)
    REPO/<name>/1/model.py       copy of topi_export/serving/ort_engine_model.py
    REPO/<name>/1/model.onnx     the graph, + its external data under the locations it names (1/weights.data)

Same model name, tensors and dims as the platform model, so a loop model calls either. Used where Triton has no
onnxruntime backend (the nvidia-pytriton wheel: docs/triton-server.md).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from topi_export.errors import TopiError

TEMPLATE = Path(__file__).resolve().parent / "ort_engine_model.py"
ONNX_TO_TRITON = {"FLOAT": "TYPE_FP32", "FLOAT16": "TYPE_FP16", "BFLOAT16": "TYPE_BF16", "INT64": "TYPE_INT64",
                  "INT32": "TYPE_INT32", "BOOL": "TYPE_BOOL"}
KINDS = ("KIND_CPU", "KIND_GPU")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # Triton TYPE_*
    dims: tuple  # -1: any size


def graph_io(onnx_path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's inputs (initializers excluded) and outputs, weights not loaded: dim_value -> number,
    symbolic -> -1 (what triton_repo.py declares for the onnxruntime_onnx model)."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - anything unreadable is a broken engine directory
        raise TopiError(f"cannot read ONNX graph {onnx_path} ({type(exc).__name__}): rebuild the engine "
                        f"directory") from None

    def spec(v):
        tt = v.type.tensor_type
        kind = onnx.TensorProto.DataType.Name(tt.elem_type)
        if kind not in ONNX_TO_TRITON:
            raise TopiError(f"{onnx_path}: tensor {v.name!r} is {kind}, which the Python engine model cannot serve")
        return TensorSpec(v.name, ONNX_TO_TRITON[kind],
                          tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim))

    initializers = {t.name for t in model.graph.initializer}
    return ([spec(v) for v in model.graph.input if v.name not in initializers],
            [spec(v) for v in model.graph.output])


def _q(text: str) -> str:
    return json.dumps(text)  # a protobuf text-format string for the names used here (ASCII, no control chars)


def engine_model_config(name: str, inputs, outputs, *, instances: int = 1, kind: str = "KIND_CPU",
                        parameters: dict | None = None) -> str:
    """config.pbtxt of a Python-backend engine model (ort_engine_model.py reads ``parameters``)."""
    if kind not in KINDS:
        raise TopiError(f"instance kind {kind!r}: choose one of {', '.join(KINDS)}")

    def block(t):
        return (f"  {{\n    name: {_q(t.name)}\n    data_type: {t.dtype}\n"
                f"    dims: [ {', '.join(map(str, t.dims))} ]\n  }}")

    parts = [f"name: {_q(name)}", 'backend: "python"',
             "max_batch_size: 0  # the batch is an explicit dim of the graph; token dims are dynamic (-1)",
             "input [\n" + ",\n".join(map(block, inputs)) + "\n]",
             "output [\n" + ",\n".join(map(block, outputs)) + "\n]",
             f"instance_group [\n  {{\n    kind: {kind}\n    count: {int(instances)}\n  }}\n]"]
    for key, value in (parameters or {}).items():
        parts.append(f"parameters {{\n  key: {_q(key)}\n  value {{ string_value: {_q(str(value))} }}\n}}")
    return "\n".join(parts) + "\n"


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # the weights once on disk when the repository shares the file system
    except OSError:
        shutil.copyfile(src, dst)


def write_engine_model(repo, name: str, onnx_path, *, instances: int = 1, kind: str = "KIND_CPU",
                       parameters: dict | None = None) -> Path:
    """Write REPO/<name>/ for the ONNX graph ``onnx_path`` (its external data must lie in the graph's folder or
    below it). Returns the model directory. Refuses an existing model directory."""
    from topi_export.fsutil import check_onnx_external_data

    onnx_path = Path(onnx_path)
    model_dir = Path(repo) / name
    if model_dir.exists():
        raise TopiError(f"{model_dir} already exists: write the model into a new repository")
    data = sorted(check_onnx_external_data(onnx_path, onnx_path.parent))  # confined to the graph's folder
    inputs, outputs = graph_io(onnx_path)
    version = model_dir / "1"
    version.mkdir(parents=True)
    _place(onnx_path, version / "model.onnx")
    for rel in data:
        _place(onnx_path.parent / rel, version / rel)
    shutil.copyfile(TEMPLATE, version / "model.py")
    (model_dir / "config.pbtxt").write_text(
        engine_model_config(name, inputs, outputs, instances=instances, kind=kind, parameters=parameters))
    return model_dir
