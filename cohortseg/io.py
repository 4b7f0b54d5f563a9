"""File I/O at the edges: atomic writes, checksums, NIfTI loading with sanity checks."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from cohortseg.errors import InputError


_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path, suffix: str | None = None):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A crash (even SIGKILL) therefore never leaves a half-written file under the final name.
    `suffix` keeps the extension so writers that sniff it (nibabel: .nii.gz) behave.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part" + suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs must be readable by the team
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_json_atomic(path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def save_nifti_atomic(data: np.ndarray, affine: np.ndarray, path, header=None, dtype=None) -> Path:
    """Save `data` with `affine` (sform and qform set, code 1 = scanner) atomically. Units the header
    leaves unknown are set to mm and s (BIDS validators warn on unknown units; affines are in mm)."""
    data = np.asarray(data if dtype is None else data.astype(dtype))
    import nibabel as nib  # here, not at import: the workflow's parse imports this module

    img = nib.Nifti1Image(data, affine, header=header)
    img.set_data_dtype(data.dtype)
    xyz, t = img.header.get_xyzt_units()
    img.header.set_xyzt_units(xyz if xyz != "unknown" else "mm", t if t != "unknown" else "sec")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def _digest(h, *paths, chunk: int = 1 << 20) -> str:
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(chunk), b""):
                h.update(block)
    return h.hexdigest()


def git_blob_sha1(path, chunk: int = 1 << 20) -> str:
    """Git's object id of a file's contents (sha1 of ``blob <size>\\0`` + bytes): what ``git hash-object``
    prints and what a repository tree lists, so a card can name a file by its upstream git blob."""
    p = Path(path)
    h = hashlib.sha1(f"blob {p.stat().st_size}\0".encode())
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256sum(path) -> str:
    return _digest(hashlib.sha256(), path)


def md5sum(path) -> str:
    return _digest(hashlib.md5(), path)


def tree_md5(path) -> str:
    """md5 of a file, or of a folder as SHIVA computes it: the bytes of every file below it, in sorted
    path order (SavedModel fold folders)."""
    path = Path(path)
    if path.is_dir():
        return _digest(hashlib.md5(), *sorted(p for p in path.rglob("*") if p.is_file()))
    if path.is_file():
        return md5sum(path)
    raise FileNotFoundError(str(path))


# --------------------------------------------------------------------------------------------
# Loading with the checks a 10,000-scan cohort needs: every failure is an InputError saying why.
MAX_ANISOTROPY = 30.0


def load_image(path, allow_4d: bool = False, max_voxels: int = 200_000_000, need: str = "3D image"):
    """Load a NIfTI as float32 after sanity checks. Returns (nib.Nifti1Image, warnings).

    Raises InputError for: missing/unreadable/corrupt/truncated files, non-NIfTI, 4D (unless
    allow_4d: first volume, with a warning), unsupported data types, too many voxels (checked from
    the header before reading any data), singular or non-finite affines, qform/sform disagreement,
    extreme anisotropy, all-zero/constant images, and mostly non-finite voxels (a few NaN/Inf are
    set to 0 with a warning).
    """
    import nibabel as nib

    path = Path(path)
    warnings: list[str] = []
    if not path.is_file():
        raise InputError("file not found", path)
    try:
        img = nib.load(str(path))
    except Exception as e:  # noqa: BLE001 - nibabel raises many types
        raise InputError(f"not a readable NIfTI image ({type(e).__name__}: {e})", path) from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"not a NIfTI image ({type(img).__name__})", path)
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) == 4:
        if not allow_4d:
            raise InputError(f"4D image {shape} where a {need} is expected (set allow_4d: true to use the first volume)", path)
        warnings.append(f"4D image {img.shape}: using the first volume (allow_4d)")
    elif len(shape) != 3:
        raise InputError(f"{len(shape)}D image {img.shape} where a {need} is expected", path)
    nvox = int(np.prod(shape[:3]))
    if nvox > max_voxels:
        raise InputError(f"image has {nvox:,} voxels {tuple(shape)}, above max_voxels={max_voxels:,} (memory guard)", path)
    if min(shape[:3]) < 1:
        raise InputError(f"empty image shape {shape}", path)
    dt = img.get_data_dtype()
    if dt.kind not in "iuf" or dt.names is not None:
        raise InputError(f"unsupported data type {dt} (expected integer or float intensities)", path)
    _check_affine(img, path)
    try:
        if len(img.shape) == 4:
            data = np.asarray(img.dataobj[..., 0], dtype=np.float32)
        else:
            data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape[:3])
    except Exception as e:  # noqa: BLE001 - truncated gzip, short file, ...
        raise InputError(f"corrupt or truncated image data ({type(e).__name__}: {e})", path) from None
    bad = ~np.isfinite(data)
    if bad.any():
        frac = float(bad.mean())
        if frac > 0.01:
            raise InputError(f"{frac:.1%} of voxels are NaN/Inf", path)
        data[bad] = 0
        warnings.append(f"{int(bad.sum())} NaN/Inf voxels set to 0")
    if not np.any(data):
        raise InputError("image is all zeros", path)
    if float(data.max()) == float(data.min()):
        raise InputError(f"image is constant ({float(data.max())})", path)
    out = nib.Nifti1Image(data, img.affine, img.header)
    out.set_data_dtype(np.float32)
    return out, warnings


def _check_affine(img, path) -> None:
    aff = img.affine
    if aff is None or not np.all(np.isfinite(aff)):
        raise InputError("non-finite affine (NaN/Inf in qform/sform)", path)
    m = aff[:3, :3]
    zooms = np.sqrt((m ** 2).sum(axis=0))
    if abs(np.linalg.det(m)) < 1e-6 or np.any(zooms < 1e-3):
        raise InputError(f"singular affine (voxel sizes {np.round(zooms, 4).tolist()})", path)
    hdr = img.header
    if hasattr(hdr, "get_qform"):
        q, qc = hdr.get_qform(coded=True)
        s, sc = hdr.get_sform(coded=True)
        if qc and sc and q is not None and s is not None and not np.allclose(q, s, atol=1e-2, rtol=1e-3):
            raise InputError("qform and sform disagree (the scanner-to-voxel mapping is ambiguous; "
                             "fix the header, e.g. copy the sform into the qform)", path)
    if zooms.max() / zooms.min() > MAX_ANISOTROPY:
        raise InputError(f"extreme anisotropy: voxel sizes {np.round(zooms, 3).tolist()} mm "
                         f"(ratio > {MAX_ANISOTROPY:g})", path)
