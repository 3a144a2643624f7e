"""Errors about the data a run was given, which the thin scripts report in one line (framework.cli)."""
from __future__ import annotations


class InputError(ValueError):
    """A dataset file or folder that cannot be used: missing, unreadable, empty, or inconsistent
    with the rest of its song. The message names the file."""


class MissingInput(InputError, FileNotFoundError):
    """An :class:`InputError` for a file or folder that does not exist; still a ``FileNotFoundError``
    for callers that catch that."""
