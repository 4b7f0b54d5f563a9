"""A small BIDS demo cohort built from the real images in ../shared/data.

Several participants reuse the same real scans in other orientations and resolutions, which is
exactly what exercises orientation handling: every variant must give the same segmentation.
sub-01 holds every kind of scan the public-weight pipelines take (config/demo.yaml runs them all):
the cord T2*w (sc_gm, sc_csa), cord T1w and T2w (sc_csa) with the T2w's vertebral point labels
(sc_csa per level), and a brain T1w as ``acq-brain`` (brain_tissue; brainchop's example head).
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from cohortseg.io import save_nifti_atomic, write_json_atomic, write_text_atomic


def _flip_rows(img):
    """Same anatomy, first voxel axis reversed (data and affine changed consistently)."""
    data = np.asarray(img.dataobj)[::-1]
    aff = img.affine.copy()
    aff[:3, 3] = aff[:3, 3] + aff[:3, 0] * (img.shape[0] - 1)
    aff[:3, 0] = -aff[:3, 0]
    return data, aff


def _ras(img):
    c = nib.as_closest_canonical(img)
    return np.asarray(c.dataobj), c.affine


def _extra_scans(shared: Path) -> dict:
    """sub-01's scans beyond the cord trio: vertebral labels (t2 space) and a brain T1w."""
    out = {}
    for suffix, rel in (("labels", "data/spine/t2/labels.nii.gz"), ("acq-brain_T1w", "data/brain/t1_crop.nii.gz")):
        img = nib.load(shared / rel)
        out[suffix] = (np.asarray(img.dataobj), img.affine)
    return out


def build_demo(shared_dir, out_dir, n_extra: int = 0) -> Path:
    """Write the demo BIDS dataset to `out_dir` (idempotent) and return it."""
    shared = Path(shared_dir)
    out = Path(out_dir)
    t2s = nib.load(shared / "data/spine/t2s/t2s.nii.gz")
    t1 = nib.load(shared / "data/spine/t1/t1w.nii.gz")
    t2 = nib.load(shared / "data/spine/t2/t2.nii.gz")
    variants = {
        "sub-01": {"T2starw": (np.asarray(t2s.dataobj), t2s.affine),
                   "T1w": (np.asarray(t1.dataobj), t1.affine), "T2w": (np.asarray(t2.dataobj), t2.affine),
                   **_extra_scans(shared)},
        "sub-02": {"T2starw": _ras(t2s)},
        "sub-03/ses-01": {"T2starw": _flip_rows(t2s)},
        "sub-03/ses-02": {"T2starw": (np.asarray(t2s.dataobj), t2s.affine)},
    }
    for i in range(n_extra):
        variants[f"sub-{i + 4:02d}"] = {"T2starw": (np.asarray(t2s.dataobj), t2s.affine)}
    for folder, images in variants.items():
        parts = folder.split("/")
        stem = "_".join(parts)
        for suffix, (data, aff) in images.items():
            p = out.joinpath(*parts, "anat", f"{stem}_{suffix}.nii.gz")
            if not p.exists():
                save_nifti_atomic(np.asarray(data), aff, p)
    write_json_atomic(out / "dataset_description.json", {
        "Name": "cohortseg demo cohort", "BIDSVersion": "1.9.0", "DatasetType": "raw",
        "License": "MIT (images from sct-data/sct_testing_data and neuroneural/brainchop)",
        "GeneratedBy": [{"Name": "cohortseg make-demo"}]})
    subs = sorted({f.split("/")[0] for f in variants})
    write_text_atomic(out / "participants.tsv", "participant_id\n" + "\n".join(subs) + "\n")
    (out / "README").write_text("Demo cohort built by `cohortseg make-demo` from ../shared/data.\n")
    return out
