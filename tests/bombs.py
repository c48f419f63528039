"""Hostile scan files built cheaply for the size-check tests, and a runner that tries them under a memory cap.

Nothing here writes gigabytes: a header that claims a huge grid needs no voxel data, and a gzip stream that really
expands to 8 GiB is a small gzip member of 64 MiB of zeros (about 64 KB) repeated 128 times (a gzip file may hold
several members; every reader concatenates them).
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np

GiB = 1 << 30
_ZERO_MEMBER_BYTES = 64 << 20


@lru_cache(maxsize=1)
def zero_member() -> bytes:
    """One gzip member that expands to 64 MiB of zeros (about 64 KB)."""
    return gzip.compress(b"\0" * _ZERO_MEMBER_BYTES, compresslevel=9)


def zeros_gz(f, n_bytes: int) -> None:
    """Append gzip members expanding to ``n_bytes`` zeros (a multiple of 64 MiB) to the open file ``f``."""
    assert n_bytes % _ZERO_MEMBER_BYTES == 0
    member = zero_member()
    for _ in range(n_bytes // _ZERO_MEMBER_BYTES):
        f.write(member)


def header_bytes(shape, dtype, nifti2: bool = False, vox_offset: int | None = None,
                 extension_flag: bool = False) -> bytes:
    """A NIfTI header (+ the 4 extension-flag bytes) claiming ``shape`` voxels of ``dtype``; no voxel data."""
    hdr = nib.Nifti2Header() if nifti2 else nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_qform(np.eye(4), code=1)
    raw = hdr.structarr.copy()
    raw["vox_offset"] = vox_offset if vox_offset is not None else (544 if nifti2 else 352)
    return raw.tobytes() + (b"\1\0\0\0" if extension_flag else b"\0\0\0\0")


def claims_huge(path: Path, side: int, nifti2: bool = False) -> Path:
    """A NIfTI (``.nii`` or ``.nii.gz``) whose header claims ``side``^3 int16 voxels and holds none."""
    blob = header_bytes((side, side, side), np.int16, nifti2=nifti2)
    path.write_bytes(gzip.compress(blob) if path.name.endswith(".gz") else blob)
    return path


def honest_8gib(path: Path) -> Path:
    """An 8 MB ``.nii.gz`` that really expands to 8 GiB: its header claims 2048^3 uint8 voxels, all zeros."""
    with open(path, "wb") as f:
        f.write(gzip.compress(header_bytes((2048, 2048, 2048), np.uint8)))
        zeros_gz(f, 8 * GiB)
    return path


def extension_lie_8gib(path: Path) -> Path:
    """A ``.nii.gz`` claiming 8^3 voxels but 8 GiB of header extensions (an extension whose size field says
    2 GiB, then 8 GiB of zeros): nibabel alone would read the extension into memory."""
    head = header_bytes((8, 8, 8), np.uint8, vox_offset=8 * GiB, extension_flag=True)
    ext = np.array([(1 << 31) - 16, 6], dtype="<i4").tobytes()  # esize, ecode (comment)
    with open(path, "wb") as f:
        f.write(gzip.compress(head + ext))
        zeros_gz(f, 8 * GiB)
    return path


def trailing_8gib(path: Path) -> Path:
    """A valid 8^3 ``.nii.gz`` followed by 8 GiB of zeros its header does not account for."""
    img = nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4))
    with open(path, "wb") as f:
        f.write(gzip.compress(img.to_bytes()))
        zeros_gz(f, 8 * GiB)
    return path


_RUNNER = """
import contextlib, io, json, os, resource, sys, traceback
import medcam3d, medcam3d.cli, medcam3d.pipeline, monai.transforms, nibabel, SimpleITK  # everything, before the cap
page = os.sysconf("SC_PAGE_SIZE")
used = int(open("/proc/self/statm").read().split()[0]) * page
cap = used + 2 * (1 << 30)
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
results = {}
for name, argv in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = medcam3d.cli.main(argv)
        except MemoryError:
            traceback.print_exc()
            code = 99
        except SystemExit as e:  # argparse
            code = e.code
    results[name] = [code, err.getvalue()]
print(json.dumps(results))
"""


def run_capped(cases: dict[str, list[str]], cwd: Path, timeout: float = 300) -> dict[str, tuple[int, str]]:
    """Run ``medcam3d <argv>`` for each case in one fresh interpreter whose address space is capped (RLIMIT_AS) at
    what importing medcam3d took plus 2 GiB. Returns name -> (exit code, stderr); 99 means a MemoryError escaped."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(_RUNNER), json.dumps(cases)], cwd=cwd,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return {k: (int(v[0]), str(v[1])) for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()}
