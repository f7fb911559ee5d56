"""A Python-backend engine model: an ONNX graph of an engine directory served by ort_engine_model.py.

    REPO/<name>/config.pbtxt     backend "python"; the inputs and outputs of the graph, as the onnxruntime_onnx
                                 platform model declares them (token dims -1, fixed dims as numbers, batch explicit)
    REPO/<name>/1/model.py       copy of topi_export/serving/ort_engine_model.py
    REPO/<name>/1/model.onnx     the graph, + its external data under the locations it names (1/weights.data)

Same model name, tensors and dims as the platform model, so a loop model calls either. Used where Triton has no
onnxruntime backend (the nvidia-pytriton wheel: docs/triton.md, "The server's Python environment").
"""
from __future__ import annotations

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


def engine_model_config(name: str, inputs, outputs, *, instances: int = 1, kind: str = "KIND_CPU",
                        parameters: dict | None = None) -> str:
    """config.pbtxt of a Python-backend engine model (ort_engine_model.py reads ``parameters``), built as a
    ModelConfig message (serving/model_config.py)."""
    from topi_export.serving.model_config import config_text, model_config

    if kind not in KINDS:
        raise TopiError(f"instance kind {kind!r}: choose one of {', '.join(KINDS)}")
    return config_text(model_config(name, inputs=inputs, outputs=outputs, backend="python", kind=kind,
                                    count=instances, parameters=parameters))


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # the weights once on disk when the repository shares the file system
    except OSError:
        shutil.copyfile(src, dst)


def write_engine_model(repo, name: str, onnx_path, *, instances: int = 1, kind: str = "KIND_CPU",
                       parameters: dict | None = None) -> Path:
    """Write REPO/<name>/ for the ONNX graph ``onnx_path`` (its external data must lie in the graph's folder or
    below it), staged and placed whole (fsutil.staged_dir). Returns the model directory; refuses an existing one.
    ``topi-export triton --engine-models python`` writes the same files for every graph of an engine directory,
    hash-checked against its manifest (triton_repo.py)."""
    from topi_export.fsutil import atomic_write_bytes, check_onnx_external_data, staged_dir

    onnx_path = Path(onnx_path)
    model_dir = Path(repo) / name
    if os.path.lexists(model_dir):
        raise TopiError(f"{model_dir} already exists: write the model into a new repository")
    data = sorted(check_onnx_external_data(onnx_path, onnx_path.parent))  # confined to the graph's folder
    inputs, outputs = graph_io(onnx_path)
    config = engine_model_config(name, inputs, outputs, instances=instances, kind=kind, parameters=parameters)
    with staged_dir(model_dir, replace=False) as tmp:
        _place(onnx_path, tmp / "1" / "model.onnx")
        for rel in data:
            _place(onnx_path.parent / rel, tmp / "1" / rel)
        atomic_write_bytes(tmp / "1" / "model.py", TEMPLATE.read_bytes())
        atomic_write_bytes(tmp / "config.pbtxt", config.encode())
        for d in [tmp, *tmp.rglob("*")]:
            if d.is_dir():
                d.chmod(0o755)  # Triton may run as another user
    return model_dir
