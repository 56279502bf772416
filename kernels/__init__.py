"""Triton kernels, shipped as `jsp_fast.kernels` (never imported as a top-level `kernels`)."""
