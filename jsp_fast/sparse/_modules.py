"""``BlockSparseLinear``: an ``nn.Linear`` replacement that stores and trains only the kept blocks."""
from __future__ import annotations

import torch
from torch import nn

from ._format import BlockSparseWeight, _pair, build_tables
from ._ops import _act_name, bsr_linear


class BlockSparseLinear(nn.Module):
    """``y = act(x Wᵀ + b)`` with a block-sparse ``W``.

    Parameters: ``values`` ``[nnzb, bm, bk]`` (the kept blocks, trainable) and ``bias`` ``[n]`` (or
    None). Buffers: ``block_rows``/``block_cols`` (saved in the state dict) and the derived look-up
    tables (not saved; rebuilt on load). ``.to()``/``.double()``/``.cuda()`` move everything.
    """

    def __init__(self, in_features: int, out_features: int, block_rows: torch.Tensor, block_cols: torch.Tensor,
                 block=(32, 32), bias: bool = True, activation: str | None = None, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        bm, bk = _pair(block)
        self.in_features, self.out_features, self.block = int(in_features), int(out_features), (bm, bk)
        self.activation = _act_name(activation)
        self.backend = backend
        proto = BlockSparseWeight.from_blocks(
            torch.zeros(len(block_rows), bm, bk, device=device, dtype=dtype or torch.get_default_dtype()),
            block_rows, block_cols, (out_features, in_features))
        self.values = nn.Parameter(proto.values)
        nn.init.kaiming_uniform_(self.values.view(-1, bk), a=5 ** 0.5)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=self.values.dtype)) if bias else None
        self.register_buffer("block_rows", proto.block_row.clone())
        self.register_buffer("block_cols", proto.col_idx.clone())
        self._rebuild_tables()
        self.register_load_state_dict_post_hook(lambda module, keys: module._rebuild_tables())

    def _rebuild_tables(self) -> None:
        bm, bk = self.block
        t = build_tables(self.block_rows, self.block_cols, self.out_features // bm, self.in_features // bk)
        for name, v in zip(("row_ptr", "_col_idx", "_block_row", "col_ptr", "row_idx", "perm"), t):
            self.register_buffer(name, v, persistent=False)

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

    @property
    def weight(self) -> BlockSparseWeight:
        """The plan over the live ``values`` Parameter (no copy; gradients reach ``values``)."""
        return BlockSparseWeight(self.values, (self.out_features, self.in_features), self.block, self.row_ptr,
                                 self._col_idx, self._block_row, self.col_ptr, self.row_idx, self.perm)

    @property
    def density(self) -> float:
        return self.weight.density

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bsr_linear(x, self.weight, None, self.bias, self.activation, backend=self.backend)

    def to_linear(self) -> nn.Linear:
        """A dense ``nn.Linear`` with the same function (zeros outside kept blocks)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight.to_dense())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return (f"{self.in_features} -> {self.out_features}, block={self.block}, nnzb={self.values.shape[0]}, "
                f"density={self.density:.3f}, bias={self.bias is not None}, activation={self.activation!r}, "
                f"backend={self.backend!r}")
