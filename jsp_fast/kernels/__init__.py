"""Triton kernels, shipped as ``jsp_fast.kernels``: ``@triton.jit`` kernels and their launchers only.

Submodules (imported on first use, so ``import jsp_fast`` never imports triton):
``bsr_linear`` (forward with fused epilogue, forward+JVP), ``bsr_grad`` (transposed product,
kept-block weight gradient), ``fused_field`` (a whole concatsquash field in one launch);
``_compile_check`` compiles every variant ahead of time. Tables come from ``jsp_fast.sparse.plan``;
autograd and backend selection live in ``jsp_fast.sparse``.
"""
import importlib

_SUBMODULES = ("bsr_linear", "bsr_grad", "fused_field")
_EXPORTS = {
    "bsr_linear_fwd": "bsr_linear", "bsr_linear_jvp": "bsr_linear",
    "bsr_t_matmul": "bsr_grad", "bsr_weight_grad": "bsr_grad",
}
__all__ = list(_SUBMODULES) + list(_EXPORTS)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
