"""Block-sparse compute: plan, backend registry, torch.library ops, modules, the sparse field, sparsify.

Public: ``BlockSparseWeight`` (the plan: kept blocks + look-up tables), ``BlockSparseLinear``
(nn.Module), ``SparseODEnet`` (the block-sparse concatsquash field), ``sparsify`` (any module) and
its ``SparsifyReport``; the modules
``plan`` (tables, block shapes, masks) and ``registry`` (backends and ``resolve``, the one chooser).
The ops are re-exported as ``jsp_fast.ops`` and the registry as ``jsp_fast.backends``.
"""
from __future__ import annotations

from . import plan, registry
from . import backends  # noqa: F401  (registers torch, cpu, triton, cuda; imports neither triton nor CUDA)
from . import _ops  # noqa: F401  (registers the jsp_fast::bsr_* custom ops)
from ._field import SparseODEnet
from ._modules import BlockSparseLinear
from ._sparsify import SparsifyReport, sparsify
from .plan import BlockSparseWeight

__all__ = ["BlockSparseWeight", "BlockSparseLinear", "SparseODEnet", "sparsify", "SparsifyReport", "plan", "registry"]
