"""jsp_fast.sparse.plan: BlockSparseWeight (construction from masks, tables, moves, saving), block shapes
and masks, the int32 view, the stacked field layout; BlockSparseLinear as a module."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import jsp_fast as jf
from jsp_fast.sparse import BlockSparseLinear, BlockSparseWeight
from jsp_fast.sparse.plan import (as_block, block_grid, blocks_to_dense, infer_block, is_block_aligned,
                                  stack_field)


def _grid(nbr, nbc, p, gen):
    g = torch.rand(nbr, nbc, generator=gen) < p
    g[0, 0] = True
    return g


def _expand(grid, block):
    return grid.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)


@pytest.mark.parametrize("block", [(32, 32), (16, 8), (3, 5)])
def test_from_dense_element_mask_roundtrip(block):
    gen = torch.Generator().manual_seed(1)
    n, k = block[0] * 4, block[1] * 6
    W = torch.randn(n, k, generator=gen)
    grid = _grid(4, 6, 0.4, gen)
    grid[2] = False  # an empty block row
    mask = _expand(grid, block)
    w = BlockSparseWeight.from_dense(W, mask, block)
    assert w.nnzb == int(grid.sum())
    assert torch.equal(w.to_dense(), W * mask)
    assert torch.equal(w.block_mask(), grid)
    assert torch.equal(w.mask(), mask)
    assert w.density == pytest.approx(grid.float().mean().item())
    # the grid form gives the same plan
    w2 = BlockSparseWeight.from_dense(W, grid, block)
    assert torch.equal(w2.values, w.values)


def test_tables_are_consistent():
    gen = torch.Generator().manual_seed(2)
    grid = _grid(5, 7, 0.5, gen)
    w = BlockSparseWeight.from_dense(torch.randn(20, 14, generator=gen), grid, (4, 2))
    rows, cols = grid.nonzero(as_tuple=True)
    assert torch.equal(w.block_row, rows) and torch.equal(w.col_idx, cols)
    assert torch.equal(w.row_ptr[1:] - w.row_ptr[:-1], grid.sum(1))
    assert torch.equal(w.col_ptr[1:] - w.col_ptr[:-1], grid.sum(0))
    # column order: each block column's blocks, rows ascending; perm points back into values
    for c in range(7):
        sl = slice(int(w.col_ptr[c]), int(w.col_ptr[c + 1]))
        assert torch.equal(w.col_idx[w.perm[sl]], torch.full_like(w.perm[sl], c))
        assert torch.equal(w.row_idx[sl], grid[:, c].nonzero().flatten())
    assert all(t.dtype == torch.int64 for t in w.tables())


def test_mask_none_keeps_nonzero_blocks():
    W = torch.zeros(8, 8)
    W[5, 6] = 1.5
    w = BlockSparseWeight.from_dense(W, None, (4, 4))
    assert w.nnzb == 1 and torch.equal(w.to_dense(), W)


def test_all_dense_and_empty():
    W = torch.randn(8, 12)
    w = BlockSparseWeight.from_dense(W, torch.ones(8, 12, dtype=torch.bool), (4, 4))
    assert w.nnzb == 6 and torch.equal(w.to_dense(), W)
    e = BlockSparseWeight.from_dense(W, torch.zeros(2, 3, dtype=torch.bool), (4, 4))
    assert e.nnzb == 0 and torch.equal(e.to_dense(), torch.zeros(8, 12))


def test_unaligned_mask_is_a_clear_error():
    mask = torch.ones(8, 8, dtype=torch.bool)
    mask[0, 0] = False
    with pytest.raises(ValueError, match="not block-aligned.*1 of 4 blocks"):
        BlockSparseWeight.from_dense(torch.randn(8, 8), mask, (4, 4))


def test_wrong_mask_shape_and_indivisible_dims():
    with pytest.raises(ValueError, match="mask has shape"):
        BlockSparseWeight.from_dense(torch.randn(8, 8), torch.ones(8, 4, dtype=torch.bool), (4, 4))
    with pytest.raises(ValueError, match="not a multiple of the block"):
        BlockSparseWeight.from_dense(torch.randn(10, 8), None, (4, 4))
    with pytest.raises(ValueError, match="block dims must be positive"):
        BlockSparseWeight.from_dense(torch.randn(8, 8), None, (0, 4))
    with pytest.raises(ValueError, match="2-d"):
        BlockSparseWeight.from_dense(torch.randn(8), None, 4)


def test_from_blocks_sorts_and_keeps_parameters():
    gen = torch.Generator().manual_seed(3)
    vals = nn.Parameter(torch.randn(3, 2, 4, generator=gen))
    w = BlockSparseWeight.from_blocks(vals, torch.tensor([0, 1, 1]), torch.tensor([2, 0, 1]), (4, 12))
    assert w.values is vals  # already sorted: no copy, gradients reach the Parameter
    w2 = BlockSparseWeight.from_blocks(vals, torch.tensor([1, 0, 1]), torch.tensor([1, 2, 0]), (4, 12))
    d = w2.to_dense()
    assert torch.equal(d[2:4, 4:8], vals[0].detach()) and torch.equal(d[0:2, 8:12], vals[1].detach())
    d.sum().backward()
    assert torch.equal(vals.grad, torch.ones_like(vals))
    with pytest.raises(ValueError, match="duplicate"):
        BlockSparseWeight.from_blocks(vals, torch.tensor([0, 0, 1]), torch.tensor([1, 1, 0]), (4, 12))
    with pytest.raises(ValueError, match="out of range"):
        BlockSparseWeight.from_blocks(vals, torch.tensor([0, 0, 2]), torch.tensor([1, 0, 0]), (4, 12))


def test_moves_and_dtype():
    w = BlockSparseWeight.from_dense(torch.randn(8, 8), None, 4)
    d = w.double()
    assert d.dtype == torch.float64 and d.row_ptr.dtype == torch.int64
    assert torch.equal(d.to_dense(), w.to_dense().double())
    m = w.to("meta")
    assert m.device.type == "meta" and m.col_ptr.device.type == "meta"


def test_save_load_roundtrip(tmp_path):
    gen = torch.Generator().manual_seed(4)
    W = torch.randn(12, 16, generator=gen, dtype=torch.float64)
    w = BlockSparseWeight.from_dense(W, _grid(3, 4, 0.5, gen), (4, 4))
    w.save(tmp_path / "w.safetensors")
    r = BlockSparseWeight.load(tmp_path / "w.safetensors")
    assert r.shape == w.shape and r.block == w.block and r.dtype == torch.float64
    assert torch.equal(r.to_dense(), w.to_dense())
    assert all(torch.equal(a, b) for a, b in zip(r.tables(), w.tables()))
    tensors, meta = w.to_tensors(prefix="layer0.")
    r2 = BlockSparseWeight.from_tensors(tensors, meta, prefix="layer0.")
    assert torch.equal(r2.values, w.values)
    with pytest.raises(ValueError, match="no block-sparse metadata"):
        BlockSparseWeight.from_tensors(tensors, {}, prefix="layer0.")


def test_linear_module_matches_masked_linear_and_trains():
    gen = torch.Generator().manual_seed(5)
    lin = nn.Linear(64, 32)
    grid = _grid(2, 4, 0.5, gen)
    mask = _expand(grid, (16, 16))
    layer = BlockSparseLinear.from_linear(lin, mask, block=(16, 16), activation="tanh")
    x = torch.randn(9, 64, generator=gen)
    ref = torch.tanh(nn.functional.linear(x, lin.weight * mask, lin.bias))
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    before = layer.values.detach().clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).square().sum().backward()
    assert layer.values.grad is not None and layer.bias.grad is not None
    opt.step()
    assert not torch.equal(layer.values, before)
    assert torch.equal(layer.weight.to_dense() != 0, (layer.weight.to_dense() != 0) & mask)
    dense = layer.to_linear()
    torch.testing.assert_close(torch.tanh(dense(x)), layer(x), rtol=1e-5, atol=1e-5)


def test_linear_module_state_dict_and_moves():
    lin = nn.Linear(16, 16)
    layer = BlockSparseLinear.from_linear(lin, torch.eye(4, dtype=torch.bool), block=4)
    sd = layer.state_dict()
    assert set(sd) == {"values", "bias", "block_rows", "block_cols"}
    other = BlockSparseLinear(16, 16, torch.arange(4), torch.arange(4), block=4)
    other.load_state_dict(sd)
    x = torch.randn(3, 16)
    torch.testing.assert_close(other(x), layer(x))
    d = layer.double()
    assert d.values.dtype == torch.float64 and d.weight.row_ptr.dtype == torch.int64
    assert d(x.double()).dtype == torch.float64
    assert "density=0.250" in repr(layer)


def test_public_names():
    assert jf.sparse.BlockSparseWeight is BlockSparseWeight
    assert callable(jf.ops.bsr_linear) and callable(jf.ops.bsr_linear_jvp)
    names = jf.backends.available()
    assert isinstance(names, tuple) and "torch" in names
    assert "cpu" in names  # the compiled module is built in this tree


# ---- block shapes, masks, the int32 view and the stacked field layout (jsp_fast.sparse.plan) ----------
def test_as_block_accepts_ints_and_pairs():
    import numpy as np

    assert as_block(8) == (8, 8)
    assert as_block((16, 32)) == (16, 32)
    assert as_block([4, 2]) == (4, 2)
    assert as_block(np.int64(16)) == (16, 16)
    assert as_block(torch.tensor([8, 4])) == (8, 4)


@pytest.mark.parametrize("bad,err,msg", [
    (0, ValueError, "positive"), ((8, -1), ValueError, "positive"), ((8,), ValueError, "got 1 values"),
    ((8, 8, 8), ValueError, "got 3 values"), (2.5, TypeError, "int or a pair"), ("8", TypeError, "int or a pair"),
    (None, TypeError, "int or a pair"), (True, TypeError, "int or a pair"), ((8, 2.0), TypeError, "int or a pair"),
])
def test_as_block_errors(bad, err, msg):
    with pytest.raises(err, match=msg):
        as_block(bad)


def test_block_alignment_and_inference():
    gen = torch.Generator().manual_seed(3)
    g = torch.rand(4, 6, generator=gen) < 0.5
    g[0, 0], g[0, 1] = True, False
    mask = g.repeat_interleave(16, 0).repeat_interleave(8, 1)  # 64 x 48 of 16x8 blocks
    assert is_block_aligned(mask, (16, 8)) and is_block_aligned(mask, 8)
    assert not is_block_aligned(mask, (16, 16)) and not is_block_aligned(mask, (32, 8))
    assert infer_block(mask) == (8, 8)  # the largest candidate the mask is built of
    assert torch.equal(block_grid(mask, (16, 8)), g)
    m2 = mask.clone()
    m2[0, 0] = False  # a partially kept block: not aligned to any candidate
    assert infer_block(m2) is None
    with pytest.raises(ValueError, match="not a multiple of the block"):
        block_grid(mask, (7, 8))


def test_int32_view_matches_tables():
    gen = torch.Generator().manual_seed(5)
    w = BlockSparseWeight.from_dense(torch.randn(48, 32, generator=gen), _grid(3, 4, 0.5, gen), (16, 8))
    t = w.int32()
    assert t is w.int32()  # made once
    assert t[:4] == (48, 32, 16, 8)
    for a, b in zip(t[4:], w.tables()):
        assert a.dtype == torch.int32 and torch.equal(a.long(), b)


def test_stack_field_layout():
    gen = torch.Generator().manual_seed(4)
    masks = [None, (torch.rand(40, 24, generator=gen) < 0.3), None]
    weights = [torch.randn(24, 3, generator=gen, dtype=torch.float64),
               torch.randn(40, 24, generator=gen, dtype=torch.float64) * masks[1],
               torch.zeros(3, 40, dtype=torch.float64)]
    weights[2][1, 5] = 1.0  # one nonzero: one kept block in the last layer
    L = stack_field(weights, masks, 16)
    assert L.block == (16, 16) and L.shapes == ((24, 3), (40, 24), (3, 40))
    assert L.block_rows == (2, 3, 1) and L.row_ptr_offsets == (0, 3, 7) and L.vector_offsets == (0, 32, 80)
    assert L.vector_len == 96 and L.max_width == 48 and L.nnzb[2] == 1
    assert L.row_ptr.dtype == torch.int32 and L.col_idx.dtype == torch.int32
    # every layer rebuilt from the stacked tables gives back its (padded) weight
    start = 0
    for (n, k), nbr, off, nnzb, w in zip(L.shapes, L.block_rows, L.row_ptr_offsets, L.nnzb, weights):
        rp = L.row_ptr[off: off + nbr + 1].long() - start
        rows = torch.repeat_interleave(torch.arange(nbr), rp[1:] - rp[:-1])
        dense = blocks_to_dense(L.values[start: start + nnzb], rows, L.col_idx[start: start + nnzb].long(),
                                (nbr * 16, -(-k // 16) * 16))
        torch.testing.assert_close(dense[:n, :k], w, rtol=0, atol=0)
        start += nnzb
