"""Triton kernels, shipped as `jsp_fast.kernels` (never imported as a top-level `kernels`).

Submodules (imported on first use, so `import jsp_fast` works without triton):
`bsr_linear` (forward with fused epilogue, forward+JVP, autograd), `bsr_grad` (transposed product,
kept-block weight gradient), `fused_field` (whole concatsquash field in one launch), `lut` (tables).
"""
import importlib

_SUBMODULES = ("bsr_linear", "bsr_grad", "fused_field", "lut")
_EXPORTS = {
    "bsr_linear_fwd": "bsr_linear", "bsr_linear_jvp": "bsr_linear", "BsrLinearFunction": "bsr_linear",
    "bsr_t_matmul": "bsr_grad", "bsr_weight_grad": "bsr_grad",
    "FusedFieldPlan": "fused_field", "fused_field": "fused_field",
    "block_luts": "lut", "BlockLuts": "lut",
}
__all__ = list(_SUBMODULES) + list(_EXPORTS)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
