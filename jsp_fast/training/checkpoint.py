"""Checkpoints: ``jf.save(path, model, ...)`` / ``jf.load(path)``; safetensors + JSON, never pickle.

A checkpoint is a directory::

    config.json         format/version, the model's config(), mask names, JSON extras and a manifest
                        (size + sha256) of the files below; written last
    model.safetensors   model.state_dict(); a pruned layer's ``weight_mask`` (bool) is stored once,
                        as the buffer it is
    state.safetensors   optional: optimizer tensors (``optimizer.<param>.<key>``) and tensor extras
    state.json          optional: optimizer param groups, the training history, JSON extras

Writes are atomic: everything goes to a hidden temporary sibling directory, is fsynced, and is then
renamed over ``path`` (the old checkpoint is moved aside first and deleted after the swap). A write
interrupted at any point leaves either the old checkpoint or the new one; ``load`` verifies the
manifest, so a half-written directory is never accepted, and if a crash falls between the two
renames ``load`` picks up the moved-aside previous checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save
from torch import nn

from .._version import __version__
from ..cnf import CNF, ODEnet
from . import _sparse
from .history import History

FORMAT = "jsp_fast.checkpoint"
VERSION = 1
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.safetensors"
STATE_JSON = "state.json"
CONFIG_FILE = "config.json"

__all__ = ["save", "load", "load_checkpoint", "exists", "Checkpoint", "CheckpointError"]


class CheckpointError(ValueError):
    """The path is not a (complete, uncorrupted) jsp_fast checkpoint."""


@dataclass
class Checkpoint:
    """Everything ``load_checkpoint`` read: the model and the trainer's state."""

    path: Path
    model: nn.Module
    config: dict
    optimizer: dict | None = None     # a torch optimizer state_dict, ready for load_state_dict
    history: History | None = None    # the jf.train History, when one was saved
    extra: dict = field(default_factory=dict)  # JSON values and tensors, as given to save()


# -- helpers ---------------------------------------------------------------------------------------
def _jsonable(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"cannot store {type(v).__name__} in a checkpoint (JSON values and tensors only)")


def _write(path: Path, data: bytes) -> dict:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover (platforms without directory fds)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _model_config(model: nn.Module) -> dict:
    if not hasattr(model, "config"):
        raise TypeError(f"can only save a jf.CNF (a model with config()), got {type(model).__name__}")
    net = getattr(model, "net", None)
    if _sparse.is_sparse(model):  # a sparse checkpoint: the layout rebuilds the SparseODEnet on load
        return _jsonable({**model.config(), "sparse": _sparse.layout(net)})
    if net is not None and not isinstance(net, ODEnet):
        raise TypeError(f"cannot save a CNF whose field is a {type(net).__name__}: save the dense/masked "
                        f"model before jf.sparsify() and sparsify it again after loading")
    return _jsonable(model.config())


def _is_checkpoint(path: Path) -> bool:
    cfg = path / CONFIG_FILE
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def _backups(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True)


def _resolve(path) -> Path:
    """The checkpoint directory for ``path``: itself, its ``last/`` (a jf.train checkpoint_dir), or
    the previous checkpoint moved aside by an interrupted save."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    p = Path(path)
    if _is_checkpoint(p):
        return p
    if _is_checkpoint(p / "last"):
        return p / "last"
    if not p.exists():
        for b in _backups(p):
            if _is_checkpoint(b):
                warnings.warn(f"{p} is missing after an interrupted save; loading the previous checkpoint {b}",
                              stacklevel=3)
                return b
        raise CheckpointError(f"no checkpoint at {p} (path does not exist)")
    if p.is_dir():
        raise CheckpointError(f"{p} is not a jsp_fast checkpoint (no valid {CONFIG_FILE})")
    raise CheckpointError(f"{p} is a file; a jsp_fast checkpoint is a directory with {CONFIG_FILE}")


def exists(path) -> bool:
    """True when ``path`` (or ``path/last``) holds a checkpoint ``load`` would accept."""
    try:
        _resolve(path)
        return True
    except (CheckpointError, TypeError):
        return False


# -- save ------------------------------------------------------------------------------------------
def save(path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, history=None,
         extra: dict | None = None) -> Path:
    """Write a checkpoint directory at ``path`` atomically; returns the path.

    ``extra`` holds JSON values and tensors (tensors go to ``state.safetensors``); ``history`` a
    ``jf.train`` History (or a list of dicts). An existing checkpoint at ``path`` is replaced; any
    other existing non-empty file or directory there is left alone (error).
    """
    path = Path(path)
    if path.exists() and not _is_checkpoint(path) and not (path.is_dir() and not any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not a jsp_fast checkpoint; refusing to replace it")
    cfg_model = _model_config(model)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    masks = sorted(k[: -len(".weight_mask")] for k in sd if k.endswith(".weight_mask"))

    state_tensors: dict[str, torch.Tensor] = {}
    state_json: dict[str, Any] = {}
    if optimizer is not None:
        osd = optimizer.state_dict()
        scalars: dict[str, dict] = {}
        for pid, st in osd["state"].items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    state_tensors[f"optimizer.{pid}.{k}"] = v.detach().contiguous().cpu()
                else:
                    scalars.setdefault(str(pid), {})[k] = _jsonable(v)
        state_json["optimizer"] = {"class": type(optimizer).__name__, "param_groups": _jsonable(osd["param_groups"]),
                                   "state_ids": [int(p) for p in osd["state"]], "scalars": scalars}
    extra_json: dict[str, Any] = {}
    for k, v in (extra or {}).items():
        if isinstance(v, torch.Tensor):
            state_tensors[f"extra.{k}"] = v.detach().contiguous().cpu()
        else:
            extra_json[str(k)] = _jsonable(v)
    if history is not None:
        state_json["history"] = history.to_dict() if hasattr(history, "to_dict") else _jsonable(list(history))

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
    backup = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        files = {MODEL_FILE: _write(tmp / MODEL_FILE, _st_save(sd, metadata={"format": "pt"}))}
        if state_tensors:
            files[STATE_FILE] = _write(tmp / STATE_FILE, _st_save(state_tensors, metadata={"format": "pt"}))
        if state_json:
            files[STATE_JSON] = _write(tmp / STATE_JSON, json.dumps(state_json).encode())
        config = {"format": FORMAT, "version": VERSION, "jsp_fast_version": __version__,
                  "class": type(model).__name__, "model": cfg_model, "masks": masks,
                  "extra": extra_json, "files": files}
        _write(tmp / CONFIG_FILE, json.dumps(config, indent=2).encode())  # last: marks it complete
        _fsync_dir(tmp)
        moved = False
        if path.exists():
            os.rename(path, backup)
            moved = True
        try:
            os.rename(tmp, path)
        except BaseException:
            if moved and not path.exists():
                os.rename(backup, path)
            raise
        _fsync_dir(path.parent)
        if moved:
            shutil.rmtree(backup, ignore_errors=True)
        for stale in _backups(path):  # left by an earlier save that died between its renames
            shutil.rmtree(stale, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


# -- load ------------------------------------------------------------------------------------------
def _read(path: Path, name: str, meta: dict) -> bytes:
    f = path / name
    try:
        data = f.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} is incomplete: cannot read {name} ({exc.strerror})") from None
    if len(data) != meta.get("bytes") or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is corrupted: {name} does not match its manifest")
    return data


def _read_config(path: Path) -> dict:
    try:
        cfg = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path / CONFIG_FILE}: {exc}") from None
    if cfg.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a jsp_fast checkpoint")
    if int(cfg.get("version", 0)) > VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {cfg['version']}; this jsp_fast reads "
                              f"up to {VERSION} (upgrade jsp_fast)")
    if MODEL_FILE not in cfg.get("files", {}):
        raise CheckpointError(f"checkpoint {path} has no {MODEL_FILE} in its manifest")
    return cfg


def _load_state_into(model: nn.Module, sd: dict[str, torch.Tensor], path: Path) -> None:
    """Give every maskable layer the checkpoint's mask (or none), then load strictly."""
    masked = {k[: -len(".weight_mask")]: v for k, v in sd.items() if k.endswith(".weight_mask")}
    for name, module in model.named_modules():
        if hasattr(module, "set_mask"):
            m = masked.pop(name, None)
            module.set_mask(None if m is None else m.to(torch.bool))
    if masked:
        raise CheckpointError(f"checkpoint {path} has masks for {sorted(masked)}, which the model lacks")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit the model: {exc}") from None


def load_checkpoint(path, model: nn.Module | None = None, device: str | torch.device | None = None) -> Checkpoint:
    """Read a checkpoint: the model (built from ``config.json``, or ``model`` loaded in place), the
    optimizer state_dict, the history and the extras (tensors included)."""
    path = _resolve(path)
    cfg = _read_config(path)
    files = cfg["files"]
    sd = _st_load(_read(path, MODEL_FILE, files[MODEL_FILE]))
    if model is None:
        if cfg.get("class", "CNF") != "CNF":
            raise CheckpointError(f"checkpoint {path} holds a {cfg.get('class')}, not a CNF")
        try:
            sparse = _sparse.is_sparse_config(cfg["model"])
            model = _sparse.from_config(cfg["model"], sd) if sparse else CNF.from_config(cfg["model"])
        except (TypeError, ValueError, KeyError, IndexError) as exc:
            raise CheckpointError(f"checkpoint {path} has an invalid model config: {exc}") from None
        if device is not None:
            model = model.to(device)
    else:
        mine = _jsonable(model.config()) if hasattr(model, "config") else None
        theirs = cfg.get("model", {})
        if _sparse.mismatch(model, theirs):
            raise CheckpointError(f"checkpoint {path} {_sparse.mismatch(model, theirs)}")
        if mine is not None:
            for k in ("dim", "hidden", "activation"):
                if k in theirs and mine.get(k) != theirs[k]:
                    raise CheckpointError(f"checkpoint {path} has {k}={theirs[k]!r}, the model {k}={mine.get(k)!r}")
    ref = next(iter(model.parameters()), None)
    if ref is not None:
        sd = {k: v.to(ref.device) for k, v in sd.items()}
    _load_state_into(model, sd, path)

    tensors = _st_load(_read(path, STATE_FILE, files[STATE_FILE])) if STATE_FILE in files else {}
    sj = json.loads(_read(path, STATE_JSON, files[STATE_JSON])) if STATE_JSON in files else {}
    optimizer = None
    if "optimizer" in sj:
        o = sj["optimizer"]
        state = {}
        for pid in o["state_ids"]:
            st = dict(o["scalars"].get(str(pid), {}))
            prefix = f"optimizer.{pid}."
            st.update({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            state[int(pid)] = st
        optimizer = {"state": state, "param_groups": o["param_groups"]}
    history = None
    if "history" in sj:
        history = History.from_dict(sj["history"])
    extra = dict(cfg.get("extra", {}))
    extra.update({k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")})
    return Checkpoint(path=path, model=model, config=cfg, optimizer=optimizer, history=history, extra=extra)


def load(path, device: str | torch.device | None = None) -> nn.Module:
    """Load the model saved at ``path`` (a checkpoint directory, or a ``jf.train`` checkpoint_dir).

    Pruned layers come back with their ``weight_mask`` buffers, so the model stays pruned.
    """
    return load_checkpoint(path, device=device).model
