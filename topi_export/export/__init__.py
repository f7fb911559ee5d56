"""Export: the ``anchor`` and ``pruned`` ONNX graphs of a model at one shape (DESIGN §3)."""
from topi_export.export.graphs import GRAPHS, export_graphs, graph_io  # noqa: F401
