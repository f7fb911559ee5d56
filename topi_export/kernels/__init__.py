"""GPU kernels (OpenAI Triton) and TensorRT plugins for the ``topi`` ops; see README.md.

Import the submodules directly: ``topi_export.kernels.triton_kernels`` needs triton, ``topi_export.kernels.trt_plugins``
needs nothing until ``register_plugins()`` is called.
"""
