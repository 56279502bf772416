"""Block-sparse compute: the plan format, torch.library ops with autograd, backends, modules.

``BlockSparseWeight`` (plan + look-up tables), ``BlockSparseLinear`` (nn.Module); the ops are in
``jsp_fast.ops`` and the backend registry in ``jsp_fast.backends`` (see ``_backends.py``).
"""
from __future__ import annotations

from ._format import BlockSparseWeight
from ._modules import BlockSparseLinear
from . import _ops  # noqa: F401  (registers the jsp_fast::bsr_* custom ops)
from . import _triton  # noqa: F401  (registers "triton" when triton is installed; imports it lazily)
from ._field import SparseODEnet
from ._sparsify import sparsify

__all__ = ["BlockSparseWeight", "BlockSparseLinear", "SparseODEnet", "sparsify"]
