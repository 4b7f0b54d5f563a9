"""Is the pipeline's anatomy in the image? Cheap, tested criteria, and a clear refusal otherwise.

A brain T1 given to a cord pipeline, or a cord scan given to a brain pipeline, still yields a mask
and numbers; in a 10,000-subject table those rows are silent errors. Each pipeline therefore
measures a few properties of its input or of its own segmentation and refuses (status ``refused``,
:class:`cohortseg.errors.AnatomyError`) when one is out of range:

Cord pipelines (``sc_gm``, ``sc_csa``), on the segmented structure in the native grid, along the
image's S-I voxel axis (:func:`cord_measures`):

* ``extent_fraction``: slices from the first to the last one holding the structure / all slices
  (a cord runs through the whole field of view; a blob on the corpus callosum spans a few slices
  of a head);
* ``continuity``: slices holding it / slices of that span (one tube, no gaps);
* ``mean_area_mm2``: mean in-plane area over those slices, within the plausible range of the
  structure for the contrast; ``area_cv``: its SD / mean across slices (a tube's cross-section is
  steady);
* ``drift_mm_per_mm``: median in-plane step of the per-slice centroid per mm along S-I (a cord
  may tilt, but does not wander across the field of view from slice to slice).

Brain pipelines (``brain_tissue``, ``cmb``, ``wmh``), before any network, from the image itself
(:func:`head_measures`): the field of view and the extent of the head (foreground) along L-R and
A-P; after the brain mask (:func:`brain_mask_measures`): an intracranial volume in the plausible
range and a mask that does not touch the field of view on most of its six sides.

The thresholds are the ``<pipeline>.anatomy`` keys of config/schemas/config.schema.yaml (defaults
read from there, documented there, recorded in group/summary.json); the measured values go into
the item's record (``checks``). With ``anatomy.refuse: false`` a failed criterion becomes a QC flag
``anatomy_<criterion>`` instead of a refusal.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cohortseg.errors import AnatomyError

NO_CORD = "no spinal cord in the field of view"
NOT_BRAIN = "not a brain image"
_WORLD = "LR", "AP", "SI"


@dataclass(frozen=True)
class Failure:
    key: str  # criterion name (QC flag anatomy_<key>)
    text: str  # measured value vs limit, naming the config key


# ----------------------------------------------------------------------------------------------
# limits
# ----------------------------------------------------------------------------------------------
def limits(pipeline: str, cfg: dict) -> dict:
    """The anatomy thresholds of a pipeline: the schema's defaults, updated by ``cfg['anatomy']``."""
    from cohortseg.schema import defaults

    out = {**defaults(pipeline, "anatomy"), **(cfg.get("anatomy") or {})}
    for k, v in defaults(pipeline, "anatomy").items():  # per-contrast tables keep the entries not overridden
        if isinstance(v, dict):
            out[k] = {**v, **(out[k] or {})}
    return out


def enforce(failures: list[Failure], what: str, path, lim: dict, flags: list, as_text: bool = False) -> None:
    """Refuse (AnatomyError naming the file and every failed criterion) or, with ``refuse: false``,
    add ``anatomy_<key>`` QC flags to `flags` (``as_text``: the criteria's text, for warnings)."""
    if not failures:
        return
    if lim.get("refuse", True):
        raise AnatomyError(f"{what}: " + "; ".join(f.text for f in failures), path)
    flags += [f"anatomy_{f.key}: {what}: {f.text}" if as_text else f"anatomy_{f.key}" for f in failures]


# ----------------------------------------------------------------------------------------------
# cord
# ----------------------------------------------------------------------------------------------
def cord_measures(mask, affine) -> dict:
    """Tube criteria of a cord (or cord GM) mask along the S-I voxel axis (see the module docstring)."""
    from cohortseg.science.csa import si_axis
    from cohortseg.science.metrics import area_per_slice

    m = np.asarray(mask) > 0
    aff = np.asarray(affine, float)
    ax = si_axis(aff)
    area = area_per_slice(m, aff, ax)
    n = int(area.size)
    present = area > 0
    out = {"n_slices": n, "slices_with_mask": int(present.sum()), "extent_fraction": 0.0, "continuity": 0.0,
           "mean_area_mm2": 0.0, "area_cv": 0.0, "drift_mm_per_mm": None}
    if not present.any():
        return out
    idx = np.flatnonzero(present)
    span = int(idx[-1] - idx[0] + 1)
    a = area[present]
    out.update(extent_fraction=round(span / n, 4), continuity=round(float(present.sum() / span), 4),
               mean_area_mm2=round(float(a.mean()), 3), area_cv=round(float(a.std() / a.mean()), 4))
    if idx.size >= 2:
        ijk = np.argwhere(m)
        world = ijk @ aff[:3, :3].T + aff[:3, 3]
        k = ijk[:, ax]
        cnt = np.bincount(k, minlength=n)[idx]
        cen = np.stack([np.bincount(k, weights=world[:, d], minlength=n)[idx] / cnt for d in range(3)], axis=1)
        step = np.diff(cen, axis=0)
        along = np.abs(step[:, 2])  # world S-I
        inplane = np.linalg.norm(step[:, :2], axis=1)
        out["drift_mm_per_mm"] = round(float(np.median(inplane / np.maximum(along, 1e-6))), 4)
    return out


def cord_failures(m: dict, lim: dict, contrast: str, structure: str = "cord") -> list[Failure]:
    """The criteria of ``<pipeline>.anatomy`` a mask's :func:`cord_measures` fail."""
    if not m["slices_with_mask"]:
        return [Failure("empty", f"no {structure} segmented on any of the {m['n_slices']} slices")]
    f = []
    if m["extent_fraction"] < lim["min_extent_fraction"]:
        f.append(Failure("extent", f"the {structure} spans {m['extent_fraction']:.0%} of the {m['n_slices']} slices along "
                                   f"S-I (anatomy.min_extent_fraction {lim['min_extent_fraction']:.0%})"))
    if m["continuity"] < lim["min_continuity"]:
        f.append(Failure("continuity", f"the {structure} is on {m['continuity']:.0%} of the slices of its span, not one "
                                       f"continuous tube (anatomy.min_continuity {lim['min_continuity']:.0%})"))
    ranges = lim["area_range_mm2"]
    lo, hi = ranges.get(contrast, ranges["default"])
    if not lo <= m["mean_area_mm2"] <= hi:
        f.append(Failure("area", f"mean {structure} area {m['mean_area_mm2']:.1f} mm^2 outside the plausible "
                                 f"{lo:g}-{hi:g} mm^2 for {contrast} (anatomy.area_range_mm2)"))
    if m["area_cv"] > lim["max_area_cv"]:
        f.append(Failure("area_cv", f"the {structure} area varies by {m['area_cv']:.0%} (SD/mean) from slice to slice, "
                                    f"no tube of steady cross-section (anatomy.max_area_cv {lim['max_area_cv']:.0%})"))
    d = m["drift_mm_per_mm"]
    if d is not None and d > lim["max_drift_mm_per_mm"]:
        f.append(Failure("drift", f"the {structure} centre moves {d:.2f} mm in-plane per mm along S-I "
                                  f"(anatomy.max_drift_mm_per_mm {lim['max_drift_mm_per_mm']:g})"))
    return f


def check_cord(mask, affine, lim: dict, contrast: str, path, flags: list, checks: dict,
               structure: str = "cord") -> None:
    """Measure, record into `checks`, refuse or flag (cord pipelines' finalize)."""
    m = cord_measures(mask, affine)
    checks[structure] = m
    failures = cord_failures(m, lim, contrast, structure)
    # nothing to measure on an empty mask: refused whatever `refuse` says
    enforce(failures, NO_CORD, path, {**lim, "refuse": lim.get("refuse", True) or not m["slices_with_mask"]}, flags)


# ----------------------------------------------------------------------------------------------
# brain
# ----------------------------------------------------------------------------------------------
def _extent_mm(ijk: np.ndarray, affine) -> list[float]:
    """World L-R, A-P, S-I extent (mm) of the bounding box of the voxels `ijk` (voxels counted whole)."""
    aff = np.asarray(affine, float)
    lo, hi = np.min(ijk, axis=0) - 0.5, np.max(ijk, axis=0) + 0.5
    corners = np.array([[(lo, hi)[a][0], (lo, hi)[b][1], (lo, hi)[c][2]] for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    world = corners @ aff[:3, :3].T + aff[:3, 3]
    return [round(float(v), 1) for v in world.max(0) - world.min(0)]


def head_measures(data, affine) -> dict:
    """Field of view and head (foreground) extent along world L-R, A-P, S-I, in mm, from the image
    itself: a ~4 mm copy above a tenth of its 99th percentile, largest 3-D component. A second or so
    per image."""
    from scipy import ndimage
    from cohortseg.science.metrics import voxel_sizes

    d = np.asarray(data, dtype=np.float32)
    if d.ndim > 3:
        d = d.reshape(d.shape[:3] + (-1,))[..., 0]
    aff = np.asarray(affine, float)
    out = {"fov_mm": _extent_mm(np.array([[0, 0, 0], np.array(d.shape) - 1]), aff), "head_mm": [0.0, 0.0, 0.0]}
    f = np.clip(voxel_sizes(aff) / 4.0, 0.02, 1.0)
    sm = ndimage.zoom(np.nan_to_num(d), f, order=1)
    pos = sm[sm > 0]
    if pos.size < 10 or pos.min() == pos.max():
        return out
    # the head with its scalp: above a tenth of the bright tissue (T1 background noise stays well below)
    lab, n = ndimage.label(sm > 0.1 * np.percentile(pos, 99), structure=np.ones((3, 3, 3)))
    if n == 0:
        return out
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    ijk = np.argwhere(lab == sizes.argmax()) / f  # back to native voxel indices
    out["head_mm"] = _extent_mm(ijk, aff)
    return out


def head_failures(m: dict, lim: dict) -> list[Failure]:
    f = []
    for name, key, lo in (("field of view", "fov", lim["min_fov_mm"]), ("head", "head", lim["min_head_mm"])):
        ext = m[f"{key}_mm"]
        short = [f"{_WORLD[i]} {ext[i]:.0f} mm" for i in (0, 1) if ext[i] < lo]
        if short:
            f.append(Failure(key, f"{name} {' x '.join(f'{v:.0f}' for v in ext)} mm (L-R x A-P x S-I): "
                                  f"{', '.join(short)} < {lo:g} mm (anatomy.min_{key}_mm)"))
    return f


def check_head(data, affine, lim: dict, path, warnings: list, checks: dict) -> None:
    """Before any network (brain pipelines' prepare): refuse an image that cannot hold a head
    (with ``refuse: false``: a warning)."""
    m = head_measures(data, affine)
    checks["head"] = m
    enforce(head_failures(m, lim), NOT_BRAIN, path, lim, warnings, as_text=True)


def brain_mask_measures(mask, affine) -> dict:
    """Intracranial volume (mL) of a brain mask and the sides (of six) of the field of view it touches."""
    import nibabel as nib

    m = np.asarray(mask) > 0
    vol = float(m.sum()) * abs(float(np.linalg.det(np.asarray(affine, float)[:3, :3]))) / 1000.0
    codes = nib.aff2axcodes(np.asarray(affine, float))
    opposite = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}
    sides = []
    if m.any():
        for ax in range(3):
            if np.take(m, 0, axis=ax).any():
                sides.append(opposite[codes[ax]])
            if np.take(m, m.shape[ax] - 1, axis=ax).any():
                sides.append(codes[ax])
    return {"volume_ml": round(vol, 1), "sides_touched": "".join(sides)}


def brain_mask_failures(m: dict, lim: dict) -> list[Failure]:
    f = []
    lo, hi = lim["icv_range_ml"]
    if not lo <= m["volume_ml"] <= hi:
        f.append(Failure("icv", f"brain mask {m['volume_ml']:.0f} mL outside the plausible intracranial "
                                f"{lo:g}-{hi:g} mL (anatomy.icv_range_ml)"))
    if len(m["sides_touched"]) > lim["max_sides_touched"]:
        f.append(Failure("fov_sides", f"brain mask touches {len(m['sides_touched'])} sides of the field of view "
                                      f"({m['sides_touched']}; anatomy.max_sides_touched {lim['max_sides_touched']})"))
    return f


def check_brain_mask(mask, affine, lim: dict, path, flags: list, checks: dict) -> None:
    m = brain_mask_measures(mask, affine)
    checks["brain_mask"] = m
    enforce(brain_mask_failures(m, lim), NOT_BRAIN, path, lim, flags)
