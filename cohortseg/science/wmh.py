"""MNI152 template region map for the SHIVA WMH path: periventricular / deep white / infracortical
regions from the template's tissue maps, pulled into a subject through the MNI affine when no
subject tissue segmentation is available.

The deep-T1-WMH recipe (MNI box, its own region net, the upstream volumes) is
:mod:`cohortseg.science.deepwmh`.
"""
from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

from cohortseg.science.lesions import WMH_REGIONS, wmh_region_map, world_grid

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


__all__ = ["mni_tissue_masks", "mni_region_map", "region_names"]
