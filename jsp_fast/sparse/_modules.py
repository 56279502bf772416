"""Modules that store and train only the kept blocks: ``BlockSparseLinear`` and their shared storage."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _act
from ._ops import bsr_linear
from .plan import BlockSparseWeight, as_block, build_tables

__all__ = ["BlockSparseLinear", "under_func_transform"]


def under_func_transform(x: torch.Tensor) -> bool:
    """True when ``x`` is being traced by a ``torch.func`` transform (``jvp``, ``vmap``, ``grad``).

    The ``jsp_fast::bsr_*`` ops have neither forward-mode nor batching rules, so a block-sparse layer
    computes with its dense (zero-filled) weight there instead: same function, dense speed. This is
    the path ``jf.CNF`` takes for the trace of a user field that has no ``jvp`` of its own; plain
    calls (a solve, ``sample``, training of the value) run the kernels.
    """
    return torch._C._functorch.is_functorch_wrapped_tensor(x)

_TABLES = ("_t_row_ptr", "_t_col_idx", "_t_block_row", "_t_col_ptr", "_t_row_idx", "_t_perm")


class _BlockStorage(nn.Module):
    """Kept blocks as module state: the Parameter ``values`` ``[nnzb, bm, bk]`` (row-major over the block
    grid) and the buffers ``block_rows``/``block_cols`` (their grid coordinates, saved in the state dict).
    The look-up tables are derived from them by ``plan.build_tables`` into non-persistent buffers (they
    follow ``.to()`` and stay out of the state dict), rebuilt after ``load_state_dict``; ``weight`` is
    the ``BlockSparseWeight`` over the live ``values`` (no copy: gradients reach them).
    """

    def _init_blocks(self, weight: BlockSparseWeight) -> None:
        self.out_features, self.in_features = weight.shape
        self.block = weight.block
        self.values = nn.Parameter(weight.values.detach().clone())
        self.register_buffer("block_rows", weight.block_row.clone())
        self.register_buffer("block_cols", weight.col_idx.clone())
        for name, t in zip(_TABLES, weight.tables()):
            self.register_buffer(name, t.clone(), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, keys: module._rebuild_tables())

    def _rebuild_tables(self) -> None:
        bm, bk = self.block
        tables = build_tables(self.block_rows, self.block_cols, self.out_features // bm, self.in_features // bk)
        for name, t in zip(_TABLES, tables):
            self.register_buffer(name, t, persistent=False)

    @property
    def weight(self) -> BlockSparseWeight:
        """The plan over the live ``values`` Parameter (no copy; gradients reach ``values``)."""
        return BlockSparseWeight(self.values, (self.out_features, self.in_features), self.block,
                                 *(self._buffers[name] for name in _TABLES))

    @property
    def nnzb(self) -> int:
        return int(self.values.shape[0])

    @property
    def density(self) -> float:
        bm, bk = self.block
        return self.nnzb * bm * bk / (self.out_features * self.in_features)

    def block_mask(self) -> torch.Tensor:
        """bool ``[n/bm, k/bk]`` grid of kept blocks."""
        return self.weight.block_mask()

    def mask(self) -> torch.Tensor:
        """bool ``[n, k]`` element mask."""
        return self.weight.mask()

    def dense_weight(self) -> torch.Tensor:
        """The dense ``[n, k]`` weight (zeros outside kept blocks), differentiable in ``values``."""
        return self.weight.to_dense()


class BlockSparseLinear(_BlockStorage):
    """``y = act(x Wᵀ + b)`` with a block-sparse ``W``.

    Parameters: ``values`` ``[nnzb, bm, bk]`` (the kept blocks, trainable) and ``bias`` ``[n]`` (or
    None). Buffers: ``block_rows``/``block_cols`` (saved in the state dict) and the derived look-up
    tables (not saved; rebuilt on load). ``.to()``/``.double()``/``.cuda()`` move everything.
    """

    def __init__(self, in_features: int, out_features: int, block_rows: torch.Tensor, block_cols: torch.Tensor,
                 block=(32, 32), bias: bool = True, activation: str | None = None, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        bm, bk = as_block(block)
        self.activation = _act.check(activation)
        self.backend = backend
        proto = BlockSparseWeight.from_blocks(
            torch.zeros(len(block_rows), bm, bk, device=device, dtype=dtype or torch.get_default_dtype()),
            block_rows, block_cols, (out_features, in_features))
        self._init_blocks(proto)
        nn.init.kaiming_uniform_(self.values.view(-1, bk), a=5 ** 0.5)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=self.values.dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor | None = None, block=(32, 32),
                    activation: str | None = None, backend: str = "auto") -> "BlockSparseLinear":
        """Keep the blocks of ``linear.weight`` chosen by ``mask`` (see ``BlockSparseWeight.from_dense``)."""
        w = BlockSparseWeight.from_dense(linear.weight.detach(), mask, block)
        m = cls(linear.in_features, linear.out_features, w.block_row, w.col_idx, w.block,
                bias=linear.bias is not None, activation=activation, backend=backend,
                device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            m.values.copy_(w.values)
            if linear.bias is not None:
                m.bias.copy_(linear.bias)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if under_func_transform(x):
            return _act.apply(self.activation, F.linear(x, self.dense_weight(), self.bias))
        return bsr_linear(x, self.weight, None, self.bias, self.activation, backend=self.backend)

    def to_linear(self) -> nn.Linear:
        """A dense ``nn.Linear`` with the same function (zeros outside kept blocks)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return (f"{self.in_features} -> {self.out_features}, block={self.block}, nnzb={self.nnzb}, "
                f"density={self.density:.3f}, bias={self.bias is not None}, activation={self.activation!r}, "
                f"backend={self.backend!r}")
