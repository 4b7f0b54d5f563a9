"""Generic segmentation metrics in physical units (voxel geometry from the NIfTI affine)."""
from __future__ import annotations

import numpy as np


def dice(a, b) -> float:
    """Dice coefficient of two binary masks (non-zero = foreground). Both empty -> 1.0."""
    a = np.asarray(a) != 0
    b = np.asarray(b) != 0
    if a.shape != b.shape:
        raise ValueError(f"dice: shape mismatch {a.shape} vs {b.shape}")
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return float(2.0 * np.logical_and(a, b).sum() / total)


def bounding_box(mask, margin: int = 0) -> tuple[list[int], list[int]]:
    """(lo, hi) voxel corners (hi exclusive) of the non-zero voxels of `mask`, grown by `margin` and
    clipped to the array. ValueError for an empty mask."""
    m = np.asarray(mask) != 0
    if not m.any():
        raise ValueError("bounding_box of an empty mask")
    lo, hi = [], []
    for ax in range(m.ndim):
        idx = np.flatnonzero(m.any(axis=tuple(a for a in range(m.ndim) if a != ax)))
        lo.append(max(int(idx[0]) - margin, 0))
        hi.append(min(int(idx[-1]) + 1 + margin, m.shape[ax]))
    return lo, hi


def largest_component(mask, fill_holes: bool = True) -> np.ndarray:
    """Largest 26-connected component of a binary mask (optionally with holes filled)."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask
    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        mask = lab == int(np.argmax(sizes))
    if fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    return mask


def voxel_sizes(affine) -> np.ndarray:
    """Length (mm) of each voxel axis of `affine`."""
    return np.sqrt((_linear(affine) ** 2).sum(axis=0))


def _linear(affine) -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape not in ((4, 4), (3, 3)):
        raise ValueError(f"affine must be 4x4 (or 3x3), got {a.shape}")
    return a[:3, :3]


def voxel_volume_mm3(affine) -> float:
    """Volume of one voxel: |det| of the affine's linear part (handles oblique/sheared grids)."""
    return float(abs(np.linalg.det(_linear(affine))))


def inplane_area_mm2(affine, axis: int) -> float:
    """Area of one voxel face in the plane of the two voxel axes other than `axis`.

    |cross product| of the two in-plane affine columns: exact for oblique or sheared affines (the
    parallelogram spanned by the in-plane voxel edges).
    """
    m = _linear(affine)
    axis = int(axis) % 3
    i, j = [ax for ax in range(3) if ax != axis]
    return float(np.linalg.norm(np.cross(m[:, i], m[:, j])))


def area_per_slice(mask_or_prob, affine, axis: int) -> np.ndarray:
    """Area (mm^2) in every slice along voxel `axis`: sum of the slice values x in-plane voxel area.

    Binary masks give the segmented area, probability/partial-volume maps their soft area. Returns a
    float64 vector of length shape[axis].
    """
    x = np.asarray(mask_or_prob, dtype=np.float64)
    if x.ndim != 3:
        raise ValueError(f"area_per_slice expects a 3D array, got shape {x.shape}")
    axis = int(axis) % 3
    other = tuple(ax for ax in range(3) if ax != axis)
    return x.sum(axis=other) * inplane_area_mm2(affine, axis)


def volume_mm3(mask, affine) -> float:
    """Volume (mm^3): sum of the mask (or probabilities) x voxel volume."""
    return float(np.asarray(mask, dtype=np.float64).sum() * voxel_volume_mm3(affine))
