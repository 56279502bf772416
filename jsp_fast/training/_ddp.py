"""What ``jf.train`` does differently on rank ``r`` of ``W`` torchrun workers (DistributedDataParallel).

The single-process run is the definition; the distributed one reproduces it:

* Minibatch ``k`` is the same global batch the single process draws (``_Batches`` depends only on
  ``(seed, k)``); rank ``r`` takes rows ``[r B/W, (r+1) B/W)`` of it. DDP averages the gradients, and
  the mean of ``W`` equal-size shard means is the batch mean, so the update is the single-process
  one up to float rounding. ``batch_size`` must be a multiple of ``W``.
* Equality holds for the exact trace and fixed-step solvers. Two things make other runs differ (by
  noise / solver tolerance, not in distribution): Hutchinson noise is drawn per rank from a seed
  derived from ``(seed, rank, step)`` (so a run is a pure function of its step and world size, and
  no RNG state has to travel between ranks or across a resume with another world size), and an
  adaptive solver (dopri5) picks its steps from the error of the rows it integrates, which are
  ``B/W`` rows per rank instead of ``B``.
* The logged row is reduced over ranks: means (train NLL, bits/dim, ``train_R``, kinetic,
  jacobian, loss) are averaged, NFEs take the maximum (the step waits for the slowest rank).
  ``R`` on the fixed batch is split over ranks; the validation pass deals its ``eval_batch`` chunks
  round-robin (chunk ``i`` seeded from ``(seed, step, i)``) and sums them in chunk order, so it is
  the single-process value exactly for a deterministic trace.
* Pruning masks (every bool/integer buffer) must be identical on every rank: checked with a digest
  before training and after it, never assumed.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import _dist

__all__ = ["DDPRun"]

_TRAIN, _R, _VAL = 1, 2, 3  # seed tags: the noise streams of the training, R and validation solves

# row key -> how ranks combine it
_MEAN_KEYS = ("train_nll", "train_bpd", "loss", "train_R", "kinetic", "jacobian")
_MAX_KEYS = ("nfe_forward", "nfe_backward")


class _LogProb(nn.Module):
    """``model.log_prob`` as a forward, so DDP (which hooks ``forward``) can wrap it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, return_stats: bool = False):
        if return_stats:
            return self.model.log_prob(x, return_stats=True)
        return self.model.log_prob(x), None


class DDPRun:
    """Rank ``r``'s share of one training run; built after the resume, before the first step."""

    def __init__(self, model: nn.Module, seed: int, batch_size: int, device: torch.device):
        self.rank, self.world, self.seed = _dist.rank(), _dist.world(), seed
        if batch_size % self.world:
            raise ValueError(f"batch_size={batch_size} must be a multiple of the number of processes "
                             f"({self.world}): each rank takes an equal share of the global minibatch")
        self.local = batch_size // self.world
        self.is_main = self.rank == 0
        # a user's NCCL-only group cannot carry CPU tensors; jsp_fast's own group routes them to gloo
        self.reduce_device = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        self.check_masks(model, "before training")
        # broadcast_buffers=False: the masks were just checked equal and never change; DDP's
        # construction still broadcasts rank 0's parameters, so every rank starts identical.
        self.module = DistributedDataParallel(
            _LogProb(model), device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)

    def close(self) -> None:
        """Drop the DDP wrapper now (its C++ reducer hangs if freed after the group is destroyed)."""
        self.module = None

    @staticmethod
    def check_masks(model: nn.Module, when: str) -> None:
        _dist.check_same(_dist.structure_digest(model),
                         f"pruning masks ({when}; prune on one rank and share them with "
                         f"jsp_fast.training._dist.broadcast_masks, or prune identically everywhere)")

    @staticmethod
    def agree_on_start(start: int, path) -> None:
        steps = _dist.all_gather_object(int(start))
        if len(set(steps)) > 1:
            raise _dist.DistributedError(
                f"ranks resumed from different steps {steps}: every rank must see the same checkpoint "
                f"{path} (put the checkpoint directory on a file system all nodes share)")

    # -- the training step -------------------------------------------------------------------------
    def local_indices(self, idx: torch.Tensor, step: int) -> torch.Tensor:
        """This rank's rows of global minibatch ``idx``; seeds this rank's noise for the step."""
        torch.manual_seed(_dist.derive_seed(self.seed, _TRAIN, step, self.rank))
        return idx[self.rank * self.local:(self.rank + 1) * self.local]

    def log_prob(self, x: torch.Tensor, return_stats: bool = False):
        logp, stats = self.module(x, return_stats)
        return (logp, stats) if return_stats else logp

    def reduce(self, row: dict) -> dict:
        keys = [k for k in (*_MEAN_KEYS, *_MAX_KEYS) if k in row]
        mine = torch.tensor([float(row[k]) for k in keys], dtype=torch.float64, device=self.reduce_device)
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        torch.distributed.all_gather(parts, mine)
        stacked = torch.stack(parts)
        for j, k in enumerate(keys):
            if k in _MAX_KEYS:
                row[k] = int(stacked[:, j].max())
            else:
                row[k] = float(stacked[:, j].mean())
        return row

    # -- evaluation --------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model, row: dict, step: int, r_x: torch.Tensor, val: torch.Tensor | None,
                 do_R: bool, do_val: bool, eval_batch: int, bits_per_dim: Callable | None) -> dict:
        if not (do_R or do_val):
            return row
        part: dict = {}
        if do_R:
            piece = torch.tensor_split(r_x, self.world)[self.rank]
            if piece.shape[0]:
                torch.manual_seed(_dist.derive_seed(self.seed, _R, step, self.rank))
                _, stats = model.log_prob(piece, return_stats=True)
                part["R"] = (float(stats["R"].double().sum()), int(piece.shape[0]), int(model.nfe["forward"]))
        if do_val:
            chunks = []
            for i, a, b in _dist.mine(_dist.shards(val.shape[0], eval_batch)):
                torch.manual_seed(_dist.derive_seed(self.seed, _VAL, step, i))
                x = val[a:b]
                logp = model.log_prob(x)
                bpd = None if bits_per_dim is None else float(torch.as_tensor(bits_per_dim(logp, x)).double().sum())
                chunks.append((i, float(logp.double().sum()), bpd))
            part["val"] = chunks
        parts = _dist.all_gather_object(part)
        if do_R:
            Rs = [p["R"] for p in parts if "R" in p]
            row["R"] = sum(s for s, _, _ in Rs) / sum(n for _, n, _ in Rs)
            row["R_nfe"] = max(f for _, _, f in Rs)
        if do_val:
            nll = bpd = 0.0  # summed in chunk order, as the single-process pass does
            for _, s, b in sorted((c for p in parts for c in p["val"]), key=lambda c: c[0]):
                nll -= s
                if b is not None:
                    bpd += b
            n = val.shape[0]
            row["val_nll"] = nll / n
            if bits_per_dim is not None:
                row["val_bpd"] = bpd / n
        return row
