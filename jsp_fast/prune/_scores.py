"""Saliency scores at initialization, one function per method; larger score = more worth keeping.

Every function takes the model, the prunable parameters ``{name: Parameter}`` and a list of data
batches (``[n, dim]`` tensors; empty for data-free methods) and returns ``{name: Tensor}``.

- jsp:       ``dR ⊙ dL``. ``L`` = mean NLL, ``R`` = mean ``∫‖J(z(t))‖_F dt``, both from one
             ``log_prob(x, return_stats=True)`` solve. A weight scores high when the gradient step on
             ``L`` (``-dL``) also lowers ``R`` to first order (its contribution ``-dL·dR`` is most
             negative when ``dR·dL`` is most positive). Over several batches ``dL`` and ``dR`` are each
             averaged first, then multiplied.
- random:    i.i.d. uniform scores from the seed.
- magnitude: ``|θ|``.
- snip:      ``|θ ⊙ dL|`` (Lee et al., 2019).
- grasp:     ``θ ⊙ Hg`` with ``g = dL`` and ``Hg`` a Hessian-vector product (Wang et al., 2020). The
             paper scores ``S(-θ) = -θ ⊙ Hg`` (≈ half the change of the gradient norm ``gᵀg`` when the
             weight is removed) and removes the weights with the *largest* ``S``, whose removal reduces
             gradient flow the least; keeping the largest ``θ ⊙ Hg`` is the same rule.
- synflow:   data-free, see ``synflow_scores``.
"""
from __future__ import annotations

import torch
from torch import nn

DATA_METHODS = ("jsp", "snip", "grasp")


def _grads(out: torch.Tensor, params: list[torch.Tensor], **kw) -> list[torch.Tensor]:
    gs = torch.autograd.grad(out, params, allow_unused=True, **kw)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]


def loss_and_R_grads(model: nn.Module, params: dict[str, torch.Tensor], batches: list[torch.Tensor]):
    """Batch-averaged ``dL`` and ``dR`` (lists aligned with ``params``) plus the mean ``L`` and ``R``."""
    ps = list(params.values())
    dL = [torch.zeros_like(p) for p in ps]
    dR = [torch.zeros_like(p) for p in ps]
    L_sum = R_sum = 0.0
    for x in batches:
        logp, stats = model.log_prob(x, return_stats=True)
        L, R = -logp.mean(), stats["R"].mean()
        for acc, g in zip(dL, _grads(L, ps, retain_graph=True)):
            acc.add_(g, alpha=1.0 / len(batches))
        for acc, g in zip(dR, _grads(R, ps)):
            acc.add_(g, alpha=1.0 / len(batches))
        L_sum += float(L.detach())
        R_sum += float(R.detach())
    return dL, dR, L_sum / len(batches), R_sum / len(batches)


def loss_grads(model: nn.Module, params: dict[str, torch.Tensor], batches: list[torch.Tensor]):
    ps = list(params.values())
    dL = [torch.zeros_like(p) for p in ps]
    for x in batches:
        for acc, g in zip(dL, _grads(-model.log_prob(x).mean(), ps)):
            acc.add_(g, alpha=1.0 / len(batches))
    return dL


def hessian_grad_product(model: nn.Module, params: dict[str, torch.Tensor], batches: list[torch.Tensor]):
    """``H g`` with ``g = dL`` (batch-averaged), by double backward through the solve."""
    ps = list(params.values())
    g = [gi.detach() for gi in loss_grads(model, params, batches)]
    hg = [torch.zeros_like(p) for p in ps]
    for x in batches:
        gx = _grads(-model.log_prob(x).mean(), ps, create_graph=True)
        z = sum((a * b).sum() for a, b in zip(gx, g) if a.requires_grad)
        if not isinstance(z, torch.Tensor) or not z.requires_grad:
            continue  # the loss is linear in these weights at this point: H g = 0
        for acc, h in zip(hg, _grads(z, ps)):
            acc.add_(h, alpha=1.0 / len(batches))
    return g, hg


def jsp_scores(model, params, batches):
    dL, dR, _, _ = loss_and_R_grads(model, params, batches)
    return {n: r * l for n, r, l in zip(params, dR, dL)}


def random_scores(model, params, batches, generator: torch.Generator):
    return {n: torch.rand(p.shape, generator=generator, dtype=torch.float64).to(p.device)
            for n, p in params.items()}


def magnitude_scores(model, params, batches):
    return {n: p.detach().abs() for n, p in params.items()}


def snip_scores(model, params, batches):
    dL = loss_grads(model, params, batches)
    return {n: (p.detach() * g).abs() for (n, p), g in zip(params.items(), dL)}


def grasp_scores(model, params, batches):
    _, hg = hessian_grad_product(model, params, batches)
    return {n: p.detach() * h for (n, p), h in zip(params.items(), hg)}


def _time_gate(model, name: str, p: torch.Tensor) -> torch.Tensor:
    """The concatsquash time gate at t = 0 of the layer owning ``name``; 1 for a plain linear layer
    (a user field's ``nn.Linear``: no gate)."""
    if name.endswith(".linear.weight"):
        layer = model.get_submodule(name[: -len(".linear.weight")])
        if hasattr(layer, "gate_and_shift"):
            t0 = torch.zeros((), dtype=p.dtype, device=p.device)
            return layer.gate_and_shift(t0)[0]
    return torch.ones(p.shape[0], dtype=p.dtype, device=p.device)


def synflow_scores(model, params, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SynFlow (Tanaka et al., 2020) for a concatsquash field, on a float64 copy of the weights.

    SynFlow scores the linearised network: all weights replaced by ``|θ|``, an all-ones input, and
    ``R = 1ᵀ f(1)``; on a ReLU net with positive input that is the path norm, which is conserved
    layer to layer (what makes the iterative version avoid layer collapse). For the CNF we evaluate
    the field at ``t = 0`` with the activations taken as the identity (tanh is not positively
    homogeneous, and saturating it would break the conservation), biases dropped, and each layer's
    time gate ``sigmoid(W_g·0 + b_g) > 0`` kept as a positive per-output scale:
    ``h_0 = 1``, ``h_{l+1} = gate_l ⊙ (|W_l| ⊙ m_l) h_l``, ``R = Σ h_L``, score ``|W| ⊙ ∂R/∂|W|``.
    No data are used.
    """
    ws = {}
    for name, p in params.items():
        ws[name] = p.detach().abs().to(torch.float64).requires_grad_(True)
    h = None
    for name, w in ws.items():
        gate = _time_gate(model, name, params[name])
        gate = gate.detach().to(torch.float64)
        m = masks.get(name)
        weff = w if m is None else w * m
        if h is None:
            h = torch.ones(1, w.shape[1], dtype=torch.float64, device=w.device)
        if h.shape[1] != w.shape[1]:
            raise ValueError(f"synflow expects a chain of layers; {name} takes {w.shape[1]} inputs, "
                             f"the previous layer gives {h.shape[1]}")
        h = (h @ weff.T) * gate
    R = h.sum()
    gs = torch.autograd.grad(R, list(ws.values()))
    return {n: (w.detach() * g) for (n, w), g in zip(ws.items(), gs)}
