"""Triton kernels, one op per file. Installed as `rlhf_fast.kernels` (see setup.py)."""
