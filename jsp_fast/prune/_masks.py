"""Masks from scores: unstructured or block units, layer-wise or global selection, exact counts.

A layer is cut into *units*: single weights (unstructured), ``bm × bk`` blocks (block granularity;
a block's score is the sum of its weights' scores), or one indivisible dense unit (the ``"dense"``
fallback for layers smaller than the block). Selection keeps ``K = round((1 - sparsity) · N)`` of the
``N`` prunable weights, to within one block:

- ``scope="layer"``: every layer keeps its share ``(1 - sparsity)`` of its own weights; per-layer
  counts are rounded to whole units, blocked layers first, each layer taking its proportional share
  of the weights not yet assigned, so rounding errors are spread over the later layers, not summed.
- ``scope="global"``: units of all layers compete on their score per weight (sum / unit size, which
  for one block size is the same order as the sum). A floor is reserved first: every layer keeps at
  least ``max(1, ceil(floor · (1 - sparsity) · units_in_layer))`` of its best units, so no layer is
  emptied (a CNF with an empty layer is a constant field).
"""
from __future__ import annotations

import math

import torch

GRANULARITIES = ("unstructured", "block")
SCOPES = ("global", "layer")
FALLBACKS = ("unstructured", "dense", "error")


class _Layer:
    """One prunable weight cut into units; ``kind`` is "block", "block_edge" (blocks and a kept last
    column), "element" or "dense"."""

    def __init__(self, name: str, score: torch.Tensor, kind: str, block: tuple[int, int]):
        self.name, self.kind, self.shape = name, kind, tuple(score.shape)
        self.numel = score.numel()
        if kind == "block_edge":  # blocks over all but the last column, which is kept (not counted)
            score = score[:, :-1]
            self.numel = score.numel()
        if kind in ("block", "block_edge"):
            bm, bk = block
            o, i = score.shape
            self.grid = (o // bm, i // bk)
            self.size = bm * bk
            self.unit_scores = score.reshape(o // bm, bm, i // bk, bk).sum(dim=(1, 3)).reshape(-1)
        elif kind == "element":
            self.size = 1
            self.unit_scores = score.reshape(-1)
        else:
            self.size = self.numel
            self.unit_scores = score.sum().reshape(1)
        self.n_units = self.unit_scores.numel()
        self.keep = torch.zeros(self.n_units, dtype=torch.bool, device=score.device)

    def top(self, k: int) -> torch.Tensor:
        """Indices of the ``k`` best units (stable order, so equal scores resolve by position)."""
        order = torch.argsort(self.unit_scores, descending=True, stable=True)
        return order[:k]

    def mask(self, block: tuple[int, int]) -> torch.Tensor:
        if self.kind in ("block", "block_edge"):
            bm, bk = block
            grid = self.keep.reshape(self.grid)
            m = grid.repeat_interleave(bm, 0).repeat_interleave(bk, 1)
            if self.kind == "block_edge":
                m = torch.cat([m, torch.ones(m.shape[0], 1, dtype=torch.bool, device=m.device)], 1)
            return m
        if self.kind == "dense":
            return torch.ones(self.shape, dtype=torch.bool, device=self.keep.device)
        return self.keep.reshape(self.shape)


def plan_layers(shapes: dict[str, tuple[int, ...]], granularity: str, block: tuple[int, int],
                fallback: str) -> tuple[dict[str, str], dict[str, str]]:
    """Unit kind per layer and, for layers that could not be blocked, why.

    Layers with a side shorter than the block get the ``fallback`` ("unstructured" or "dense"; with
    "error" they raise). Layers at least as large as the block that it does not divide always raise.
    """
    kinds, reasons = {}, {}
    for name, shape in shapes.items():
        if granularity == "unstructured":
            kinds[name] = "element"
            continue
        if len(shape) != 2:
            raise ValueError(f"block granularity needs 2-D weights; {name} has shape {tuple(shape)}")
        (o, i), (bm, bk) = shape, block
        if o % bm == 0 and i % bk == 0:
            kinds[name] = "block"
        elif o < bm or i < bk:
            why = f"shape {(o, i)} is smaller than the block {block}"
            if fallback == "error":
                raise ValueError(f"block {block} does not fit layer {name}: {why}. Use fallback='unstructured' "
                                 f"or 'dense' for such layers, a smaller block, or granularity='unstructured'")
            kinds[name] = "element" if fallback == "unstructured" else "dense"
            reasons[name] = f"{'unstructured' if fallback == 'unstructured' else 'dense'} mask: {why}"
        elif o % bm == 0 and i % bk == 1:
            # Linear(d + 1, h) on cat([z, t]) (a user field): blocks over the first d columns, the last
            # one kept whole; jf.sparsify runs such a layer as blocks plus a dense edge.
            kinds[name] = "block_edge"
            reasons[name] = (f"block mask on the first {i - 1} columns; the last column (e.g. a concatenated "
                             f"t) is kept")
        else:
            good = (math.gcd(o, bm), math.gcd(i, bk))
            raise ValueError(f"block {block} does not divide layer {name} of shape {(o, i)}. Use a block "
                             f"that divides it (e.g. block={good}) or granularity='unstructured'")
    return kinds, reasons


def build_masks(scores: dict[str, torch.Tensor], sparsity: float, kinds: dict[str, str],
                block: tuple[int, int], scope: str, floor: float = 0.1,
                exclude: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Bool masks keeping the highest-scoring units, ``round((1 - sparsity) · N)`` weights in total.

    ``exclude`` ({name: bool mask kept by an earlier round}) stops pruned weights from coming back
    (iterative rounds): the scores outside it are treated as -inf.
    """
    layers = []
    for name, s in scores.items():
        s = s.detach().to(torch.float64)
        if torch.isnan(s).any():
            raise ValueError(f"scores of {name} contain NaN (did the solve diverge?)")
        if exclude is not None and name in exclude:
            s = s.masked_fill(~exclude[name], -math.inf)
        layers.append(_Layer(name, s, kinds[name], block))
    total = sum(l.numel for l in layers)
    target = int(round((1.0 - sparsity) * total))
    fixed = [l for l in layers if l.kind == "dense"]
    free = [l for l in layers if l.kind != "dense"]
    for l in fixed:
        l.keep[:] = True
    budget = target - sum(l.numel for l in fixed)
    need = sum(l.size for l in free)
    if budget < need:
        after = f"; {budget} remain after the dense fallback layers {[l.name for l in fixed]}" if fixed else ""
        raise ValueError(
            f"sparsity {sparsity} keeps {target} of {total} weights{after}: fewer than the {need} that one "
            f"unit per layer needs. Lower the sparsity, use a smaller block or granularity='unstructured'"
            + (", or fallback='unstructured'" if fixed else ""))
    n_free = sum(l.numel for l in free)
    if scope == "layer":
        # Coarse units first; each layer takes its proportional share of what is still unassigned,
        # so rounding errors are spread over the later (finer) layers instead of piling up.
        kept, left = 0, n_free
        for l in sorted(free, key=lambda l: -l.size):
            k = int(round((budget - kept) * l.numel / left / l.size))
            k = min(max(k, 1), l.n_units)
            l.keep[l.top(k)] = True
            kept += k * l.size
            left -= l.numel
        return {l.name: l.mask(block) for l in layers}

    # Global: reserve the per-layer floor, then rank every remaining unit by score per weight.
    density = budget / max(n_free, 1)
    reserved = 0
    for l in free:
        f = min(max(1, math.ceil(floor * density * l.n_units)), l.n_units)
        l.keep[l.top(f)] = True
        reserved += f * l.size
    rest = budget - reserved
    if rest > 0:
        cand_score, cand_size, cand_layer, cand_idx = [], [], [], []
        for j, l in enumerate(free):
            idx = torch.nonzero(~l.keep).reshape(-1)
            cand_score.append(l.unit_scores[idx] / l.size)
            cand_size.append(torch.full_like(idx, l.size))
            cand_layer.append(torch.full_like(idx, j))
            cand_idx.append(idx)
        score, size = torch.cat(cand_score), torch.cat(cand_size)
        layer_of, idx = torch.cat(cand_layer), torch.cat(cand_idx)
        order = torch.argsort(score, descending=True, stable=True)
        size, layer_of, idx = size[order], layer_of[order], idx[order]
        cum = torch.cumsum(size, 0)
        p = int((cum <= rest).sum())  # the longest prefix that fits
        chosen = torch.zeros_like(order, dtype=torch.bool)
        chosen[:p] = True
        left = rest - (int(cum[p - 1]) if p else 0)
        if left > 0:  # top up with the best single weights after the prefix, for an exact count
            singles = torch.nonzero(size[p:] == 1).reshape(-1)[:left] + p
            chosen[singles] = True
        for j, l in enumerate(free):
            sel = chosen & (layer_of == j)
            l.keep[idx[sel]] = True
    return {l.name: l.mask(block) for l in layers}
