"""deep-T1-WMH (JPSC-AD) style preprocessing and back-mapping for white-matter hypointensities on T1.

Recipe (../shared/README.md): z-score the image, affine to MNI, crop an MNI box of 184x202x72 at
1x1x1.5 mm, re-z-score inside the box, predict, map the box probabilities back to native space and
report WMH volume in total and per region (periventricular, deep white, infracortical).

The box grid is the one of the upstream tool (LAS voxel axes, in MNI mm):
``x = 90 - i`` (i = 0..183), ``y = -117 + j`` (j = 0..201), ``z = -33 + 1.5 k`` (k = 0..71), i.e.
x in [-93, 90], y in [-117, 84], z in [-33, 73.5] mm - the cerebrum's white matter, not the whole
head. The affine to MNI comes from :func:`cohortseg.science.registration.affine_to_mni` (a 4x4 matrix native
RAS mm -> MNI RAS mm); the resampling itself is done here with scipy (linear), which keeps the
matrix the only thing a job has to remember between `prepare` and `finalize`.

Z-scoring: first over the whole native image (upstream behaviour; pass ``mask`` to restrict it to
the brain), then again over the whole box.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
from scipy import ndimage

from cohortseg.errors import InputError
from cohortseg.science.lesions import WMH_REGIONS, wmh_region_map, world_grid

BOX_SHAPE: tuple[int, int, int] = (184, 202, 72)
BOX_AFFINE = np.array([[-1.0, 0.0, 0.0, 90.0],
                       [0.0, 1.0, 0.0, -117.0],
                       [0.0, 0.0, 1.5, -33.0],
                       [0.0, 0.0, 0.0, 1.0]])
BOX_SPACING_MM = (1.0, 1.0, 1.5)


def zscore(volume: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """(v - mean) / std with mean/std over `mask` (default: every voxel); nan -> 0; float32."""
    v = np.nan_to_num(np.asarray(volume, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    sel = v if mask is None else v[np.asarray(mask) > 0]
    if sel.size == 0:
        raise InputError("z-score: empty mask")
    mu, sd = float(sel.mean(dtype=np.float64)), float(sel.std(dtype=np.float64))
    if not sd > 0:
        raise InputError("z-score: image is constant")
    return ((v - mu) / sd).astype(np.float32)


def _native_data(img) -> np.ndarray:
    d = np.asarray(img.dataobj, dtype=np.float32)
    if d.ndim > 3:
        d = d.reshape(d.shape[:3] + (-1,))[..., 0]
    return d


def _box_to_native_vox(matrix: np.ndarray, native_affine: np.ndarray) -> np.ndarray:
    """4x4: box voxel -> native voxel (box -> MNI world -> native world -> native voxel)."""
    return np.linalg.inv(np.asarray(native_affine, float)) @ np.linalg.inv(np.asarray(matrix, float)) @ BOX_AFFINE


def to_box(volume: np.ndarray, native_affine: np.ndarray, matrix: np.ndarray, order: int = 1) -> np.ndarray:
    """Resample a native volume into the MNI box (184x202x72) with native->MNI `matrix` (zero outside)."""
    vox = _box_to_native_vox(matrix, native_affine)
    return ndimage.affine_transform(np.asarray(volume, dtype=np.float32), vox[:3, :3], offset=vox[:3, 3],
                                    output_shape=BOX_SHAPE, order=order, mode="constant", cval=0.0,
                                    prefilter=order > 1).astype(np.float32)


def prepare_t1(t1_img, transform=None, brain_mask=None, zscore_mask=None) -> tuple[np.ndarray, dict]:
    """deep-T1-WMH input for one T1w image.

    `transform`: a :class:`cohortseg.science.registration.LinearTransform` (or its dict / a 4x4 matrix)
    native -> MNI; computed with :func:`cohortseg.science.registration.affine_to_mni` (using `brain_mask`
    to strip the skull) when None. Returns ``x`` (1, 184, 202, 72, 1) float32 and a JSON-able
    ``meta`` (matrix, native grid) for :func:`box_to_native`.
    """
    from cohortseg.science import registration

    if transform is None:
        transform = registration.affine_to_mni(t1_img, brain_mask=brain_mask)
    matrix = _matrix_of(transform)
    d = _native_data(t1_img)
    zmask = None if zscore_mask is None else np.asarray(getattr(zscore_mask, "dataobj", zscore_mask)) > 0
    z = zscore(d, zmask)
    box = to_box(z, t1_img.affine, matrix, order=1)
    inside = to_box(np.ones(d.shape, np.float32), t1_img.affine, matrix, order=0) > 0
    if inside.mean() < 0.2:
        raise InputError(f"only {inside.mean():.0%} of the MNI box is covered by the image; "
                         "registration to MNI failed or the field of view is too small")
    x = zscore(box)[None, ..., None]
    meta = {"matrix": np.asarray(matrix).tolist(), "native_affine": np.asarray(t1_img.affine).tolist(),
            "native_shape": list(d.shape), "box_shape": list(BOX_SHAPE), "box_affine": BOX_AFFINE.tolist(),
            "box_coverage": float(inside.mean()), "mni_scaling": float(abs(np.linalg.det(np.asarray(matrix)[:3, :3])))}
    return x, meta


def _matrix_of(transform) -> np.ndarray:
    if isinstance(transform, dict):
        transform = transform["matrix"]
    m = getattr(transform, "matrix", transform)
    m = np.asarray(m, dtype=float)
    if m.shape != (4, 4):
        raise ValueError("transform must be a LinearTransform, its dict or a 4x4 matrix")
    return m


def box_to_native(prob_box: np.ndarray, meta: dict, order: int = 1) -> np.ndarray:
    """Map a box probability map (184x202x72; batch/channel singleton axes allowed) back to the native
    grid in `meta` (from :func:`prepare_t1`); voxels outside the box get 0."""
    p = np.asarray(prob_box, dtype=np.float32)
    while p.ndim > 3 and p.shape[0] == 1:
        p = p[0]
    if p.ndim == 4 and p.shape[-1] == 1:
        p = p[..., 0]
    if tuple(p.shape) != BOX_SHAPE:
        raise InputError(f"box probability map has shape {p.shape}, expected {BOX_SHAPE}")
    matrix = np.asarray(meta["matrix"], dtype=float)
    native_aff = np.asarray(meta["native_affine"], dtype=float)
    shape = tuple(int(s) for s in meta["native_shape"])
    # native voxel -> box voxel
    vox = np.linalg.inv(_box_to_native_vox(matrix, native_aff))
    return ndimage.affine_transform(p, vox[:3, :3], offset=vox[:3, 3], output_shape=shape, order=order,
                                    mode="constant", cval=0.0, prefilter=order > 1).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# regions
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def mni_tissue_masks(resolution: int = 1) -> dict:
    """Offline MNI152 (nilearn) masks for the fallback WMH region map: ``brain``, ``gm`` (cortical:
    GM probability > 0.5 outside the deep-grey box |x|<=30, -36<=y<=26, -12<=z<=22 mm), ``wm`` (WM
    probability > 0.5) and ``ventricles`` (the two largest CSF-like components - brain, GM and WM
    probabilities < 0.5, template intensity < 0.45 - inside |x|<35, -50<y<40, -5<z<40 mm).
    Returns arrays plus ``affine``."""
    from nilearn import datasets

    t = datasets.load_mni152_template(resolution=resolution)
    aff = t.affine
    T = np.asarray(t.get_fdata(), dtype=np.float32)
    brain = np.asarray(datasets.load_mni152_brain_mask(resolution=resolution).get_fdata()) > 0
    gmp = np.asarray(datasets.load_mni152_gm_template(resolution=resolution).get_fdata())
    wmp = np.asarray(datasets.load_mni152_wm_template(resolution=resolution).get_fdata())
    x, y, z = world_grid(T.shape, aff)
    csf = brain & (gmp < 0.5) & (wmp < 0.5) & (T < 0.45)
    central = (np.abs(x) < 35) & (y > -50) & (y < 40) & (z > -5) & (z < 40)
    lab, n = ndimage.label(csf & central)
    if n == 0:
        raise RuntimeError("could not find the ventricles in the MNI template")
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    vent = np.isin(lab, np.argsort(sizes)[::-1][:2])
    deepbox = (np.abs(x) <= 30) & (y >= -36) & (y <= 26) & (z >= -12) & (z <= 22)
    return {"brain": brain, "gm": (gmp > 0.5) & ~deepbox, "wm": wmp > 0.5, "ventricles": vent, "affine": aff}


def mni_region_map(resolution: int = 1, periventricular_mm: float = 10.0, infracortical_mm: float = 4.0):
    """Fallback WMH region map in MNI space (nibabel image; labels of :data:`lesions.WMH_REGIONS`)
    from the template masks of :func:`mni_tissue_masks`; domain = WM probability > 0.5. Warp it to a
    subject with ``registration.apply(transform, img, reference=native, interpolation='nearest',
    inverse=True)`` when no subject tissue segmentation is available."""
    import nibabel as nib

    m = mni_tissue_masks(resolution)
    rmap = wmh_region_map(m["ventricles"], m["gm"], m["wm"], m["affine"], periventricular_mm, infracortical_mm)
    return nib.Nifti1Image(rmap, m["affine"])


def region_names() -> dict:
    return dict(WMH_REGIONS)


def box_grid() -> tuple[Sequence[int], np.ndarray]:
    """(shape, affine) of the MNI box, e.g. as `reference` for registration.apply."""
    return BOX_SHAPE, BOX_AFFINE.copy()


__all__ = ["BOX_SHAPE", "BOX_AFFINE", "BOX_SPACING_MM", "zscore", "to_box", "prepare_t1", "box_to_native",
           "mni_tissue_masks", "mni_region_map", "region_names", "box_grid"]
