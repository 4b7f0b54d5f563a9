"""The lesion networks' input on the conformed grid (the SHIVA path of ``cmb`` and ``wmh``): the
conformed image and its crude fallback brain mask, the antspyx affine to MNI152 and its eTIV, the
robust scale and the head box stored for ``predict``. Arrays and images in, arrays out.

Fallback brain mask
-------------------
No skull stripper runs on 2 CPU cores in seconds, so without a brain-mask card the mask is morphological
(:func:`fallback_brain_mask`): Otsu threshold of the image at 2 mm, 4 mm erosion (cuts the brain off the
scalp), largest component, 6 mm dilation, 10 mm closing, hole filling: an intracranial-like envelope
(Dice 0.96 with mindgrab on brainchop's t1_crop). It is crude: where scalp and brain touch over more
than 4 mm it can leak into the scalp, and it does not know anatomy (orbits, neck); the SHIVA crop and
p99 only need it roughly right, but the outside-brain rule is only as good as the mask. Put
``brainchop_mindgrab`` first in ``<pipeline>.models`` for a learned mask (it runs in the GPU ``infer`` job:
seconds on a GPU, ~3.5 min per session on 2 shared CPU cores).
"""
from __future__ import annotations

import numpy as np

from cohortseg.errors import InputError
from cohortseg.science.metrics import bounding_box

CONFORM_SHAPE = 256
INTERP_ORDER = {"linear": 1, "cubic": 3}
FALLBACK_MASK = "otsu-morphology (cohortseg.science.lesion_input.fallback_brain_mask)"


def fallback_brain_mask(data: np.ndarray, affine) -> np.ndarray:
    """Crude morphological intracranial mask (see the module docstring), on a ~2 mm copy of the image:
    Otsu threshold of the positive voxels, erosion by a 4 mm ball (cuts the brain off the scalp), largest
    component, dilation by a 6 mm ball, hole filling, closing by a 10 mm ball (fills the sulci and the
    CSF around the brain), hole filling; back to the full grid by linear interpolation > 0.5.

    On brainchop's t1_crop it gives 1.59 L with Dice 0.96 against the mindgrab mask (mindgrab 1.64 L).
    Raises InputError when nothing is left."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    from cohortseg.science.metrics import voxel_sizes

    def ball(r):
        g = np.ogrid[tuple(slice(-r, r + 1) for _ in range(3))]
        return sum(x * x for x in g) <= r * r

    d = np.asarray(data, dtype=np.float32)
    zooms = voxel_sizes(affine)
    f = np.clip(zooms / 2.0, 0.05, 1.0)  # zoom factor to ~2 mm voxels (never up-sample)
    sm = ndimage.zoom(d, f, order=1)
    pos = sm[sm > 0]
    if pos.size < 100:
        raise InputError("image has almost no positive voxels; cannot find the head")
    b = ndimage.binary_erosion(sm > threshold_otsu(pos), ball(2))
    lab, n = ndimage.label(b)
    if n == 0:
        raise InputError("fallback brain mask is empty (image too small or too noisy?)")
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    b = ndimage.binary_fill_holes(ndimage.binary_dilation(lab == sizes.argmax(), ball(3)))
    r = 5
    b = ndimage.binary_closing(np.pad(b, r + 1), ball(r))[tuple(slice(r + 1, -r - 1) for _ in range(3))]
    b = ndimage.binary_fill_holes(b)
    up = ndimage.zoom(b.astype(np.float32), np.array(d.shape) / np.array(b.shape), order=1) > 0.5
    out = np.zeros(d.shape, bool)
    sl = tuple(slice(0, min(a, b_)) for a, b_ in zip(d.shape, up.shape))
    out[sl] = up[sl]
    return out


def robust_scale(vol: np.ndarray, mask: np.ndarray | None = None) -> float:
    """99.9th percentile of the positive voxels (in `mask` when given): the scale x is divided by
    before float16 storage."""
    v = vol[mask] if mask is not None and mask.any() else vol
    pos = v[v > 0]
    if pos.size == 0:
        raise InputError("image has no positive voxel after conforming")
    s = float(np.percentile(pos, 99.9))
    return s if s > 0 else float(pos.max())


def conformed_with_mask(img, path, order: int, anatomy: dict, warnings: list):
    """(conformed image, fallback mask on the conformed grid) of a loaded image. Every image of cmb and
    wmh passes here, so this is where they check it is a head (`anatomy`: the limits of
    :mod:`cohortseg.science.anatomy`): before anything else from the image, then the fallback mask's
    volume against the lower end of ``icv_range_ml`` only (the crude mask can leak into the scalp:
    3.0 L on the deep-T1-WMH brain; and its sides are not checked: it lives on the conformed grid)."""
    from cohortseg.science.anatomy import check_brain_mask, check_head
    from cohortseg.science.conform import conform_ras

    check_head(np.asarray(img.dataobj), img.affine, anatomy, path, warnings, {})
    conf = conform_ras(img, order=order, shape=CONFORM_SHAPE)
    try:
        mask = fallback_brain_mask(np.asarray(conf.dataobj), conf.affine)
    except InputError as e:
        raise InputError(e.reason, path) from None
    check_brain_mask(mask, conf.affine, {**anatomy, "icv_range_ml": [anatomy["icv_range_ml"][0], float("inf")],
                                         "max_sides_touched": 6}, path, warnings, {})
    return conf, mask


def mni_record(conf, mask, source: str) -> dict:
    """Affine of a conformed image to MNI152 (skull-stripped by `mask`): {'matrix', 'det', 'from',
    'error'}; a failure or an implausible scaling is recorded, not raised."""
    import nibabel as nib

    from cohortseg.science import registration

    try:
        tr = registration.affine_to_mni(conf, brain_mask=nib.Nifti1Image(mask.astype(np.uint8), conf.affine))
    except Exception as e:  # noqa: BLE001 - the lesions are still measured without MNI coordinates
        return {"matrix": None, "det": None, "from": source, "error": f"{type(e).__name__}: {e}"}
    det = float(np.linalg.det(np.asarray(tr.matrix)[:3, :3]))
    out = {"matrix": np.asarray(tr.matrix).tolist(), "det": det, "from": source, "error": "",
           "tool": tr.info.get("tool", ""), "fixed": tr.info.get("fixed", "")}
    if not registration.MNI_DET_RANGE[0] < det < registration.MNI_DET_RANGE[1]:
        out.update(matrix=None, error=f"implausible scaling to MNI152 (det {det:.3f}); registration failed?")
    return out


def etiv_from_mni(mni: dict) -> float | None:
    """eTIV (mL) by atlas scaling from a T1's MNI record (:func:`mni_record`), None without one."""
    if not mni.get("matrix") or mni.get("from") != "T1w":
        return None
    try:
        from cohortseg.science.brain import template_icv_ml

        return float(template_icv_ml() / mni["det"])
    except Exception:  # noqa: BLE001 - eTIV is a bonus
        return None


def stored_input(chans: dict, channels: list, mask: np.ndarray) -> tuple[np.ndarray, dict]:
    """The network input as stored by ``prepare``: the conformed channels (in the order of `channels`)
    divided by their robust scale (:func:`robust_scale`; the p99 normalisation of ``predict`` is
    scale-free), cut to the bounding box of the head and mask (+4 voxels), float16 (~15-20 MB per
    channel and session). Returns (x, 1 x box x C; meta: ``scales``, ``x_box``)."""
    scales = [robust_scale(np.asarray(chans[c]), mask) for c in channels]
    fg = mask.copy()
    for c, s in zip(channels, scales):
        fg |= np.asarray(chans[c]) > 0.02 * s  # above background noise
    if not fg.any():
        raise InputError("image is empty after conforming to the 1 mm RAS grid")
    lo, hi = bounding_box(fg, margin=4)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    x = np.stack([np.asarray(chans[c], np.float32)[sl] / s for c, s in zip(channels, scales)], axis=-1)
    return x[None].astype(np.float16), {"scales": scales, "x_box": [list(lo), list(hi)]}


def full_volume(x: np.ndarray, shape=None, box=None) -> np.ndarray:
    """The conformed channels (``shape`` x C, float32) from a stored head box (:func:`stored_input`'s
    ``x`` and ``x_box``)."""
    x = np.asarray(x[0])
    if box is None:
        return x.astype(np.float32)
    out = np.zeros(tuple(shape or [CONFORM_SHAPE] * 3) + x.shape[-1:], np.float32)
    out[tuple(slice(a, b) for a, b in zip(*box))] = x
    return out


def unpack_mask(packed: np.ndarray, shape) -> np.ndarray:
    """A mask stored with ``np.packbits``, back on its grid."""
    n = int(np.prod(shape))
    return np.unpackbits(np.asarray(packed, np.uint8), count=n).astype(bool).reshape(tuple(shape))
