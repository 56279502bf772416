"""Training and checkpoints: ``train`` (Adam on the NLL, RNODE optional, masks kept), its
``History``, and ``save``/``load`` (safetensors + JSON directories, written atomically).

Dependencies point down: ``loop`` → ``checkpoint`` → ``history``; all of them use ``jsp_fast.cnf``
and never the package root.
"""
from __future__ import annotations

from .checkpoint import Checkpoint, CheckpointError, exists, load, load_checkpoint, save
from .history import History
from .loop import CHECKPOINT_NAME, REG_KEYS, train

__all__ = ["train", "History", "save", "load", "load_checkpoint", "exists", "Checkpoint", "CheckpointError",
           "REG_KEYS", "CHECKPOINT_NAME"]
