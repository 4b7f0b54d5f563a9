"""Spinal cord cross-sectional area (CSA) and shape metrics from a (soft) cord mask.

Pure functions over numpy arrays + a 4x4 voxel-to-world affine (RAS+ mm, as nibabel gives it), so
they work for any storage orientation (RAS, PSR, LAS, oblique): the superior-inferior (S-I) voxel
axis is found from the affine, and every length/area is computed in world millimetres.

Output tables follow Spinal Cord Toolbox's ``sct_process_segmentation`` csa.csv layout (column
names and meaning; no SCT code is used):

* per slice (:func:`csa_per_slice`): ``Slice (I->S)``, ``VertLevel``, ``MEAN(area)``,
  ``MEAN(angle_AP)``, ``MEAN(angle_RL)``, ``MEAN(diameter_AP)``, ``MEAN(diameter_RL)``,
  ``MEAN(eccentricity)``, ``MEAN(orientation)``, ``MEAN(solidity)``, ``SUM(length)``;
* per vertebral level (:func:`csa_per_level`): the same metrics as ``MEAN(..)``/``STD(..)`` over the
  slices of each level, ``SUM(length)``, ``Slice (I->S)`` as ``"first:last"`` and ``N slices``.

Conventions (documented differences to SCT in brackets):

* ``Slice (I->S)`` counts voxel slices along the S-I axis from the inferior end of the volume
  (SCT's index in its RPI orientation). Rows cover every slice from the first to the last one
  containing the mask; metrics are NaN on empty slices inside that range.
* Centreline: per-slice centre of mass of the (soft) mask, fitted by a weighted polynomial in the
  slice index (degree 5 by default, lowered for short cords) [SCT default: bspline/polyfit].
* Angle: ``theta`` between the centreline tangent and the slice normal, in 3-D world space.
  ``MEAN(area)`` = sum of soft values x in-plane voxel area x cos(theta) with angle correction
  [SCT rescales the slice by cos(angle_RL), cos(angle_AP); identical for a tilt about one axis].
  ``MEAN(angle_AP)`` = atan2(t.L, t.n): tilt towards the patient's left (rotation about A-P),
  ``MEAN(angle_RL)`` = atan2(t.A, t.n): tilt towards anterior (rotation about R-L), in degrees,
  with t the tangent, n the slice normal pointing superior, L and A the world left/anterior
  directions projected into the slice plane (SCT's x/y of its RPI grid). Without angle
  correction the angles are reported as 0 and ``SUM(length)`` is the slice spacing, as in SCT.
* Diameters/eccentricity/orientation: from the weighted second moments of the soft mask, projected
  onto the plane perpendicular to the centreline (angle correction) and including each voxel's own
  extent; diameter = 4 sqrt(eigenvalue) (full axis of the ellipse with the same moments);
  ``diameter_RL`` is the axis closer to R-L; orientation = angle (deg, 0-90) between the major axis
  and R-L. Solidity: area / convex-hull area of the slice mask thresholded at 0.5 (largest
  component), in the slice plane.
* Vertebral levels: see :func:`vertebral_levels`.

Cleaning a predicted cord map before measuring it: :func:`tube_filter` (per-slice blobs off a
smooth centreline are removed) and :func:`largest_component` (largest 3-D component).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from cohortseg.errors import InputError

NEAR_ZERO = 1e-6

PER_SLICE_COLUMNS = [
    "Slice (I->S)", "VertLevel", "MEAN(area)", "MEAN(angle_AP)", "MEAN(angle_RL)",
    "MEAN(diameter_AP)", "MEAN(diameter_RL)", "MEAN(eccentricity)", "MEAN(orientation)",
    "MEAN(solidity)", "SUM(length)",
]
_METRICS = ["area", "angle_AP", "angle_RL", "diameter_AP", "diameter_RL", "eccentricity",
            "orientation", "solidity"]


# --------------------------------------------------------------------------------------- geometry
def si_axis(affine) -> int:
    """Index of the voxel axis most aligned with world S-I (largest |cos| with world z)."""
    a = np.asarray(affine, dtype=float)[:3, :3]
    cos = np.abs(a[2]) / np.maximum(np.linalg.norm(a, axis=0), 1e-12)
    return int(np.argmax(cos))


def _inplane(axis: int) -> tuple[int, int]:
    return tuple(i for i in range(3) if i != axis)  # type: ignore[return-value]


def _frame(affine, axis: int):
    """World frame of the slices: in-plane columns, unit normal (superior), L and A in-plane units."""
    a = np.asarray(affine, dtype=float)[:3, :3]
    ia, ib = _inplane(axis)
    ca, cb, ck = a[:, ia], a[:, ib], a[:, axis]
    n = np.cross(ca, cb)
    n /= np.linalg.norm(n)
    if n[2] < 0 or (n[2] == 0 and np.dot(n, ck) < 0):
        n = -n
    left = np.array([-1.0, 0.0, 0.0])
    e_l = left - np.dot(left, n) * n
    if np.linalg.norm(e_l) < 1e-6:  # slices perpendicular to R-L: fall back on the A axis
        ant = np.array([0.0, 1.0, 0.0]) - n[1] * n
        e_a = ant / np.linalg.norm(ant)
        e_l = np.cross(n, e_a)
    else:
        e_l /= np.linalg.norm(e_l)
        e_a = np.cross(e_l, n)
    return ca, cb, ck, n, e_l, e_a


def _i_to_s(affine, axis: int, n_slices: int) -> np.ndarray:
    """Map voxel slice index -> 'Slice (I->S)' index."""
    ck = np.asarray(affine, dtype=float)[:3, axis]
    k = np.arange(n_slices)
    return k if ck[2] >= 0 else (n_slices - 1 - k)


def _as_volume(arr) -> np.ndarray:
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim == 4 and a.shape[3] == 1:
        a = a[..., 0]
    if a.ndim != 3:
        raise InputError(f"expected a 3-D mask, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    return a


# ------------------------------------------------------------------------------------- centreline
@dataclass(frozen=True)
class Centerline:
    """Cord centreline in voxel coordinates of one volume.

    ``slices``: voxel indices along ``axis`` from the first to the last slice holding the mask;
    ``com``: raw per-slice centre of mass (n, 2) in the two in-plane voxel axes (NaN on empty
    slices); ``fit``: the smoothed polynomial fit evaluated on every slice; ``deriv``: d fit / d slice;
    ``mass``: sum of mask values per slice; ``degree``: the polynomial degree used.
    """

    axis: int
    slices: np.ndarray
    com: np.ndarray
    fit: np.ndarray
    deriv: np.ndarray
    mass: np.ndarray
    degree: int
    n_slices: int

    def voxel_points(self) -> np.ndarray:
        """(n, 3) voxel coordinates of the fitted centreline."""
        pts = np.zeros((len(self.slices), 3))
        ia, ib = _inplane(self.axis)
        pts[:, ia], pts[:, ib], pts[:, self.axis] = self.fit[:, 0], self.fit[:, 1], self.slices
        return pts

    def tangents(self, affine) -> np.ndarray:
        """(n, 3) world tangent, mm per slice step (not normalised), pointing to increasing slice."""
        d = np.zeros((len(self.slices), 3))
        ia, ib = _inplane(self.axis)
        d[:, ia], d[:, ib], d[:, self.axis] = self.deriv[:, 0], self.deriv[:, 1], 1.0
        return d @ np.asarray(affine, dtype=float)[:3, :3].T


def centerline(soft_or_binary, affine, axis: int | None = None, degree: int = 5) -> Centerline:
    """Per-slice centre of mass of the mask, smoothed by a mass-weighted polynomial fit.

    ``axis`` defaults to the S-I axis of ``affine``. The degree is lowered for short cords (at
    most one degree per 10 non-empty slices, at least 1) so that slice-to-slice noise of the centre
    of mass is smoothed rather than followed; one non-empty slice gives a constant.
    """
    m = np.clip(_as_volume(soft_or_binary), 0.0, None)
    if axis is None:
        axis = si_axis(affine)
    ia, ib = _inplane(axis)
    mm = np.moveaxis(m, (ia, ib, axis), (0, 1, 2))
    mass_all = mm.sum(axis=(0, 1))
    nz = np.nonzero(mass_all > NEAR_ZERO)[0]
    if nz.size == 0:
        raise InputError("empty mask: no centreline")
    slices = np.arange(nz[0], nz[-1] + 1)
    mass = mass_all[slices]
    ii = np.arange(mm.shape[0])[:, None]
    jj = np.arange(mm.shape[1])[None, :]
    com = np.full((len(slices), 2), np.nan)
    for n, k in enumerate(slices):
        if mass[n] > NEAR_ZERO:
            s = mm[:, :, k]
            com[n] = ((s * ii).sum() / mass[n], (s * jj).sum() / mass[n])
    ok = mass > NEAR_ZERO
    n_ok = int(ok.sum())
    deg = int(max(0, min(degree, n_ok - 1, max(1, n_ok // 10))))
    fit = np.empty_like(com)
    deriv = np.zeros_like(com)
    if deg == 0:
        fit[:] = np.nanmean(com[ok], axis=0)
    else:
        w = np.sqrt(mass[ok] / mass[ok].max())
        for c in range(2):
            p = np.polynomial.Polynomial.fit(slices[ok], com[ok, c], deg, w=w)
            fit[:, c] = p(slices)
            deriv[:, c] = p.deriv()(slices)
    return Centerline(axis=axis, slices=slices, com=com, fit=fit, deriv=deriv, mass=mass, degree=deg,
                      n_slices=int(mm.shape[2]))


def angle_per_slice(centerline_or_mask, affine, axis: int | None = None, degree: int = 5) -> pd.DataFrame:
    """Angle between the cord centreline and the slice normal, per slice of the centreline.

    Accepts a :class:`Centerline` or a mask (then :func:`centerline` is computed). Returns a
    DataFrame indexed like the centreline slices with columns ``slice`` (voxel index),
    ``Slice (I->S)``, ``angle`` (deg, 3-D angle to the slice normal), ``angle_AP``, ``angle_RL``
    (deg, SCT sign convention, see module doc), ``cos`` and ``length`` (mm of centreline per slice).
    """
    cl = centerline_or_mask if isinstance(centerline_or_mask, Centerline) else centerline(
        centerline_or_mask, affine, axis=axis, degree=degree)
    _, _, _, n, e_l, e_a = _frame(affine, cl.axis)
    t = cl.tangents(affine)
    t_n = t @ n
    t = t * np.sign(np.where(t_n == 0, 1.0, t_n))[:, None]  # orient towards superior
    tn, tl, ta = t @ n, t @ e_l, t @ e_a
    norm = np.linalg.norm(t, axis=1)
    cos = tn / norm
    return pd.DataFrame({
        "slice": cl.slices,
        "Slice (I->S)": _i_to_s(affine, cl.axis, cl.n_slices)[cl.slices],
        "angle": np.degrees(np.arccos(np.clip(cos, -1, 1))),
        "angle_AP": np.degrees(np.arctan2(tl, tn)),
        "angle_RL": np.degrees(np.arctan2(ta, tn)),
        "cos": cos,
        "length": norm,
    })


# ---------------------------------------------------------------------------------- shape metrics
def _slice_shape(s: np.ndarray, ca, cb, t_unit, e_l) -> dict:
    """Moment-based diameters etc. of one slice; `t_unit` None = no angle correction."""
    w = s.sum()
    ii, jj = np.nonzero(s > NEAR_ZERO)
    ws = s[ii, jj]
    ci, cj = (ws * ii).sum() / w, (ws * jj).sum() / w
    v = np.outer(ii - ci, ca) + np.outer(jj - cj, cb)  # (m, 3) world offsets in the slice plane
    cov = (v * ws[:, None]).T @ v / w + (np.outer(ca, ca) + np.outer(cb, cb)) / 12.0
    if t_unit is not None:
        p = np.eye(3) - np.outer(t_unit, t_unit)
        cov = p @ cov @ p.T
        e_l = p @ e_l
        e_l /= np.linalg.norm(e_l)
    evals, evecs = np.linalg.eigh(cov)
    evals, evecs = evals[::-1][:2], evecs[:, ::-1][:, :2]  # the 3rd is ~0 (out of plane)
    evals = np.clip(evals, 0.0, None)
    d_major, d_minor = 4.0 * np.sqrt(evals)
    cos_major = abs(float(evecs[:, 0] @ e_l))
    orientation = float(np.degrees(np.arccos(np.clip(cos_major, 0.0, 1.0))))
    if orientation <= 45.0:
        d_rl, d_ap = d_major, d_minor
    else:
        d_rl, d_ap = d_minor, d_major
    ecc = float(np.sqrt(max(0.0, 1.0 - (d_minor / d_major) ** 2))) if d_major > 0 else np.nan
    return {"diameter_AP": float(d_ap), "diameter_RL": float(d_rl), "eccentricity": ecc,
            "orientation": orientation, "solidity": _solidity(s)}


def _solidity(s: np.ndarray) -> float:
    from skimage import measure

    b = s > 0.5
    if not b.any():
        return np.nan
    lab = measure.label(b, connectivity=2)
    props = measure.regionprops(lab)
    r = max(props, key=lambda p: p.area)
    try:
        return float(r.solidity)
    except Exception:  # degenerate hull (a line of voxels)
        return np.nan


def csa_per_slice(soft_mask, affine, angle_correction: bool = True, levels=None,
                  centerline_: Centerline | None = None, degree: int = 5) -> pd.DataFrame:
    """Cross-sectional area and shape per axial slice, SCT csa.csv-compatible columns.

    ``soft_mask``: 3-D array, binary or soft in [0, 1] (values are clipped to [0, 1]).
    ``affine``: voxel-to-world (mm). ``levels``: optional per-voxel-slice vertebral level array
    (length = number of slices along the S-I axis, NaN where unknown, e.g. from
    :func:`vertebral_levels`) or a mapping {voxel slice index: level}. ``centerline_``: a
    precomputed centreline (e.g. from a cord mask when measuring GM); default: from the mask.
    Returns one row per slice from the first to the last non-empty slice, sorted I->S.
    """
    m = np.clip(_as_volume(soft_mask), 0.0, 1.0)
    axis = si_axis(affine) if centerline_ is None else centerline_.axis
    cl = centerline_ if centerline_ is not None else centerline(m, affine, axis=axis, degree=degree)
    ia, ib = _inplane(axis)
    mm = np.moveaxis(m, (ia, ib, axis), (0, 1, 2))
    n_slices = mm.shape[2]
    ca, cb, ck, n, e_l, e_a = _frame(affine, axis)
    pix_area = float(np.linalg.norm(np.cross(ca, cb)))
    ang = angle_per_slice(cl, affine)
    by_slice = {int(k): i for i, k in enumerate(cl.slices)}
    tangents = cl.tangents(affine)
    i2s = _i_to_s(affine, axis, n_slices)
    lev = _levels_lookup(levels, n_slices)

    nzs = np.nonzero(mm.sum(axis=(0, 1)) > NEAR_ZERO)[0]
    if nzs.size == 0:
        raise InputError("empty mask: no cross-sectional area")
    rows = []
    spacing = float(abs(np.dot(ck, n)))  # slice spacing along the normal
    for k in range(nzs[0], nzs[-1] + 1):
        row = {"Slice (I->S)": int(i2s[k]), "VertLevel": lev[k]}
        s = mm[:, :, k]
        mass = s.sum()
        j = by_slice.get(k)
        if mass <= NEAR_ZERO:
            row.update({f"MEAN({x})": np.nan for x in _METRICS})
            row["SUM(length)"] = np.nan
            rows.append(row)
            continue
        if angle_correction and j is None:
            raise InputError(f"the centreline does not cover slice {k} of the mask; "
                             "supply a longer centreline or disable angle correction")
        if angle_correction:
            cos = float(ang["cos"].iat[j])
            a_ap, a_rl = float(ang["angle_AP"].iat[j]), float(ang["angle_RL"].iat[j])
            t = tangents[j]
            t_unit = t / np.linalg.norm(t)
            length = float(ang["length"].iat[j])
        else:
            cos, a_ap, a_rl, t_unit, length = 1.0, 0.0, 0.0, None, spacing
        row["MEAN(area)"] = float(mass * pix_area * cos)
        row["MEAN(angle_AP)"] = a_ap
        row["MEAN(angle_RL)"] = a_rl
        for key, val in _slice_shape(s, ca, cb, t_unit, e_l).items():
            row[f"MEAN({key})"] = val
        row["SUM(length)"] = length
        rows.append(row)
    df = pd.DataFrame(rows, columns=PER_SLICE_COLUMNS)
    df["VertLevel"] = pd.array(df["VertLevel"].to_numpy(dtype=float), dtype="Float64").round().astype("Int64")
    return df.sort_values("Slice (I->S)").reset_index(drop=True)


def _levels_lookup(levels, n_slices: int) -> np.ndarray:
    out = np.full(n_slices, np.nan)
    if levels is None:
        return out
    if isinstance(levels, Mapping):
        for k, v in levels.items():
            if 0 <= int(k) < n_slices:
                out[int(k)] = np.nan if v is None else float(v)
        return out
    arr = np.asarray(levels, dtype=float)
    if arr.ndim != 1 or arr.size != n_slices:
        raise ValueError(f"levels must be a 1-D array with one entry per slice ({n_slices}), got {arr.shape}")
    return arr


# ----------------------------------------------------------------------------- vertebral levels
def vertebral_levels(level_img_or_points, affine=None, *, n_slices: int | None = None,
                     axis: int | None = None, kind: str = "auto", convention: str = "body",
                     extrapolate: float | None = None, mask=None,
                     level_height_mm: float | None = None) -> np.ndarray:
    """Vertebral level of every voxel slice along the S-I axis (float array, NaN = unknown).

    Inputs (``kind``):

    * ``"map"``: a full level map (every cord/vertebra voxel holds its level, e.g.
      ``sct_label_vertebrae`` output or PAM50 ``levels``): per slice the most frequent non-zero
      level, counted inside ``mask`` (>0.5) when given and overlapping.
    * ``"centerline"``: a centreline whose voxels hold the level of their slice (dense or sparse,
      e.g. ``t2_labeled_center_manual``). Each labelled slice gives a point (slice, level) and the
      points are interpolated as for ``"points"`` with the ``"body"`` convention.
    * ``"points"``: point labels (one voxel, or a small blob whose mean position is used, per
      level value). ``convention="body"`` (default): value N marks the centre of vertebral body N
      (as ``t2/labels.nii.gz``: 3 = C3, 5 = C5); a continuous level coordinate L is interpolated
      linearly in slice position between labels, and a slice belongs to level floor(L + 0.5), i.e.
      level boundaries lie half-way between body centres (C4 is the middle third between C3 and C5
      centres when only those two are labelled); a slice exactly on a boundary goes to the lower
      (more inferior, larger-numbered) vertebra. ``convention="disc"``: value N marks the disc
      at the top of vertebra N (SCT ``label_disc``: 3 = C2/C3); slice level = floor(L), i.e. the
      vertebra below the disc above it.
    * ``"auto"``: ``"map"`` if the labelled slices hold more than 4 labelled voxels on median, else
      ``"centerline"``.
    * a sequence of (voxel_slice_index, level) pairs or a mapping {level: voxel_slice_index}:
      treated as ``"points"`` (``n_slices`` required).

    Beyond the outermost labels the line is extrapolated with the slope of the nearest segment by
    less than ``extrapolate`` levels (default: 0.5 for "body" -- the outermost vertebrae are
    completed up to their mid-way discs -- and 1.0 for "disc"); ``0`` disables extrapolation,
    ``np.inf`` extrapolates over the whole volume. A single label needs ``level_height_mm``
    (S-I height of one vertebral level) for its slope; otherwise only its own slice is labelled.
    """
    if convention not in ("body", "disc"):
        raise ValueError("convention must be 'body' or 'disc'")
    if isinstance(level_img_or_points, Mapping) or (
            not isinstance(level_img_or_points, np.ndarray) and _is_pairs(level_img_or_points)):
        if n_slices is None:
            raise ValueError("n_slices is required with point lists")
        if isinstance(level_img_or_points, Mapping):
            pts = [(float(k_), float(lv)) for lv, k_ in level_img_or_points.items()]
        else:
            pts = [(float(k_), float(lv)) for k_, lv in level_img_or_points]
        spacing, sup = _spacing(affine, axis)
        return _interp_levels(pts, n_slices, convention, extrapolate, level_height_mm, spacing, sup)

    vol = _as_volume(level_img_or_points)
    if affine is None and axis is None:
        raise ValueError("affine (or axis) is required for a level image")
    if axis is None:
        axis = si_axis(affine)
    ia, ib = _inplane(axis)
    lv = np.rint(np.moveaxis(vol, (ia, ib, axis), (0, 1, 2))).astype(np.int64)
    n = lv.shape[2]
    counts = (lv > 0).sum(axis=(0, 1))
    if not counts.any():
        raise InputError("vertebral level image holds no label")
    if kind == "auto":
        kind = "map" if np.median(counts[counts > 0]) > 4 else "centerline"
    spacing, sup = _spacing(affine, axis)
    if kind == "map":
        out = np.full(n, np.nan)
        mk = None
        if mask is not None:
            mk = np.moveaxis(_as_volume(mask), (ia, ib, axis), (0, 1, 2)) > 0.5
        for k in np.nonzero(counts)[0]:
            s = lv[:, :, k]
            vals = s[(s > 0) & mk[:, :, k]] if mk is not None and ((s > 0) & mk[:, :, k]).any() else s[s > 0]
            out[k] = float(np.bincount(vals).argmax())
        return out
    if kind == "centerline":
        pts = []
        for k in np.nonzero(counts)[0]:
            s = lv[:, :, k]
            pts.append((float(k), float(np.bincount(s[s > 0]).argmax())))
        return _interp_levels(pts, n, "body", extrapolate, level_height_mm, spacing, sup)
    if kind == "points":
        pts = []
        for value in np.unique(lv[lv > 0]):
            ks = np.nonzero(lv == value)[2]
            pts.append((float(ks.mean()), float(value)))
        return _interp_levels(pts, n, convention, extrapolate, level_height_mm, spacing, sup)
    raise ValueError(f"unknown kind {kind!r} (auto, map, centerline, points)")


def _is_pairs(x) -> bool:
    try:
        return len(x) > 0 and all(len(p) == 2 and np.ndim(p[0]) == 0 for p in x)
    except TypeError:
        return False


def _spacing(affine, axis) -> tuple[float, float]:
    """(slice spacing in mm, +1 if the slice index runs towards superior else -1)."""
    if affine is None:
        return 1.0, 1.0
    a = np.asarray(affine, dtype=float)
    axis = si_axis(a) if axis is None else axis
    return float(np.linalg.norm(a[:3, axis])), (1.0 if a[2, axis] >= 0 else -1.0)


def _interp_levels(pts: Sequence[tuple[float, float]], n: int, convention: str, extrapolate,
                   level_height_mm, spacing, superior: float = 1.0) -> np.ndarray:
    if not pts:
        raise InputError("no vertebral label")
    pts = sorted(pts)
    ks = np.array([p[0] for p in pts])
    ls = np.array([p[1] for p in pts])
    # several labels on one slice (e.g. centreline blobs): keep their mean
    uk, inv = np.unique(ks, return_inverse=True)
    ls = np.array([ls[inv == i].mean() for i in range(len(uk))])
    ks = uk
    if extrapolate is None:
        extrapolate = 0.5 if convention == "body" else 1.0
    z = np.arange(n, dtype=float)
    lcont = np.interp(z, ks, ls)  # constant outside the labelled range
    if len(ks) >= 2:
        slope_lo = (ls[1] - ls[0]) / (ks[1] - ks[0])
        slope_hi = (ls[-1] - ls[-2]) / (ks[-1] - ks[-2])
    elif level_height_mm:
        # levels increase going inferior: negative slope when the slice index runs towards superior
        slope_lo = slope_hi = -superior * spacing / float(level_height_mm)
    else:
        slope_lo = slope_hi = None
    lo, hi = z < ks[0], z > ks[-1]
    if slope_lo is not None:
        lcont[lo] = ls[0] + slope_lo * (z[lo] - ks[0])
        lcont[hi] = ls[-1] + slope_hi * (z[hi] - ks[-1])
    else:
        lcont[lo | hi] = np.nan
    outside = np.zeros(n, bool)
    # strict limit: the slice exactly on the outermost (mid-way or next) disc is not labelled
    outside[lo] = np.abs(lcont[lo] - ls[0]) >= extrapolate - 1e-9
    outside[hi] = np.abs(lcont[hi] - ls[-1]) >= extrapolate - 1e-9
    lev = np.floor(lcont + 0.5) if convention == "body" else np.floor(lcont + 1e-9)
    lev[outside] = np.nan
    return lev


# ------------------------------------------------------------------------------- mask cleaning
def largest_component(prob, threshold: float = 0.5) -> np.ndarray:
    """Keep the largest 3-D connected component (26-connectivity) of ``prob > threshold``.

    Returns ``prob`` (soft values kept) zeroed outside that component dilated by one voxel, so the
    partial-volume rim just below the threshold survives. The cord is one tube: every other blob
    is a false positive. An empty thresholded mask returns zeros.
    """
    from scipy import ndimage

    from cohortseg.science.metrics import largest_component as largest

    p = np.asarray(prob, dtype=np.float32)
    keep = largest(p > threshold, fill_holes=False)
    if not keep.any():
        return np.zeros_like(p)
    keep = ndimage.binary_dilation(keep, structure=np.ones((3, 3, 3), bool))
    return np.where(keep, p, 0.0).astype(np.float32)


def tube_filter(prob, affine, threshold: float = 0.5, max_dist_mm: float = 5.0, degree: int = 2,
                iterations: int = 3) -> np.ndarray:
    """Keep, on every axial slice, only the blobs lying on a smooth cord centreline.

    A slice-wise (2-D) network can jump to another round structure on a few slices. The
    thresholded mask is split into 2-D connected components per slice; a robust centreline is
    fitted through the centroids of each slice's largest component (polynomial of ``degree`` in
    the slice index, refitted ``iterations`` times without slices farther than 2.5 robust standard
    deviations, at least 1 mm); components whose centroid lies farther than ``max_dist_mm`` from
    it are removed (with their one-voxel soft rim). Returns the filtered soft map.
    """
    from scipy import ndimage

    p = np.asarray(prob, dtype=np.float32)
    axis = si_axis(affine)
    ia, ib = _inplane(axis)
    pm = np.moveaxis(p, (ia, ib, axis), (0, 1, 2))
    a = np.asarray(affine, dtype=float)[:3, :3]
    ca, cb = a[:, ia], a[:, ib]
    comps = []  # (slice, label image, centroids (n, 2), sizes)
    for k in range(pm.shape[2]):
        b = pm[:, :, k] > threshold
        lab, n = ndimage.label(b, structure=np.ones((3, 3), bool))
        if n == 0:
            continue
        idx = np.arange(1, n + 1)
        cen = np.array(ndimage.center_of_mass(b, lab, idx)).reshape(n, 2)
        size = ndimage.sum_labels(pm[:, :, k], lab, idx)
        comps.append((k, lab, cen, size))
    if len(comps) < 3:
        return p.copy()
    ks = np.array([c[0] for c in comps], float)
    pts = np.array([c[2][int(np.argmax(c[3]))] for c in comps])
    keep = np.ones(len(ks), bool)
    deg = int(min(degree, max(1, keep.sum() // 10)))
    fits = None
    for _ in range(max(1, iterations)):
        fits = [np.polynomial.Polynomial.fit(ks[keep], pts[keep, c], deg) for c in range(2)]
        res = np.array([np.linalg.norm((fits[0](k) - q[0]) * ca + (fits[1](k) - q[1]) * cb)
                        for k, q in zip(ks, pts)])
        sd = max(1.4826 * np.median(np.abs(res[keep] - np.median(res[keep]))), 1.0)
        new = res <= 2.5 * sd + np.median(res[keep])
        if new.sum() < 3 or np.array_equal(new, keep):
            break
        keep = new
    out = np.zeros_like(pm)
    for k, lab, cen, _ in comps:
        centre = np.array([fits[0](k), fits[1](k)])
        good = [i + 1 for i, q in enumerate(cen)
                if np.linalg.norm((q[0] - centre[0]) * ca + (q[1] - centre[1]) * cb) <= max_dist_mm]
        if good:
            m = ndimage.binary_dilation(np.isin(lab, good), structure=np.ones((3, 3), bool))
            out[:, :, k] = np.where(m, pm[:, :, k], 0.0)
    return np.moveaxis(out, (0, 1, 2), (ia, ib, axis)).astype(np.float32)


# ------------------------------------------------------------------------------------ aggregation
def csa_per_level(perslice_df: pd.DataFrame, levels: Sequence[int] | None = None,
                  combine: bool = False) -> pd.DataFrame:
    """Aggregate a per-slice table by vertebral level (SCT ``-perlevel 1`` style).

    One row per level (sorted by level) with ``Slice (I->S)`` = ``"first:last"``, ``VertLevel``,
    ``N slices`` (slices with a valid area), ``MEAN(x)`` and ``STD(x)`` (population std, as SCT)
    for area, angles, diameters, eccentricity, orientation, solidity, and ``SUM(length)``.
    ``levels`` selects levels; ``combine=True`` pools the selected levels into one row whose
    ``VertLevel`` is ``"a:b"``. Slices without a level are ignored.
    """
    df = perslice_df.copy()
    df = df[df["VertLevel"].notna() & df["MEAN(area)"].notna()]
    df["VertLevel"] = df["VertLevel"].astype(int)
    if levels is not None:
        df = df[df["VertLevel"].isin([int(x) for x in levels])]
    if df.empty:
        return pd.DataFrame(columns=_level_columns())
    groups = [((f"{df['VertLevel'].min()}:{df['VertLevel'].max()}"), df)] if combine else \
        [(int(v), g) for v, g in df.groupby("VertLevel", sort=True)]
    rows = []
    for lvl, g in groups:
        row = {"Slice (I->S)": f"{int(g['Slice (I->S)'].min())}:{int(g['Slice (I->S)'].max())}",
               "VertLevel": lvl, "N slices": int(len(g))}
        for x in _METRICS:
            vals = g[f"MEAN({x})"].to_numpy(dtype=float)
            vals = vals[np.isfinite(vals)]
            row[f"MEAN({x})"] = float(vals.mean()) if vals.size else np.nan
            row[f"STD({x})"] = float(vals.std()) if vals.size else np.nan
        row["SUM(length)"] = float(np.nansum(g["SUM(length)"].to_numpy(dtype=float)))
        rows.append(row)
    return pd.DataFrame(rows, columns=_level_columns())


def _level_columns() -> list[str]:
    cols = ["Slice (I->S)", "VertLevel", "N slices"]
    for x in _METRICS:
        cols += [f"MEAN({x})", f"STD({x})"]
    return cols + ["SUM(length)"]
