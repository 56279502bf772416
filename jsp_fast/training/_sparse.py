"""Sparse training and sparse checkpoints: what ``jf.train(..., sparse=True)`` and ``jf.save``/``jf.load``
of a block-sparse CNF need (a CNF whose field is a ``SparseODEnet``).

``jf.train(model, ..., sparse=True)`` trains a **sparse copy** of the pruned ``model``
(``training_copy``: ``jf.sparsify(model)``; block-aligned masked layers hold only their kept blocks, the
others stay dense and are reported in a warning). Every training step (the solve, the trace, the RNODE
terms and the backward, double backward through the trace included) runs the block-sparse per-layer ops;
the no-grad evaluations (``R``, validation NLL) run the fused field. The optimizer holds state for the
kept blocks only. The caller's ``model`` is not touched during the run: ``write_back`` copies the
trained values into it when the run ends (also when it is interrupted), so after ``train`` returns the
masked dense model holds what the sparse copy learned, with the same masks. The checkpoints such a run
writes are sparse checkpoints (below); resuming needs ``sparse=True`` again.

A sparse checkpoint is an ordinary checkpoint directory whose ``config.json`` model entry has a
``"sparse"`` key (``layout``: per layer ``{"kind": "sparse", "block": [bm, bk]}`` or ``{"kind": "dense",
"reason": ...}``, plus the backend) and whose ``model.safetensors`` is the sparse CNF's state dict: per
block-sparse layer ``values`` [nnzb, bm, bk] (the kept blocks), ``block_rows``/``block_cols`` (their grid
coordinates), the bias and the hyper-layers; a dense layer as ``layer.*`` (with its ``weight_mask``).
``from_config`` rebuilds the skeleton that state dict loads into, so ``jf.load`` of a sparse checkpoint
gives back a sparse model. ``to_dense`` converts a sparse CNF back to the masked dense one
(``jf.sparsify`` goes the other way).

Imports ``cnf`` and ``sparse`` only (``checkpoint`` and ``loop`` import this module).
"""
from __future__ import annotations

import sys
import warnings

import torch
from torch import nn

from ..cnf import CNF, ODEnet

# The compute layer (jsp_fast.sparse) loads the compiled core: it is imported where a sparse model is
# built, not with this module (checkpoint imports it, and `jsp-fast train --help` must stay light).

__all__ = ["is_sparse", "training_copy", "write_back", "to_dense", "layer_masks", "layout", "is_sparse_config",
           "from_config", "mismatch"]



def is_sparse(model: nn.Module) -> bool:
    """True for a CNF whose field is a ``SparseODEnet`` (none exists before jsp_fast.sparse is imported)."""
    sparse = sys.modules.get("jsp_fast.sparse")
    return sparse is not None and isinstance(getattr(model, "net", None), sparse.SparseODEnet)


def _same_config(model: CNF, net: nn.Module) -> CNF:
    """A CNF with ``model``'s configuration (and end time) around ``net``."""
    return model.with_net(net)


def to_dense(model: CNF) -> CNF:
    """The masked dense CNF with the same function as the sparse ``model`` (a new model; a dense one is
    returned as is)."""
    if not is_sparse(model):
        return model
    return _same_config(model, model.net.to_odenet())


def training_copy(model: nn.Module, saved: nn.Module | None = None, backend: str = "auto") -> CNF:
    """The sparse CNF ``jf.train(sparse=True)`` trains in place of ``model``.

    ``saved``: the model of the checkpoint the run resumes from (its structure wins: the caller's model may
    not be pruned yet, e.g. the CLI resuming a run). A sparse ``model`` is trained as it is.
    """
    if is_sparse(model):  # trained as it is (a resume loads the checkpoint into it)
        return model
    if saved is not None:
        if not is_sparse(saved):
            raise ValueError("the checkpoint to resume from was written by a dense run: resume it with sparse=False "
                             "(--no-sparse), or start over in a new checkpoint directory")
        ref = next(model.parameters())
        return saved.to(device=ref.device, dtype=ref.dtype)  # a load builds float32; the run's dtype wins
    if not isinstance(model, CNF) or not isinstance(model.net, ODEnet):
        raise TypeError(f"sparse=True trains a jf.CNF whose field is a jsp_fast ODEnet, got {type(model).__name__}"
                        + (f" with a {type(model.net).__name__} field" if isinstance(model, CNF) else ""))
    from ..sparse import sparsify  # noqa: PLC0415

    out = sparsify(model, backend=backend)
    net = out.net
    if not net.sparse_layers:
        reasons = "; ".join(f"layer {i}: {r}" for i, r in net.dense_layers.items())
        raise ValueError("sparse=True needs a block-pruned model (jf.prune(..., granularity='block')), but no "
                         f"layer of the field can be block-sparse ({reasons}); train with sparse=False (--no-sparse)")
    if net.dense_layers:
        warnings.warn("sparse training: these field layers stay dense: "
                      + "; ".join(f"layer {i}: {r}" for i, r in net.dense_layers.items()), stacklevel=3)
    return out


@torch.no_grad()
def write_back(sparse_model: CNF, model: nn.Module) -> None:
    """Copy the trained ``sparse_model`` into the masked dense ``model`` in place (parameters and masks)."""
    if sparse_model is model:
        return
    dense = to_dense(sparse_model)
    for dst, src in zip(model.net.layers, dense.net.layers):
        dst.set_mask(src.mask)
    model.load_state_dict(dense.state_dict())


def layer_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{layer name: bool mask [out, in]}`` of a dense or block-sparse CNF, named as in the masked dense
    model: masked layers' ``weight_mask``, block-sparse layers' kept blocks, and a layer a sparse model
    kept dense (``DenseConcatSquash.layer``) under its dense name. Resume compares these; the CLI copies
    them from a checkpoint into the model it resumes."""
    out = {}
    for name, m in model.named_modules():
        mask = getattr(m, "mask", None)
        if callable(mask) and hasattr(m, "block_rows"):  # a block-sparse layer: the mask of its kept blocks
            mask = mask()
        elif not hasattr(m, "set_mask"):
            continue
        elif name.endswith(".layer"):  # DenseConcatSquash wraps the dense layer as `.layer`
            name = name[: -len(".layer")]
        if mask is not None:
            out[name] = mask.detach().cpu()
    return out


# -- checkpoints -------------------------------------------------------------------------------------
def layout(net) -> dict:
    """What a sparse checkpoint records beside the state dict to rebuild ``net``'s structure."""
    layers = []
    for i, layer in enumerate(net.layers):
        if hasattr(layer, "block_rows"):  # a BlockSparseConcatSquash
            layers.append({"kind": "sparse", "block": [int(b) for b in layer.block]})
        else:
            layers.append({"kind": "dense", "reason": net.dense_layers.get(i, "")})
    return {"layers": layers, "backend": net.backend}


def is_sparse_config(cfg_model: dict) -> bool:
    return isinstance(cfg_model, dict) and "sparse" in cfg_model


def mismatch(model: nn.Module, cfg_model: dict) -> str | None:
    """Why the checkpoint with model config ``cfg_model`` cannot load into ``model`` (sparse vs dense)."""
    if is_sparse_config(cfg_model) and not is_sparse(model):
        return ("holds a block-sparse model but the model given is dense: load it with jf.load(path) (or resume "
                "with sparse=True)")
    if not is_sparse_config(cfg_model) and is_sparse(model):
        return "holds a dense model but the model given is block-sparse (resume with sparse=False)"
    return None


def from_config(cfg_model: dict, state: dict[str, torch.Tensor]) -> CNF:
    """The skeleton of a saved sparse CNF (the right layers, kept-block counts and masks), ready for
    ``load_state_dict(state)``. Raises ValueError/KeyError when ``cfg_model`` and ``state`` disagree."""
    from ..sparse import SparseODEnet, registry  # noqa: PLC0415
    from ..sparse._field import BlockSparseConcatSquash, DenseConcatSquash  # noqa: PLC0415

    spec = cfg_model["sparse"]
    dense = CNF.from_config(cfg_model)
    layers, dense_layers = [], {}
    specs = spec["layers"]
    if len(specs) != len(dense.net.layers):
        raise ValueError(f"the sparse layout lists {len(specs)} layers, the config builds {len(dense.net.layers)}")
    for i, (layer, s) in enumerate(zip(dense.net.layers, specs)):
        if s.get("kind") == "sparse":
            bm, bk = (int(b) for b in s["block"])
            n, k = layer.linear.weight.shape
            grid = torch.zeros(n // bm, k // bk, dtype=torch.bool)
            grid[state[f"net.layers.{i}.block_rows"].long(), state[f"net.layers.{i}.block_cols"].long()] = True
            layer.set_mask(grid.repeat_interleave(bm, 0).repeat_interleave(bk, 1))
            layers.append(BlockSparseConcatSquash(layer, (bm, bk)))
        elif s.get("kind") == "dense":
            m = state.get(f"net.layers.{i}.layer.weight_mask")
            layer.set_mask(None if m is None else m.to(torch.bool))
            layers.append(DenseConcatSquash(layer))
            dense_layers[i] = str(s.get("reason", ""))
        else:
            raise ValueError(f"layer {i} of the sparse layout has kind {s.get('kind')!r}, expected 'sparse' or 'dense'")
    backend = spec.get("backend", "auto")
    try:
        backend = registry.check_name(backend)
    except ValueError:  # saved where another backend was available (e.g. "triton" on a GPU machine)
        backend = "auto"
    net = SparseODEnet(layers, dense.net.activation, backend, dense_layers)
    return _same_config(dense, net)
