"""Deterministic 2D data augmentation for axial cord slices (numpy + scipy only).

Every random draw comes from the ``numpy.random.Generator`` passed in, so the same seed gives the
same output bit for bit. Slices are (H, W) in the model grid of ``cohortseg.science.resampling``: axis 0
runs towards the subject's Left, axis 1 towards Anterior. The only flip allowed by anatomy is
left-right (axis 0); an anterior-posterior flip would put the cord in front of the vertebral body.

Spatial transforms (one resampling per slice, image linear, label linear for soft labels or
nearest for binary ones, so a binary label stays binary and a soft label stays in [0, 1]):
random translation, rotation about the slice centre, isotropic scaling, elastic morphing (a
Gaussian-smoothed random displacement field), left-right flip. Intensity transforms (image only):
gamma on the min-max rescaled slice, multiplicative scaling and additive shift, contrast inversion
(``x -> -x`` on the z-scored image; this is what lets a model trained on T1w, cord bright, segment a
T2w, cord dark), a random look-up table (``p_lut``: the slice's 0.5-99.5 percentile range is mapped
through a piecewise-linear curve with ``lut_points`` random knot values, monotonic or not -- a
synthetic new contrast), Gaussian noise, a label-driven intensity change (``p_label_intensity``: the labelled structure
is brightened or darkened by up to ``label_intensity`` slice standard deviations, weighted by the
soft label, so the network cannot rely on the absolute cord intensity relative to tissues that
share it in the training contrast), and a narrower field of view (``p_fov``: a random band of
up to ``fov_max_fraction`` of the slice on each side is set to the slice minimum, as the zero
padding of a small native FOV looks; the label is kept, the network must not rely on FOV edges).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities (p_*) and ranges of every transform. ``AugmentConfig.none()`` disables all."""

    p_spatial: float = 0.8
    translate_px: float = 6.0           # uniform in [-t, t] per axis
    rotate_deg: float = 15.0            # uniform in [-r, r]
    scale: tuple = (0.85, 1.15)         # isotropic zoom factor range
    p_elastic: float = 0.3
    elastic_alpha_px: float = 2.0       # max displacement magnitude (px) after smoothing/normalising
    elastic_sigma_px: float = 6.0       # smoothness of the displacement field
    p_flip_lr: float = 0.5
    p_gamma: float = 0.3
    gamma: tuple = (0.7, 1.5)
    p_intensity: float = 0.5
    intensity_scale: tuple = (0.8, 1.25)
    intensity_shift: float = 0.2
    p_invert: float = 0.0
    p_lut: float = 0.0
    lut_points: int = 5
    p_noise: float = 0.2
    noise_std: float = 0.05
    p_fov: float = 0.0
    fov_max_fraction: float = 0.25
    p_label_intensity: float = 0.0
    label_intensity: float = 1.5

    @classmethod
    def from_dict(cls, d: dict | None) -> "AugmentConfig":
        if not d:
            return cls()
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            from cohortseg.errors import ConfigError

            raise ConfigError(f"unknown augmentation keys: {sorted(unknown)}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)

    @classmethod
    def none(cls) -> "AugmentConfig":
        return cls(p_spatial=0.0, p_elastic=0.0, p_flip_lr=0.0, p_gamma=0.0, p_intensity=0.0,
                   p_invert=0.0, p_noise=0.0)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _coords(shape, rng: np.random.Generator, cfg: AugmentConfig):
    """Sampling coordinates (2, H, W) in the input for every output pixel, or None (identity)."""
    h, w = shape
    spatial = rng.random() < cfg.p_spatial
    elastic = rng.random() < cfg.p_elastic
    flip = rng.random() < cfg.p_flip_lr
    if not (spatial or elastic or flip):
        return None
    ii, jj = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    ci, cj = (h - 1) / 2.0, (w - 1) / 2.0
    di, dj = ii - ci, jj - cj
    if flip:
        di = -di
    if spatial:
        ang = np.radians(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg))
        zoom = rng.uniform(*cfg.scale)
        ti, tj = rng.uniform(-cfg.translate_px, cfg.translate_px, size=2)
        c, s = np.cos(ang), np.sin(ang)
        # output pixel -> input: inverse rotation/zoom about the centre, then shift
        si = (c * di - s * dj) / zoom - ti
        sj = (s * di + c * dj) / zoom - tj
        di, dj = si, sj
    if elastic:
        fi = ndimage.gaussian_filter(rng.standard_normal((h, w)), cfg.elastic_sigma_px, mode="reflect")
        fj = ndimage.gaussian_filter(rng.standard_normal((h, w)), cfg.elastic_sigma_px, mode="reflect")
        mag = max(np.sqrt(fi ** 2 + fj ** 2).max(), 1e-12)
        amp = rng.uniform(0.0, cfg.elastic_alpha_px) / mag
        di = di + amp * fi
        dj = dj + amp * fj
    return np.stack([di + ci, dj + cj])


def _intensity(x: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig, label=None) -> np.ndarray:
    if rng.random() < cfg.p_label_intensity and label is not None:
        x = x + rng.uniform(-cfg.label_intensity, cfg.label_intensity) * float(x.std()) * label
    if rng.random() < cfg.p_gamma:
        g = float(np.exp(rng.uniform(np.log(cfg.gamma[0]), np.log(cfg.gamma[1]))))
        lo, hi = float(x.min()), float(x.max())
        if hi > lo:
            x = ((x - lo) / (hi - lo)) ** g * (hi - lo) + lo
    if rng.random() < cfg.p_intensity:
        x = x * rng.uniform(*cfg.intensity_scale) + rng.uniform(-cfg.intensity_shift, cfg.intensity_shift)
    if rng.random() < cfg.p_lut:
        lo, hi = np.percentile(x, [0.5, 99.5])
        if hi > lo:
            u = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
            knots = np.linspace(0.0, 1.0, max(2, int(cfg.lut_points)))
            vals = rng.random(knots.size)
            x = lo + np.interp(u, knots, vals) * (hi - lo)
    if rng.random() < cfg.p_invert:
        x = -x
    if rng.random() < cfg.p_noise:
        x = x + rng.normal(0.0, cfg.noise_std, size=x.shape)
    if rng.random() < cfg.p_fov:
        h, w = x.shape
        a0, a1, b0, b1 = (rng.uniform(0, cfg.fov_max_fraction, size=4) * np.array([h, h, w, w])).astype(int)
        bg = float(x.min())
        x = x.copy()
        x[:a0] = bg
        x[h - a1:] = bg
        x[:, :b0] = bg
        x[:, w - b1:] = bg
    return x


def augment_pair(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                 cfg: AugmentConfig | None = None, binary_label: bool | None = None):
    """Augment one (H, W) slice and its label. Returns float32 (image, label) of the same shape.

    ``binary_label`` (default: inferred, True when the label only holds 0 and 1) selects nearest
    interpolation for the label so it stays binary; soft labels are interpolated linearly and
    clipped to [0, 1].
    """
    cfg = cfg or AugmentConfig()
    img = np.asarray(image, dtype=np.float64)
    lab = np.asarray(label, dtype=np.float64)
    if img.shape != lab.shape or img.ndim != 2:
        raise ValueError(f"image {img.shape} and label {lab.shape} must be equal 2-D shapes")
    if binary_label is None:
        binary_label = bool(np.isin(lab, (0.0, 1.0)).all())
    coords = _coords(img.shape, rng, cfg)
    if coords is not None:
        img = ndimage.map_coordinates(img, coords, order=1, mode="nearest")
        lab = ndimage.map_coordinates(lab, coords, order=0 if binary_label else 1, mode="constant",
                                      cval=0.0)
    lab = np.clip(lab, 0.0, 1.0)
    img = _intensity(img, rng, cfg, lab)
    return img.astype(np.float32), lab.astype(np.float32)


def augment_batch(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                  cfg: AugmentConfig | None = None, binary_label: bool | None = None):
    """Augment a batch (B, H, W[, 1]) slice by slice, consuming ``rng`` in batch order."""
    images = np.asarray(images)
    labels = np.asarray(labels)
    squeeze = images.ndim == 4
    xi = images[..., 0] if squeeze else images
    yi = labels[..., 0] if labels.ndim == 4 else labels
    if binary_label is None:
        binary_label = bool(np.isin(yi, (0.0, 1.0)).all())
    out_x = np.empty(xi.shape, np.float32)
    out_y = np.empty(yi.shape, np.float32)
    for b in range(xi.shape[0]):
        out_x[b], out_y[b] = augment_pair(xi[b], yi[b], rng, cfg, binary_label=binary_label)
    if squeeze:
        return out_x[..., None], out_y[..., None]
    return out_x, out_y


# ------------------------------------------------------------------------------------------ 3D
@dataclass(frozen=True)
class Warp3D:
    """One random 3D deformation of a volume (translation + rotation + elastic morphing), drawn once
    (:func:`draw_warp3d`) and evaluated on any box of output voxels (:meth:`coords`): the augmented
    volume is never built whole, only the training patches cut from it."""

    centre: tuple          # voxel the rotation turns about (the volume's centre)
    rotation: np.ndarray   # 3x3, output -> input
    shift: np.ndarray      # voxels, output -> input
    field: np.ndarray      # (3, g, g, g) elastic displacement (voxels) on a coarse control grid
    shape: tuple           # of the volume (the control grid spans it)

    def coords(self, lo, size) -> np.ndarray:
        """Input coordinates (3, *size) of the output voxels ``lo`` .. ``lo + size``."""
        idx = np.stack(np.meshgrid(*[np.arange(a, a + n, dtype=np.float64) for a, n in zip(lo, size)],
                                   indexing="ij"))
        c = np.asarray(self.centre, np.float64).reshape(3, 1, 1, 1)
        out = np.einsum("ij,j...->i...", self.rotation, idx - c) + c + self.shift.reshape(3, 1, 1, 1)
        g = self.field.shape[1]
        grid = [(idx[a] / max(self.shape[a] - 1, 1)) * (g - 1) for a in range(3)]
        for a in range(3):
            out[a] += ndimage.map_coordinates(self.field[a], grid, order=1, mode="nearest")
        return out


def draw_warp3d(shape, rng: np.random.Generator, translate_vox: float = 8.0, rotate_deg: float = 10.0,
                elastic_vox: float = 3.0, control_points: int = 6) -> Warp3D:
    """A random :class:`Warp3D` for a volume of ``shape``: translation uniform in +-``translate_vox``
    per axis, rotation about each axis uniform in +-``rotate_deg``, and an elastic displacement of
    at most ``elastic_vox`` voxels interpolated (linearly) from ``control_points``^3 random vectors
    (smooth at the scale of a lobe)."""
    a = np.radians(rng.uniform(-rotate_deg, rotate_deg, size=3))
    cx, cy, cz = np.cos(a)
    sx, sy, sz = np.sin(a)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    shift = rng.uniform(-translate_vox, translate_vox, size=3)
    g = max(2, int(control_points))
    field = rng.standard_normal((3, g, g, g))
    mag = max(float(np.sqrt((field ** 2).sum(axis=0)).max()), 1e-12)
    field *= rng.uniform(0.0, elastic_vox) / mag
    return Warp3D(centre=tuple((np.asarray(shape, float) - 1) / 2), rotation=rz @ ry @ rx, shift=shift,
                  field=field, shape=tuple(int(s) for s in shape))


def warp_labels(labels: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """A label map sampled at ``coords`` (nearest neighbour: labels stay labels; 0 outside)."""
    return ndimage.map_coordinates(labels, coords, order=0, mode="constant", cval=0).astype(labels.dtype)
