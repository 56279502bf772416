"""``History``: what ``jf.train`` logs, one dict per step; checkpoints store it too.

Its own module because both the loop (which writes it) and checkpoints (which restore it) need it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Mapping

from .._io import atomic_write_text

__all__ = ["History"]


class History:
    """Per-step training records: a list of dicts (``rows``), JSON round-trippable.

    Every row has ``step``, ``train_nll`` (nats), ``nfe_forward``/``nfe_backward`` (the training
    solve), ``time`` (seconds since the run started, summed over resumes) and, when measured,
    ``R`` (mean ``∫‖J‖_F dt`` on the fixed validation batch) and ``R_nfe``. Rows at evaluation steps
    add ``val_nll`` (nats); with a bits/dim converter ``train_bpd``/``val_bpd``; with ``reg``, the
    training batch's ``train_R``, ``kinetic``, ``jacobian`` and the total ``loss``. Step 0 is the
    evaluation before any update.
    """

    def __init__(self, rows: list[dict] | None = None, meta: dict | None = None):
        self.rows: list[dict] = list(rows or [])
        self.meta: dict = dict(meta or {})

    def append(self, row: dict) -> None:
        self.rows.append(row)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def column(self, key: str) -> tuple[list[int], list[float]]:
        """``(steps, values)`` of the rows that have ``key``."""
        pairs = [(r["step"], r[key]) for r in self.rows if r.get(key) is not None]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def last(self, key: str, default=None):
        """The most recent value of ``key`` (e.g. ``history.last("val_nll")``)."""
        for r in reversed(self.rows):
            if r.get(key) is not None:
                return r[key]
        return default

    def to_dict(self) -> dict:
        return {"meta": self.meta, "rows": self.rows}

    def to_json(self, path: str | Path | None = None, indent: int | None = None) -> str:
        """The history as JSON; written (atomically) to ``path`` too when given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=True)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_dict(cls, d: Mapping | list) -> "History":
        if isinstance(d, list):
            return cls(d)
        return cls(d.get("rows", []), d.get("meta", {}))

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "History":
        s = str(text_or_path)
        if not s.lstrip().startswith(("{", "[")):
            s = Path(s).read_text()
        return cls.from_dict(json.loads(s))

    def __repr__(self) -> str:
        last = self.rows[-1] if self.rows else {}
        return (f"History({len(self.rows)} rows, last step {last.get('step')}, "
                f"train_nll={last.get('train_nll')}, val_nll={self.last('val_nll')})")
