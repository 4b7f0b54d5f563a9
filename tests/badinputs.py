"""Fixture generator: broken inputs made from the real images in ../shared/data.

Each case is (name, maker, expected message fragment); `make_bad(case, src, out)` writes the file.
A 10,000-scan cohort contains all of these; each must fail with a clear reason (or, for the few that
can be repaired safely, load with a warning).
"""
from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np


def _save(data, affine, out, header=None, dtype=None):
    img = nib.Nifti1Image(np.asarray(data) if dtype is None else np.asarray(data).astype(dtype), affine, header)
    nib.save(img, str(out))


def truncated(src, out):
    raw = Path(src).read_bytes()
    Path(out).write_bytes(raw[: len(raw) // 2])


def corrupt_gzip(src, out):
    raw = bytearray(Path(src).read_bytes())
    for i in range(200, min(len(raw), 4000), 7):
        raw[i] ^= 0xFF
    Path(out).write_bytes(bytes(raw))


def not_nifti(src, out):
    with gzip.open(out, "wb") as f:
        f.write(b"This is a DICOM export log, not an image\n" * 100)


def four_d(src, out):
    img = nib.load(src)
    d = np.asarray(img.dataobj)
    _save(np.stack([d, d * 0.5], axis=-1), img.affine, out)


def nan_voxels(src, out):
    img = nib.load(src)
    d = np.asarray(img.dataobj, dtype=np.float32).copy()
    d.flat[:: max(1, d.size // 10)] = np.nan  # ~10 voxels: repairable
    _save(d, img.affine, out)


def mostly_nan(src, out):
    img = nib.load(src)
    d = np.asarray(img.dataobj, dtype=np.float32).copy()
    d[: d.shape[0] // 2] = np.inf
    _save(d, img.affine, out)


def all_zero(src, out):
    img = nib.load(src)
    _save(np.zeros(img.shape, np.float32), img.affine, out)


def _raw_sform(src, out, edit):
    """Write a header whose sform (qform off) is edited by `edit`, bypassing nibabel's checks."""
    img = nib.load(src)
    hdr = nib.Nifti1Image(np.asarray(img.dataobj), img.affine).header.copy()
    hdr["qform_code"] = 0
    hdr["sform_code"] = 1
    edit(hdr)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), None, hdr), str(out))


def singular_affine(src, out):
    def edit(h):
        for r in ("srow_x", "srow_y", "srow_z"):
            h[r][2] = 0.0
    _raw_sform(src, out, edit)


def nonfinite_affine(src, out):
    def edit(h):
        h["srow_x"][3] = np.nan
    _raw_sform(src, out, edit)


def qform_sform_disagree(src, out):
    img = nib.load(src)
    new = nib.Nifti1Image(np.asarray(img.dataobj), img.affine)
    q = img.affine.copy()
    q[:3, 3] += 25.0  # 25 mm apart
    new.set_sform(img.affine, code=1)
    new.set_qform(q, code=1)
    nib.save(new, str(out))


def extreme_anisotropy(src, out):
    img = nib.load(src)
    aff = img.affine.copy()
    aff[:3, 2] *= 100
    _save(np.asarray(img.dataobj), aff, out)


def wrong_dtype(src, out):
    img = nib.load(src)
    d = np.asarray(img.dataobj).astype(np.complex64)
    _save(d, img.affine, out)


def huge_header(src, out):
    """A header claiming 2000^3 voxels (the memory guard must refuse before reading data)."""
    img = nib.load(src)
    hdr = img.header.copy()
    hdr.set_data_shape((2000, 2000, 2000))
    with gzip.open(out, "wb") as f:
        f.write(hdr.binaryblock + b"\x00" * 4)


def fov_misses_anatomy(src, out):
    """A valid image whose field of view is a corner of the scan, away from the cord."""
    img = nib.load(src)
    part = img.slicer[0:12, 0:14, :]
    _save(np.asarray(part.dataobj), part.affine, out)


CASES = {
    # name: (maker, expected fragment of the error, or None when it loads with a warning)
    "truncated": (truncated, "corrupt or truncated"),
    "corrupt_gzip": (corrupt_gzip, "not a readable NIfTI"),
    "not_nifti": (not_nifti, "not a readable NIfTI"),
    "four_d": (four_d, "4D image"),
    "mostly_nan": (mostly_nan, "NaN/Inf"),
    "all_zero": (all_zero, "all zeros"),
    "singular_affine": (singular_affine, "singular affine"),
    "nonfinite_affine": (nonfinite_affine, "non-finite affine"),
    "qform_sform_disagree": (qform_sform_disagree, "qform and sform disagree"),
    "extreme_anisotropy": (extreme_anisotropy, "extreme anisotropy"),
    "wrong_dtype": (wrong_dtype, "unsupported data type"),
    "huge": (huge_header, "memory guard"),
}
REPAIRABLE = {"nan_voxels": (nan_voxels, "NaN/Inf voxels set to 0")}
# valid files that fail later, in the pipeline (e.g. an empty segmentation)
PIPELINE_FAILURES = {"fov_misses_anatomy": (fov_misses_anatomy, "no spinal cord in the field of view")}


def make_bad(case: str, src, out) -> Path:
    maker = (CASES.get(case) or REPAIRABLE.get(case) or PIPELINE_FAILURES[case])[0]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    maker(str(src), str(out))
    return out
