"""Triton Python-backend engine model: one ONNX graph of an engine directory, run by ONNX Runtime in-process.

Copied into a repository as ``<model>/1/model.py`` next to ``1/model.onnx`` and its external data
(``1/weights.data``): the files of an ``onnxruntime_onnx`` platform model, served by the Python backend instead.
The config is that platform model's config with ``backend: "python"`` in place of ``platform:`` (same inputs,
outputs, names, types and dims; ``max_batch_size: 0``), so the BLS loop model (bls_model.py) calls it unchanged.
This is what serves a repository on a Triton without the onnxruntime backend (PyPI's nvidia-pytriton wheel ships
only the Python backend: docs/triton-server.md).

Needs only numpy and onnxruntime in the stub's environment (not topi_export: no torch import per instance).
Optional ``parameters`` of the config (string values):
  onnx_file             the graph in the version folder, default "model.onnx"
  intra_op_num_threads  ONNX Runtime threads per instance (default: ONNX Runtime's choice)
  inter_op_num_threads
A request's missing input, or shapes the graph cannot run, get an error response; the other requests of the
batch are served. Types and ranks were already checked by Triton against the config.
"""
import json
from pathlib import Path

import numpy as np

pb_utils = None  # triton_python_backend_utils, bound in initialize() (it exists only inside the Python backend)

# ONNX element types as ONNX Runtime names them -> the Triton config types they may be declared as
ORT_TO_TRITON = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(bfloat16)": "TYPE_BF16",
                 "tensor(int64)": "TYPE_INT64", "tensor(int32)": "TYPE_INT32", "tensor(bool)": "TYPE_BOOL"}


def session_options(ort, params):
    """The options `topi-export run` opens graphs with (topi_export/backends/onnxruntime.py session_options):
    the same optimization level and no prepacked weight copies, so the server computes what `run` computes."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.log_severity_level = 3
    so.add_session_config_entry("session.disable_prepacking", "1")
    for key in ("intra_op_num_threads", "inter_op_num_threads"):
        if params.get(key):
            setattr(so, key, int(params[key]))
    return so


def check_io(session, inputs: dict, outputs: dict, where: str) -> None:
    """The graph must take exactly the config's inputs and produce its outputs, in the declared types."""
    graph_in = {t.name: t.type for t in session.get_inputs()}
    graph_out = {t.name: t.type for t in session.get_outputs()}
    if set(graph_in) != set(inputs):
        raise ValueError(f"{where} takes inputs {sorted(graph_in)} but config.pbtxt declares {sorted(inputs)}: "
                         f"regenerate the repository")
    missing = sorted(set(outputs) - set(graph_out))
    if missing:
        raise ValueError(f"{where} has no outputs {missing} that config.pbtxt declares: regenerate the repository")
    for name, declared in [*inputs.items(), *outputs.items()]:
        have = ORT_TO_TRITON.get({**graph_in, **graph_out}[name], "unsupported")
        if have != declared:
            raise ValueError(f"{where}: tensor {name!r} is {have} in the graph but {declared} in config.pbtxt: "
                             f"regenerate the repository")


class TritonPythonModel:
    def initialize(self, args):
        global pb_utils
        import onnxruntime as ort
        import triton_python_backend_utils as pb_utils

        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        model_dir = Path(args["model_repository"])
        if model_dir.suffix == ".py":  # Triton 22.06 passed the path of model.py here
            model_dir = model_dir.parent.parent
        path = model_dir / str(args["model_version"]) / params.get("onnx_file", "model.onnx")
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: place the engine's ONNX graph (and its weights file) in "
                                    f"the version folder")
        available = ort.get_available_providers()
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in available:
            providers = [("CUDAExecutionProvider", {"device_id": int(args.get("model_instance_device_id", 0))}),
                         "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), session_options(ort, params), providers=providers)
        self.inputs = {t["name"]: t["data_type"] for t in config.get("input", [])}
        self.outputs = {t["name"]: t["data_type"] for t in config.get("output", [])}
        check_io(self.session, self.inputs, self.outputs, f"{args['model_name']} ({path.name})")

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._run(request))
            except Exception as exc:  # one failed request must not take the others down
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"{type(exc).__name__}: {first}")))
        return responses

    def _run(self, request):
        feed = {}
        for name in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"missing input {name!r}")
            feed[name] = tensor.as_numpy()
        names = list(request.requested_output_names()) or list(self.outputs)
        arrays = self.session.run(names, feed)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, np.ascontiguousarray(a))
                                                          for n, a in zip(names, arrays)])
