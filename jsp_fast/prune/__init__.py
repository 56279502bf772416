"""Pruning at initialization: ``jf.prune(model, method, sparsity, data)`` and ``jf.remove_pruning``.

``prune`` scores the selected prunable field weights (``model.prunable_parameters()``, all of them by
default; see ``layers=``), builds bool masks (see ``_masks`` for granularity, scope, the global
per-layer floor and the exact count) and applies them in place as each layer's ``weight_mask``
buffer. ``prune.METHODS`` lists the scores.

Where a mask lives: a concatsquash layer of ``jf.cnf.ODEnet`` holds it (``set_mask``); a plain
``nn.Linear`` of a user field holds it in one of the two formats of ``jsp_fast._linear_mask`` (jf's
zeroed weight + ``weight_mask`` buffer, or with ``as_torch_prune=True`` ``torch.nn.utils.prune``'s
``weight_orig``/``weight_mask`` + forward pre-hook).
"""
from __future__ import annotations

import contextlib
import fnmatch
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .._blocks import as_block
from .._device import check_device
from .. import _linear_mask
from . import _scores
from ._masks import FALLBACKS, GRANULARITIES, SCOPES, build_masks, plan_layers

METHODS = ("jsp", "random", "magnitude", "snip", "grasp", "synflow")
LAYER_CHOICES = ("all", "hidden")

__all__ = ["FALLBACKS", "GRANULARITIES", "LAYER_CHOICES", "METHODS", "SCOPES", "PruneResult", "prune",
           "remove_pruning"]


@dataclass
class PruneResult:
    """What ``prune`` did. ``masks`` are already applied to the model.

    ``masks``, ``density``, ``scores``, ``kept`` and ``total`` cover the selected layers only
    (``layers``, the parameter names ``sparsity`` applied to); ``excluded`` names the prunable
    parameters that were left untouched (dense unless pruned before). ``fallback`` names the layers
    that could not be cut into blocks and got an unstructured or dense mask instead, with the reason;
    ``info`` holds method diagnostics (e.g. JSP's ``L`` and ``R`` at initialization).
    ``first_layer_inputs`` (int64 ``[in_features]``) counts the kept weights in each input column of
    the field's first layer: a coordinate of the data with few kept weights is nearly cut off.
    """

    method: str
    sparsity: float
    granularity: str
    block: tuple[int, int] | None
    scope: str
    masks: dict[str, torch.Tensor]
    density: dict[str, float]
    scores: dict[str, torch.Tensor]
    fallback: dict[str, str] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    seconds: float = 0.0
    layers: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()
    first_layer_inputs: torch.Tensor | None = None

    @property
    def kept(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))

    @property
    def total(self) -> int:
        return int(sum(m.numel() for m in self.masks.values()))

    @property
    def overall_density(self) -> float:
        return self.kept / max(self.total, 1)

    def __repr__(self) -> str:
        layers = ", ".join(f"{n}: {d:.3f}" for n, d in self.density.items())
        fb = f", fallback={self.fallback}" if self.fallback else ""
        ex = f", excluded={list(self.excluded)}" if self.excluded else ""
        return (f"PruneResult(method={self.method!r}, sparsity={self.sparsity}, granularity={self.granularity!r}, "
                f"scope={self.scope!r}, kept={self.kept}/{self.total} ({self.overall_density:.4f}), "
                f"density={{{layers}}}{fb}{ex})")


def _select_layers(layers, names: list[str]) -> list[str]:
    """The prunable parameter names (in model order) that ``layers`` selects; never empty."""
    def bad(why: str) -> ValueError:
        return ValueError(f"{why}. layers must be one of {LAYER_CHOICES}, a glob over the prunable parameter "
                          f"names (e.g. 'net.layers.1.*'), a list of such names/globs, or a callable "
                          f"name -> bool. Prunable parameters: {names}")

    if isinstance(layers, str) and layers in LAYER_CHOICES:
        chosen = names if layers == "all" else names[1:-1]
        if not chosen:
            raise bad(f"layers='hidden' selects nothing: the field has {len(names)} prunable layer(s), "
                      f"and 'hidden' leaves out the first and the last")
        return chosen
    if callable(layers):
        chosen = [n for n in names if layers(n)]
    elif isinstance(layers, str):
        chosen = [n for n in names if fnmatch.fnmatchcase(n, layers)]
    elif isinstance(layers, (list, tuple)) and layers and all(isinstance(p, str) for p in layers):
        for pat in layers:
            if not any(fnmatch.fnmatchcase(n, pat) for n in names):
                raise bad(f"layers entry {pat!r} matches no prunable parameter")
        chosen = [n for n in names if any(fnmatch.fnmatchcase(n, pat) for pat in layers)]
    else:
        raise bad(f"bad layers={layers!r}")
    if not chosen:
        raise bad(f"layers={layers!r} selects no prunable parameter")
    return chosen


class _LinearOwner:
    """A plain ``nn.Linear`` seen through the ``mask``/``set_mask`` interface of a concatsquash layer."""

    def __init__(self, linear: nn.Linear, torch_format: bool):
        self.linear, self.torch_format = linear, torch_format

    @property
    def mask(self) -> torch.Tensor | None:
        return _linear_mask.get_mask(self.linear)[0]

    def set_mask(self, mask: torch.Tensor | None) -> None:
        if mask is None:
            _linear_mask.unprune(self.linear)
        else:
            _linear_mask.set_mask(self.linear, mask, self.torch_format)


def _owner(model: nn.Module, name: str, as_torch_prune: bool):
    """What holds the mask of the prunable parameter ``name``: the concatsquash layer owning
    ``<layer>.linear.weight`` (it has ``set_mask``), else the ``nn.Linear`` owning ``<linear>.weight``."""
    if name.endswith(".linear.weight"):
        layer = model.get_submodule(name[: -len(".linear.weight")])
        if hasattr(layer, "set_mask"):
            if as_torch_prune:
                raise ValueError(
                    f"as_torch_prune=True needs nn.Linear layers called through their own forward (so "
                    f"torch's pre-hook applies the mask); {name} belongs to a {type(layer).__name__}, which "
                    f"keeps its mask as a weight_mask buffer. Use as_torch_prune=False for this model")
            return layer
    linear = model.get_submodule(name[: -len(".weight")])
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"prunable parameter {name} belongs to a {type(linear).__name__}, not an nn.Linear")
    return _LinearOwner(linear, as_torch_prune)


def _first_layer_inputs(model: nn.Module, first: str) -> torch.Tensor:
    """Kept weights per input column of the prunable parameter ``first`` (after masks are applied)."""
    mask = getattr(_owner(model, first, False), "mask", None)
    w = model.prunable_parameters()[first]
    if mask is None:
        return torch.full((w.shape[1],), w.shape[0], dtype=torch.int64)
    return mask.sum(0).to(device="cpu", dtype=torch.int64)


def _batches(model: nn.Module, data, n_batches: int, batch_size: int | None, seed: int) -> list[torch.Tensor]:
    """Validate ``data`` and cut it into the scoring batches (seeded; whole set when no batch_size)."""
    if hasattr(data, "train") and not isinstance(data, torch.Tensor):
        data = data.train  # a jf.data dataset object
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"data must be a tensor of shape [n, {model.dim}], got {type(data).__name__}")
    if data.dim() != 2 or data.shape[0] == 0:
        raise ValueError(f"data must be a non-empty [n, {model.dim}] tensor, got shape {tuple(data.shape)}")
    if data.shape[1] != model.dim:
        raise ValueError(f"data has dimension {data.shape[1]} but the model has dim={model.dim}")
    ref = next(iter(model.prunable_parameters().values()))
    if not data.is_floating_point():
        raise TypeError(f"data must be floating point, got {data.dtype}")
    check_device(data.device, "data")
    check_device(ref.device, "the model")
    data = data.to(device=ref.device, dtype=ref.dtype)
    if not torch.isfinite(data).all():
        raise ValueError("data contains NaN or inf")
    if batch_size is None:
        return [data]
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    if not isinstance(n_batches, int) or n_batches <= 0:
        raise ValueError(f"n_batches must be a positive int, got {n_batches!r}")
    gen = torch.Generator().manual_seed(int(seed))
    n = data.shape[0]
    idx = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(n_batches * batch_size / n))])
    idx = idx.to(data.device)
    return [data[idx[i * batch_size:(i + 1) * batch_size]] for i in range(n_batches)]


@contextlib.contextmanager
def _scoring_mode(model: nn.Module, seed: int):
    """Seeded RNG (Hutchinson noise) restored afterwards; adjoint off (GraSP needs double backward)."""
    adjoint = getattr(model, "adjoint", False)
    device = next(iter(model.prunable_parameters().values())).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(seed))  # seeds the CUDA generators too
        try:
            if adjoint:
                model.adjoint = False
            yield
        finally:
            if adjoint:
                model.adjoint = adjoint


def prune(model: nn.Module, method: str = "jsp", sparsity: float = 0.9, data=None, *,
          granularity: str = "unstructured", block=(32, 32), scope: str = "global",
          abs_scores: bool = False, n_batches: int = 1, batch_size: int | None = None, seed: int = 0,
          fallback: str = "unstructured", floor: float = 0.1, rounds: int | None = None,
          layers: str | list[str] | tuple[str, ...] | Callable[[str], bool] = "all",
          as_torch_prune: bool = False) -> PruneResult:
    """Prune ``model``'s field weights at initialization, in place; returns a ``PruneResult``.

    Args:
        model: a ``jf.CNF`` (anything with ``prunable_parameters()`` whose owners have ``set_mask``).
        method: one of ``prune.METHODS``; ``jsp``, ``snip`` and ``grasp`` need ``data``.
        sparsity: fraction of the selected weights (see ``layers``) to remove, in [0, 1).
        data: ``[n, dim]`` tensor (or a ``jf.data`` dataset, whose ``.train`` is used).
        granularity: "unstructured" (single weights) or "block" (``block = (rows, cols)`` tiles; a
            block's score is the sum of its weights').
        scope: "global" (one ranking over all layers, with a per-layer floor of
            ``max(1, ceil(floor · (1 - sparsity) · units))`` units) or "layer" (each layer keeps
            ``1 - sparsity`` of its own weights).
        abs_scores: rank by ``|score|`` (JSP and GraSP scores are signed).
        n_batches, batch_size: score on ``n_batches`` seeded random batches of ``batch_size`` and
            average the gradients; ``batch_size=None`` scores on all of ``data`` at once.
        seed: drives random scores, batch sampling and Hutchinson noise (global RNG left untouched).
        fallback: for layers smaller than the block: "unstructured", "dense" or "error".
        floor: the global-scope per-layer floor above.
        rounds: prune in this many rounds, rescoring the pruned field each time, to density
            ``(1 - sparsity)^(k / rounds)`` after round k; a weight pruned once stays pruned. Default:
            100 for SynFlow (its published schedule), 1 (one-shot) for the others. Iterating a
            data-driven score is FORCE-style progressive pruning (de Jorge et al., 2021); each round
            costs one scoring pass (for JSP: one solve and its backward passes).
        layers: which prunable parameters to prune. "all" (default); "hidden" (every layer but the
            field's first, ``dim -> hidden``, and last, ``hidden -> dim``); a glob matched against the
            names of ``model.prunable_parameters()`` (e.g. ``"net.layers.1.*"``), a list of such names
            or globs, or a callable ``name -> bool``. Unselected layers are left untouched (dense on
            a fresh model) and ``sparsity`` applies to the selected weights only: the overall density
            of the field is higher. Why it matters: with all layers prunable, data-driven scores can
            put most of the budget into the narrow input and output layers and starve the hidden
            ones. Scores are still computed on the whole field (SynFlow needs the chain), then only
            the selected layers are ranked.
        as_torch_prune: for a field of plain ``nn.Linear`` layers (``jf.CNF(dim, net=your_field)``),
            leave the masks in ``torch.nn.utils.prune``'s format (``weight_orig``, ``weight_mask`` and
            its forward pre-hook) instead of jf's (pruned weights zeroed, ``weight_mask`` buffer).
            A ValueError for ``jf``'s own ``ODEnet``, whose layers do not call ``nn.Linear.forward``.
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; expected one of {METHODS}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not (0.0 <= sparsity < 1.0):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPES}")
    if fallback not in FALLBACKS:
        raise ValueError(f"unknown fallback {fallback!r}; expected one of {FALLBACKS}")
    if not (0.0 <= floor <= 1.0):
        raise ValueError(f"floor must be in [0, 1], got {floor!r}")
    if rounds is None:
        rounds = 100 if method == "synflow" else 1
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds <= 0:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")
    if not isinstance(as_torch_prune, bool):
        raise TypeError(f"as_torch_prune must be True or False, got {as_torch_prune!r}")
    if not hasattr(model, "prunable_parameters"):
        raise TypeError(f"model must be a jf.CNF (with prunable_parameters()), got {type(model).__name__}")
    blk = as_block(block) if granularity == "block" else None
    all_params = dict(model.prunable_parameters())
    if not all_params:
        raise ValueError("the model has no prunable parameters")
    selected = _select_layers(layers, list(all_params))
    params = {n: all_params[n] for n in selected}
    kinds, reasons = plan_layers({n: tuple(p.shape) for n, p in params.items()}, granularity,
                                 blk or (1, 1), fallback)
    if method in _scores.DATA_METHODS:
        if data is None:
            raise ValueError(f"method {method!r} scores with data: pass data=[n, {model.dim}] tensor "
                             f"(data-free methods: random, magnitude, synflow)")
        batches = _batches(model, data, n_batches, batch_size, seed)
    else:
        batches = []

    start = time.perf_counter()
    info: dict = {}
    build = dict(kinds=kinds, block=blk or (1, 1), scope=scope, floor=floor)
    owners = {name: _owner(model, name, as_torch_prune) for name in params}
    saved = {name: (p.detach().clone(), owners[name].mask) for name, p in params.items()} if rounds > 1 else {}
    masks: dict[str, torch.Tensor] = {}
    try:
        with _scoring_mode(model, seed):
            for k in range(1, rounds + 1):
                if masks and method != "synflow":  # score the field as pruned so far (SynFlow masks itself)
                    for name, mask in masks.items():
                        owners[name].set_mask(mask)
                raw = _raw_scores(method, model, all_params, batches, masks, seed, info)
                scores = {n: raw[n].detach().abs() if abs_scores else raw[n].detach() for n in params}
                rho = (1.0 - sparsity) ** (k / rounds)
                masks = build_masks(scores, 1.0 - rho, exclude=masks or None, **build)
    except BaseException:
        with torch.no_grad():  # leave the model as it came in
            for name, (w, mask) in saved.items():
                params[name].copy_(w)
                owners[name].set_mask(mask)
        raise
    info["rounds"] = rounds

    for name, mask in masks.items():
        owners[name].set_mask(mask)
    density = {n: float(m.float().mean()) for n, m in masks.items()}
    return PruneResult(method=method, sparsity=float(sparsity), granularity=granularity, block=blk, scope=scope,
                       masks=masks, density=density, scores={n: s.detach() for n, s in scores.items()},
                       fallback=reasons, info=info, seconds=time.perf_counter() - start,
                       layers=tuple(params), excluded=tuple(n for n in all_params if n not in params),
                       first_layer_inputs=_first_layer_inputs(model, next(iter(all_params))))


def _raw_scores(method, model, params, batches, masks, seed, info):
    if method == "synflow":
        return _scores.synflow_scores(model, params, masks)
    if method == "jsp":
        dL, dR, L, R = _scores.loss_and_R_grads(model, params, batches)
        info.update(L=L, R=R)
        return {n: r * l for n, r, l in zip(params, dR, dL)}
    if method == "random":
        return _scores.random_scores(model, params, batches, generator=torch.Generator().manual_seed(int(seed)))
    return getattr(_scores, f"{method}_scores")(model, params, batches)


prune.METHODS = METHODS
prune.LAYER_CHOICES = LAYER_CHOICES


def remove_pruning(model: nn.Module) -> nn.Module:
    """Bake the masks into plain weights (pruned entries stay 0) and drop them, in place.

    Takes any module: jf's masks (concatsquash layers' ``weight_mask``, or a plain ``nn.Linear``'s) and
    ``torch.nn.utils.prune``'s (``weight_orig``/``weight_mask`` and the forward pre-hook) alike. Unlike
    ``torch.nn.utils.prune.remove``, the trainable Parameter stays the same object (now ``weight``).
    """
    for m in model.modules():
        if hasattr(m, "set_mask") and getattr(m, "mask", None) is not None:
            m.apply_mask_()
            m.set_mask(None)
        elif isinstance(m, nn.Module) and "weight_mask" in m._buffers:
            if "weight_orig" not in m._parameters and "weight" not in m._parameters:
                continue  # not a masked weight this function knows
            _linear_mask.bake(m)
    return model
