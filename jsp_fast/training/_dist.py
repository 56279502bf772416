"""torch.distributed plumbing for runs launched by ``torchrun``: the process group, rank queries,
small collectives on Python objects, seeds derived per rank/shard, and a check that every rank holds
the same pruning masks.

Nothing here starts processes: ``torchrun`` (``python -m torch.distributed.run``) launches them and
sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``; a plain ``python`` run
(``WORLD_SIZE`` unset or 1) never touches torch.distributed. The process group is made with a finite
timeout (``JSP_FAST_DIST_TIMEOUT`` seconds, default 300) so a rank whose peer hangs fails instead
of waiting forever; a peer that dies is noticed sooner, by gloo/NCCL or by torchrun, which stops the
remaining workers of a failed group.
"""
from __future__ import annotations

import atexit
import datetime
import hashlib
import os
from contextlib import contextmanager, suppress
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistributedError", "ENV_TIMEOUT", "launched", "active", "rank", "world", "is_main", "local_device",
           "timeout_s", "session", "barrier", "broadcast_object", "all_gather_object", "check_same", "guard",
           "join", "derive_seed", "shard_seed", "shards", "mine", "structure_digest", "broadcast_masks"]

ENV_TIMEOUT = "JSP_FAST_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0


class DistributedError(RuntimeError):
    """A multi-process run cannot go on: ranks disagree, or a peer died or stopped responding."""


# -- who am I ----------------------------------------------------------------------------------------
def launched() -> bool:
    """True in a process started by torchrun with more than one worker in total."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def active() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def _local_rank() -> int:
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, a bare ``cuda`` becomes this worker's GPU ``cuda:LOCAL_RANK`` (one GPU per
    process, the usual torchrun layout); anything else is returned as given."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and launched():
        n = torch.cuda.device_count()
        lr = _local_rank()
        if lr >= n:
            raise DistributedError(f"local rank {lr} has no GPU of its own: this node has {n} CUDA device(s); "
                                   f"use --nproc-per-node {n} or fewer")
        return torch.device("cuda", lr)
    return device


def timeout_s() -> float:
    raw = os.environ.get(ENV_TIMEOUT)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        v = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_TIMEOUT} must be a number of seconds, got {raw!r}") from None
    if not v > 0:
        raise ValueError(f"{ENV_TIMEOUT} must be a positive number of seconds, got {raw!r}")
    return v


# -- the process group -------------------------------------------------------------------------------
def _init() -> None:
    # gloo carries CPU tensors and the object collectives; NCCL (when built in) the CUDA tensors.
    # One group serves both, so a CPU run on a GPU node and a GPU run need no flag.
    cuda = torch.cuda.is_available() and dist.is_nccl_available()
    if cuda and _local_rank() < torch.cuda.device_count():
        torch.cuda.set_device(_local_rank())
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    try:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s()))
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"cannot join the torchrun process group ({backend}, "
                               f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}): "
                               f"{_first_line(exc)}") from exc


def join() -> bool:
    """Join the process group torchrun describes, if launched by it and none exists yet; True if
    this call made it. The group then stays for the rest of the process and is left at exit: in a
    torchrun worker a second group made after destroying the first cannot connect (the rendezvous
    store still holds the first one's addresses), so ``jf.train`` called twice must reuse it."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return False
    _init()
    atexit.register(_leave)
    return True


def _leave() -> None:
    if dist.is_available() and dist.is_initialized():
        with suppress(Exception):  # a broken group must not turn a clean exit into an error
            dist.destroy_process_group()


@contextmanager
def session() -> Iterator[bool]:
    """Join the process group torchrun describes (if launched by it and none exists yet) for the
    duration of the block, and leave it afterwards; yields whether this block made the group.

    A group that already exists (the caller's) is used and left alone. For a command that is the
    whole process (``jsp-fast train`` ...); library code calls ``join``.
    """
    own = launched() and not (dist.is_available() and dist.is_initialized())
    if own:
        _init()
    try:
        yield own
        if own and dist.is_initialized():
            # leave together: a rank done early (compare's others while rank 0 writes the report) that
            # tore its gloo pairs down under a working peer was seen to abort at exit ("terminate called
            # without an active exception", 1 run in ~10 on CI)
            with suppress(Exception):
                dist.barrier()
    finally:
        if own and dist.is_initialized():
            with suppress(Exception):  # a broken group must not mask the real error
                dist.destroy_process_group()


def _first_line(exc: BaseException) -> str:
    s = str(exc).strip()
    return s.splitlines()[0] if s else type(exc).__name__


_PEER_WORDS = ("gloo", "nccl", "connection", "timed out", "timeout", "socket", "peer", "broken pipe", "c10d")


@contextmanager
def guard(what: str) -> Iterator[None]:
    """Turn a failed collective (a peer died, hung or hit an error) into one ``DistributedError``
    naming this rank, the work and the timeout, instead of a backend traceback."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as exc:
        dist_error = getattr(dist, "DistError", None)
        msg = str(exc).lower()
        if not active() or not ((dist_error is not None and isinstance(exc, dist_error))
                                or any(w in msg for w in _PEER_WORDS)):
            raise
        raise DistributedError(
            f"rank {rank()} of {world()}: {what} stopped: another process died or did not respond within "
            f"{timeout_s():g} s ({ENV_TIMEOUT}); {_first_line(exc)}") from exc


# -- collectives on Python objects -------------------------------------------------------------------
def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj: Any = None, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (pickled; small things only)."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not active():
        return [obj]
    out: list = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def check_same(value: Any, what: str) -> None:
    """Raise ``DistributedError`` unless every rank passed an equal ``value`` (e.g. a digest)."""
    values = all_gather_object(value)
    if any(v != values[0] for v in values[1:]):
        odd = [r for r, v in enumerate(values) if v != values[0]]
        raise DistributedError(f"{what} differ across ranks (ranks {odd} disagree with rank 0)")


# -- seeds -------------------------------------------------------------------------------------------
def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from a tuple of non-negative ints (NumPy's SeedSequence), so
    (seed, rank, step) streams do not overlap the way ``seed + rank`` ones would."""
    words = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 32 | int(words[1])) & ((1 << 63) - 1))


_SHARD_TAG = 0x5A4D


def shard_seed(seed: int, shard: int) -> int:
    """The seed of shard ``shard`` of a sharded sample/eval run. Shard 0 keeps ``seed`` itself, so a
    run that fits in one shard draws exactly what ``model.sample(n, seed=seed)`` draws."""
    return int(seed) if shard == 0 else derive_seed(_SHARD_TAG, seed, shard)


def shards(n: int, size: int) -> list[tuple[int, int, int]]:
    """``(index, start, stop)`` of the fixed-size shards covering ``range(n)``."""
    return [(i, s, min(s + size, n)) for i, s in enumerate(range(0, n, size))]


def mine(items: Sequence) -> list:
    """This rank's share of ``items``: items ``rank, rank + world, ...``."""
    return list(items[rank()::world()])


# -- masks -------------------------------------------------------------------------------------------
def structure_digest(model: nn.Module) -> str:
    """sha256 of the model's sparsity structure: every bool/integer buffer (pruning masks, block
    index tables) with its name and shape."""
    h = hashlib.sha256()
    for name, buf in sorted(model.named_buffers(), key=lambda kv: kv[0]):
        if buf.is_floating_point() or buf.is_complex():
            continue
        t = buf.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def broadcast_masks(model: nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s pruning masks (``weight_mask`` of each maskable layer, or none)
    and re-zero the pruned weights: pruning is scored once and shared, not recomputed per rank."""
    if not active():
        return
    masks = None
    if rank() == src:
        masks = {name: (None if m.mask is None else m.mask.detach().cpu())
                 for name, m in model.named_modules() if hasattr(m, "set_mask")}
    masks = broadcast_object(masks, src=src)
    if rank() != src:
        modules = dict(model.named_modules())
        for name, mask in masks.items():
            if name not in modules or not hasattr(modules[name], "set_mask"):
                raise DistributedError(f"rank {src} has a maskable layer {name!r} that rank {rank()}'s model lacks")
            modules[name].set_mask(mask)
    if hasattr(model, "apply_masks_"):
        model.apply_masks_()
