"""The block-sparse plan: the one place block tables and packed layouts are built.

A weight ``W`` of shape ``[n, k]`` cut into ``bm x bk`` blocks keeps ``nnzb`` of them. Stored:

- ``values`` ``[nnzb, bm, bk]``: the kept blocks, row-major inside a block, blocks in block-row-major
  (CSR) order. It may be an ``nn.Parameter`` (or any tensor that requires grad): the ops
  differentiate with respect to it, so training a sparsified model updates exactly the kept blocks.
- the forward look-up table (block rows): ``row_ptr [n/bm + 1]``, ``col_idx [nnzb]``,
  ``block_row [nnzb]``;
- the transposed table (block columns, for the input gradient): ``col_ptr [k/bk + 1]``,
  ``row_idx [nnzb]`` and ``perm [nnzb]`` (the index into ``values`` of each block in column order).

The tables are int64 and built once, from a fixed layout (pruning at initialisation fixes it);
``BlockSparseWeight.int32()`` is the int32 view the fused CUDA/Triton fields read, and
``stack_field`` packs the layers of a whole field on one block grid (the Triton fused field).

Block shapes are parsed by ``as_block`` (an int or a pair); masks are tested and measured by
``block_grid``, ``is_block_aligned`` and ``infer_block``.

Layers whose dimensions are not multiples of the block are rejected with an error rather than padded:
padding would change the layer's shape (and every neighbour's), and ``jf.sparsify`` keeps such layers
dense anyway. Choose a block that divides both dimensions, or pad the model yourself.
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple, Sequence

import torch

from .._blocks import as_block

__all__ = ["BlockSparseWeight", "Plan", "FieldLayout", "BLOCK_CANDIDATES",
           "as_block", "block_grid", "is_block_aligned", "infer_block", "build_tables", "blocks_to_dense",
           "stack_field"]

FORMAT_VERSION = 1
_META_KEY = "jsp_fast.block_sparse"

# Block shapes tried, largest first, when the block is not given (a mask carries no block size, so it
# is recovered from the mask: the largest of these on which the mask is constant).
BLOCK_CANDIDATES = ((64, 64), (64, 32), (32, 64), (32, 32), (32, 16), (16, 32), (16, 16), (8, 8))


class Plan(NamedTuple):
    """The look-up tables a backend receives with every call (int64, on the values' device; int32 from
    ``BlockSparseWeight.int32()``)."""

    n: int
    k: int
    bm: int
    bk: int
    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    block_row: torch.Tensor
    col_ptr: torch.Tensor
    row_idx: torch.Tensor
    perm: torch.Tensor


# ---- block shapes and masks ----------------------------------------------------------------------
def _check_divisible(shape: tuple[int, int], block: tuple[int, int]) -> None:
    n, k = shape
    bm, bk = block
    if n % bm or k % bk:
        raise ValueError(
            f"weight shape [{n}, {k}] is not a multiple of the block {block}: block-sparse layers need "
            f"block-aligned dims (no padding is done). Pick a block that divides both dims, or keep this "
            f"layer dense (jf.sparsify does that automatically)."
        )


def block_grid(mask: torch.Tensor, block) -> torch.Tensor:
    """bool ``[n/bm, k/bk]``: the blocks of ``mask`` (bool or numeric) with any kept (nonzero) entry."""
    bm, bk = as_block(block)
    n, k = mask.shape
    _check_divisible((n, k), (bm, bk))
    return (mask != 0).reshape(n // bm, bm, k // bk, bk).any(dim=3).any(dim=1)


def is_block_aligned(mask: torch.Tensor, block) -> bool:
    """True when ``mask`` tiles exactly into ``block`` and is constant on every block."""
    n, k = mask.shape
    bm, bk = as_block(block)
    if n % bm or k % bk:
        return False
    g = (mask != 0).reshape(n // bm, bm, k // bk, bk)
    return bool((g.all(dim=(1, 3)) == g.any(dim=(1, 3))).all())


def infer_block(mask: torch.Tensor) -> tuple[int, int] | None:
    """The largest of ``BLOCK_CANDIDATES`` the mask is built of, or None."""
    best = None
    for b in BLOCK_CANDIDATES:
        if is_block_aligned(mask, b) and (best is None or b[0] * b[1] > best[0] * best[1]):
            best = b
    return best


# ---- tables ----------------------------------------------------------------------------------------
def build_tables(block_rows: torch.Tensor, block_cols: torch.Tensor, nbr: int, nbc: int):
    """Forward and transposed tables from sorted (row-major) block coordinates."""
    dev = block_rows.device
    rows = block_rows.to(torch.int64)
    cols = block_cols.to(torch.int64)
    row_ptr = torch.zeros(nbr + 1, dtype=torch.int64, device=dev)
    row_ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=nbr), 0)
    perm = torch.argsort(cols * max(nbr, 1) + rows, stable=True)
    col_ptr = torch.zeros(nbc + 1, dtype=torch.int64, device=dev)
    col_ptr[1:] = torch.cumsum(torch.bincount(cols, minlength=nbc), 0)
    return row_ptr, cols.contiguous(), rows.contiguous(), col_ptr, rows[perm].contiguous(), perm.contiguous()


class BlockSparseWeight:
    """A block-sparse ``[n, k]`` weight plus its look-up tables. See the module docstring.

    Build with :meth:`from_dense` (a dense weight and a mask) or :meth:`from_blocks` (kept block values
    and their grid coordinates). Pass it to ``jf.ops.bsr_linear`` / ``bsr_linear_jvp``.
    """

    __slots__ = ("values", "shape", "block", "row_ptr", "col_idx", "block_row", "col_ptr", "row_idx", "perm",
                 "_i32")

    def __init__(self, values, shape, block, row_ptr, col_idx, block_row, col_ptr, row_idx, perm):
        # Internal: the tables are trusted here (use from_dense / from_blocks).
        self.values = values
        self.shape = (int(shape[0]), int(shape[1]))
        self.block = as_block(block)
        self.row_ptr, self.col_idx, self.block_row = row_ptr, col_idx, block_row
        self.col_ptr, self.row_idx, self.perm = col_ptr, row_idx, perm
        self._i32 = None

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None, block=(32, 32)) -> "BlockSparseWeight":
        """Keep the blocks of ``weight`` [n, k] selected by ``mask``.

        ``mask``: a bool element mask ``[n, k]`` that is constant on every block (an error says how many
        blocks are partially kept otherwise), or a block grid ``[n/bm, k/bk]``; ``None`` keeps every
        block that has a nonzero. Kept blocks take ``weight``'s values (zeros inside a kept block stay).
        ``values`` is a copy, differentiable with respect to ``weight``.
        """
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-d tensor [n, k], got {getattr(weight, 'shape', type(weight))}")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be floating point, got {weight.dtype}")
        bm, bk = as_block(block)
        n, k = weight.shape
        _check_divisible((n, k), (bm, bk))
        nbr, nbc = n // bm, k // bk
        if mask is None:
            grid = block_grid(weight.detach(), (bm, bk))
        else:
            if not isinstance(mask, torch.Tensor):
                mask = torch.as_tensor(mask)
            mask = mask.to(device=weight.device) != 0
            if tuple(mask.shape) == (n, k):
                grid = block_grid(mask, (bm, bk))
                partial = int((grid & ~mask.reshape(nbr, bm, nbc, bk).all(dim=3).all(dim=1)).sum())
                if partial:
                    raise ValueError(
                        f"mask is not block-aligned for block {(bm, bk)}: {partial} of {nbr * nbc} blocks are "
                        f"partially kept. Build the mask with granularity='block' and the same block, or pass "
                        f"a block grid of shape [{nbr}, {nbc}]."
                    )
            elif tuple(mask.shape) == (nbr, nbc):
                grid = mask
            else:
                raise ValueError(
                    f"mask has shape {tuple(mask.shape)}; expected the weight's shape [{n}, {k}] or the "
                    f"block grid [{nbr}, {nbc}] for block {(bm, bk)}"
                )
        rows, cols = grid.nonzero(as_tuple=True)
        values = weight.reshape(nbr, bm, nbc, bk).permute(0, 2, 1, 3)[rows, cols].contiguous()
        return cls._build(values, rows, cols, (n, k), (bm, bk))

    @classmethod
    def from_blocks(cls, values: torch.Tensor, block_rows: torch.Tensor, block_cols: torch.Tensor,
                    shape) -> "BlockSparseWeight":
        """Wrap kept block ``values`` [nnzb, bm, bk] at grid coordinates ``block_rows``/``block_cols``.

        ``values`` is used as is (no copy) when the blocks are already in row-major order, so an
        ``nn.Parameter`` passed here receives the gradients; otherwise it is gathered into that order
        (still differentiable). Duplicate coordinates are an error.
        """
        if not isinstance(values, torch.Tensor) or values.dim() != 3:
            raise ValueError(f"values must be [nnzb, bm, bk], got {getattr(values, 'shape', type(values))}")
        n, k = (int(s) for s in shape)
        bm, bk = values.shape[1], values.shape[2]
        _check_divisible((n, k), (bm, bk))
        rows = torch.as_tensor(block_rows, device=values.device).to(torch.int64).reshape(-1)
        cols = torch.as_tensor(block_cols, device=values.device).to(torch.int64).reshape(-1)
        if rows.numel() != values.shape[0] or cols.numel() != values.shape[0]:
            raise ValueError(f"{values.shape[0]} blocks but {rows.numel()} block_rows and {cols.numel()} block_cols")
        nbr, nbc = n // bm, k // bk
        if rows.numel() and (rows.min() < 0 or rows.max() >= nbr or cols.min() < 0 or cols.max() >= nbc):
            raise ValueError(f"block coordinates out of range for a [{nbr}, {nbc}] block grid")
        key = rows * nbc + cols
        if rows.numel() > 1:
            order = torch.argsort(key)
            if torch.unique(key).numel() != key.numel():
                raise ValueError("duplicate block coordinates")
            if not bool((order == torch.arange(key.numel(), device=key.device)).all()):
                values, rows, cols = values[order], rows[order], cols[order]
        return cls._build(values, rows, cols, (n, k), (bm, bk))

    @classmethod
    def _build(cls, values, rows, cols, shape, block) -> "BlockSparseWeight":
        n, k = shape
        bm, bk = block
        tables = build_tables(rows, cols, n // bm, k // bk)
        if not values.is_contiguous():
            values = values.contiguous()
        return cls(values, shape, block, *tables)

    def with_values(self, values: torch.Tensor) -> "BlockSparseWeight":
        """The same layout over other ``values`` (same shape; e.g. a Parameter or an update)."""
        if tuple(values.shape) != tuple(self.values.shape):
            raise ValueError(f"values must have shape {tuple(self.values.shape)}, got {tuple(values.shape)}")
        return BlockSparseWeight(values, self.shape, self.block, *self.tables())

    # ---- views ------------------------------------------------------------------------------------------
    def tables(self):
        return (self.row_ptr, self.col_idx, self.block_row, self.col_ptr, self.row_idx, self.perm)

    def plan(self) -> Plan:
        return Plan(self.shape[0], self.shape[1], self.block[0], self.block[1], *self.tables())

    def int32(self) -> Plan:
        """The plan with int32 tables (made once per weight): the fused CUDA field's format."""
        if self._i32 is None:
            self._i32 = Plan(*self.shape, *self.block, *(t.to(torch.int32).contiguous() for t in self.tables()))
        return self._i32

    @property
    def nnzb(self) -> int:
        return int(self.values.shape[0])

    @property
    def density(self) -> float:
        return self.nnzb * self.block[0] * self.block[1] / (self.shape[0] * self.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def block_mask(self) -> torch.Tensor:
        """bool ``[n/bm, k/bk]``: the kept blocks."""
        g = torch.zeros(self.shape[0] // self.block[0], self.shape[1] // self.block[1], dtype=torch.bool,
                        device=self.device)
        g[self.block_row, self.col_idx] = True
        return g

    def mask(self) -> torch.Tensor:
        """bool ``[n, k]`` element mask."""
        bm, bk = self.block
        return self.block_mask().repeat_interleave(bm, 0).repeat_interleave(bk, 1)

    def to_dense(self) -> torch.Tensor:
        """The dense ``[n, k]`` weight, zeros outside kept blocks; differentiable in ``values``."""
        return blocks_to_dense(self.values, self.block_row, self.col_idx, self.shape)

    def __repr__(self) -> str:
        return (f"BlockSparseWeight(shape={self.shape}, block={self.block}, nnzb={self.nnzb}, "
                f"density={self.density:.3f}, dtype={self.dtype}, device={self.device})")

    # ---- moves --------------------------------------------------------------------------------------------
    def to(self, *args, **kwargs) -> "BlockSparseWeight":
        """Like ``Tensor.to``: dtype applies to the values, device to everything (tables stay int64)."""
        values = self.values.to(*args, **kwargs)
        dev = values.device
        t = [x.to(dev) for x in self.tables()]
        return BlockSparseWeight(values, self.shape, self.block, *t)

    def cpu(self) -> "BlockSparseWeight":
        return self.to("cpu")

    def cuda(self, device=None) -> "BlockSparseWeight":
        return self.to("cuda" if device is None else device)

    def float(self) -> "BlockSparseWeight":
        return self.to(torch.float32)

    def double(self) -> "BlockSparseWeight":
        return self.to(torch.float64)

    def detach(self) -> "BlockSparseWeight":
        return BlockSparseWeight(self.values.detach(), self.shape, self.block, *self.tables())

    # ---- saving -------------------------------------------------------------------------------------------
    def to_tensors(self, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """``({name: tensor}, {key: json})`` for ``safetensors.torch.save_file`` (tables are rebuilt on load)."""
        tensors = {
            prefix + "values": self.values.detach().contiguous(),
            prefix + "block_rows": self.block_row.contiguous(),
            prefix + "block_cols": self.col_idx.contiguous(),
        }
        meta = {_META_KEY + (":" + prefix if prefix else ""): json.dumps(
            {"format": FORMAT_VERSION, "shape": list(self.shape), "block": list(self.block)})}
        return tensors, meta

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str], prefix: str = ""):
        key = _META_KEY + (":" + prefix if prefix else "")
        if key not in metadata:
            raise ValueError(f"no block-sparse metadata under {key!r}; found keys {sorted(metadata)}")
        meta = json.loads(metadata[key])
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"unsupported block-sparse format {meta.get('format')!r} (expected {FORMAT_VERSION})")
        values = tensors[prefix + "values"]
        if list(values.shape[1:]) != list(meta["block"]):
            raise ValueError(f"values blocks {tuple(values.shape[1:])} disagree with metadata block {meta['block']}")
        return cls.from_blocks(values, tensors[prefix + "block_rows"], tensors[prefix + "block_cols"], meta["shape"])

    def save(self, path: str | os.PathLike) -> None:
        """Write a ``.safetensors`` file: values, block coordinates and a small JSON header."""
        from safetensors.torch import save_file  # noqa: PLC0415

        tensors, meta = self.to_tensors()
        save_file({k: v.cpu() for k, v in tensors.items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "BlockSparseWeight":
        from safetensors import safe_open  # noqa: PLC0415

        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return cls.from_tensors(tensors, meta)


def blocks_to_dense(values: torch.Tensor, block_row: torch.Tensor, col_idx: torch.Tensor, shape) -> torch.Tensor:
    n, k = shape
    bm, bk = values.shape[1], values.shape[2]
    grid = values.new_zeros(n // bm, k // bk, bm, bk)
    grid = grid.index_put((block_row, col_idx), values)
    return grid.permute(0, 2, 1, 3).reshape(n, k)


# ---- a whole field on one block grid (the Triton fused field) --------------------------------------
class FieldLayout(NamedTuple):
    """The block-sparse layers of a field re-blocked on one ``BM x BK`` grid and concatenated.

    A layer ``[n, k]`` is zero-padded to whole blocks (``nbr = ceil(n/BM)`` block rows); its kept blocks
    follow the previous layer's in ``values``/``col_idx``, and its ``row_ptr`` (``nbr + 1`` entries,
    already offset by the blocks before it) follows the previous layer's at ``row_ptr_offsets[l]``.
    Per-output vectors of the whole field are packed at ``vector_offsets[l]`` (``nbr * BM`` apart).
    """

    block: tuple[int, int]
    shapes: tuple[tuple[int, int], ...]
    block_rows: tuple[int, ...]
    row_ptr_offsets: tuple[int, ...]
    vector_offsets: tuple[int, ...]
    nnzb: tuple[int, ...]
    row_ptr: torch.Tensor  # int32
    col_idx: torch.Tensor  # int32, at least one entry (a kernel needs a valid pointer)
    values: torch.Tensor   # [max(nnz, 1), BM, BK]
    vector_len: int
    max_width: int         # the widest padded layer side (the fused kernel's scratch row)


def stack_field(weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None] | None, block) -> FieldLayout:
    """Pack dense ``[n_l, k_l]`` weights (zeros outside kept blocks) into a :class:`FieldLayout`.

    ``masks[l]`` (optional) marks the kept entries; without it every block holding a nonzero is kept.
    Blocks are kept whole (a kept entry keeps its block; zeros inside it are stored).
    """
    bm, bk = as_block(block)
    if not weights:
        raise ValueError("need at least one layer")
    dev = weights[0].device
    rp, cols, vals = [], [], []
    shapes, nbrs, rp_offs, vec_offs, nnzbs = [], [], [], [], []
    nnz = rp_off = vec_off = hmax = 0
    for i, w in enumerate(weights):
        n, k = (int(s) for s in w.shape)
        nbr, nbc = -(-n // bm), -(-k // bk)
        hmax = max(hmax, nbr * bm, nbc * bk)
        wp = _pad_to(w.detach(), nbr * bm, nbc * bk)
        m = None if masks is None else masks[i]
        keep = wp if m is None else _pad_to(m.to(wp.dtype), nbr * bm, nbc * bk)
        sw = BlockSparseWeight.from_dense(wp, block_grid(keep, (bm, bk)), (bm, bk))
        vals.append(sw.values)
        rp.append(sw.row_ptr + nnz)
        cols.append(sw.col_idx)
        shapes.append((n, k))
        nbrs.append(nbr)
        rp_offs.append(rp_off)
        vec_offs.append(vec_off)
        nnzbs.append(sw.nnzb)
        nnz += sw.nnzb
        rp_off += nbr + 1
        vec_off += nbr * bm
    i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    return FieldLayout(
        (bm, bk), tuple(shapes), tuple(nbrs), tuple(rp_offs), tuple(vec_offs), tuple(nnzbs),
        i32(torch.cat(rp)), i32(torch.cat(cols)) if nnz else torch.zeros(1, dtype=torch.int32, device=dev),
        torch.cat(vals).contiguous() if nnz else weights[0].new_zeros(1, bm, bk), vec_off, hmax)


def _pad_to(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if tuple(w.shape) == (rows, cols):
        return w
    out = w.new_zeros(rows, cols)
    out[: w.shape[0], : w.shape[1]] = w
    return out
