"""The deep-T1-WMH recipe (Thyreau et al., Hum Brain Mapp 2022; JPSC-AD): boxes, resampling, eTIV,
MNI affine, region sizes and WMH volumes, as the upstream program ``deepwmh.py`` computes them.

Coordinates. The upstream program does every resampling with PyTorch ``grid_sample(align_corners=True)``:
a box of n voxels has *normalised* coordinates u = 2 i / (n - 1) - 1, so -1 and +1 are the centres of
its first and last voxels, and trilinear interpolation treats every voxel outside the array as 0
(a point half a voxel outside gets half the edge value). :func:`resample` reproduces that with
``scipy.ndimage.affine_transform(order=1, mode="grid-constant")`` from the equivalent voxel-to-voxel
matrix. Matrices here act on column vectors.

Steps (channels-last arrays; the networks are :mod:`cohortseg.models.nets.deepwmh_torch`):

1. the whole image is z-scored (float64 statistics) and resampled into the 64^3 **head box**, whose
   corners are the corners of the image (anisotropic) with the axes reordered to LAS (:func:`head_box`);
2. the head net gives 4 priors there; channel 0 (intracranial) and channel 2 (cerebrum, its largest
   6-connected component above 0.01) are resampled back to the native grid and thresholded at 0.5:
   **eTIV** = intracranial voxels x voxel volume (:func:`native_prior`, :func:`head_outputs`);
3. the affine net on channels [1, 3] x channel 0 gives 12 numbers: A = I + [[p], [0 0 0 0]] maps MNI
   64-box normalised coordinates to head-box ones; with the fixed MNI 64-box grid this is the matrix
   ``M`` native RAS mm -> MNI RAS mm (:func:`mni_matrix`);
4. through M the z-scored image is sampled into the **MNI box** 184x202x72 (:data:`BOX_AFFINE`,
   LAS voxel order, 1 x 1 x 1.5 mm) and z-scored again over the box (:func:`mni_box`);
5. the WMH net's channel 0 p is rescaled to clamp((p - .5) * 2 + .5, 0, 1) where p > .5
   (:func:`wmh_rescale`); the ROI net's 4 channels give label = argmax + 1 where the max >= .25
   (:func:`roi_labels`: 1 periventricular, 2 deep white, 3 infracortical, 4 inner gray);
6. back to the native grid (:func:`box_to_native`, only inside the native bounding box of the MNI box):
   WMH probability x 255 truncated to uint8 (values < .1 dropped), mask = >= 128; the region map by
   nearest neighbour; **volumes** (:func:`volumes`): ``wmh_vol_total`` = sum(clip(u8, 0, 192) / 192)
   x native voxel volume; per region, in the MNI box: sum of the uint8 map where > 128, / 255, x 1.5
   mm^3, and region sizes = voxel count x 1.5 mm^3, both divided by the affine's scaling |det M|.

The regional WMH volumes are measured in the MNI box and the total on the native grid (upstream's
choice), so they add up to the total only approximately (partial volumes, WMH outside the 4 regions).

Orientation: the upstream program takes the qform (cohortseg's loader refuses images whose qform and
sform disagree, so both give the same affine here) and reorders axes to LAS with nibabel's orientation
tools; its normalised-coordinate permutation is reproduced as is (:func:`las_permutation`).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from cohortseg.errors import InputError

HEAD_SHAPE = (64, 64, 64)
#: MNI grid of the head net's 64^3 output for the affine net (upstream ``affine64_mni``)
HEAD_MNI_AFFINE = np.array([[-2.85714293, 0.0, 0.0, 90.0],
                            [0.0, 3.42857146, 0.0, -126.0],
                            [0.0, 0.0, 2.85714293, -72.0],
                            [0.0, 0.0, 0.0, 1.0]])
BOX_SHAPE = (184, 202, 72)
BOX_AFFINE = np.array([[-1.0, 0.0, 0.0, 90.0],
                       [0.0, 1.0, 0.0, -117.0],
                       [0.0, 0.0, 1.5, -33.0],
                       [0.0, 0.0, 0.0, 1.0]])
REGIONS = {1: "periventricular", 2: "deepwhite", 3: "infracortical", 4: "innergray"}
#: the upstream CSV columns, in order (``<stem>_wmh_in_lrois.csv``)
COLUMNS = ["eTIV", "wmh_vol_total", *[f"wmh_vol_{r}" for r in REGIONS.values()],
           *[f"roisize_{r}" for r in REGIONS.values()]]
ROI_MIN_PROB = 0.25
PRIOR_THRESHOLD = 0.5
METHOD = "deep-T1-WMH (Thyreau et al. 2022), Keras rebuild of the upstream networks"
ICV_METHOD = "deep-T1-WMH head net intracranial prior > 0.5 on the native grid"
WMH_MASK_U8 = 128
WMH_FULL_U8 = 192


# ----------------------------------------------------------------------------------------------
# align_corners=True resampling
# ----------------------------------------------------------------------------------------------
def normaliser(shape) -> np.ndarray:
    """4x4: voxel index -> align_corners normalised coordinate (2 i / (n - 1) - 1) of a `shape` grid."""
    n = np.maximum(np.asarray(shape, float) - 1, 1)
    m = np.eye(4)
    m[:3, :3] = np.diag(2.0 / n)
    m[:3, 3] = -1.0
    return m


def resample(volume: np.ndarray, out_shape, out_to_in_vox: np.ndarray, order: int = 1,
             offset=(0, 0, 0)) -> np.ndarray:
    """Sample `volume` (3D, or 4D channels-last) on an `out_shape` grid whose voxel v maps to input voxel
    ``out_to_in_vox @ (v + offset)``: trilinear (order 1) or nearest (order 0), zeros outside the input,
    as torch ``grid_sample(..., align_corners=True, padding_mode='zeros')``. float32."""
    m = np.asarray(out_to_in_vox, float)
    t = m[:3, :3] @ np.asarray(offset, float) + m[:3, 3]
    v = np.asarray(volume, np.float32)
    if v.ndim == 4:
        return np.stack([resample(v[..., c], out_shape, m, order, offset) for c in range(v.shape[-1])], axis=-1)
    return ndimage.affine_transform(v, m[:3, :3], offset=t, output_shape=tuple(int(s) for s in out_shape),
                                    order=order, mode="grid-constant", cval=0.0, prefilter=False)


def las_permutation(affine) -> np.ndarray:
    """4x4 signed permutation R with native normalised coords = R @ head-box normalised coords (LAS box)."""
    import nibabel as nib

    o_native = nib.orientations.io_orientation(np.asarray(affine, float))
    o_las = nib.orientations.axcodes2ornt("LAS")
    back = nib.orientations.ornt_transform(o_las, o_native)
    # upstream applies this matrix to row vectors (grid @ M): as a column-vector matrix it is the transpose
    return nib.orientations.inv_ornt_aff(back, (1, 1, 1)).T


# ----------------------------------------------------------------------------------------------
# steps
# ----------------------------------------------------------------------------------------------
def zscore(volume: np.ndarray) -> np.ndarray:
    """(v - mean) / std over every voxel (float64 statistics), float32; InputError if constant."""
    v = np.asarray(volume, np.float32)
    mu, sd = float(v.mean(dtype=np.float64)), float(v.std(dtype=np.float64))
    if not np.isfinite(sd) or sd <= 0:
        raise InputError("image is constant or not finite; cannot z-score it")
    return ((v - mu) / sd).astype(np.float32)


def head_box(z: np.ndarray, affine) -> np.ndarray:
    """The z-scored native image in the 64^3 LAS head box, (64, 64, 64) float32."""
    vox = np.linalg.inv(normaliser(z.shape)) @ las_permutation(affine) @ normaliser(HEAD_SHAPE)
    return resample(z, HEAD_SHAPE, vox)


def native_prior(prior64: np.ndarray, affine, native_shape, target=None) -> np.ndarray:
    """A head-box map (64^3) resampled (trilinear, align_corners) onto the native grid of the image the
    box was made from, or onto another grid ``target = (shape, affine)`` in the same world (e.g. a
    conformed copy of that T1, or a registered SWI's grid expressed in the T1's world). float32."""
    to_head = np.linalg.inv(normaliser(HEAD_SHAPE)) @ np.linalg.inv(las_permutation(affine)) @ normaliser(native_shape)
    if target is None:
        return resample(prior64, native_shape, to_head)
    shape, taff = target
    vox = to_head @ np.linalg.inv(np.asarray(affine, float)) @ np.asarray(taff, float)
    return resample(prior64, tuple(int(s) for s in shape), vox)


def largest_component(prob: np.ndarray, level: float = 0.01) -> np.ndarray:
    """`prob` where it belongs to the largest 6-connected component of prob > level, else 0."""
    lab, n = ndimage.label(prob > level)
    if n == 0:
        return np.zeros_like(prob)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return np.where(lab == sizes.argmax(), prob, 0).astype(prob.dtype)


def head_outputs(priors64: np.ndarray, affine, native_shape) -> dict:
    """Native intracranial and cerebrum masks and eTIV (mm^3) from the head net's (64, 64, 64, >=3) output."""
    icv = native_prior(priors64[..., 0], affine, native_shape) > PRIOR_THRESHOLD
    cerebrum = native_prior(largest_component(priors64[..., 2]), affine, native_shape) > PRIOR_THRESHOLD
    voxvol = abs(float(np.linalg.det(np.asarray(affine, float)[:3, :3])))
    return {"icv": icv, "cerebrum": cerebrum, "eTIV": float(icv.sum()) * voxvol,
            "cerebrum_vol": float(cerebrum.sum()) * voxvol}


def affine_input(priors64: np.ndarray) -> np.ndarray:
    """The affine net's input: channels [1, 3] of the priors times channel 0, (64, 64, 64, 2)."""
    return (priors64[..., [1, 3]] * priors64[..., :1]).astype(np.float32)


def mni_matrix(params12, affine, native_shape) -> np.ndarray:
    """4x4 native RAS mm -> MNI RAS mm from the affine net's 12 outputs (see the module docstring)."""
    a = np.eye(4)
    a[:3, :] += np.asarray(params12, float).reshape(3, 4)
    native_to_head = np.linalg.inv(las_permutation(affine)) @ normaliser(native_shape) @ np.linalg.inv(
        np.asarray(affine, float))
    return HEAD_MNI_AFFINE @ np.linalg.inv(normaliser(HEAD_SHAPE)) @ np.linalg.inv(a) @ native_to_head


def mni_scaling(matrix) -> float:
    return abs(float(np.linalg.det(np.asarray(matrix, float)[:3, :3])))


def mni_box(z: np.ndarray, affine, matrix) -> tuple[np.ndarray, float]:
    """The z-scored native image sampled into the MNI box through `matrix`, z-scored again over the box;
    also the fraction of the box the image covers. InputError when the box is mostly outside the image."""
    vox = np.linalg.inv(np.asarray(affine, float)) @ np.linalg.inv(np.asarray(matrix, float)) @ BOX_AFFINE
    box = resample(z, BOX_SHAPE, vox)
    cover = resample(np.ones(z.shape, np.float32), BOX_SHAPE, vox)
    coverage = float((cover > 0.5).mean())
    if coverage < 0.2:
        raise InputError(f"only {coverage:.0%} of the MNI box lies inside the image: the affine to MNI failed "
                         "or the field of view is too small")
    return zscore(box), coverage


def wmh_rescale(p: np.ndarray) -> np.ndarray:
    """Upstream sharpening of the WMH channel: clamp((p - .5) * 2 + .5, 0, 1) where p > .5, else 0."""
    p = np.asarray(p, np.float32)
    return np.where(p > 0.5, np.clip((p - 0.5) * 2 + 0.5, 0, 1), 0).astype(np.float32)


def roi_labels(rois: np.ndarray) -> np.ndarray:
    """(..., 4) region probabilities -> uint8 labels 1..4 (argmax + 1) where the max >= 0.25, else 0."""
    r = np.asarray(rois)
    lab = (np.argmax(r, axis=-1) + 1).astype(np.uint8)
    lab[r.max(axis=-1) < ROI_MIN_PROB] = 0
    return lab


def _native_block(affine, native_shape, matrix) -> tuple[np.ndarray, np.ndarray]:
    """(start, size): the native voxel block holding the MNI box (its corner centres, floor/ceil)."""
    corners = np.array([[i, j, k, 1.0] for i in (0, BOX_SHAPE[0] - 1) for j in (0, BOX_SHAPE[1] - 1)
                        for k in (0, BOX_SHAPE[2] - 1)]).T  # the corner voxel centres
    ijk = (np.linalg.inv(np.asarray(affine, float)) @ np.linalg.inv(np.asarray(matrix, float)) @ BOX_AFFINE @ corners)[:3]
    ijk = np.clip(ijk, 0, np.asarray(native_shape, float)[:, None])
    start = np.floor(ijk.min(axis=1)).astype(int)
    return start, np.ceil(ijk.max(axis=1)).astype(int) - start


def box_to_native(box: np.ndarray, affine, native_shape, matrix, order: int = 1) -> np.ndarray:
    """A box map back on the native grid (trilinear, or nearest for labels), zero outside the block."""
    start, size = _native_block(affine, native_shape, matrix)
    out = np.zeros(tuple(int(s) for s in native_shape), np.float32)
    if np.any(size <= 0):
        return out
    vox = np.linalg.inv(BOX_AFFINE) @ np.asarray(matrix, float) @ np.asarray(affine, float)
    sl = tuple(slice(a, a + b) for a, b in zip(start, size))
    out[sl] = resample(box, size, vox, order=order, offset=start)
    return out


def wmh_native_u8(wmh_box: np.ndarray, affine, native_shape, matrix) -> np.ndarray:
    """Rescaled WMH box probability -> native uint8 0..255 (x 255, truncated; < .1 dropped)."""
    p = box_to_native(wmh_box, affine, native_shape, matrix, order=1)
    p[p < 0.1] = 0
    return np.clip(p * 255, 0, 255).astype(np.uint8)


def volumes(wmh_u8_native: np.ndarray, affine, wmh_box: np.ndarray, labels_box: np.ndarray, matrix,
            etiv: float) -> dict:
    """The upstream quantities (mm^3, :data:`COLUMNS`)."""
    voxvol = abs(float(np.linalg.det(np.asarray(affine, float)[:3, :3])))
    box_voxvol = abs(float(np.linalg.det(BOX_AFFINE[:3, :3])))
    scale = mni_scaling(matrix)
    u8 = np.clip(np.asarray(wmh_box, np.float32) * 255, 0, 255).astype(np.uint8).astype(np.float64)
    lesion = np.where(u8 > WMH_MASK_U8, u8, 0) / 255.0
    idx = list(REGIONS)
    per_roi = ndimage.sum(lesion, labels=labels_box, index=idx) * box_voxvol / scale
    sizes = ndimage.sum(np.ones(labels_box.shape), labels=labels_box, index=idx) * box_voxvol / scale
    out = {"eTIV": float(etiv),
           "wmh_vol_total": float((np.clip(wmh_u8_native, 0, WMH_FULL_U8) / WMH_FULL_U8).sum() * voxvol)}
    for (_, r), v in zip(REGIONS.items(), per_roi):
        out[f"wmh_vol_{r}"] = float(v)
    for (_, r), v in zip(REGIONS.items(), sizes):
        out[f"roisize_{r}"] = float(v)
    return out


def itk_affine_text(matrix) -> str:
    """The MNI affine as an ITK/ANTs transform file (LPS, MNI -> native: antsApplyTransforms -t), as the
    upstream ``_mni0Affine.txt``."""
    flip = np.array([[1, 1, -1, -1], [1, 1, -1, -1], [-1, -1, 1, 1], [1, 1, 1, 1]], float)
    mi = np.linalg.inv(np.asarray(matrix, float)) * flip
    vals = [*mi[:3, :3].ravel(), *mi[:3, 3]]
    return ("#Insight Transform File V1.0\nTransform: AffineTransform_float_3_3\nFixedParameters: 0 0 0\n"
            "Parameters: " + " ".join(f"{v:.6f}" for v in vals) + "\n")


def compact_voxels(data: np.ndarray) -> np.ndarray:
    """The native voxels as int16 when that is lossless (most T1s), else float32."""
    d = np.asarray(data, np.float32)
    if np.all(d == np.round(d)) and d.min() >= -32768 and d.max() <= 32767:
        return d.astype(np.int16)
    return d
