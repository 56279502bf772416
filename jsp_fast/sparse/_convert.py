"""Converting any ``nn.Module``: a copy whose prunable layers run the block-sparse kernels, and a report.

The user's module is deep-copied (the original is never touched); every mask in the copy is read and
then baked away, so the copy keeps no pruning hook; then the copy is walked top-down and each part
that can run block-sparse is replaced in place:

1. a **concatsquash field** (a container of concatsquash layers chained ``dim -> ... -> dim`` with one
   activation between them and nothing else, like FFJORD's ``ODEnet``) becomes a ``SparseODEnet``: the
   one-call fused field. Recognised by structure, then *verified numerically* against the module's own
   ``forward(t, z)`` for each candidate activation; a field that does not match is not mapped.
2. a **concatsquash layer** (a module of exactly three ``nn.Linear``: the main ``Linear(k, n)`` and two
   ``Linear(1, n)`` time hyper-layers, computing ``main(x) ⊙ σ(gate(t)) + shift(t)``, e.g. FFJORD's
   ``_layer``/``_hyper_gate``/``_hyper_bias``) becomes one kernel call with the gate and shift fused
   into the epilogue; also verified numerically (both roles of the two hyper-layers are tried).
3. an ``nn.Linear`` with a block-aligned mask becomes a ``BlockSparseLinear``; inside an
   ``nn.Sequential`` the activation module after it is fused into the kernel's epilogue (and replaced
   by ``nn.Identity`` so indices and state-dict keys of the other entries stay). SiLU has no kernel
   epilogue: the layer runs without activation and the SiLU module stays. A ``Linear(d + r, n)`` whose
   mask is block-aligned except for ``r < bk`` leading or trailing columns (a field that concatenates
   ``t`` to its input) becomes a ``SplitBlockLinear``: the blocks run sparse, the narrow edge dense.
4. anything else stays: a layer with no mask, a mask that keeps everything, or a mask that is not
   block-aligned (kept dense *and masked*: ``MaskedLinear``) — each listed in the report with why.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import _act, _linear_mask
from ..cnf._layers import ConcatSquashLinear, ODEnet
from ._field import BlockSparseConcatSquash, SparseODEnet
from ._modules import BlockSparseLinear, under_func_transform
from ._ops import bsr_linear
from .plan import BLOCK_CANDIDATES, as_block, infer_block, is_block_aligned

__all__ = ["LayerReport", "SparsifyReport", "MaskedLinear", "SplitBlockLinear", "ConcatSquashBlock",
           "convert_module", "check_masks"]


NOT_ALIGNED = ("mask is not block-aligned (blocks tried: 64x64 down to 8x8; pass block= for a mask built "
               "with another block)")


# ---- the report --------------------------------------------------------------------------------------
@dataclass
class LayerReport:
    """One linear layer of the original module (``name``: its qualified name there)."""

    name: str
    shape: tuple[int, int]
    kind: str  # "block-sparse", "split (block-sparse + dense edge)", "masked dense", "dense"
    block: tuple[int, int] | None = None
    density: float | None = None
    mask_source: str | None = None  # "jf.prune", "torch.nn.utils.prune", "masks=" (joined with " & ")
    activation: str | None = None  # the activation fused into the kernel
    part_of: str | None = None  # "concatsquash field <name>" / "concatsquash layer <name>"
    reason: str = ""

    @property
    def converted(self) -> bool:
        return self.kind not in ("dense", "masked dense")


@dataclass
class SparsifyReport:
    """What ``jf.sparsify`` converted, what stayed dense and why (``result.sparsify_report``)."""

    layers: list[LayerReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def converted(self) -> dict[str, LayerReport]:
        return {r.name: r for r in self.layers if r.converted}

    @property
    def dense(self) -> dict[str, str]:
        """``{layer name: why it stayed dense}``."""
        return {r.name: r.reason for r in self.layers if not r.converted}

    def __str__(self) -> str:
        lines = [f"sparsify: {len(self.converted)} of {len(self.layers)} linear layers block-sparse"]
        for r in self.layers:
            what = r.kind
            if r.block:
                what += f" {r.block[0]}x{r.block[1]}, density {r.density:.3f}"
            if r.activation and r.activation != "none":
                what += f", {r.activation} fused"
            if r.mask_source:
                what += f", mask from {r.mask_source}"
            if r.part_of:
                what += f", in {r.part_of}"
            if r.reason:
                what += f" ({r.reason})"
            lines.append(f"  {r.name or '<module>'} {list(r.shape)}: {what}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    __repr__ = __str__


# ---- modules the copy may hold ----------------------------------------------------------------------
class MaskedLinear(nn.Linear):
    """A dense ``nn.Linear`` that keeps its (not block-aligned) mask: ``x (W ⊙ M)ᵀ + b``. The mask is a
    bool buffer ``weight_mask``; pruned weights get no gradient and stay zero (``apply_mask_``)."""

    @classmethod
    def from_linear(cls, lin: nn.Linear, mask: torch.Tensor) -> "MaskedLinear":
        out = cls(lin.in_features, lin.out_features, bias=lin.bias is not None,
                  device=lin.weight.device, dtype=lin.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(lin.weight * mask)
            if lin.bias is not None:
                out.bias.copy_(lin.bias)
        out.register_buffer("weight_mask", mask.to(device=lin.weight.device, dtype=torch.bool).clone())
        return out

    @property
    def mask(self) -> torch.Tensor | None:
        return self._buffers.get("weight_mask")

    def set_mask(self, mask: torch.Tensor | None) -> None:
        if mask is None:
            self._buffers.pop("weight_mask", None)
        else:
            self.register_buffer("weight_mask", mask.to(device=self.weight.device, dtype=torch.bool).clone())
            self.apply_mask_()

    @torch.no_grad()
    def apply_mask_(self) -> None:
        if self.mask is not None:
            self.weight.mul_(self.mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.mask is None else self.weight * self.mask
        return F.linear(x, w, self.bias)


class SplitBlockLinear(nn.Module):
    """``act(x[:, main] W_mainᵀ + x[:, edge] W_edgeᵀ + b)``: the block-aligned columns run block-sparse,
    a narrow edge of ``r < bk`` columns (e.g. a concatenated time) a dense (masked) product.

    The edge term is per row, and the kernel's epilogue only takes per-output vectors, so in general
    the activation runs after the sum. When the edge columns hold the same values in every row (a
    concatenated ``t``) and no gradient is needed, the edge term *is* a per-output vector: it joins the
    bias and the activation is fused. Checked per call on the CPU only (on a GPU the check would
    synchronise the device every evaluation).
    """

    def __init__(self, lin: nn.Linear, mask: torch.Tensor, block, main: tuple[int, int], activation: str,
                 backend: str):
        super().__init__()
        a, b = main
        k = lin.in_features
        self.main_cols = (a, b)
        self.edge_cols = (0, a) if a > 0 else (b, k)
        e0, e1 = self.edge_cols
        self.in_features, self.out_features = k, lin.out_features
        self.activation = _act.check(activation)
        main_lin = nn.Linear(b - a, lin.out_features, bias=lin.bias is not None,
                             device=lin.weight.device, dtype=lin.weight.dtype)
        edge_lin = nn.Linear(e1 - e0, lin.out_features, bias=False, device=lin.weight.device,
                             dtype=lin.weight.dtype)
        with torch.no_grad():
            main_lin.weight.copy_(lin.weight[:, a:b])
            edge_lin.weight.copy_(lin.weight[:, e0:e1])
            if lin.bias is not None:
                main_lin.bias.copy_(lin.bias)
        self.main = BlockSparseLinear.from_linear(main_lin, mask[:, a:b], block, activation=None, backend=backend)
        edge_mask = mask[:, e0:e1]
        self.edge = edge_lin if bool(edge_mask.all()) else MaskedLinear.from_linear(edge_lin, edge_mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (a, b), (e0, e1) = self.main_cols, self.edge_cols
        xe = x[..., e0:e1]
        if (x.device.type == "cpu" and x.dim() == 2 and x.shape[0] > 0 and not under_func_transform(x)
                and not (torch.is_grad_enabled() and x.requires_grad) and torch.equal(xe, xe[:1].expand_as(xe))):
            main = self.main
            shift = self.edge(xe[:1]).reshape(-1)
            bias = shift if main.bias is None else main.bias + shift
            return bsr_linear(x[:, a:b], main.weight, None, bias, self.activation, backend=main.backend)
        pre = self.main(x[..., a:b]) + self.edge(xe)
        return _act.apply(self.activation, pre)

    def extra_repr(self) -> str:
        return f"main columns {self.main_cols}, dense edge columns {self.edge_cols}, activation={self.activation!r}"


class ConcatSquashBlock(nn.Module):
    """A user's concatsquash layer as one kernel call: ``forward(t, x) = (x Wᵀ + b) ⊙ σ(gate(t)) +
    shift(t)`` with the gate and shift as the kernel's per-output scale and bias."""

    def __init__(self, layer: BlockSparseConcatSquash, backend: str):
        super().__init__()
        self.layer = layer
        self.backend = backend

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if under_func_transform(x):
            gate, shift = self.layer.gate_and_shift(t)
            return F.linear(x, self.layer.dense_weight()) * gate + shift
        return self.layer(t, x, "none", self.backend)


# ---- recognising activations and concatsquash structure ------------------------------------------------
def activation_of(mod: nn.Module) -> str | None:
    """The kernel activation an activation module computes exactly, "silu" for SiLU, or None."""
    t = type(mod)
    if t is nn.Tanh:
        return "tanh"
    if t is nn.ReLU:
        return "relu"
    if t is nn.Sigmoid:
        return "sigmoid"
    if t is nn.Softplus and mod.beta == 1 and mod.threshold == 20:
        return "softplus"  # F.softplus's defaults, which _act uses
    if t is nn.ELU and mod.alpha == 1.0:
        return "elu"
    if t is nn.SiLU:
        return "silu"
    return None


def _probe_inputs(ref: torch.Tensor, n: int, k: int):
    g = torch.Generator(device="cpu").manual_seed(1234)
    x = torch.randn(n, k, generator=g, dtype=torch.float64).to(device=ref.device, dtype=ref.dtype)
    ts = [torch.tensor(v, dtype=ref.dtype, device=ref.device) for v in (0.37, -0.81)]
    return x, ts


def _close(a, b) -> bool:
    if not isinstance(a, torch.Tensor) or a.shape != b.shape:
        return False
    tol = 1e-4 if a.dtype in (torch.float32, torch.float64) else 1e-2
    return bool(torch.allclose(a, b, rtol=tol, atol=tol * (1.0 + float(b.abs().max()))))


def _concatsquash_parts(mod: nn.Module):
    """``(main, gate, shift)`` child names when ``mod`` computes ``main(x) ⊙ σ(gate(t)) + shift(t)`` for
    ``forward(t, x)`` (checked on random inputs), else None."""
    if isinstance(mod, ConcatSquashLinear):
        return "linear", "hyper_gate", "hyper_bias"
    kids = dict(mod.named_children())
    if len(kids) != 3 or not all(type(c) is nn.Linear for c in kids.values()) or mod._parameters:
        return None
    mains = [n for n, c in kids.items() if c.in_features > 1]
    hypers = [n for n, c in kids.items() if c.in_features == 1]
    if len(mains) != 1 or len(hypers) != 2:
        return None
    main = kids[mains[0]]
    if any(kids[h].out_features != main.out_features for h in hypers):
        return None
    x, ts = _probe_inputs(main.weight, 5, main.in_features)
    for gate, shift in (hypers, hypers[::-1]):
        try:
            with torch.no_grad():
                ok = all(_close(mod(t, x), main(x) * torch.sigmoid(kids[gate](t.reshape(1, 1)))
                                + kids[shift](t.reshape(1, 1))) for t in ts)
        except Exception:  # noqa: BLE001 - a module with another signature simply is not one
            ok = False
        if ok:
            return mains[0], gate, shift
    return None


def _as_jf_layer(mod: nn.Module, parts) -> ConcatSquashLinear | None:
    """The user's concatsquash layer as a jf ``ConcatSquashLinear`` (same weights), or None when its
    shift has a bias (jf's has none)."""
    main, gate, shift = (getattr(mod, p) for p in parts)
    if shift.bias is not None or gate.bias is None:
        return None
    lay = ConcatSquashLinear(main.in_features, main.out_features).to(device=main.weight.device,
                                                                      dtype=main.weight.dtype)
    with torch.no_grad():
        lay.linear.weight.copy_(main.weight)
        if main.bias is not None:
            lay.linear.bias.copy_(main.bias)
        else:
            lay.linear.bias.zero_()
        lay.hyper_gate.load_state_dict(gate.state_dict())
        lay.hyper_bias.load_state_dict(shift.state_dict())
    return lay


# ---- masks -------------------------------------------------------------------------------------------
def _linear_names(module: nn.Module) -> dict[str, nn.Linear]:
    return {q: m for q, m in module.named_modules() if isinstance(m, nn.Linear)}


def check_masks(module: nn.Module, masks) -> dict[str, torch.Tensor]:
    """``masks`` validated against ``module``'s linear layers: ``{qualified linear name: bool mask}``."""
    if masks is None:
        return {}
    if not isinstance(masks, dict):
        raise TypeError(f"masks must be a dict {{qualified layer name: bool tensor}}, got {type(masks).__name__}")
    lins = _linear_names(module)
    out = {}
    for key, m in masks.items():
        name = key[: -len(".weight")] if isinstance(key, str) and key.endswith(".weight") else key
        if name not in lins:
            raise ValueError(f"masks names {key!r}, which is not an nn.Linear of the module; its linear layers "
                             f"are {sorted(lins)}")
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"the mask for {key!r} must be a tensor, got {type(m).__name__}")
        shape = tuple(_linear_mask.trainable_weight(lins[name]).shape)
        if tuple(m.shape) != shape:
            raise ValueError(f"the mask for {key!r} has shape {tuple(m.shape)}; expected the weight's shape {shape}")
        if m.dtype != torch.bool and not bool(((m == 0) | (m == 1)).all()):
            raise ValueError(f"the mask for {key!r} must be bool (or 0/1), got values other than 0 and 1")
        out[name] = m.detach() != 0
    return out


def _copy(module: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also copies modules pruned with ``torch.nn.utils.prune``: their ``weight``
    attribute is a non-leaf tensor (``orig * mask``), which deepcopy refuses; it is recomputed anyway."""
    memo = {}
    for m in module.modules():
        if _linear_mask.torch_pruned(m) and isinstance(m.__dict__.get("weight"), torch.Tensor):
            w = m.__dict__["weight"]
            memo[id(w)] = w.detach().clone()
    return copy.deepcopy(module, memo)


# ---- the walk ----------------------------------------------------------------------------------------
class _Converter:
    def __init__(self, masks: dict[str, torch.Tensor], block, backend: str, fused):
        self.explicit = masks
        self.block = None if block is None else as_block(block)
        self.backend = backend
        self.fused = fused
        self.report = SparsifyReport()
        self.masks: dict[str, tuple[torch.Tensor | None, str | None]] = {}

    # -- masks: read from the copy, then baked away (no hook, no weight_orig) ---------------------------
    def collect(self, root: nn.Module) -> None:
        parents = {}
        for q, m in root.named_modules():
            for n, _c in m.named_children():
                parents[f"{q}.{n}" if q else n] = m
        for q, m in root.named_modules():
            if not isinstance(m, nn.Linear):
                continue
            mask, src = _linear_mask.get_mask(m)
            _linear_mask.bake(m)
            parent = parents.get(q)
            if isinstance(parent, ConcatSquashLinear) and parent.linear is m and parent.mask is not None:
                pm = parent.mask
                parent.apply_mask_()
                parent.set_mask(None)
                mask, src = (pm, "jf.prune") if mask is None else (mask & pm, f"{src} & jf.prune")
            if q in self.explicit:
                em = self.explicit[q].to(m.weight.device)
                with torch.no_grad():
                    m.weight.mul_(em)
                mask, src = (em, "masks=") if mask is None else (mask & em, f"{src} & masks=")
            self.masks[q] = (mask, src)

    # -- one linear layer ---------------------------------------------------------------------------
    def _plan(self, q: str, mask: torch.Tensor):
        """``(block, (first, last) block-aligned columns)`` for a mask, None when it is not block-aligned
        (a ValueError when ``block`` was forced and the layer could hold such blocks)."""
        n, k = mask.shape
        cands = [self.block] if self.block is not None else list(BLOCK_CANDIDATES)
        if self.block is None:
            b = infer_block(mask)
            if b is not None:
                return b, (0, k)
        elif is_block_aligned(mask, self.block):
            return self.block, (0, k)
        best = None
        for bm, bk in cands:  # block-aligned but for a narrow leading or trailing edge (r < bk columns)
            r = k % bk
            if n % bm or r == 0 or k - r < bk:
                continue
            for a, b in ((0, k - r), (r, k)):
                if is_block_aligned(mask[:, a:b], (bm, bk)) and not bool(mask[:, a:b].all()):
                    if best is None or bm * bk > best[0][0] * best[0][1]:
                        best = ((bm, bk), (a, b))
        if best is None and self.block is not None:
            bm, bk = self.block
            if n >= bm and k >= bk:
                raise ValueError(
                    f"the mask of {q or 'the module'} (weight {n}x{k}) is not aligned to the forced block "
                    f"{bm}x{bk} (not constant on its blocks, edge columns aside). Build the mask with that "
                    f"block, pass the block it was built with, or leave block=None to keep such layers dense")
        return best

    def linear(self, q: str, lin: nn.Linear, act: str | None = None):
        """The replacement for ``lin`` (None: keep it) and whether ``act`` was fused into it."""
        mask, src = self.masks.get(q, (None, None))
        shape = (lin.out_features, lin.in_features)
        rep = LayerReport(q, shape, "dense", mask_source=src)
        self.report.layers.append(rep)
        if mask is None:
            rep.reason = "no mask"
            return None, False
        if bool(mask.all()):
            rep.reason = "mask keeps every weight"
            return None, False
        plan = self._plan(q, mask)
        if plan is None:
            rep.kind = "masked dense"
            rep.reason = NOT_ALIGNED if self.block is None else (
                f"layer smaller than the block {self.block[0]}x{self.block[1]}")
            return MaskedLinear.from_linear(lin, mask), False
        block, (a, b) = plan
        rep.block, rep.density = block, float(mask[:, a:b].float().mean())
        kernel_act = act if act not in (None, "silu") else None
        rep.activation = kernel_act
        if (a, b) == (0, lin.in_features):
            rep.kind = "block-sparse"
            return BlockSparseLinear.from_linear(lin, mask, block, activation=kernel_act, backend=self.backend), \
                kernel_act is not None
        rep.kind = "split (block-sparse + dense edge)"
        rep.activation = None
        rep.reason = (f"columns {a}:{b} block-sparse, the other {lin.in_features - (b - a)} dense "
                      f"(e.g. a concatenated t)")
        if kernel_act is not None:
            rep.reason += (f"; {kernel_act} fused when the edge columns are equal in every row and no "
                           f"gradient is needed (CPU), else applied after the sum")
        return SplitBlockLinear(lin, mask, block, (a, b), kernel_act or "none", self.backend), kernel_act is not None

    # -- concatsquash layers and fields ----------------------------------------------------------------
    def _cs_mask(self, q: str, parts):
        return self.masks.get(f"{q}.{parts[0]}" if q else parts[0], (None, None))

    def concatsquash_layer(self, q: str, mod: nn.Module, parts):
        mask, src = self._cs_mask(q, parts)
        main = getattr(mod, parts[0])
        mq = f"{q}.{parts[0]}" if q else parts[0]
        if mask is None or bool(mask.all()):
            return None  # nothing to gain; its linear layers are reported one by one
        plan = self._plan(mq, mask)
        if plan is None or plan[1] != (0, main.in_features):
            return None
        lay = ConcatSquashLinear(main.in_features, main.out_features).to(device=main.weight.device,
                                                                          dtype=main.weight.dtype)
        with torch.no_grad():
            lay.linear.weight.copy_(main.weight)
            lay.linear.bias.copy_(main.bias if main.bias is not None else torch.zeros_like(lay.linear.bias))
        lay.hyper_gate = copy.deepcopy(getattr(mod, parts[1]))
        lay.hyper_bias = copy.deepcopy(getattr(mod, parts[2]))  # kept with its bias, if it has one
        lay.set_mask(mask)
        self.report.layers.append(LayerReport(mq, (main.out_features, main.in_features), "block-sparse",
                                              plan[0], float(mask.float().mean()), src,
                                              part_of=f"concatsquash layer {q or '<module>'}",
                                              reason="time gate and shift fused into the kernel"))
        return ConcatSquashBlock(BlockSparseConcatSquash(lay, plan[0]), self.backend)

    def concatsquash_field(self, q: str, mod: nn.Module):
        """A ``SparseODEnet`` for a module that is a concatsquash field, else None."""
        if isinstance(mod, ODEnet):
            net, layer_names = copy.deepcopy(mod), [f"{q}.layers.{i}" if q else f"layers.{i}"
                                                     for i in range(len(mod.layers))]
            parts = [("linear", "hyper_gate", "hyper_bias")] * len(mod.layers)
        else:
            found = self._field_structure(q, mod)
            if found is None:
                return None
            net, layer_names, parts = found
        for lay, lq, p in zip(net.layers, layer_names, parts):
            mask, _ = self._cs_mask(lq, p)
            lay.set_mask(mask)
            if mask is not None and not bool(mask.all()):
                self._plan(f"{lq}.{p[0]}", mask)  # a forced block that does not fit is an error here
        snet = SparseODEnet.from_odenet(net, backend=self.backend, block=self.block, fused=self.fused)
        for i, (lq, p) in enumerate(zip(layer_names, parts)):
            mask, src = self._cs_mask(lq, p)
            lay = snet.layers[i]
            rep = LayerReport(f"{lq}.{p[0]}", (lay.out_features, lay.in_features), "dense", mask_source=src,
                              activation=snet.activation if i < len(parts) - 1 else "none",
                              part_of=f"concatsquash field {q or '<module>'} (SparseODEnet, fused)")
            if i in snet.sparse_layers:
                rep.kind, rep.block, rep.density = "block-sparse", lay.block, lay.density
            else:
                rep.kind = "masked dense" if mask is not None and not bool(mask.all()) else "dense"
                rep.reason = snet.dense_layers[i]
            self.report.layers.append(rep)
        return snet

    def _field_structure(self, q: str, mod: nn.Module):
        if mod._parameters or list(mod._buffers):
            return None
        seqs = [c for c in mod.children() if isinstance(c, (nn.ModuleList, nn.Sequential))
                and len(c) and all(_concatsquash_parts(x) for x in c)]
        if len(seqs) != 1:
            return None
        layers = seqs[0]
        acts = []
        for c in mod.children():
            if c is layers:
                continue
            subs = list(c) if isinstance(c, (nn.ModuleList, nn.Sequential)) else [c]
            names = [activation_of(s) for s in subs]
            if any(a is None or a == "silu" for a in names) or any(p.numel() for p in c.parameters()):
                return None
            acts += names
        parts = [_concatsquash_parts(x) for x in layers]
        jf_layers = [_as_jf_layer(x, p) for x, p in zip(layers, parts)]
        widths = [(getattr(x, p[0]).in_features, getattr(x, p[0]).out_features) for x, p in zip(layers, parts)]
        if any(j is None for j in jf_layers) or widths[0][0] != widths[-1][1] or any(
                a[1] != b[0] for a, b in zip(widths[:-1], widths[1:])):
            return None
        cands = sorted(set(acts)) if acts else [a for a in _act.ACTIVATIONS]
        lname = next(n for n, c in mod.named_children() if c is layers)
        layer_names = [f"{q}.{lname}.{i}" if q else f"{lname}.{i}" for i in range(len(layers))]
        dim, hidden = widths[0][0], [w[1] for w in widths[:-1]]
        ref = getattr(layers[0], parts[0][0]).weight
        z, ts = _probe_inputs(ref, 7, dim)
        for a in cands:
            net = ODEnet(dim, hidden, a).to(device=ref.device, dtype=ref.dtype)
            net.layers = nn.ModuleList(copy.deepcopy(j) for j in jf_layers)
            try:
                with torch.no_grad():
                    ok = all(_close(mod(t, z), net(t, z)) for t in ts)
            except Exception:  # noqa: BLE001 - another signature: not a field of this kind
                ok = False
            if ok:
                return net, layer_names, parts  # the user's part names: the masks are named by them
        self.report.notes.append(f"{q or '<module>'} has the structure of a concatsquash field but its forward "
                                 f"matched none of the activations {cands}; its layers were converted one by one")
        return None

    # -- the walk ---------------------------------------------------------------------------------------
    def module(self, q: str, mod: nn.Module):
        """The replacement for ``mod`` (None: keep it, its children converted in place)."""
        if isinstance(mod, (SparseODEnet, BlockSparseLinear, SplitBlockLinear, ConcatSquashBlock)):
            self.report.notes.append(f"{q or '<module>'} is block-sparse already; kept as it is")
            return None
        if isinstance(mod, nn.Linear):
            return self.linear(q, mod)[0]
        snet = self.concatsquash_field(q, mod)
        if snet is not None:
            return snet
        parts = _concatsquash_parts(mod)
        if parts is not None:
            rep = self.concatsquash_layer(q, mod, parts)
            if rep is not None:
                return rep
        kids = list(mod.named_children())
        skip = set()
        for i, (n, child) in enumerate(kids):
            if n in skip:
                continue
            cq = f"{q}.{n}" if q else n
            if isinstance(mod, nn.Sequential) and isinstance(child, nn.Linear) and i + 1 < len(kids):
                nxt_name, nxt = kids[i + 1]
                act = activation_of(nxt)
                new, fused = self.linear(cq, child, act)
                if new is not None:
                    setattr(mod, n, new)
                    if fused:
                        setattr(mod, nxt_name, nn.Identity())
                        skip.add(nxt_name)
                    elif act == "silu":
                        self.report.notes.append(
                            f"{cq}: SiLU has no kernel epilogue; the layer runs without activation and the "
                            f"SiLU module after it ({q + '.' if q else ''}{nxt_name}) stays")
                continue
            new = self.module(cq, child)
            if new is not None:
                setattr(mod, n, new)
        return None


def convert_module(module: nn.Module, masks=None, block=None, backend: str = "auto",
                   fused: bool | str = True) -> tuple[nn.Module, SparsifyReport]:
    """A converted copy of ``module`` and the report (see the module docstring)."""
    explicit = check_masks(module, masks)
    if not _linear_names(module):
        raise ValueError(f"{type(module).__name__} has no nn.Linear layer to sparsify (jf.sparsify converts "
                         f"nn.Linear layers, concatsquash layers and fields)")
    conv = _Converter(explicit, block, backend, fused)
    out = _copy(module)
    conv.collect(out)
    new = conv.module("", out)
    return (out if new is None else new), conv.report
