"""Synthetic training slices from a template's label maps (domain randomisation).

With one labelled subject, a model learns that subject's contrasts and little else. Following
SynthSeg (Billot et al., Medical Image Analysis 2023), the label maps of a template are turned into
images of random contrast: every tissue class gets a random mean intensity, so the only thing that
stays the same from one synthetic image to the next is the anatomy, and a network trained on them
must recognise the cord by its shape and its boundary with the CSF, whatever the contrast. Mixed
with the real slices, they are what makes a model trained on a T2w segment a T1w.

Template: the PAM50 spinal cord template (De Leener et al., NeuroImage 2018; shipped with the
Spinal Cord Toolbox in ``data/PAM50/template``, LGPL-3.0) -- ``PAM50_cord``, ``PAM50_csf`` and
``PAM50_levels`` are required, ``PAM50_gm``/``PAM50_wm`` are used when present (a GM/WM contrast
inside the cord). The label maps are reoriented to LAS (the slice layout of
``cohortseg.science.resampling.to_axial_slices``: axis 0 towards Left, axis 1 towards Anterior), cut to the
vertebral levels asked for (plus ``above_mm`` above the top one, the cranio-cervical junction), and
block-averaged from the template's voxel size to the training grid (partial-volume fractions).

One synthetic slice (:meth:`TemplateSlices.sample`):

* a template slice, cut to the crop around the cord centre shifted by up to ``shift_px``;
* the space outside the CSF and the cord is filled with 3 to 6 random regions (a smoothed Gaussian
  random field cut at random quantiles), standing for vertebrae, discs, fat and muscle;
* every class (those regions, CSF, WM, GM) gets a uniform random mean in [0, 1] and a random
  within-class noise; GM equals WM (plus a little) half of the time, as at 1 mm where the cord's
  inner contrast is mostly lost; the image is the partial-volume mix of the classes;
* a Gaussian point-spread blur, a smooth multiplicative bias field, white noise, and a z-score over
  the slice (real slices are z-scored over their volume);
* the label is the template's cord fraction (soft, in [0, 1]).

The usual augmentation (``augment.py``: rotation, scaling, elastic, look-up tables...) is applied
on top, like on the real slices.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from cohortseg.errors import ConfigError, InputError

KEYS = ("template", "prefix", "levels", "above_mm", "fraction", "shift_px")  # the config section
REQUIRED = ("cord", "csf", "levels")
OPTIONAL = ("gm", "wm")


@dataclass
class TemplateSlices:
    """Template label fractions on the training grid, slices first: (N, H, W) float32 each."""

    cord: np.ndarray
    csf: np.ndarray
    gm: np.ndarray | None
    wm: np.ndarray | None
    fraction: float = 0.5       # share of each epoch's training slices that are synthetic
    shift_px: float = 8.0
    source: str = ""
    files: tuple = ()           # the template files read (provenance: their sha256 go in the card)

    @property
    def n(self) -> int:
        return int(self.cord.shape[0])

    def sample(self, rng: np.random.Generator, n: int, crop) -> tuple[np.ndarray, np.ndarray]:
        """``n`` synthetic (image, soft cord label) slices of shape ``crop``; float32 (n, H, W)."""
        h, w = int(crop[0]), int(crop[1])
        xs = np.empty((n, h, w), np.float32)
        ys = np.empty((n, h, w), np.float32)
        for k in range(n):
            z = int(rng.integers(self.n))
            xs[k], ys[k] = self._one(z, rng, h, w)
        return xs, ys

    def _one(self, z: int, rng: np.random.Generator, h: int, w: int):
        cord = self.cord[z]
        ci, cj = ndimage.center_of_mass(cord) if cord.sum() > 0 else ((cord.shape[0] - 1) / 2, (cord.shape[1] - 1) / 2)
        oi, oj = rng.uniform(-self.shift_px, self.shift_px, size=2)
        i0, j0 = int(round(ci + oi - h / 2)), int(round(cj + oj - w / 2))

        def cut(a):
            out = np.zeros((h, w), np.float64)
            if a is None:
                return out
            si0, sj0 = max(i0, 0), max(j0, 0)
            si1, sj1 = min(i0 + h, a.shape[1]), min(j0 + w, a.shape[2])
            if si1 > si0 and sj1 > sj0:
                out[si0 - i0:si1 - i0, sj0 - j0:sj1 - j0] = a[z, si0:si1, sj0:sj1]
            return out

        cord, csf = cut(self.cord), cut(self.csf)
        gm, wm = cut(self.gm), cut(self.wm)
        inner = np.clip(gm + wm, 0.0, 1.0) if (self.gm is not None and self.wm is not None) else cord
        gm = np.minimum(gm, inner)
        wm = np.clip(inner - gm, 0.0, 1.0)
        csf = np.clip(csf, 0.0, 1.0 - inner)
        rest = np.clip(1.0 - csf - inner, 0.0, 1.0)

        k = int(rng.integers(3, 7))  # background regions
        field = ndimage.gaussian_filter(rng.standard_normal((h, w)), rng.uniform(2.0, 6.0))
        regions = np.digitize(field, np.quantile(field, np.sort(rng.random(k - 1))))
        mu = rng.random(k + 3)                      # k regions, CSF, WM, GM
        if rng.random() < 0.5:
            mu[k + 2] = mu[k + 1] + rng.normal(0.0, 0.03)
        sd = rng.uniform(0.0, 0.06, size=k + 3)

        def tissue(i):
            return mu[i] + sd[i] * rng.standard_normal((h, w))

        back = mu[regions] + sd[regions] * rng.standard_normal((h, w))
        img = corrupt(rest * back + csf * tissue(k) + wm * tissue(k + 1) + gm * tissue(k + 2), rng)
        img = (img - img.mean()) / max(float(img.std()), 1e-6)
        return img.astype(np.float32), np.clip(cord, 0.0, 1.0).astype(np.float32)


def corrupt(img: np.ndarray, rng: np.random.Generator, blur_max: float = 1.0, bias_sd: float = 0.15,
            noise_max: float = 0.04) -> np.ndarray:
    """The acquisition part of a synthetic image, any number of dimensions: a Gaussian point-spread
    blur (sigma uniform in [0, ``blur_max``] voxels: a random resolution), a smooth multiplicative
    bias field exp(sum of b_a x_a + sum of b_ab x_a x_b) over the normalised voxel coordinates
    (b ~ N(0, ``bias_sd``)), and white noise (std uniform in [0, ``noise_max``])."""
    img = ndimage.gaussian_filter(img, rng.uniform(0.0, blur_max))
    axes = np.meshgrid(*[np.linspace(-1, 1, n) for n in img.shape], indexing="ij")
    pairs = [(a, b) for a in range(img.ndim) for b in range(a + 1, img.ndim)]
    coef = rng.normal(0.0, bias_sd, size=img.ndim + len(pairs))
    expo = coef[0] * axes[0]
    for a in range(1, img.ndim):
        expo = expo + coef[a] * axes[a]
    for c, (a, b) in zip(coef[img.ndim:], pairs):
        expo = expo + c * axes[a] * axes[b]
    img = img * np.exp(expo)
    return img + rng.normal(0.0, rng.uniform(0.0, noise_max), size=img.shape)


def render_labels(labels: np.ndarray, n_classes: int, rng: np.random.Generator, means=None,
                  sd_max: float = 0.06, blur_max: float = 1.0, bias_sd: float = 0.15,
                  noise_max: float = 0.04) -> np.ndarray:
    """A random-contrast image of a label map (any dimensions; SynthSeg's generative model): class
    ``c`` > 0 gets mean ``means[c]`` (default: uniform in [0.05, 1]) and a within-class noise of
    std uniform in [0, ``sd_max``], then :func:`corrupt`; background (0) stays 0 (a brain-masked
    image). Intensities are about [0, 1] and never negative; float32."""
    mu = rng.uniform(0.05, 1.0, size=n_classes)
    if means is not None:
        for c, m in means.items():
            mu[int(c)] = float(m)
    mu[0] = 0.0
    sd = rng.uniform(0.0, sd_max, size=n_classes)
    lab = np.asarray(labels, dtype=np.intp)
    img = mu[lab] + sd[lab] * rng.standard_normal(lab.shape)
    img = corrupt(img, rng, blur_max, bias_sd, noise_max)
    return np.where(lab > 0, np.clip(img, 0.0, None), 0.0).astype(np.float32)


def _to_las(img: nib.Nifti1Image) -> np.ndarray:
    """Voxel data reordered/flipped to LAS (the canonical slice layout), whatever the storage."""
    from nibabel.orientations import axcodes2ornt, io_orientation, apply_orientation, ornt_transform

    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 4:
        data = data[..., 0]
    tr = ornt_transform(io_orientation(img.affine), axcodes2ornt(("L", "A", "S")))
    return apply_orientation(data, tr)


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return a
    shp = [s - s % f for s in a.shape]
    a = a[:shp[0], :shp[1], :shp[2]]
    return a.reshape(shp[0] // f, f, shp[1] // f, f, shp[2] // f, f).mean(axis=(1, 3, 5))


def load_template(cfg: dict, inplane_mm: float) -> TemplateSlices:
    """The ``synthetic`` section of a training config -> :class:`TemplateSlices`.

    Keys: ``template`` (folder with ``PAM50_<name>.nii.gz`` files, or ``prefix`` + name), ``levels``
    [first, last] vertebral levels (PAM50: 1 = C1 ... 7 = C7, 8 = T1), ``above_mm`` kept above the
    first level, ``fraction`` (0-1) of each epoch's slices that are synthetic, ``shift_px``."""
    from cohortseg.training.datasets import expand_path

    root = Path(expand_path(cfg["template"]))
    prefix = cfg.get("prefix", "PAM50_")
    paths = {n: root / f"{prefix}{n}.nii.gz" for n in REQUIRED + OPTIONAL}
    missing = [str(paths[n]) for n in REQUIRED if not paths[n].exists()]
    if missing:
        raise ConfigError(f"synthetic template incomplete: missing {', '.join(missing)} "
                          "(the PAM50 template ships with the Spinal Cord Toolbox in data/PAM50/template)")
    frac = float(cfg.get("fraction", 0.5))
    if not 0.0 < frac < 1.0:
        raise ConfigError(f"synthetic.fraction must be in (0, 1), got {frac}")
    ref = nib.load(paths["cord"])
    vox = np.sqrt((ref.affine[:3, :3] ** 2).sum(axis=0))
    if not np.allclose(vox, vox[0], rtol=1e-3):
        raise InputError(f"synthetic template voxels are not isotropic ({vox})", str(paths["cord"]))
    f = float(inplane_mm) / float(vox[0])
    if f < 1 - 1e-6 or abs(f - round(f)) > 1e-3:
        raise ConfigError(f"grid.inplane_mm {inplane_mm} must be a whole multiple of the template voxel "
                          f"size {vox[0]:.3g} mm to use synthetic slices")
    f = int(round(f))
    maps = {}
    for n in REQUIRED + OPTIONAL:
        if n in OPTIONAL and not paths[n].exists():
            maps[n] = None
            continue
        img = nib.load(paths[n])
        if img.shape[:3] != ref.shape[:3]:
            raise InputError(f"template map {n} has shape {img.shape}, cord has {ref.shape}", str(paths[n]))
        maps[n] = _to_las(img)
    lo, hi = (int(v) for v in cfg.get("levels", [1, 7]))
    levels = np.rint(maps.pop("levels")).astype(int)
    zs = np.nonzero(np.isin(levels, np.arange(lo, hi + 1)).any(axis=(0, 1)))[0]
    if not len(zs):
        raise ConfigError(f"synthetic template: no voxel of vertebral levels {lo}-{hi}")
    z0, z1 = int(zs.min()), int(zs.max()) + int(round(float(cfg.get("above_mm", 10.0)) / vox[0]))
    z1 = min(z1, maps["cord"].shape[2] - 1)  # LAS: the last axis runs towards Superior

    def grid(a):
        if a is None:
            return None
        a = a.astype(np.float32) if a.dtype != np.float32 else a
        a = np.clip(a[:, :, z0:z1 + 1], 0.0, 1.0)
        return np.ascontiguousarray(np.moveaxis(_block_mean(a, f), 2, 0)).astype(np.float32)

    out = {n: grid(maps[n]) for n in ("cord", "csf", "gm", "wm")}
    keep = out["cord"].reshape(len(out["cord"]), -1).sum(axis=1) > 0.5  # slices with cord
    out = {n: (a[keep] if a is not None else None) for n, a in out.items()}
    return TemplateSlices(cord=out["cord"], csf=out["csf"], gm=out["gm"], wm=out["wm"], fraction=frac,
                          shift_px=float(cfg.get("shift_px", 8.0)), source=str(root),
                          files=tuple(str(paths[n]) for n in REQUIRED + OPTIONAL if paths[n].exists()))
