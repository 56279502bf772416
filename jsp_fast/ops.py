"""Public block-sparse ops: ``jf.ops.bsr_linear`` and ``jf.ops.bsr_linear_jvp``.

Both are thin wrappers over the ``torch.ops.jsp_fast.bsr_*`` custom ops (``jsp_fast/sparse/_ops.py``).
"""
from __future__ import annotations

from .sparse._ops import bsr_linear, bsr_linear_jvp

__all__ = ["bsr_linear", "bsr_linear_jvp"]
