"""One error family: every named error evalkit raises derives from :class:`EvalkitError`.

Each command-line entry point catches ``EvalkitError`` once and exits with status 2 and
the message, so bad input never surfaces as a traceback. The concrete errors keep their
historical built-in bases too (``ValueError``, ``FileNotFoundError``, ``RuntimeError``),
so library callers that catch those keep working.
"""
from __future__ import annotations

__all__ = ["EvalkitError", "InputError", "RunError"]


class EvalkitError(Exception):
    """Base of evalkit's named errors: the message names the file, tensor, key or value at fault."""


class InputError(EvalkitError, ValueError):
    """Bad input that has no more specific error class (a value, an argument, a file's content)."""


class RunError(EvalkitError, ValueError):
    """An evaluation (``evalkit run``, ``evalkit perplexity``) cannot proceed; the message says why."""
