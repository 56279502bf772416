"""``jf.sparsify(model)``: a drop-in CNF whose pruned field layers run the block-sparse kernels."""
from __future__ import annotations

import torch

from ..cnf import CNF
from ..cnf._layers import ODEnet
from . import registry
from ._field import SparseODEnet

__all__ = ["sparsify"]


def sparsify(model: CNF, backend: str = "auto", block: tuple[int, int] | int | None = None,
             fused: bool | str = True) -> CNF:
    """Return a copy of ``model`` (same configuration) whose field is a ``SparseODEnet``.

    Layers with a block-aligned ``weight_mask`` become block-sparse (only the kept blocks are stored and
    trained); the others stay dense and are listed in ``result.net.dense_layers`` with the reason.
    ``block`` is the block shape the masks were built with (``jf.prune(..., block=...)``); by default
    it is recovered from each mask. ``backend``: ``"auto"`` or one of ``jf.backends.available()``.
    ``fused=False`` disables the one-call fused field for inference; ``fused="cpu"|"cuda"|"triton"``
    forces that fused field (an error where it cannot run); the per-layer ops are always used when
    gradients are needed. The original model is not modified.
    """
    if not isinstance(model, CNF):
        raise TypeError(f"sparsify expects a jsp_fast.CNF, got {type(model).__name__}; "
                        "for a bare field use jsp_fast.sparse.SparseODEnet.from_odenet(net)")
    backend = registry.check_name(backend)
    net = model.net
    if isinstance(net, SparseODEnet):
        net = net.to_odenet()
    if not isinstance(net, ODEnet):
        raise TypeError(f"sparsify needs a CNF whose field is a jsp_fast ODEnet, got {type(net).__name__}")
    snet = SparseODEnet.from_odenet(net, backend=backend, block=block, fused=fused)
    cfg = model.config()
    keys = ("dim", "trace", "noise", "solver", "rtol", "atol", "adjoint", "train_T", "options")
    out = CNF(**{k: cfg[k] for k in keys}, T=1.0, net=snet)
    ref = model.sqrt_T
    out.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        out.sqrt_T.copy_(ref)
    out.train(model.training)
    return out
