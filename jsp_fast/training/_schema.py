"""What a checkpoint may hold, checked before any tensor reaches a module.

A checkpoint is data from outside (a download, a colleague's run, a crafted file), so ``load`` trusts
nothing: every JSON field is checked for type and range, the model is first built on the ``meta``
device (no memory) to learn exactly which tensors, shapes and dtypes the config implies, its size is
bounded, and the tensors read are compared with that list and checked finite. Every failure is a
``CheckpointError`` naming the file and the field, never a raw ``AttributeError``/``KeyError``.
"""
from __future__ import annotations

import inspect
import math
import re
from typing import Any, Mapping

import torch
from torch import nn

from ..cnf import ACTIVATIONS, CNF, NOISES, SOLVERS, TRACES
from ..errors import CheckpointError

__all__ = ["MAX_PARAMETERS", "MAX_JSON_BYTES", "check_config", "check_options", "expected_tensors",
           "check_tensors", "check_state_json", "check_settings_value"]

# A CNF field with more elements than this is no model anyone trains with jsp_fast (4 GiB of fp32);
# a config claiming one is refused before anything is allocated.
MAX_PARAMETERS = 1 << 30
MAX_JSON_BYTES = 64 << 20  # config.json / state.json; histories of 10^5 steps are a few MB
_MAX_LAYERS = 1024

_SHA = re.compile(r"^[0-9a-f]{64}$")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def _fail(where: str, field: str, expected: str, got: Any) -> CheckpointError:
    return CheckpointError(f"{where}: field {field!r}: expected {expected}, got {_short(got)}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _need(cond: bool, where: str, field: str, expected: str, got: Any) -> None:
    if not cond:
        raise _fail(where, field, expected, got)


# -- config.json -----------------------------------------------------------------------------------
def check_config(cfg: Any, where: str, fmt: str, version: int, allowed_files: tuple[str, ...],
                 required_file: str) -> dict:
    """The top level of ``config.json``: format, version, class, manifest, masks, extra, model."""
    _need(isinstance(cfg, dict), where, "<top level>", "a JSON object", type(cfg).__name__)
    _need(cfg.get("format") == fmt, where, "format", repr(fmt), cfg.get("format"))
    v = cfg.get("version")
    _need(_is_int(v) and v >= 1, where, "version", "an integer >= 1", v)
    if v > version:
        raise CheckpointError(f"{where}: checkpoint format version {v}; this jsp_fast reads up to {version} "
                              f"(upgrade jsp_fast)")
    _need(cfg.get("class", "CNF") == "CNF", where, "class", "'CNF'", cfg.get("class"))
    files = cfg.get("files")
    _need(isinstance(files, dict), where, "files", "an object {file name: {bytes, sha256}}", files)
    for name, meta in files.items():
        # File names come from this fixed list, never from the file: nothing outside is ever named.
        _need(name in allowed_files, where, f"files.{name}", f"one of {list(allowed_files)}", name)
        _need(isinstance(meta, dict), where, f"files.{name}", "an object {bytes, sha256}", meta)
        _need(_is_int(meta.get("bytes")) and meta["bytes"] >= 0, where, f"files.{name}.bytes",
              "an integer >= 0", meta.get("bytes"))
        _need(isinstance(meta.get("sha256"), str) and bool(_SHA.match(meta["sha256"])), where,
              f"files.{name}.sha256", "64 lowercase hex digits", meta.get("sha256"))
    if required_file not in files:
        raise CheckpointError(f"{where}: field 'files': the manifest has no {required_file}")
    masks = cfg.get("masks", [])
    _need(isinstance(masks, list) and all(isinstance(m, str) for m in masks), where, "masks",
          "a list of layer names", masks)
    _need(len(set(masks)) == len(masks), where, "masks", "distinct layer names", masks)
    extra = cfg.get("extra", {})
    _need(isinstance(extra, dict), where, "extra", "a JSON object", extra)
    cfg = dict(cfg)
    cfg["model"] = check_model_config(cfg.get("model"), where)
    cfg.setdefault("masks", [])
    cfg.setdefault("extra", {})
    return cfg


_MODEL_FIELDS = {
    "dim": (lambda v: _is_int(v) and 1 <= v <= 1 << 24, "an integer in [1, 2^24]"),
    "hidden": (lambda v: isinstance(v, list) and len(v) <= _MAX_LAYERS and all(_is_int(h) and 1 <= h <= 1 << 24
                                                                               for h in v),
               f"a list of at most {_MAX_LAYERS} integers in [1, 2^24]"),
    "activation": (lambda v: v in ACTIVATIONS, f"one of {list(ACTIVATIONS)}"),
    "trace": (lambda v: v in TRACES, f"one of {list(TRACES)}"),
    "noise": (lambda v: v in NOISES, f"one of {list(NOISES)}"),
    "solver": (lambda v: v in SOLVERS, f"one of {list(SOLVERS)}"),
    "rtol": (lambda v: _is_num(v) and 0 < v < math.inf, "a positive finite number"),
    "atol": (lambda v: _is_num(v) and 0 < v < math.inf, "a positive finite number"),
    "T": (lambda v: _is_num(v) and 0 < v < math.inf, "a positive finite number"),
    "adjoint": (lambda v: isinstance(v, bool), "true or false"),
    "train_T": (lambda v: isinstance(v, bool), "true or false"),
    "options": (lambda v: isinstance(v, dict), "an object of solver options"),
}


def _cnf_parameters() -> set[str]:
    return set(inspect.signature(CNF.__init__).parameters) - {"self", "net"}


def check_model_config(m: Any, where: str) -> dict:
    """``config.json``'s ``model``: every field CNF takes, typed and in range; nothing else."""
    _need(isinstance(m, dict), where, "model", "a JSON object (the CNF's config())", type(m).__name__)
    for k in ("dim", "hidden"):
        if k not in m:
            raise CheckpointError(f"{where}: field 'model.{k}' is missing")
    known = _cnf_parameters()
    for k, v in m.items():
        if k == "sparse":
            check_sparse_layout(v, where)
        elif k in _MODEL_FIELDS:
            ok, expected = _MODEL_FIELDS[k]
            _need(ok(v), where, f"model.{k}", expected, v)
        elif k in known:
            # A CNF argument newer than this table: JSON scalars only (no paths are ever opened).
            _need(v is None or isinstance(v, (bool, int, float, str)), where, f"model.{k}", "a JSON scalar", v)
        else:
            raise CheckpointError(f"{where}: unknown field 'model.{k}' (a CNF takes {sorted(known)})")
    m = dict(m)
    m["options"] = check_options(m.get("options", {}), f"{where}: field 'model.options'")
    n = parameter_count(m["dim"], m["hidden"])
    if n > MAX_PARAMETERS:
        raise CheckpointError(f"{where}: field 'model.hidden': dim={m['dim']}, hidden={_short(m['hidden'])} "
                              f"means {n:,} parameters; refusing more than {MAX_PARAMETERS:,}")
    return m


def check_sparse_layout(v: Any, where: str) -> None:
    """``model.sparse`` of a block-sparse checkpoint (``training/_sparse.layout``): one entry per layer,
    ``{"kind": "sparse", "block": [bm, bk]}`` or ``{"kind": "dense", "reason": str}``, and a backend name."""
    _need(isinstance(v, dict) and isinstance(v.get("layers"), list), where, "model.sparse",
          "an object with a list 'layers'", v)
    _need(isinstance(v.get("backend", "auto"), str), where, "model.sparse.backend", "a backend name", v.get("backend"))
    for i, e in enumerate(v["layers"]):
        ok = isinstance(e, dict) and (
            (e.get("kind") == "sparse" and isinstance(e.get("block"), list) and len(e["block"]) == 2
             and all(_is_int(b) and 1 <= b <= 1 << 16 for b in e["block"]))
            or (e.get("kind") == "dense" and isinstance(e.get("reason", ""), str)))
        _need(ok, where, f"model.sparse.layers[{i}]",
              "{'kind': 'sparse', 'block': [bm, bk]} or {'kind': 'dense', 'reason': ...}", e)


def parameter_count(dim: int, hidden: list[int]) -> int:
    """Elements of a concatsquash field (weights, biases, gates, masks) from its widths alone."""
    dims = [dim, *hidden, dim]
    return sum(2 * a * b + 4 * b for a, b in zip(dims[:-1], dims[1:]))


# torchdiffeq options that a JSON config can carry (callables, dtypes and tensors cannot).
_OPTIONS = {
    "step_size": (lambda v: _is_num(v) and 0 < v < math.inf, "a positive finite number"),
    "first_step": (lambda v: v is None or (_is_num(v) and 0 < v < math.inf), "a positive finite number or null"),
    "min_step": (lambda v: _is_num(v) and 0 <= v < math.inf, "a finite number >= 0"),
    "max_step": (lambda v: _is_num(v) and v > 0 and not math.isnan(v), "a positive number"),
    "max_num_steps": (lambda v: _is_int(v) and 1 <= v <= 2**31 - 1, "an integer in [1, 2^31 - 1]"),
    "safety": (lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1]"),
    "ifactor": (lambda v: _is_num(v) and 1 <= v < math.inf, "a finite number >= 1"),
    "dfactor": (lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1]"),
    "perturb": (lambda v: isinstance(v, bool), "true or false"),
    "interp": (lambda v: v in ("linear", "cubic"), "'linear' or 'cubic'"),
    "max_iters": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "max_order": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
}


def check_options(opts: Any, where: str) -> dict:
    """Solver options: known torchdiffeq keys with values it can use (so a bad one fails here, not
    as a misleading solver failure later)."""
    if not isinstance(opts, dict):
        raise CheckpointError(f"{where}: expected an object of solver options, got {_short(opts)}")
    for k, v in opts.items():
        if k not in _OPTIONS:
            raise CheckpointError(f"{where}: unknown solver option {k!r}; expected some of {sorted(_OPTIONS)}")
        ok, expected = _OPTIONS[k]
        if not ok(v):
            raise CheckpointError(f"{where}: solver option {k!r}: expected {expected}, got {_short(v)}")
    return dict(opts)


# -- tensors ---------------------------------------------------------------------------------------
def skeleton(model_cfg: dict, masks: list[str], where: str) -> nn.Module:
    """The CNF the config describes, on the meta device (shapes only, no memory), masks attached."""
    try:
        with torch.device("meta"):
            model = CNF.from_config(model_cfg)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: field 'model': {exc}") from None
    maskable = {name: m for name, m in model.named_modules() if hasattr(m, "set_mask")}
    for name in masks:
        if name not in maskable:
            raise CheckpointError(f"{where}: field 'masks': {name!r} is not a prunable layer of this model "
                                  f"(expected some of {sorted(maskable)})")
        w = maskable[name].linear.weight
        maskable[name].register_buffer("weight_mask", torch.empty(w.shape, dtype=torch.bool, device="meta"))
    return model


_INDEX_SUFFIXES = (".block_rows", ".block_cols")  # a block-sparse layer's kept-block coordinates


def expected_tensors(model: nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{state_dict key: (shape, kind)}`` of a (meta) model; kind: "mask", "index" or "float"."""
    def kind(k):
        return "mask" if k.endswith(".weight_mask") else "index" if k.endswith(_INDEX_SUFFIXES) else "float"
    return {k: (tuple(v.shape), kind(k)) for k, v in model.state_dict().items()}


def check_block_indices(sd: Mapping[str, torch.Tensor], where: str) -> None:
    """Kept-block coordinates are integers >= 0 (a negative one would index from the end)."""
    for k, t in sd.items():
        if k.endswith(_INDEX_SUFFIXES):
            if t.dtype not in (torch.int32, torch.int64) or t.dim() != 1:
                raise CheckpointError(f"{where}: tensor {k!r}: expected 1-d int64 block indices, got {t.dtype} "
                                      f"{tuple(t.shape)}")
            if t.numel() and int(t.min()) < 0:
                raise CheckpointError(f"{where}: tensor {k!r}: negative block index {int(t.min())}")


def check_tensors(sd: Mapping[str, torch.Tensor], expected: dict, where: str) -> torch.dtype:
    """Names, shapes, dtypes (one float dtype, bool masks) and finite values; the float dtype."""
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    if missing or extra:
        parts = ([f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}"] if missing else []) + \
                ([f"unexpected {extra[:8]}{' ...' if len(extra) > 8 else ''}"] if extra else [])
        raise CheckpointError(f"{where}: the tensors do not fit the config's model: {'; '.join(parts)}")
    dtypes = set()
    for k, (shape, kind) in expected.items():
        t = sd[k]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{where}: tensor {k!r}: expected shape {shape} (from the config), "
                                  f"got {tuple(t.shape)}")
        if kind == "index":
            if t.dtype not in (torch.int32, torch.int64):
                raise CheckpointError(f"{where}: tensor {k!r}: expected integer block indices, got {t.dtype}")
            continue
        if kind == "mask":
            if t.dtype != torch.bool:
                raise CheckpointError(f"{where}: tensor {k!r}: expected a bool mask, got {t.dtype}")
            continue
        if t.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{where}: tensor {k!r}: expected a floating-point dtype, got {t.dtype}")
        dtypes.add(t.dtype)
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{where}: tensor {k!r} holds NaN or inf (a diverged run?)")
    if len(dtypes) > 1:
        raise CheckpointError(f"{where}: tensors mix dtypes {sorted(map(str, dtypes))}; expected one")
    return dtypes.pop() if dtypes else torch.float32


# -- state.json ------------------------------------------------------------------------------------
def check_state_json(sj: Any, where: str) -> dict:
    """Optimizer param groups / ids / scalars and the history: the types ``load_checkpoint`` reads."""
    _need(isinstance(sj, dict), where, "<top level>", "a JSON object", type(sj).__name__)
    if "optimizer" in sj:
        o = sj["optimizer"]
        _need(isinstance(o, dict), where, "optimizer", "a JSON object", o)
        ids = o.get("state_ids")
        _need(isinstance(ids, list) and all(_is_int(i) and i >= 0 for i in ids), where, "optimizer.state_ids",
              "a list of integers >= 0", ids)
        groups = o.get("param_groups")
        _need(isinstance(groups, list) and all(isinstance(g, dict) for g in groups), where,
              "optimizer.param_groups", "a list of objects", groups)
        for i, g in enumerate(groups):
            ps = g.get("params")
            _need(isinstance(ps, list) and all(_is_int(p) and p >= 0 for p in ps), where,
                  f"optimizer.param_groups[{i}].params", "a list of integers >= 0", ps)
        scalars = o.get("scalars", {})
        _need(isinstance(scalars, dict) and all(isinstance(v, dict) for v in scalars.values()), where,
              "optimizer.scalars", "an object of objects", scalars)
    if "history" in sj:
        h = sj["history"]
        rows = h if isinstance(h, list) else h.get("rows", []) if isinstance(h, dict) else None
        _need(isinstance(rows, list) and all(isinstance(r, dict) for r in rows), where, "history",
              "{'rows': [objects], 'meta': object} or a list of objects", h)
        if isinstance(h, dict):
            _need(isinstance(h.get("meta", {}), dict), where, "history.meta", "a JSON object", h.get("meta"))
    return sj


def check_settings_value(extra: dict, where: str) -> None:
    """The trainer's extras, when present: ``step`` an int >= 0, ``settings`` an object."""
    if "step" in extra:
        _need(_is_int(extra["step"]) and extra["step"] >= 0, where, "extra.step", "an integer >= 0", extra["step"])
    if "settings" in extra:
        _need(isinstance(extra["settings"], dict), where, "extra.settings", "a JSON object", extra["settings"])
