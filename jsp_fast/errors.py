"""The exceptions jsp_fast raises on purpose, one hierarchy.

Each class also subclasses the built-in type a caller would already catch (``ValueError`` for bad
input, ``RuntimeError`` for a computation that gave up), so ``except ValueError`` keeps working and
``except jf.errors.JspFastError`` catches everything deliberate. Messages say what was expected and
what was given; a checkpoint error also names the file and the field.

This module imports nothing from the package, so every layer (cnf, training, app) may use it.
"""
from __future__ import annotations

__all__ = ["JspFastError", "ConfigError", "ResumeMismatchError", "CheckpointError", "ShapeError", "DataError",
           "SolverError"]


class JspFastError(Exception):
    """Base of every error jsp_fast raises deliberately (a mixin beside a built-in type)."""


class ConfigError(JspFastError, ValueError):
    """An argument, option or setting has a wrong type or value."""


class ResumeMismatchError(ConfigError):
    """A run would resume from a checkpoint made with other settings (data, model, masks, solver,
    optimizer). ``differences`` lists ``(setting, in the checkpoint, now)``."""

    def __init__(self, message: str, differences: list[tuple[str, object, object]] | None = None):
        super().__init__(message)
        self.differences = list(differences or [])


class CheckpointError(JspFastError, ValueError):
    """The path is not a complete, uncorrupted, well-formed jsp_fast checkpoint."""


class ShapeError(JspFastError, ValueError):
    """A tensor has the wrong shape (or number of dimensions) for where it is used."""


class DataError(JspFastError, ValueError):
    """A data set is missing, malformed, empty or holds non-finite values."""


class SolverError(JspFastError, RuntimeError):
    """The ODE solver gave up (step-size underflow, step budget exhausted)."""
