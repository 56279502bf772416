"""BlockSparseWeight: construction from masks, tables, moves, saving; BlockSparseLinear as a module."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import jsp_fast as jf
from jsp_fast.sparse import BlockSparseLinear, BlockSparseWeight


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
