"""Make the Triton kernels the CUDA implementations of the ``topi`` torch custom ops, so the PyTorch
path (``--backend torch`` on a GPU, the diffusers drop-in) runs the Triton influence score (query_lse, then
the column sums over context keys; see README.md) and gather."""
from __future__ import annotations

import torch


def register_torch_cuda_kernels() -> None:
    from topi_export.kernels import triton_kernels as tk

    import topi_export.ops  # noqa: F401  (defines the ops)

    torch.library.register_kernel("topi::influence_score", "cuda", tk.influence_score)
    torch.library.register_kernel("topi::token_gather", "cuda", tk.token_gather)
