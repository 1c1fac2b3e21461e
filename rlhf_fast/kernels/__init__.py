"""Triton kernels, one op per file: `@triton.jit` kernels and their launchers, no autograd."""
