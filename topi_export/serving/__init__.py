"""Serving: Triton Inference Server model repositories (``topi-export triton``).

triton_repo.py writes the repository; triton_engine.py is the StepEngine of the BLS loop model;
bls_model.py is the Python-backend ``model.py`` copied into the repository (it imports
``triton_python_backend_utils`` and is never imported by topi-export itself).
"""
