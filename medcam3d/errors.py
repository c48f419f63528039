"""Exceptions raised by medcam3d.

Every error a user can cause with their input (a file, a config, a tensor of the wrong shape) is an
:class:`InputError`. Its message is one line that names the offending file or argument and the problem,
so that the command line can print it as is and exit with status 2.
"""

from __future__ import annotations

from os import PathLike

__all__ = ["InputError", "input_error"]


class InputError(ValueError):
    """Bad input from the user: the message names the file (or argument) and what is wrong with it."""

    def __init__(self, message: str, path: str | PathLike[str] | None = None) -> None:
        self.path = None if path is None else str(path)
        text = message if self.path is None else f"{self.path}: {message}"
        super().__init__(" ".join(text.split()))  # always one line


def input_error(path: str | PathLike[str] | None, message: str) -> InputError:
    """Build an :class:`InputError` for ``path`` (helper for ``raise input_error(p, "...")``)."""
    return InputError(message, path)
