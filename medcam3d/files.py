"""Files on disk: atomic writes and content hashes. The one home of these helpers (standard library only).

Every file medcam3d writes goes to a temporary file in the destination folder and is moved into place with
``os.replace``, so a reader never sees a half-written file and a failed write leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "sha256_of", "write_bytes_atomic", "write_json_atomic", "write_text_atomic"]

_DOUBLE_SUFFIXES = (".nii.gz", ".tar.gz")


def _suffix(name: str) -> str:
    for s in _DOUBLE_SUFFIXES:
        if name.lower().endswith(s):
            return s
    return Path(name).suffix


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder (same suffix, so writers that look at it pick the right
    format); on success move it onto ``path`` with ``os.replace``, on failure delete it. The folder is created.

    Example::

        with atomic_path("maps/hirescam.nii.gz") as tmp:
            nib.save(img, tmp)
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    # not mkstemp: its 0600 files would stay unreadable to others after the rename; the writer creates the file
    # with the usual umask permissions, and a random name keeps concurrent writers apart
    tmp_path = p.parent / f".{p.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp{_suffix(p.name)}"
    try:
        yield tmp_path
        os.replace(tmp_path, p)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(obj: Any, path: str | os.PathLike[str], indent: int | None = 2, allow_nan: bool = True) -> Path:
    """Write ``obj`` as JSON atomically; returns the path. ``allow_nan=False`` refuses NaN and infinities
    (strict JSON) instead of writing them as ``NaN``/``Infinity``."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, allow_nan=allow_nan) + "\n")


def sha256_of(path: str | os.PathLike[str]) -> str | None:
    """SHA-256 of a file, or of a folder's files (sorted by name, contents chained); None if unreadable."""
    p = Path(path)
    h = hashlib.sha256()
    try:
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    except OSError:
        return None
    return h.hexdigest()
