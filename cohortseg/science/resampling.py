"""Affine-aware resampling: generic grid-to-grid helpers and the axial 0.25 mm slice grid of gmseg.

Everything here works in world (scanner, RAS+ mm) coordinates through the NIfTI affines, so the
storage orientation of an image (LAS, RAS, PSR, flipped rows, oblique/sheared affines) never changes
the physical result: only the world geometry does.

The axial slice grid (`to_axial_slices`) keeps a one-to-one correspondence between output slices and
the native slices along the through-plane (superior-inferior) voxel axis, so the slice thickness is
kept and no interpolation happens across slices. Inside each slice the output pixels are a square
0.25 mm lattice in the native slice plane, presented in a canonical orientation (first in-plane axis
towards the subject's Left, second towards Anterior, i.e. the layout of an LAS image, which is SCT's
"RPI") whatever the storage orientation, and centred on the native slice centre (or `center`).
"""
from __future__ import annotations

from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from cohortseg.errors import InputError
from cohortseg.science.metrics import voxel_sizes

# World (RAS+) directions used to present axial slices canonically.
_LEFT = np.array([-1.0, 0.0, 0.0])
_ANTERIOR = np.array([0.0, 1.0, 0.0])
_SUPERIOR = np.array([0.0, 0.0, 1.0])

# Voxels of the target grid are computed in slabs of at most this many voxels (bounds memory:
# 3 float64 coordinates per voxel).
_CHUNK_VOXELS = 1 << 21


# ----------------------------------------------------------------------------- generic helpers


def _check_affine(affine, what: str = "affine") -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise InputError(f"{what} is not a finite 4x4 matrix")
    if abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise InputError(f"{what} is singular (zero voxel size or degenerate axes)")
    return a


def through_plane_axis(affine) -> int:
    """Voxel axis whose direction is closest to superior-inferior (world z), from the affine alone.

    Compares direction cosines (|z component| of each normalised column), so voxel size does not
    bias the choice: LAS/RAS -> 2, PSR -> 1, SPR -> 0, and oblique affines pick the axis with the
    smallest angle to S-I.
    """
    a = _check_affine(affine)
    cols = a[:3, :3] / voxel_sizes(a)
    return int(np.argmax(np.abs(cols[2])))


def _map(data: np.ndarray, coords: np.ndarray, order: int, cval: float, prefiltered: bool):
    return ndimage.map_coordinates(data, coords, order=order, mode="constant", cval=cval,
                                   prefilter=not prefiltered, output=np.float64)


def resample_like(data: np.ndarray, src_affine, target_shape: Sequence[int], target_affine,
                  order: int = 1, cval: float = 0.0) -> np.ndarray:
    """Resample `data` (voxel grid `src_affine`) onto the grid (`target_shape`, `target_affine`).

    Pure world-space resampling with scipy.ndimage.map_coordinates: each target voxel centre is
    mapped through `inv(src_affine) @ target_affine`; points outside the source field of view get
    `cval`. `order` 0 = nearest (labels; the input dtype is kept), 1 = linear, 3 = cubic spline
    (float32 output for order >= 1). Extra trailing dimensions of `data` (channels, time) are
    resampled independently. Memory is bounded by processing the target in slabs.
    """
    data = np.asarray(data)
    if data.ndim < 3:
        raise InputError(f"resample_like needs a 3D (or 3D+channels) array, got shape {data.shape}")
    src = _check_affine(src_affine, "source affine")
    tgt = _check_affine(target_affine, "target affine")
    target_shape = tuple(int(s) for s in target_shape)[:3]
    if len(target_shape) != 3 or min(target_shape) < 1:
        raise InputError(f"invalid target shape {target_shape}")
    if data.ndim > 3:
        extra = data.shape[3:]
        flat = data.reshape(data.shape[:3] + (-1,))
        outs = [resample_like(flat[..., c], src, target_shape, tgt, order, cval)
                for c in range(flat.shape[-1])]
        return np.stack(outs, axis=-1).reshape(target_shape + extra)

    out_dtype = data.dtype if order == 0 else np.float32
    vox = np.linalg.inv(src) @ tgt  # target voxel -> source voxel
    work = data if order == 0 else data.astype(np.float64, copy=False)
    prefiltered = False
    if order > 1:
        work = ndimage.spline_filter(work, order=order, output=np.float64, mode="constant")
        prefiltered = True
    out = np.empty(target_shape, dtype=out_dtype)
    nx, ny, nz = target_shape
    step = max(1, _CHUNK_VOXELS // (ny * nz))
    for i0 in range(0, nx, step):
        i1 = min(nx, i0 + step)
        ii, jj, kk = np.meshgrid(np.arange(i0, i1), np.arange(ny), np.arange(nz), indexing="ij")
        coords = np.stack([vox[r, 0] * ii + vox[r, 1] * jj + vox[r, 2] * kk + vox[r, 3]
                           for r in range(3)])
        if order == 0:
            out[i0:i1] = ndimage.map_coordinates(work, coords, order=0, mode="constant", cval=cval)
        else:
            out[i0:i1] = _map(work, coords, order, cval, prefiltered)
    return out


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def axial_grid_affine(native_affine, native_shape: Sequence[int], inplane_mm: float = 0.25,
                      crop: Sequence[int] = (200, 200), center=None) -> tuple[np.ndarray, int]:
    """Affine of the axial slice grid: voxel (p, q, k) -> world mm, and the through-plane axis.

    p runs towards Left, q towards Anterior (within the native slice plane), k is the native voxel
    index along the through-plane axis (same spacing/direction as the native column).
    """
    a = _check_affine(native_affine, "native affine")
    shape = np.asarray(native_shape[:3], dtype=np.float64)
    t = through_plane_axis(a)
    ins = [ax for ax in range(3) if ax != t]
    c1, c2 = a[:3, ins[0]], a[:3, ins[1]]
    normal = _unit(np.cross(c1, c2))
    if normal @ _SUPERIOR < 0:
        normal = -normal
    u = _LEFT - (_LEFT @ normal) * normal
    if np.linalg.norm(u) < 1e-6:  # slice plane perpendicular to L-R (should not happen for axial)
        u = _ANTERIOR - (_ANTERIOR @ normal) * normal
    u = _unit(u)
    v = _unit(np.cross(normal, u))  # L x S = A for the canonical case
    if v @ _ANTERIOR < 0 and abs(v @ _ANTERIOR) > 1e-9:
        v = -v
    h, w = int(crop[0]), int(crop[1])
    # Anchor: the physical in-plane FOV centre of slice 0 (orientation independent) sits on output
    # pixel (h // 2, w // 2). Native voxel centres are then at offsets (i - (n-1)/2) * spacing from
    # it, which land exactly on output pixel centres for odd and even n whenever the native spacing
    # is an even multiple of `inplane_mm` (0.5 mm, 1 mm at 0.25 mm): the native -> slices -> native
    # round trip is then lossless for linear interpolation.
    centre_vox = (shape - 1) / 2.0
    centre_vox[t] = 0.0
    c0 = a[:3, :3] @ centre_vox + a[:3, 3]
    if center is not None:
        # move the in-plane centre to the given world point (projected into the slice plane)
        d = np.asarray(center, dtype=np.float64)[:3] - c0
        c0 = c0 + (d @ u) * u + (d @ v) * v
    g = np.eye(4)
    g[:3, 0] = inplane_mm * u
    g[:3, 1] = inplane_mm * v
    g[:3, 2] = a[:3, t]
    g[:3, 3] = c0 - g[:3, 0] * (h // 2) - g[:3, 1] * (w // 2)
    return g, t


def to_axial_slices(img: nib.Nifti1Image, inplane_mm: float = 0.25, crop=(200, 200), order: int = 1,
                    center=None, fill: float = 0.0):
    """Resample every axial slice of `img` to `inplane_mm` in-plane, centre-crop/pad to `crop`.

    Returns (slices, grid): `slices` float32 (N, H, W), N = number of native slices along the
    through-plane axis (in native index order), slices[k, p, q] with p running towards the subject's
    Left and q towards Anterior whatever the storage orientation (a left-right flip is
    slices[:, ::-1]); `grid` a JSON-serialisable dict with the native and slice-grid geometry
    (`slices_to_native` needs it) plus `valid_fraction` per slice. Pixels outside the native field
    of view are set to `fill`; `grid["fov_mask"]` is not stored (recompute with `fov_mask(grid)`).
    `center` (world mm, optional) recentres the crop in-plane (e.g. on the cord centreline).
    """
    if img.ndim != 3:
        if img.ndim == 4 and img.shape[3] == 1:
            img = img.slicer[..., 0]
        else:
            raise InputError(f"expected a 3D image, got shape {img.shape}")
    if inplane_mm <= 0:
        raise InputError(f"inplane_mm must be positive, got {inplane_mm}")
    data = np.asarray(img.dataobj, dtype=np.float64)
    if not np.all(np.isfinite(data)):
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    aff = _check_affine(img.affine)
    g, t = axial_grid_affine(aff, data.shape, inplane_mm, crop, center)
    h, w = int(crop[0]), int(crop[1])
    n = data.shape[t]
    grid = {
        "native_shape": [int(s) for s in data.shape],
        "native_affine": aff.tolist(),
        "through_axis": int(t),
        "si_axis": int(t),  # alias of through_axis (superior-inferior voxel axis of the native image)
        "inplane_mm": float(inplane_mm),
        "crop": [h, w],
        "n_slices": int(n),
        "slice_thickness_mm": float(voxel_sizes(aff)[t]),
        "grid_affine": g.tolist(),
        "axcodes": list(nib.aff2axcodes(aff)),
    }
    coords, inside = _grid_to_native_coords(grid)
    ins = [ax for ax in range(3) if ax != t]
    cin = np.moveaxis(coords[ins], 3, 0)  # (N, 2, H, W): in-plane native coords per slice
    vals = np.empty((n, h, w), dtype=np.float64)
    for kk in range(n):
        plane = np.take(data, kk, axis=t)  # 2D, axes = ins
        c2 = cin[kk]
        vals[kk] = ndimage.map_coordinates(plane, c2, order=order, mode="nearest", output=np.float64)
    inside_nhw = np.moveaxis(inside, 2, 0)
    vals[~inside_nhw] = fill
    slices = np.ascontiguousarray(vals, dtype=np.float32)
    grid["valid_fraction"] = [float(x) for x in inside.mean(axis=(0, 1))]
    return slices, grid


def _grid_to_native_coords(grid: dict):
    """Native voxel coordinates (3, H, W, N) of every slice-grid pixel and the inside-FOV mask."""
    a = np.asarray(grid["native_affine"], dtype=np.float64)
    g = np.asarray(grid["grid_affine"], dtype=np.float64)
    t = int(grid["through_axis"])
    h, w = grid["crop"]
    n = int(grid["n_slices"])
    shape = np.asarray(grid["native_shape"])
    m = np.linalg.inv(a) @ g
    p, q, k = np.meshgrid(np.arange(h), np.arange(w), np.arange(n), indexing="ij")
    coords = np.stack([m[r, 0] * p + m[r, 1] * q + m[r, 2] * k + m[r, 3] for r in range(3)])
    coords[t] = np.round(coords[t])  # exact slice index (removes float noise)
    inside = np.ones((h, w, n), dtype=bool)
    for ax in range(3):
        inside &= (coords[ax] >= -0.5) & (coords[ax] < shape[ax] - 0.5)  # half-open voxel extent
    return coords, inside


def fov_mask(grid: dict) -> np.ndarray:
    """Boolean (N, H, W): slice-grid pixels inside the native field of view."""
    _, inside = _grid_to_native_coords(grid)
    return np.moveaxis(inside, 2, 0)


def slices_to_native(prob_slices: np.ndarray, grid: dict, native_img=None, order: int = 1
                     ) -> np.ndarray:
    """Map (N, H, W) slice-grid values back to the native voxel grid described by `grid`.

    Returns float32 with the native shape; each native voxel takes the in-slice interpolated value
    of its own slice (no mixing across slices); voxels whose centre falls outside the H x W crop get
    0. `native_img` (optional) is checked against the geometry stored in `grid`.
    """
    prob = np.asarray(prob_slices)
    if prob.ndim == 4 and prob.shape[-1] == 1:
        prob = prob[..., 0]
    h, w = grid["crop"]
    n = int(grid["n_slices"])
    if prob.shape != (n, h, w):
        raise InputError(f"slice stack has shape {prob.shape}, grid expects {(n, h, w)}")
    shape = tuple(int(s) for s in grid["native_shape"])
    a = np.asarray(grid["native_affine"], dtype=np.float64)
    if native_img is not None:
        if tuple(native_img.shape[:3]) != shape or not np.allclose(native_img.affine, a, atol=1e-4):
            raise InputError("native image does not match the grid the slices were made from")
    g = np.asarray(grid["grid_affine"], dtype=np.float64)
    m = np.linalg.inv(g) @ a  # native voxel -> (p, q, k)
    i, j, k = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    pqk = np.stack([m[r, 0] * i + m[r, 1] * j + m[r, 2] * k + m[r, 3] for r in range(3)])
    pqk[2] = np.round(pqk[2])
    out = np.zeros(shape, dtype=np.float64)
    inside = ((pqk[0] >= -0.5) & (pqk[0] < h - 0.5) & (pqk[1] >= -0.5) & (pqk[1] < w - 0.5)
              & (pqk[2] >= 0) & (pqk[2] <= n - 1))
    kidx = pqk[2].astype(np.int64)
    for kk in np.unique(kidx[inside]):
        sel = inside & (kidx == kk)
        out[sel] = ndimage.map_coordinates(prob[kk].astype(np.float64), pqk[:2, sel], order=order,
                                           mode="nearest", output=np.float64)
    return out.astype(np.float32)


def preprocess_image(img: nib.Nifti1Image, inplane_mm: float, crop: Sequence[int], center=None):
    """Native image -> (x (N, H, W) float32 slices of the axial grid, z-scored by the image's finite
    voxels; grid). The model grid of the 2D slice models: training (:mod:`cohortseg.training.datasets`)
    and inference (``sc_csa``) both call this."""
    data = np.asarray(img.dataobj, dtype=np.float64)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
        img = nib.Nifti1Image(data, img.affine)
    finite = np.isfinite(data)
    if not finite.any():
        raise InputError("image has no finite voxel")
    mean, std = float(data[finite].mean()), float(data[finite].std())
    if std <= 0:
        raise InputError("image is constant")
    slices, grid = to_axial_slices(img, inplane_mm=inplane_mm, crop=tuple(crop), order=1, center=center)
    x = ((slices - mean) / std).astype(np.float32)
    grid["zscore"] = {"mean": mean, "std": std}
    return x, grid
