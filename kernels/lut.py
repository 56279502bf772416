"""Look-up tables of a fixed block layout (built once, like triton-lang/kernels' blocksparse plan).

``block_luts(grid)`` for a bool ``[N/bm, K/bk]`` grid of kept blocks returns, all int32 on the grid's
device:
- forward (block rows, CSR): ``row_ptr [N/bm + 1]``, ``col_idx [nnzb]``; blocks are numbered in
  row-major order over the grid (the order of ``values``);
- ``row_idx [nnzb]``: block row of every block (for the weight gradient);
- transposed (block columns, CSC): ``col_ptr [K/bk + 1]``, ``t_row [nnzb]``, ``t_perm [nnzb]``
  (the block's index in ``values``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class BlockLuts(NamedTuple):
    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    row_idx: torch.Tensor
    col_ptr: torch.Tensor
    t_row: torch.Tensor
    t_perm: torch.Tensor

    def fwd(self):
        return self.row_ptr, self.col_idx

    def transposed(self):
        return self.col_ptr, self.t_row, self.t_perm


def block_grid(mask: torch.Tensor, block) -> torch.Tensor:
    """bool ``[N/bm, K/bk]``: blocks with any kept (or nonzero) entry."""
    bm, bk = block
    n, k = mask.shape
    if n % bm or k % bk:
        raise ValueError(f"{n}x{k} does not tile into {bm}x{bk} blocks")
    return (mask != 0).reshape(n // bm, bm, k // bk, bk).any(dim=3).any(dim=1)


def block_luts(grid: torch.Tensor) -> BlockLuts:
    grid = grid.to(torch.bool)
    nbr, nbc = grid.shape
    rows, cols = grid.nonzero(as_tuple=True)                       # row-major order = values order
    row_ptr = torch.zeros(nbr + 1, dtype=torch.int64, device=grid.device)
    row_ptr[1:] = torch.cumsum(grid.sum(1), 0)
    order = torch.argsort(cols * nbr + rows)                       # column-major order
    col_ptr = torch.zeros(nbc + 1, dtype=torch.int64, device=grid.device)
    col_ptr[1:] = torch.cumsum(grid.sum(0), 0)
    i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    return BlockLuts(i32(row_ptr), i32(cols), i32(rows), i32(col_ptr), i32(rows[order]), i32(order))


def dense_to_blocks(weight: torch.Tensor, grid: torch.Tensor, block) -> torch.Tensor:
    """``values [nnzb, bm, bk]`` of the kept blocks of a dense ``[N, K]`` weight, in row-major order."""
    bm, bk = block
    n, k = weight.shape
    rows, cols = grid.nonzero(as_tuple=True)
    return weight.reshape(n // bm, bm, k // bk, bk).permute(0, 2, 1, 3)[rows, cols].contiguous()


def blocks_to_dense(values: torch.Tensor, row_idx: torch.Tensor, col_idx: torch.Tensor, shape) -> torch.Tensor:
    n, k = shape
    bm, bk = values.shape[1:]
    w = values.new_zeros(n // bm, k // bk, bm, bk)
    w[row_idx.long(), col_idx.long()] = values
    return w.permute(0, 2, 1, 3).reshape(n, k)
