"""``jf.sparsify(module)``: a drop-in copy whose pruned layers run the block-sparse kernels."""
from __future__ import annotations

import torch
from torch import nn

from ..cnf import CNF
from . import registry
from ._convert import SparsifyReport, convert_module
from ._field import SparseODEnet, _check_fused

__all__ = ["sparsify", "SparsifyReport"]


def sparsify(module: nn.Module, masks: dict[str, torch.Tensor] | None = None, block=None, backend: str = "auto",
             fused: bool | str = True) -> nn.Module:
    """A copy of ``module`` with the same forward whose pruned layers run block-sparse.

    ``module``: a ``jf.CNF`` (the result is a ``jf.CNF`` with the same configuration) or any
    ``nn.Module``: a torchdiffeq right-hand side ``f(t, z)``, another library's CNF or field, a plain
    MLP. The copy carries ``result.sparsify_report`` (a ``SparsifyReport``: per linear layer what it
    became, its block and density, where its mask came from, and for the ones left dense, why).

    Masks are taken from ``jf.prune`` (``weight_mask`` buffers), from ``torch.nn.utils.prune``
    (``weight_orig``/``weight_mask``; the copy keeps no pruning hook) and from ``masks``
    (``{qualified nn.Linear name (or name + ".weight"): bool tensor of the weight's shape}``; combined
    with a mask the layer already has). Converted: concatsquash fields (onto ``SparseODEnet``, one
    fused call per evaluation), concatsquash layers of other code bases (FFJORD's ``_layer``,
    ``_hyper_gate``, ``_hyper_bias``; gate and shift fused), ``nn.Linear`` layers (the activation module
    after one in an ``nn.Sequential`` fused; SiLU applied after the kernel), and ``Linear(d + 1, h)`` on
    ``cat([z, t])`` (the blocks sparse, the time column dense). Masks that are not block-aligned stay
    dense (masked) and are reported.

    ``block``: the block the masks were built with (an int or a pair); by default recovered from each
    mask. Forced, a mask that is not aligned to it is a ValueError (layers smaller than the block stay
    dense). ``backend``: ``"auto"`` or one of ``jf.backends.available()``. ``fused``: for concatsquash
    fields, False disables the one-call fused field for inference; "cpu"|"cuda"|"triton" forces it.
    The original module is not modified.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"sparsify expects an nn.Module (a jf.CNF, a torchdiffeq field, any model), "
                        f"got {type(module).__name__}")
    if isinstance(masks, str):
        raise TypeError(f"masks must be a dict {{layer name: bool tensor}}, got the string {masks!r} "
                        f"(the backend is the keyword backend=)")
    backend = registry.check_name(backend)
    fused = _check_fused(fused)
    if isinstance(module, CNF):
        return _sparsify_cnf(module, masks, block, backend, fused)
    out, report = convert_module(module, masks, block, backend, fused)
    out.sparsify_report = report
    return out


def _sparsify_cnf(model: CNF, masks, block, backend, fused) -> CNF:
    net = model.net
    if isinstance(net, SparseODEnet):
        net = net.to_odenet()  # converts again through its dense equivalent (same layer names)
    inner = {k[len("net."):]: v for k, v in (masks or {}).items() if k.startswith("net.")}
    if masks and len(inner) != len(masks):
        bad = [k for k in masks if not k.startswith("net.")]
        raise ValueError(f"masks of a CNF are named from the CNF (the field is 'net'): got {bad}")
    snet, report = convert_module(net, inner, block, backend, fused)
    for r in report.layers:
        r.name = f"net.{r.name}" if r.name else "net"
    out = model.with_net(snet)
    out.sparsify_report = report
    return out
