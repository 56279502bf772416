"""Masks on a plain ``nn.Linear``: the two formats a user field can carry, read and written in one place.

- **jf** (what ``jf.prune`` writes on a user field by default): the weight is zeroed where pruned and
  the bool buffer ``weight_mask`` records the mask; ``CNF.apply_masks_`` (called by ``jf.train`` after
  every step) re-zeroes it, so the layer's own ``forward`` needs no hook.
- **torch** (``torch.nn.utils.prune``, or ``jf.prune(..., as_torch_prune=True)``): the Parameter
  ``weight_orig``, the buffer ``weight_mask`` and a forward pre-hook that sets ``weight = orig * mask``.

``jf.prune`` and ``jf.remove_pruning`` (prune/), ``CNF.prunable_parameters`` (cnf/) and ``jf.sparsify``
(sparse/) all go through these functions, so the formats are defined once. Only the ``"weight"`` of
a layer is considered (the one parameter ``jf.prune`` prunes).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

__all__ = ["torch_pruned", "get_mask", "set_mask", "unprune", "bake", "trainable_weight"]


def _hook_key(lin: nn.Module):
    for key, hook in lin._forward_pre_hooks.items():
        if isinstance(hook, torch_prune.BasePruningMethod) and getattr(hook, "_tensor_name", None) == "weight":
            return key
    return None


def torch_pruned(lin: nn.Module) -> bool:
    """True when ``lin.weight`` is pruned in ``torch.nn.utils.prune``'s format."""
    return "weight_orig" in lin._parameters and "weight_mask" in lin._buffers


def get_mask(lin: nn.Module) -> tuple[torch.Tensor | None, str | None]:
    """``(bool mask, format)`` with format ``"torch.nn.utils.prune"`` or ``"jf.prune"``; ``(None, None)``."""
    m = lin._buffers.get("weight_mask")
    if m is None:
        return None, None
    return m != 0, ("torch.nn.utils.prune" if torch_pruned(lin) else "jf.prune")


def trainable_weight(lin: nn.Module) -> nn.Parameter:
    """The Parameter an optimizer updates: ``weight_orig`` under torch's format, else ``weight``."""
    return lin._parameters["weight_orig"] if torch_pruned(lin) else lin._parameters["weight"]


def set_mask(lin: nn.Linear, mask: torch.Tensor, torch_format: bool = False) -> None:
    """Attach ``mask`` (bool, the weight's shape). A layer already in torch's format keeps it (its mask
    is replaced); otherwise ``torch_format`` chooses. The jf format zeroes the pruned weights."""
    w = trainable_weight(lin)
    if tuple(mask.shape) != tuple(w.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not fit weight shape {tuple(w.shape)}")
    mask = mask.to(device=w.device, dtype=torch.bool)
    if torch_pruned(lin):
        with torch.no_grad():
            lin.weight_mask.copy_(mask.to(lin.weight_mask.dtype))
        lin.weight = w * lin.weight_mask  # what the hook computes; fresh until the next forward
        return
    if torch_format:
        # custom_from_mask stores the mask in the weight's dtype (torch's own convention).
        torch_prune.custom_from_mask(lin, "weight", mask)
        return
    lin.register_buffer("weight_mask", mask.clone())
    with torch.no_grad():
        lin.weight.mul_(lin.weight_mask)


def unprune(lin: nn.Module) -> None:
    """Drop the mask of either format, restoring the trainable Parameter as ``weight`` (the same
    object, values untouched: nothing is baked)."""
    if torch_pruned(lin):
        orig = lin._parameters.pop("weight_orig")
        del lin._buffers["weight_mask"]
        key = _hook_key(lin)
        if key is not None:
            del lin._forward_pre_hooks[key]
        if "weight" in lin.__dict__:
            del lin.__dict__["weight"]
        lin.register_parameter("weight", orig)
    elif "weight_mask" in lin._buffers:
        del lin._buffers["weight_mask"]


def bake(lin: nn.Module) -> None:
    """Zero the pruned weights for good and drop the mask (either format); ``weight`` stays the same
    Parameter object as the trainable one, so an optimizer holding it keeps working."""
    mask, _ = get_mask(lin)
    if mask is None:
        return
    with torch.no_grad():
        trainable_weight(lin).mul_(mask)
    unprune(lin)
