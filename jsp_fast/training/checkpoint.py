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
renames ``load`` picks up the moved-aside previous checkpoint. Temporary folders left by a killed
save carry the writer's pid and are removed by the next save (or ``jf.train`` start) once that
process is gone.

Loading trusts nothing in the directory (see ``_schema``): JSON fields are type- and range-checked,
tensors are compared by name, shape and dtype with what the config implies before a module is built,
and only the fixed file names above are ever opened, never through a symlink that leaves the
directory. Every failure is a ``CheckpointError`` naming the file and the field.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
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
from .._device import check_device
from ..errors import CheckpointError, ConfigError
from . import _schema as schema
from . import _sparse
from .history import History

FORMAT = "jsp_fast.checkpoint"
VERSION = 1
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.safetensors"
STATE_JSON = "state.json"
CONFIG_FILE = "config.json"
DATA_FILES = (MODEL_FILE, STATE_FILE, STATE_JSON)  # the only names a manifest may list
OURS = frozenset((CONFIG_FILE, *DATA_FILES))        # everything save() ever writes in a checkpoint

__all__ = ["save", "load", "load_checkpoint", "exists", "Checkpoint", "CheckpointError", "check_target",
           "clean_stale", "discard"]


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


def _member(path: Path, name: str) -> Path:
    """``path/name`` as a regular file inside ``path``: a symlink that leaves the directory (or
    anything that is not a plain file) is refused, so nothing outside is ever read."""
    f = path / name
    try:
        st = os.lstat(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: cannot read {name} ({exc.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        real = f.resolve()
        if real.parent != path.resolve():
            raise CheckpointError(f"checkpoint {path}: {name} is a symlink to {real}, outside the checkpoint "
                                  f"directory; refusing to read it")
        st = os.stat(f)
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"checkpoint {path}: {name} is not a regular file")
    return f


def _read_json(path: Path, name: str, data: bytes | None = None) -> Any:
    if data is None:
        f = _member(path, name)
        if f.stat().st_size > schema.MAX_JSON_BYTES:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes; a checkpoint's JSON is at most "
                                  f"{schema.MAX_JSON_BYTES}")
        try:
            data = f.read_bytes()
        except OSError as exc:
            raise CheckpointError(f"cannot read {f} ({exc.strerror})") from None
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path / name} is not valid JSON ({type(exc).__name__}: {exc})") from None


def _is_checkpoint(path: Path) -> bool:
    try:
        cfg = _read_json(path, CONFIG_FILE)
    except (CheckpointError, OSError):
        return False
    return isinstance(cfg, dict) and cfg.get("format") == FORMAT


def _foreign(path: Path) -> list[str]:
    """Entries of directory ``path`` that ``save`` did not write (user files: never deleted)."""
    try:
        return sorted(e.name for e in os.scandir(path) if e.name not in OURS)
    except OSError:
        return []


def _backups(path: Path) -> list[Path]:
    found = []
    for p in path.parent.glob(f".{path.name}.old-*"):
        try:
            found.append((p.stat().st_mtime, p))
        except OSError:
            continue
    return [p for _, p in sorted(found, reverse=True)]


def _temp_owner_alive(tmp: Path) -> bool:
    """Whether the process that named ``.NAME.tmp-PID-HEX`` still runs (then it may be mid-save)."""
    pid = tmp.name.rsplit(".tmp-", 1)[-1].split("-")[0]
    if not pid.isdigit():
        return False  # written by an older jsp_fast (no pid in the name)
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def clean_stale(path) -> list[Path]:
    """Remove the temporary folders of killed saves to ``path`` (ours by name and content, their
    writer gone); the removed paths."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        if tmp.is_symlink() or not tmp.is_dir() or _foreign(tmp) or _temp_owner_alive(tmp):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def check_target(path) -> None:
    """Raise ``ConfigError`` now if a checkpoint could never be written at ``path`` (a file in the
    way, a directory of someone else's files, no write permission), before any work is done."""
    path = Path(path)
    for a in (path, *path.parents):
        if not (a.exists() or a.is_symlink()):
            continue
        if a != path and not a.is_dir():
            raise ConfigError(f"cannot write a checkpoint at {path}: {a} is a file, not a directory")
        if a == path:
            if not a.is_dir():
                raise ConfigError(f"cannot write a checkpoint at {path}: it is a file; refusing to replace it")
            entries = sorted(os.listdir(a))
            foreign = _foreign(a)
            if (entries and not _is_checkpoint(a)) or foreign:
                what = "holds files jsp_fast did not write" if _is_checkpoint(a) else "is not a jsp_fast checkpoint"
                shown = foreign or entries
                raise ConfigError(f"{path} {what} ({', '.join(shown[:5])}{' ...' if len(shown) > 5 else ''}); "
                                  f"refusing to replace or delete it: move it away or choose another directory")
        if not os.access(a, os.W_OK):
            raise ConfigError(f"cannot write a checkpoint at {path}: {a} is not writable")
        return


def discard(path) -> list[Path]:
    """Delete the checkpoint at ``path`` with its moved-aside copies and stale temporaries (a run
    starting over); refuses, deleting nothing, if ``path`` holds anything ``save`` did not write."""
    path = Path(path)
    check_target(path)
    removed = clean_stale(path)
    for b in _backups(path):
        if b.is_dir() and not b.is_symlink() and not _foreign(b):
            shutil.rmtree(b, ignore_errors=True)
            removed.append(b)
    if path.is_dir():
        for name in OURS:
            if (path / name).exists() or (path / name).is_symlink():
                (path / name).unlink()
        path.rmdir()
        removed.append(path)
    return removed


def _resolve(path) -> Path:
    """The checkpoint directory for ``path``: itself, its ``last/`` (a jf.train checkpoint_dir), or
    the previous checkpoint moved aside by an interrupted save (of either)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    p = Path(path)
    if _is_checkpoint(p):
        return p
    if _is_checkpoint(p / "last"):
        return p / "last"
    missing = [q for q in (p, p / "last") if not (q.exists() or q.is_symlink()) and q.parent.is_dir()]
    for q in missing:
        for b in _backups(q):
            if _is_checkpoint(b):
                warnings.warn(f"{q} is missing after an interrupted save; loading the previous checkpoint {b}",
                              stacklevel=3)
                return b
    if not p.exists():
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
    if path.is_dir() and _foreign(path):  # replacing it would delete a user's files
        raise FileExistsError(f"{path} holds files jsp_fast did not write ({', '.join(_foreign(path)[:5])}); "
                              f"refusing to replace it")
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
    clean_stale(path)
    # The pid in the name tells a later save whether this folder's writer is still alive.
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"
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
            if not _foreign(stale):
                shutil.rmtree(stale, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


# -- load ------------------------------------------------------------------------------------------
def _read(path: Path, name: str, meta: dict) -> bytes:
    f = _member(path, name)
    if f.stat().st_size != meta["bytes"]:  # before reading: a huge planted file is never loaded
        raise CheckpointError(f"checkpoint {path} is corrupted: {name} has {f.stat().st_size} bytes, its "
                              f"manifest says {meta['bytes']}")
    try:
        data = f.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} is incomplete: cannot read {name} ({exc.strerror})") from None
    if len(data) != meta["bytes"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise CheckpointError(f"checkpoint {path} is corrupted: {name} does not match its manifest")
    return data


def _read_config(path: Path) -> dict:
    cfg = _read_json(path, CONFIG_FILE)
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a jsp_fast checkpoint ({CONFIG_FILE} has no format {FORMAT!r})")
    return schema.check_config(cfg, str(path / CONFIG_FILE), FORMAT, VERSION, DATA_FILES, MODEL_FILE)


def _tensors(path: Path, name: str, meta: dict) -> dict[str, torch.Tensor]:
    """A safetensors file of the manifest, parsed (its header errors become CheckpointErrors)."""
    data = _read(path, name, meta)
    try:
        return _st_load(data)
    except Exception as exc:  # noqa: BLE001 (SafetensorError, and whatever a crafted header provokes)
        raise CheckpointError(f"{path / name} is not a valid safetensors file ({type(exc).__name__}: {exc})") from None


def _load_state_into(model: nn.Module, sd: dict[str, torch.Tensor], path: Path) -> None:
    """Give every maskable layer the checkpoint's mask (or none), then load strictly."""
    masked = {k[: -len(".weight_mask")]: v for k, v in sd.items() if k.endswith(".weight_mask")}
    try:
        for name, module in model.named_modules():
            if hasattr(module, "set_mask"):
                m = masked.pop(name, None)
                module.set_mask(None if m is None else m.to(torch.bool))
        if masked:
            raise CheckpointError(f"checkpoint {path} has masks for {sorted(masked)}, which the model lacks")
        model.load_state_dict(sd, strict=True)
    except (RuntimeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {path} does not fit the model: {exc}") from None


def _optimizer(path: Path, sj: dict, tensors: dict[str, torch.Tensor]) -> dict | None:
    if "optimizer" not in sj:
        return None
    o = sj["optimizer"]
    ids = set(o["state_ids"])
    state: dict[int, dict] = {int(pid): dict(o.get("scalars", {}).get(str(pid), {})) for pid in ids}
    for k, v in tensors.items():
        if not k.startswith("optimizer."):
            continue
        pid, _, key = k[len("optimizer."):].partition(".")
        if not pid.isdigit() or int(pid) not in ids or not key:
            raise CheckpointError(f"{path / STATE_FILE}: tensor {k!r} names no parameter of the optimizer state "
                                  f"(expected optimizer.<id>.<key> with id in {sorted(ids)})")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{path / STATE_FILE}: tensor {k!r} holds NaN or inf")
        state[int(pid)][key] = v
    return {"state": state, "param_groups": o["param_groups"]}


def load_checkpoint(path, model: nn.Module | None = None, device: str | torch.device | None = None) -> Checkpoint:
    """Read a checkpoint: the model (built from ``config.json``, or ``model`` loaded in place), the
    optimizer state_dict, the history and the extras (tensors included).

    Everything is validated first (see the module docstring); any defect is a ``CheckpointError``.
    """
    if device is not None:
        device = check_device(device)
    path = _resolve(path)
    cfg = _read_config(path)
    files = cfg["files"]
    where = str(path / MODEL_FILE)
    sd = _tensors(path, MODEL_FILE, files[MODEL_FILE])
    sparse = _sparse.is_sparse_config(cfg["model"])
    if sparse:  # the layout and the kept-block coordinates in the tensors rebuild the structure
        schema.check_block_indices(sd, where)
        try:
            skel = _sparse.from_config(cfg["model"], sd)
        except (TypeError, ValueError, KeyError, IndexError) as exc:
            raise CheckpointError(f"{path / CONFIG_FILE}: field 'model.sparse' does not fit {MODEL_FILE}: "
                                  f"{exc}") from None
    else:
        skel = schema.skeleton(cfg["model"], cfg["masks"], str(path / CONFIG_FILE))
    dtype = schema.check_tensors(sd, schema.expected_tensors(skel), where)
    tensors = _tensors(path, STATE_FILE, files[STATE_FILE]) if STATE_FILE in files else {}
    bad = sorted(k for k in tensors if not k.startswith(("optimizer.", "extra.")))
    if bad:
        raise CheckpointError(f"{path / STATE_FILE}: unexpected tensors {bad[:8]} (expected optimizer.* and extra.*)")
    sj = {}
    if STATE_JSON in files:
        sj = schema.check_state_json(_read_json(path, STATE_JSON, _read(path, STATE_JSON, files[STATE_JSON])),
                                     str(path / STATE_JSON))
    optimizer = _optimizer(path, sj, tensors)
    extra = dict(cfg["extra"])
    extra.update({k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")})
    schema.check_settings_value(extra, str(path / CONFIG_FILE))

    if model is None:
        try:
            model = skel if sparse else CNF.from_config(cfg["model"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path / CONFIG_FILE}: field 'model': {exc}") from None
        model = model.to(dtype)
        if device is not None:
            model = model.to(device)
    else:
        mine = _jsonable(model.config()) if hasattr(model, "config") else None
        theirs = cfg["model"]
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
    history = History.from_dict(sj["history"]) if "history" in sj else None
    return Checkpoint(path=path, model=model, config=cfg, optimizer=optimizer, history=history, extra=extra)


def load(path, device: str | torch.device | None = None) -> nn.Module:
    """Load the model saved at ``path`` (a checkpoint directory, or a ``jf.train`` checkpoint_dir).

    Pruned layers come back with their ``weight_mask`` buffers, so the model stays pruned. A
    malformed, corrupted or crafted checkpoint raises ``CheckpointError`` (a ``ValueError``).
    """
    return load_checkpoint(path, device=device).model
