"""Export: the ``topi`` and ``dense`` ONNX graphs of a model (docs/design.md, "Graphs")."""
from topi_export.export.graphs import GRAPH_KINDS, example_feed, export_graphs, graph_tensors  # noqa: F401
