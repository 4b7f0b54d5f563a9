"""Lesion census (clusters of a probability map) and lesion locations by region.

Connectivity: clusters are 3D connected components with **26-connectivity** (voxels touching by a
face, an edge or a corner belong to the same lesion), as ``skimage.measure.label`` does by default in
SHIVA. Rules (SHIVA contract): a voxel is lesion when ``prob > threshold`` (strictly); clusters of
**at or below** ``min_size_vox`` voxels are dropped; clusters with **more than** ``max_outside_frac``
of their voxels outside the brain mask are dropped (kept clusters keep all their voxels).

Region maps
-----------
* WMH (deep-T1-WMH style), :func:`wmh_region_map`: from distance transforms (mm, voxel sizes from
  the affine) of a lateral-ventricle mask and a cortical grey-matter mask, inside a white-matter
  domain: ``periventricular`` = within ``periventricular_mm`` (default 10 mm) of the ventricles;
  else ``infracortical`` = within ``infracortical_mm`` (default 4 mm) of cortex; else ``deep_white``.
  Periventricular wins where both apply.
* CMB (MARS-like location classes), :func:`cmb_location_mni` / :func:`cmb_region_map_mni`: **coarse
  boxes in MNI152 (2009c) millimetres**, an approximation used because no labelled atlas ships
  offline with nilearn (only the MNI152 T1/GM/WM/brain-mask templates do):

  - ``infratentorial``: brainstem box (|x| <= 16, -46 <= y <= -8, z <= -8) or, behind y = -36,
    below a tilted tentorium surface z < -6 - 0.30*|x| (cerebellum);
  - ``deep``: basal ganglia / thalamus / internal capsule box |x| <= 30, -36 <= y <= 26,
    -12 <= z <= 22 (also covers the corpus callosum genu/body and periventricular white matter,
    which MARS counts as deep);
  - ``lobar``: everything else inside the brain (cortex, juxtacortical white matter, insula).

  Expect misclassification within ~5-10 mm of the box borders (e.g. insula vs putamen, anterior
  temporal lobe vs midbrain). For a given subject, map lesion centroids to MNI with
  :mod:`cohortseg.science.registration` (``mni_affine_fn``) and classify with :func:`cmb_location_mni`.
* WMH without a subject tissue segmentation (the SHIVA WMH path), :func:`mni_region_map`: the same
  regions on the MNI152 template's tissue maps, pulled into a subject through the MNI affine. The
  deep-T1-WMH recipe (MNI box, its own region net, the upstream volumes) is :mod:`cohortseg.science.deepwmh`.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import functools

import numpy as np
from scipy import ndimage

from cohortseg.errors import InputError
from cohortseg.science.metrics import voxel_sizes, voxel_volume_mm3

WMH_REGIONS = {1: "periventricular", 2: "deep_white", 3: "infracortical"}
CMB_REGIONS = {1: "lobar", 2: "deep", 3: "infratentorial"}
UNASSIGNED = "unassigned"

_STRUCTURES = {6: ndimage.generate_binary_structure(3, 1), 18: ndimage.generate_binary_structure(3, 2),
               26: ndimage.generate_binary_structure(3, 3)}


def _apply_affine(aff: np.ndarray, pts: np.ndarray) -> np.ndarray:
    pts = np.asarray(pts, dtype=float).reshape(-1, 3)
    return pts @ np.asarray(aff, dtype=float)[:3, :3].T + np.asarray(aff, dtype=float)[:3, 3]


def label_clusters(binary: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """Connected components (6/18/26-connectivity) of a 3D boolean array -> (int32 labels, n)."""
    if connectivity not in _STRUCTURES:
        raise ValueError("connectivity must be 6, 18 or 26")
    lab, n = ndimage.label(np.asarray(binary, dtype=bool), structure=_STRUCTURES[connectivity])
    return lab.astype(np.int32, copy=False), int(n)


def filter_clusters(labels: np.ndarray, n: int, brain_mask: np.ndarray | None, min_size_vox: int,
                    max_outside_frac: float = 0.25) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop clusters of <= `min_size_vox` voxels or with > `max_outside_frac` voxels outside the mask.

    Returns (relabelled int32 labels 1..k in scan order, kept old ids, outside fractions of kept).
    """
    if n == 0:
        return np.zeros(labels.shape, np.int32), np.zeros(0, int), np.zeros(0)
    flat = labels.ravel()
    sizes = np.bincount(flat, minlength=n + 1)
    if brain_mask is not None:
        inside = np.bincount(labels[np.asarray(brain_mask) > 0], minlength=n + 1)
    else:
        inside = sizes
    n_out = sizes - inside
    ids = np.arange(n + 1)
    outside = n_out / np.maximum(sizes, 1)
    keep = (ids > 0) & (sizes > int(min_size_vox)) & (n_out <= float(max_outside_frac) * sizes + 1e-9)
    kept = ids[keep]
    lut = np.zeros(n + 1, np.int32)
    lut[kept] = np.arange(1, kept.size + 1, dtype=np.int32)
    return lut[labels], kept, outside[kept]


def lesion_census(prob: np.ndarray, brain_mask: np.ndarray | None, affine: np.ndarray, threshold: float,
                  min_size_vox: int, max_outside_frac: float = 0.25, regions=None,
                  mni_affine_fn: Callable | np.ndarray | None = None,
                  connectivity: int = 26) -> tuple[np.ndarray, list[dict]]:
    """Threshold `prob`, find 26-connected clusters, apply the SHIVA size and outside-brain rules.

    Parameters
    ----------
    prob : 3D float array (probabilities); brain_mask : 3D array (>0 = brain) or None (no outside rule)
    affine : voxel -> world (mm) affine of `prob`
    threshold : voxels with ``prob > threshold`` are lesion
    min_size_vox : clusters with ``n_voxels <= min_size_vox`` are dropped
    max_outside_frac : clusters with a larger fraction of voxels outside `brain_mask` are dropped
    regions : optional location: ``(region_map, names)`` (3D int array on the same grid + ``{int: name}``;
        a lesion's region is the most frequent non-zero label among its voxels, ties -> lowest label,
        none -> ``"unassigned"``), or a callable ``f(mni_xyz (N,3)) -> list of N names`` applied to
        the MNI centroids (needs `mni_affine_fn`; e.g. :func:`cmb_location_mni`).
    mni_affine_fn : optional callable mapping world points (N,3) mm -> MNI (N,3) mm, or a 4x4 matrix.

    Returns
    -------
    labels : int32 array, 0 = background, lesions numbered 1..n in scan order
    census : one dict per lesion: lesion_id, n_voxels, volume_mm3, centroid_i/j/k (voxel),
        x_mm/y_mm/z_mm (world), [mni_x/mni_y/mni_z], prob_max, prob_mean, outside_brain_frac,
        [region]
    """
    p = np.asarray(prob, dtype=np.float32)
    while p.ndim > 3 and p.shape[-1] == 1:
        p = p[..., 0]
    if p.ndim != 3:
        raise InputError(f"probability map must be 3D, got shape {np.shape(prob)}")
    if brain_mask is not None and np.shape(brain_mask)[:3] != p.shape:
        raise InputError(f"brain mask shape {np.shape(brain_mask)} != probability map shape {p.shape}")
    p = np.nan_to_num(p, nan=0.0)
    lab0, n0 = label_clusters(p > float(threshold), connectivity)
    labels, _, outside = filter_clusters(lab0, n0, brain_mask, min_size_vox, max_outside_frac)
    n = int(outside.size)
    census: list[dict] = []
    if n == 0:
        return labels, census
    idx = np.arange(1, n + 1)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    coms = np.array(ndimage.center_of_mass(np.ones_like(p, dtype=np.float32), labels, idx), dtype=float).reshape(n, 3)
    pmax = np.asarray(ndimage.maximum(p, labels, idx), dtype=float).reshape(n)
    pmean = np.asarray(ndimage.mean(p, labels, idx), dtype=float).reshape(n)
    world = _apply_affine(affine, coms)
    vvol = voxel_volume_mm3(affine)
    mni = None
    if mni_affine_fn is not None:
        if callable(mni_affine_fn):
            mni = np.asarray(mni_affine_fn(world), dtype=float).reshape(n, 3)
        else:
            mni = _apply_affine(np.asarray(mni_affine_fn), world)
    region_names = None
    if regions is not None:
        if callable(regions):
            if mni is None:
                raise ValueError("a callable `regions` classifies MNI coordinates: give mni_affine_fn")
            region_names = list(regions(mni))
        else:
            rmap, names = regions
            region_names = _majority_regions(labels, n, np.asarray(rmap), names)
    for k in range(n):
        row = {"lesion_id": int(k + 1), "n_voxels": int(sizes[k]), "volume_mm3": float(sizes[k] * vvol),
               "centroid_i": float(coms[k, 0]), "centroid_j": float(coms[k, 1]), "centroid_k": float(coms[k, 2]),
               "x_mm": float(world[k, 0]), "y_mm": float(world[k, 1]), "z_mm": float(world[k, 2])}
        if mni is not None:
            row.update(mni_x=float(mni[k, 0]), mni_y=float(mni[k, 1]), mni_z=float(mni[k, 2]))
        row.update(prob_max=float(pmax[k]), prob_mean=float(pmean[k]), outside_brain_frac=float(outside[k]))
        if region_names is not None:
            row["region"] = str(region_names[k])
        census.append(row)
    return labels, census


def _majority_regions(labels: np.ndarray, n: int, rmap: np.ndarray, names: Mapping) -> list[str]:
    if rmap.shape != labels.shape:
        raise InputError(f"region map shape {rmap.shape} != label shape {labels.shape}")
    sel = labels > 0
    lab = labels[sel].astype(np.int64)
    reg = rmap[sel].astype(np.int64)
    out = []
    if reg.size and reg.min() < 0:
        raise InputError("region map must hold non-negative integers")
    nreg = int(reg.max()) + 1 if reg.size else 1
    counts = np.zeros((n + 1, nreg), np.int64)
    np.add.at(counts, (lab, reg), 1)
    for k in range(1, n + 1):
        c = counts[k, 1:]
        if c.size == 0 or c.max() == 0:
            out.append(UNASSIGNED)
        else:
            r = int(np.argmax(c)) + 1
            out.append(str(_name(names, r)))
    return out


def _name(names: Mapping, r: int) -> str:
    if r in names:
        return names[r]
    if str(r) in names:
        return names[str(r)]
    return f"region_{r}"


def regional_volumes(labels: np.ndarray, region_map: np.ndarray, names: Mapping, affine: np.ndarray) -> dict:
    """Lesion volume (mm^3) per region: ``{name: mm3 for every name} | {"unassigned": mm3, "total": mm3}``.

    Voxel-wise: each lesion voxel (``labels > 0``) counts in the region of its own voxel;
    lesion voxels where ``region_map == 0`` (or an unnamed label) go to ``"unassigned"``.
    """
    labels = np.asarray(labels)
    rmap = np.asarray(region_map)
    if rmap.shape != labels.shape:
        raise InputError(f"region map shape {rmap.shape} != label shape {labels.shape}")
    vvol = voxel_volume_mm3(affine)
    les = labels > 0
    reg = rmap[les].astype(np.int64)
    out = {}
    named = set()
    for key, name in names.items():
        r = int(key)
        named.add(r)
        out[str(name)] = float(np.count_nonzero(reg == r) * vvol)
    out[UNASSIGNED] = float(np.count_nonzero(~np.isin(reg, list(named))) * vvol)
    out["total"] = float(np.count_nonzero(les) * vvol)
    return out


def lesion_counts_by_region(census: Sequence[dict], names: Sequence[str]) -> dict:
    """Number of lesions per region name (from census rows with a ``region`` key)."""
    out = {str(n): 0 for n in names}
    for row in census:
        r = row.get("region", UNASSIGNED)
        out[r] = out.get(r, 0) + 1
    return out


# ----------------------------------------------------------------------------------------------
# WMH regions (distance transforms)
# ----------------------------------------------------------------------------------------------
def wmh_region_map(ventricle_mask: np.ndarray, gm_mask: np.ndarray, wm_mask: np.ndarray | None,
                   affine: np.ndarray, periventricular_mm: float = 10.0, infracortical_mm: float = 4.0,
                   domain: np.ndarray | None = None) -> np.ndarray:
    """deep-T1-WMH style regions: 1 periventricular, 2 deep_white, 3 infracortical (0 elsewhere).

    Distances are Euclidean, in mm (``scipy.ndimage.distance_transform_edt`` with the affine's voxel
    sizes), measured from each voxel to the nearest voxel of the lateral ventricles and of the cortical
    grey matter. Labelled voxels are those of `domain` (default: `wm_mask`; pass e.g. ``wm | lesions``
    when a tissue segmentation calls T1-hypointense lesions grey matter) outside the ventricles:
    ``d_vent <= periventricular_mm`` -> periventricular; else ``d_gm <= infracortical_mm`` ->
    infracortical; else deep white.
    """
    vent = np.asarray(ventricle_mask) > 0
    gm = np.asarray(gm_mask) > 0
    if domain is None:
        if wm_mask is None:
            raise ValueError("give wm_mask or domain")
        domain = wm_mask
    dom = (np.asarray(domain) > 0) & ~vent
    if not (vent.shape == gm.shape == dom.shape):
        raise InputError("ventricle, GM and WM/domain masks must share a grid")
    sp = voxel_sizes(affine)
    big = 1e6
    d_vent = ndimage.distance_transform_edt(~vent, sampling=sp) if vent.any() else np.full(vent.shape, big)
    d_gm = ndimage.distance_transform_edt(~gm, sampling=sp) if gm.any() else np.full(gm.shape, big)
    out = np.zeros(vent.shape, np.uint8)
    out[dom] = 2
    out[dom & (d_gm <= infracortical_mm)] = 3
    out[dom & (d_vent <= periventricular_mm)] = 1
    return out


# ----------------------------------------------------------------------------------------------
# CMB location classes (coarse MNI boxes; see module docstring)
# ----------------------------------------------------------------------------------------------
def cmb_location_mni(points_mni: np.ndarray) -> list[str]:
    """Classify MNI152 (mm, RAS) points as ``lobar`` / ``deep`` / ``infratentorial`` (coarse boxes)."""
    codes = _cmb_codes(np.asarray(points_mni, dtype=float).reshape(-1, 3))
    return [CMB_REGIONS[int(c)] for c in codes]


def world_grid(shape: Sequence[int], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World coordinates (x, y, z) in mm of every voxel of a grid (float32 arrays of `shape`)."""
    a = np.asarray(affine, dtype=np.float64)
    ii, jj, kk = np.ogrid[tuple(slice(0, int(s)) for s in tuple(shape)[:3])]
    return tuple((a[r, 0] * ii + a[r, 1] * jj + a[r, 2] * kk + a[r, 3]).astype(np.float32) for r in range(3))


def _cmb_codes(p: np.ndarray) -> np.ndarray:
    return _cmb_codes_xyz(p[:, 0], p[:, 1], p[:, 2])


def deep_grey_box(x, y, z):
    """The MNI152 deep-grey box (basal ganglia, thalamus, internal capsule: |x| <= 30, -36 <= y <= 26,
    -12 <= z <= 22 mm): CMB's ``deep`` class, and what the template's cortex excludes."""
    return (np.abs(x) <= 30) & (y >= -36) & (y <= 26) & (z >= -12) & (z <= 22)


def _cmb_codes_xyz(x, y, z) -> np.ndarray:
    ax = np.abs(x)
    brainstem = (ax <= 16) & (y >= -46) & (y <= -8) & (z <= -8)
    cerebellum = (y <= -36) & (z < -6.0 - 0.30 * ax)
    deep = deep_grey_box(x, y, z)
    codes = np.ones(np.shape(x), np.uint8)  # lobar
    codes[deep] = 2
    codes[brainstem | cerebellum] = 3
    return codes


# ----------------------------------------------------------------------------------------------
# the census of a whole-head grid
# ----------------------------------------------------------------------------------------------
CENSUS_COLUMNS = ["lesion_id", "n_voxels", "volume_mm3", "centroid_i", "centroid_j", "centroid_k", "x_mm", "y_mm",
                  "z_mm", "mni_x", "mni_y", "mni_z", "prob_max", "prob_mean", "outside_brain_frac", "region"]
#: brain mask volumes outside this range (mm^3) are flagged (`brain_mask_volume_low/high`)
BRAIN_MASK_RANGE_MM3 = (700_000.0, 2_200_000.0)


def census_in_box(prob, mask, aff, thr, min_vox, max_out, regions, matrix):
    """:func:`lesion_census` on the bounding box of the supra-threshold voxels (+1 voxel): the same
    clusters, numbering (raster order is kept by a shift), rules and world/MNI coordinates, for a
    fraction of the cost on a whole-head grid. Returns (labels on the full grid, census rows with every
    CENSUS_COLUMNS key, centroids in full-grid voxel indices)."""
    from cohortseg.science.metrics import bounding_box

    labels = np.zeros(prob.shape, np.int32)
    sup = prob > thr
    if not sup.any():
        return labels, []
    lo, hi = bounding_box(sup, margin=1)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    shift = np.eye(4)
    shift[:3, 3] = lo
    if isinstance(regions, tuple):
        regions = (regions[0][sl], regions[1])
    sub, census = lesion_census(prob[sl], mask[sl], np.asarray(aff, float) @ shift, thr, min_vox, max_out,
                                regions=regions, mni_affine_fn=matrix)
    labels[sl] = sub
    for r in census:
        for k, o in zip(("centroid_i", "centroid_j", "centroid_k"), lo):
            r[k] += o
    rows = []
    for r in census:
        row = {c: r.get(c, np.nan) for c in CENSUS_COLUMNS}
        if "region" not in r:
            row["region"] = UNASSIGNED
        rows.append(row)
    return labels, rows


def touches_box(labels: np.ndarray, affine, grid_affine, start, shape) -> bool:
    """Whether a lesion voxel (`labels` > 0 on the grid of `affine`) lies within one voxel of the edge
    of the box (`start`, `shape`) of another grid (`grid_affine`): the network's field of view, where
    a lesion may be cut."""
    if not labels.any():
        return False
    ijk = np.argwhere(labels > 0)
    aff = np.asarray(affine, float)
    world = ijk @ aff[:3, :3].T + aff[:3, 3]
    c = np.linalg.inv(np.asarray(grid_affine, float))
    cv = world @ c[:3, :3].T + c[:3, 3]
    lo = np.array(start) + 0.5
    hi = np.array(start) + np.array(shape) - 1.5
    return bool(((cv < lo) | (cv > hi)).any())


# ----------------------------------------------------------------------------------------------
# the MNI152 template region map (the SHIVA WMH path: no subject tissue segmentation)
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def mni_tissue_masks(resolution: int = 1) -> dict:
    """Offline MNI152 (nilearn) masks for the fallback WMH region map: ``brain``, ``gm`` (cortical:
    GM probability > 0.5 outside :func:`deep_grey_box`), ``wm`` (WM
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
    deepbox = deep_grey_box(x, y, z)
    return {"brain": brain, "gm": (gmp > 0.5) & ~deepbox, "wm": wmp > 0.5, "ventricles": vent, "affine": aff}


def mni_region_map(resolution: int = 1, periventricular_mm: float = 10.0, infracortical_mm: float = 4.0):
    """Fallback WMH region map in MNI space (nibabel image; labels of :data:`WMH_REGIONS`)
    from the template masks of :func:`mni_tissue_masks`; domain = WM probability > 0.5. Warp it to a
    subject with ``registration.apply(transform, img, reference=native, interpolation='nearest',
    inverse=True)`` when no subject tissue segmentation is available."""
    import nibabel as nib

    m = mni_tissue_masks(resolution)
    rmap = wmh_region_map(m["ventricles"], m["gm"], m["wm"], m["affine"], periventricular_mm, infracortical_mm)
    return nib.Nifti1Image(rmap, m["affine"])


__all__ = ["WMH_REGIONS", "CMB_REGIONS", "UNASSIGNED", "label_clusters", "filter_clusters", "lesion_census",
           "regional_volumes", "lesion_counts_by_region", "wmh_region_map", "cmb_location_mni",
           "world_grid", "deep_grey_box", "census_in_box", "touches_box", "mni_tissue_masks", "mni_region_map"]
