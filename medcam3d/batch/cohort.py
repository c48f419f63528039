"""A cohort: a manifest CSV or a folder of scans -> :class:`ScanTask` list (plus the rows that could not be used).

Manifest (CSV, UTF-8): one scan per row, columns ``scan_id, path, organ_labels_path`` (the third is optional and
may be empty). A header row is recognised by its names (``scan_id``/``id``, ``path``/``scan_path``/``image``,
``organ_labels_path``/``organs``/``organ_labels``/``labels_path``) in any order; without one the columns are taken
in that order. A first row that looks like a header (only name-like cells, none of them an existing file) but names
no known id and path columns is refused with an :class:`InputError` listing the accepted names, rather than read as
a scan. Blank lines and lines starting with ``#`` are skipped; relative paths are relative to the manifest's
folder. A scan path is a NIfTI/NRRD/MHA file or a DICOM series folder.

Folder: every scan file (``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``) and every sub-folder
holding DICOM files, sorted by name; the scan id is the file name without extension (the folder name for DICOM).
``<stem>_organs<ext>`` beside ``<stem><ext>`` is that scan's organ label map (the phantom convention of
:func:`medcam3d.data.write_nifti`); ``*_organs*`` and ``*_lesions*`` files are not scans.

Bad rows (a missing file, an empty or duplicate id, too few columns) are returned as :class:`BadRow`, never
raised: one bad row does not stop a cohort.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

__all__ = ["BadRow", "ScanTask", "folder_name", "parse_shard", "read_cohort", "read_manifest", "scan_folder", "shard"]

SCAN_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_ID_NAMES = ("scan_id", "id", "scan", "case_id", "name")
_PATH_NAMES = ("path", "scan_path", "image", "image_path", "file")
_ORGAN_NAMES = ("organ_labels_path", "organs", "organ_labels", "labels_path", "organ_mask", "organs_path")
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,119}")
_HEADER_LIKE = re.compile(r"[A-Za-z_][A-Za-z0-9_ -]*")  # a column name: no dot, no slash
_MAX_ID = 512


@dataclass(frozen=True)
class ScanTask:
    """One scan of the cohort.

    Attributes:
        scan_id: the user's identifier (any text; shown escaped in reports).
        path: absolute path of the scan file or DICOM folder.
        organs: absolute path of its organ label map, or None.
        folder: file-system-safe output folder name under ``DIR/scans/`` (see :func:`folder_name`).
    """

    scan_id: str
    path: str
    organs: str | None
    folder: str


@dataclass(frozen=True)
class BadRow:
    """A manifest row or folder entry that cannot be processed: ``where`` (file:line), id (if any), the problem."""

    where: str
    scan_id: str | None
    error: str


def folder_name(scan_id: str) -> str:
    """The output folder name of a scan: the id itself when it is a safe file name (letters, digits, ``_.-``,
    starting with a letter or digit, at most 120 characters), else a sanitised prefix plus a hash of the id (so that
    ids differing only in unsafe characters stay apart)."""
    if _SAFE.fullmatch(scan_id) and not scan_id.endswith((".partial", ".old")):
        return scan_id
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", scan_id).strip("._-")[:80] or "scan"
    return f"{safe}-{hashlib.sha256(scan_id.encode('utf-8')).hexdigest()[:10]}"


def _check_id(scan_id: str) -> str | None:
    if not scan_id:
        return "empty scan id"
    if len(scan_id) > _MAX_ID:
        return f"scan id longer than {_MAX_ID} characters"
    if any(ord(c) < 32 or ord(c) == 127 for c in scan_id):
        return "scan id contains control characters"
    return None


def _is_dicom_dir(d: Path) -> bool:
    try:
        files = [f for f in sorted(d.iterdir())[:64] if f.is_file()]
    except OSError:
        return False
    for f in files:
        if f.suffix.lower() == ".dcm":
            return True
        try:
            with open(f, "rb") as fh:
                head = fh.read(132)
        except OSError:
            continue
        if len(head) == 132 and head[128:132] == b"DICM":
            return True
    return False


def _scan_stem(name: str) -> str | None:
    low = name.lower()
    for suf in SCAN_SUFFIXES:
        if low.endswith(suf) and len(name) > len(suf):
            return name[: -len(suf)]
    return None


def scan_folder(folder: str | os.PathLike[str]) -> tuple[list[ScanTask], list[BadRow]]:
    """The scans in a folder (see the module docstring)."""
    root = Path(folder).expanduser().resolve()
    rows: list[tuple[str, str, str | None, str]] = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if _is_dicom_dir(entry):
                rows.append((entry.name, str(entry), None, str(entry)))
            continue
        stem = _scan_stem(entry.name)
        if stem is None or re.search(r"_(organs|lesions)$", stem):
            continue
        ext = entry.name[len(stem):]
        organs = entry.with_name(f"{stem}_organs{ext}")
        rows.append((stem, str(entry), str(organs) if organs.is_file() else None, str(entry)))
    return _validate(rows)


def _header(row: Sequence[str]) -> dict[str, int] | None:
    names = [c.strip().lower() for c in row]
    id_col = next((i for i, n in enumerate(names) if n in _ID_NAMES), None)
    path_col = next((i for i, n in enumerate(names) if n in _PATH_NAMES), None)
    if id_col is None or path_col is None:
        return None
    cols = {"id": id_col, "path": path_col}
    organ_col = next((i for i, n in enumerate(names) if n in _ORGAN_NAMES), None)
    if organ_col is not None:
        cols["organs"] = organ_col
    return cols


def _refuse_unknown_header(row: Sequence[str], base: Path, mpath: Path) -> None:
    """InputError when ``row`` (the first, not a known header) looks like a header: every cell a bare name and none
    an existing file or folder. A data row has a scan path (with a dot or a slash, or existing)."""
    cells = [c.strip() for c in row]
    if len(cells) < 2 or not all(_HEADER_LIKE.fullmatch(c) for c in cells):
        return
    if any((base / c).exists() for c in cells):
        return
    raise InputError(
        f"manifest header {','.join(cells)!r} names no known columns; accepted: scan id = {'/'.join(_ID_NAMES)}; "
        f"scan path = {'/'.join(_PATH_NAMES)}; organ labels (optional) = {'/'.join(_ORGAN_NAMES)} -- or no "
        "header, with columns scan_id,path[,organ_labels_path]", mpath)


def read_manifest(manifest: str | os.PathLike[str]) -> tuple[list[ScanTask], list[BadRow]]:
    """The scans listed in a manifest CSV (see the module docstring)."""
    mpath = Path(manifest).expanduser().resolve()
    base = mpath.parent
    try:
        text = mpath.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError("manifest is not UTF-8 text", mpath) from None
    except OSError as e:
        raise InputError(f"cannot read the manifest ({e.strerror})", mpath) from None
    lines = [(i + 1, line) for i, line in enumerate(text.splitlines())]
    lines = [(n, line) for n, line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise InputError("manifest has no rows", mpath)
    parsed = list(csv.reader([line for _, line in lines]))
    cols = _header(parsed[0])
    if cols is None:
        _refuse_unknown_header(parsed[0], base, mpath)
    start = 1 if cols is not None else 0
    cols = cols or {"id": 0, "path": 1, "organs": 2}
    need = max(cols["id"], cols["path"]) + 1
    rows: list[tuple[str, str, str | None, str]] = []
    bad: list[BadRow] = []
    for (lineno, _), row in zip(lines[start:], parsed[start:]):
        where = f"{mpath.name}:{lineno}"
        if len(row) < need:
            bad.append(BadRow(where, row[cols["id"]].strip() if len(row) > cols["id"] else None,
                              f"expected at least {need} columns (scan_id, path[, organ_labels_path]), got {len(row)}"))
            continue
        sid, p = row[cols["id"]].strip(), row[cols["path"]].strip()
        o = row[cols["organs"]].strip() if "organs" in cols and len(row) > cols["organs"] else ""
        if not p:
            bad.append(BadRow(where, sid or None, "empty scan path"))
            continue
        scan = (base / Path(p).expanduser()).resolve()
        organs = str((base / Path(o).expanduser()).resolve()) if o else None
        rows.append((sid, str(scan), organs, where))
    tasks, more_bad = _validate(rows)
    return tasks, sorted(bad + more_bad, key=lambda b: int(b.where.rsplit(":", 1)[1]))


def _validate(rows: list[tuple[str, str, str | None, str]]) -> tuple[list[ScanTask], list[BadRow]]:
    tasks: list[ScanTask] = []
    bad: list[BadRow] = []
    seen_ids: set[str] = set()
    seen_folders: dict[str, str] = {}
    for sid, path, organs, where in rows:
        problem = _check_id(sid)
        if problem is None and sid in seen_ids:
            problem = f"duplicate scan id {sid!r}"
        folder = folder_name(sid) if problem is None else ""
        if problem is None and folder.casefold() in seen_folders:
            problem = f"scan id {sid!r} maps to the same output folder as {seen_folders[folder.casefold()]!r}"
        if problem is None and not Path(path).exists():
            problem = f"scan not found: {path}"
        if problem is None and organs is not None and not Path(organs).is_file():
            problem = f"organ label map not found: {organs}"
        if problem is not None:
            bad.append(BadRow(where, sid or None, problem))
            continue
        seen_ids.add(sid)
        seen_folders[folder.casefold()] = sid
        tasks.append(ScanTask(sid, path, organs, folder))
    return tasks, bad


def read_cohort(source: str | os.PathLike[str]) -> tuple[list[ScanTask], list[BadRow]]:
    """A manifest CSV or a folder of scans -> (tasks sorted by scan id, bad rows)."""
    p = Path(source).expanduser()
    if not p.exists():
        raise InputError("no such manifest or folder", p)
    tasks, bad = scan_folder(p) if p.is_dir() else read_manifest(p)
    return sorted(tasks, key=lambda t: t.scan_id), bad


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m:
        raise InputError(f"--shard {text!r}: expected I/N, e.g. 0/4 (I from 0 to N-1)")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise InputError(f"--shard {text!r}: need N >= 1 and 0 <= I < N")
    return i, n


def shard(tasks: Sequence[ScanTask], index: int, count: int) -> list[ScanTask]:
    """Shard ``index`` of ``count``: the tasks sorted by scan id, then every ``count``-th from ``index``. The shards
    0..count-1 partition the cohort (each scan in exactly one), whatever the manifest's row order."""
    return sorted(tasks, key=lambda t: t.scan_id)[index::count]
