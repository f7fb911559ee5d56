"""ToPi custom ops: influence scoring and context-token gather.

Both are ``torch.library`` custom ops in namespace ``topi`` so the PyTorch reference, the ONNX
exporter (which keeps them as opaque ``topi``-domain nodes with function bodies: influence as
``query_lse`` + ``context_influence``, see ``topi_export.ops.onnx``) and the GPU kernels in ``topi_export/kernels/``
share one definition.
"""
from topi_export.ops.reference import (  # noqa: F401
    influence_score,
    influence_score_materialized,
    token_gather,
)
