"""GPU kernels (OpenAI Triton) and TensorRT plugins for the ``topi`` ops; see README.md.

Import the submodules directly: ``plugins.triton_kernels`` needs triton, ``plugins.trt_plugins``
needs nothing until ``register_plugins()`` is called.
"""
