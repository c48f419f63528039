"""Size checks made *before* memory is allocated: what a header claims, what a gzip stream expands to, what a
resampled grid will hold.

A file's header (NIfTI, NRRD/MetaImage, DICOM) says how many voxels it holds; a resampling step's spacing says how
many voxels its output grid will hold. Both are checked against two limits before anything of that size exists:

* ``max_voxels`` -- at most :data:`DEFAULT_MAX_VOXELS` (1.5 x 10^9; a whole-body CT is about 5 x 10^8) voxels
  per volume (``--max-voxels``, ``max_voxels=``).
* the memory budget -- the estimated working set (bytes per voxel of the step, times its voxels) must fit in half
  of this machine's memory (:func:`memory_budget`: the smaller of physical memory and a cgroup limit, halved, and
  never more than the address space an ``RLIMIT_AS`` leaves free).

A refusal is an :class:`~medcam3d.errors.InputError` whose one-line message starts with ``size check:``, says what
was claimed and what the limit is, so a memory bomb is refused by arithmetic rather than by a failed allocation.
:class:`GunzipStream` decompresses a gzip file chunk by chunk and counts as it goes, so that a stream that expands
beyond what its header accounts for is stopped while decompressing, not after.
"""

from __future__ import annotations

import math
import os
import resource
import zlib
from collections.abc import Sequence
from typing import BinaryIO, Protocol

from ..errors import InputError

__all__ = [
    "DEFAULT_MAX_VOXELS",
    "MAX_HEADER_BYTES",
    "GunzipStream",
    "check_max_voxels",
    "check_voxels",
    "format_bytes",
    "memory_budget",
    "resolve_max_voxels",
]

#: Default largest volume, in voxels, medcam3d reads or resamples to (a whole-body CT is about 5 x 10^8).
DEFAULT_MAX_VOXELS = 1_500_000_000
#: Largest header (with its extensions) a NIfTI file may have before its voxel data: 64 MiB.
MAX_HEADER_BYTES = 64 << 20
_CHUNK = 1 << 20


def check_max_voxels(value: object, what: str = "max_voxels") -> int:
    """``value`` as a positive int, or :class:`InputError` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def resolve_max_voxels(max_voxels: int | None) -> int:
    """``max_voxels``, or :data:`DEFAULT_MAX_VOXELS` when ``None`` (validated)."""
    return DEFAULT_MAX_VOXELS if max_voxels is None else check_max_voxels(max_voxels)


def format_bytes(n: float) -> str:
    """``1.5 GiB``-style size."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} bytes" if unit == "bytes" else f"{n:.3g} {unit}"
        n /= 1024.0
    return f"{n:.3g} PiB"  # pragma: no cover - the loop always returns


def _physical_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not POSIX
        return None


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path, encoding="ascii") as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" or a huge number: no limit
            return int(text)
    return None


def _address_space_left() -> int | None:
    """Bytes of address space an ``RLIMIT_AS`` still leaves this process (``None`` without such a limit)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            used = int(f.read().split()[0]) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        used = 0
    return max(0, soft - used)


def memory_budget() -> int | None:
    """Bytes a single step may use: half of this machine's memory (the smaller of physical memory and a cgroup
    limit), and no more than the address space an ``RLIMIT_AS`` leaves free. ``None`` when unknown."""
    known = [m for m in (_physical_memory(), _cgroup_limit()) if m]
    budget = min(known) // 2 if known else None
    left = _address_space_left()
    if left is not None:
        budget = left if budget is None else min(budget, left)
    return budget


def _dims(shape: Sequence[int]) -> str:
    return " x ".join(str(int(s)) for s in shape)


def _count(n: int) -> str:
    """Exact below ten million (so that a limit of 7999 and a claim of 8000 read differently), else ``1.5e+09``."""
    return str(n) if n < 10_000_000 else f"{n:.3g}"


def check_voxels(
    shape: Sequence[int],
    bytes_per_voxel: float,
    where: object,
    *,
    claim: str = "the header claims",
    max_voxels: int | None = None,
) -> None:
    """Refuse (before allocating) a volume of ``shape`` that exceeds the voxel limit or the memory budget.

    Args:
        shape: the claimed grid (any number of axes; Python ints, so no overflow).
        bytes_per_voxel: the step's working set per voxel (e.g. file bytes + a float32 copy).
        where: the file (or config) named in the message.
        claim: who claims the size, e.g. ``"the header claims"`` or ``"resampling to 0.8 mm would make"``.
        max_voxels: the voxel limit (``None``: :data:`DEFAULT_MAX_VOXELS`).

    Raises:
        InputError: ``size check: ...`` naming what is claimed and the limit.
    """
    limit = resolve_max_voxels(max_voxels)
    n = math.prod(int(s) for s in shape)
    if n > limit:
        raise InputError(
            f"size check: {claim} {_dims(shape)} = {_count(n)} voxels, more than the limit of {_count(limit)} voxels "
            "(raise it with --max-voxels / max_voxels= if this is really meant)",
            where if where is not None else None,  # type: ignore[arg-type]
        )
    budget = memory_budget()
    need = n * float(bytes_per_voxel)
    if budget is not None and need > budget:
        raise InputError(
            f"size check: {claim} {_dims(shape)} = {_count(n)} voxels, which needs about {format_bytes(need)} "
            f"({bytes_per_voxel:g} bytes per voxel), more than the memory budget of {format_bytes(budget)} "
            "(half of this machine's memory)",
            where if where is not None else None,  # type: ignore[arg-type]
        )


class Writable(Protocol):
    """Anything with ``write(bytes)`` (a file, ``io.BytesIO``, a counting sink)."""

    def write(self, b: bytes, /) -> object: ...


class GunzipStream:
    """Decompress a gzip file (one or several members) chunk by chunk, counting the bytes it expands to.

    ``read(n)`` returns at most ``n`` bytes and never decompresses much more than asked for (zlib's
    ``max_length``), so a caller can stop a stream that expands too far while decompressing it. The gzip trailer
    (CRC-32 and length) of every member is verified by zlib when the member ends.

    Raises ``zlib.error`` on corrupt data and ``EOFError`` on a stream cut short.
    """

    def __init__(self, fileobj: BinaryIO) -> None:
        self._f = fileobj
        self._d = zlib.decompressobj(wbits=31)
        self._buf = b""
        self.total = 0  # bytes decompressed so far

    def _inflate(self, max_out: int) -> bytes:
        """Up to ``max_out`` (> 0) newly decompressed bytes; ``b""`` at the clean end of the last member."""
        while True:
            if self._d.eof:  # (zlib may leave the same bytes in unconsumed_tail: unused_data is what counts)
                data = self._d.unused_data or self._f.read(_CHUNK)
                if not data:
                    return b""
                self._d = zlib.decompressobj(wbits=31)  # the next gzip member
            elif self._d.unconsumed_tail:
                data = self._d.unconsumed_tail
            else:
                data = self._f.read(_CHUNK)
                if not data:
                    raise EOFError("compressed file ended before the end-of-stream marker was reached")
            out = self._d.decompress(data, max_out)
            if out:
                self.total += len(out)
                return out

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer only at the end of the stream)."""
        parts = []
        while n > 0:
            chunk = self._inflate(min(n, _CHUNK))
            if not chunk:
                break
            parts.append(chunk)
            n -= len(chunk)
        return b"".join(parts)

    def readinto_file(self, out: Writable, n: int) -> int:
        """Decompress up to ``n`` bytes into ``out`` (a writable file object); returns the count written."""
        done = 0
        while done < n:
            chunk = self._inflate(min(n - done, _CHUNK))
            if not chunk:
                break
            out.write(chunk)
            done += len(chunk)
        return done
