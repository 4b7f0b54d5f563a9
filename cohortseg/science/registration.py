"""Linear registration with antspyx, returned as plain 4x4 world (RAS mm) matrices.

* :func:`rigid` / :func:`affine` / :func:`affine_to_mni` run ``ants.registration`` (Mattes MI,
  low-resolution multi-resolution schedule suitable for CI and cohorts) and return a
  :class:`LinearTransform` whose ``matrix`` maps **moving world RAS mm -> fixed world RAS mm**.
  A matrix serialises into a job's ``meta`` (``to_dict``) - no ANTs transform files to carry around.
* :func:`apply` resamples an image onto a reference grid (scipy, nearest/linear/cubic);
* Determinism: ITK runs single-threaded (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1`` is set before
  ants is first imported, unless the caller set it) and the metric sampling uses a fixed
  ``random_seed`` (passed both ways antspyx versions read it, see :func:`_seeded`), so the same
  inputs give bit-identical matrices.
* Fixed image for MNI: the MNI152 2009c (sym) T1 template shipped inside the nilearn wheel, brain
  only, at 2 mm by default.

Conventions: nibabel affines are RAS; ANTs physical space is LPS. ANTs linear transforms map
fixed-space points to moving-space points (that is how images are pulled); the matrix here is the
inverse of that, converted to RAS.
"""
from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import ndimage

from cohortseg.errors import InputError

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: plausible det of a subject -> MNI152 affine (eTIV = the template's ~1.6 L / det: 0.3-8 L); outside it
#: the registration failed (a collapsed or exploded scale). A failure check only: whether the head is
#: plausible is the anatomy checks' question (e.g. brain_tissue's brain_mask_range_ml, 500-2500 mL by
#: default, which a tighter range such as (0.4, 2.5) would contradict below 640 mL)
MNI_DET_RANGE = (0.2, 5.0)
DEFAULT_SEED = 20240229
_INTERP = {"nearest": 0, "nearestneighbor": 0, "label": 0, "genericlabel": 0, "linear": 1,
           "cubic": 3, "bspline": 3}

#: CI/cohort-friendly schedules (iterations, shrink factors, smoothing sigmas in voxels) used on
#: images resampled to `work_spacing_mm` (2 mm) first
FAST_SCHEDULE = {"aff_iterations": (100, 50, 10), "aff_shrink_factors": (4, 2, 1),
                 "aff_smoothing_sigmas": (2, 1, 0)}


def _ants(threads: int | None = None):
    """Import ants with a deterministic ITK thread count (set only if the caller did not set one)."""
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(threads or 1))
    import ants  # noqa: WPS433 - heavy import kept lazy

    return ants


@contextlib.contextmanager
def _seeded(ants, seed: int):
    """Make ``ants.registration`` use `seed` whichever way this antspyx version reads it.

    antspyx <= 0.6.1 passes its ``random_seed`` argument to antsRegistration; 0.6.3 ignores that
    argument and reads the package-global ``ants.config._random_seed`` instead (set by
    ``ants.set_ants_deterministic``, which also reseeds numpy's global generator - not wanted in a
    library), so the global is set for the call and restored afterwards.
    """
    cfg = getattr(ants, "config", None)
    if cfg is None or not hasattr(cfg, "_random_seed"):
        yield
        return
    old = cfg._random_seed
    cfg._random_seed = int(seed)
    try:
        yield
    finally:
        cfg._random_seed = old


# ----------------------------------------------------------------------------------------------
# image conversion
# ----------------------------------------------------------------------------------------------
def _as_nib(img):
    import nibabel as nib

    if isinstance(img, (str, os.PathLike)):
        return nib.load(str(img))
    if hasattr(img, "affine") and hasattr(img, "dataobj"):
        return img
    ants = _ants()
    if isinstance(img, ants.ANTsImage):
        return from_ants(img)
    raise TypeError(f"expected a nibabel image, an ANTsImage or a path, got {type(img)}")


def to_ants(img, dtype=np.float32):
    """nibabel image (RAS affine) -> ANTsImage (LPS origin/direction), data copied as float32."""
    ants = _ants()
    if isinstance(img, ants.ANTsImage):
        return img
    img = _as_nib(img)
    data = np.asarray(img.dataobj, dtype=dtype)
    if data.ndim > 3:
        data = data.reshape(data.shape[:3] + (-1,))[..., 0]
    aff = _LPS @ np.asarray(img.affine, dtype=float)
    sp = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
    direction = aff[:3, :3] / sp
    return ants.from_numpy(np.ascontiguousarray(data), origin=tuple(aff[:3, 3]), spacing=tuple(sp),
                           direction=direction)


def from_ants(aimg):
    """ANTsImage -> nibabel Nifti1Image (RAS affine)."""
    import nibabel as nib

    d = np.asarray(aimg.direction, dtype=float)
    aff = np.eye(4)
    aff[:3, :3] = d * np.asarray(aimg.spacing, dtype=float)
    aff[:3, 3] = aimg.origin
    return nib.Nifti1Image(aimg.numpy(), _LPS @ aff)


def _grid(reference) -> tuple[tuple[int, int, int], np.ndarray]:
    if isinstance(reference, tuple) and len(reference) == 2 and np.shape(reference[1]) == (4, 4):
        return tuple(int(s) for s in reference[0])[:3], np.asarray(reference[1], dtype=float)
    ref = _as_nib(reference)
    return tuple(int(s) for s in ref.shape[:3]), np.asarray(ref.affine, dtype=float)


# ----------------------------------------------------------------------------------------------
# transforms
# ----------------------------------------------------------------------------------------------
@dataclass
class LinearTransform:
    """World-space linear transform: ``matrix`` maps moving RAS mm -> fixed RAS mm.

    ``fixed_shape``/``fixed_affine`` record the grid of the fixed image (the default reference of
    :func:`apply`); ``moving_shape``/``moving_affine`` the moving image's grid (for the inverse).
    """

    matrix: np.ndarray
    kind: str = "affine"
    fixed_shape: tuple | None = None
    fixed_affine: np.ndarray | None = None
    moving_shape: tuple | None = None
    moving_affine: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    def inverse(self) -> "LinearTransform":
        return LinearTransform(np.linalg.inv(self.matrix), self.kind, self.moving_shape, self.moving_affine,
                               self.fixed_shape, self.fixed_affine, dict(self.info, inverted=True))

    def to_dict(self) -> dict:
        def lst(a):
            return None if a is None else np.asarray(a).tolist()

        return {"matrix": lst(self.matrix), "kind": self.kind, "fixed_shape": lst(self.fixed_shape),
                "fixed_affine": lst(self.fixed_affine), "moving_shape": lst(self.moving_shape),
                "moving_affine": lst(self.moving_affine), "info": self.info}

    @classmethod
    def from_dict(cls, d) -> "LinearTransform":
        if isinstance(d, LinearTransform):
            return d

        def arr(a):
            return None if a is None else np.asarray(a, dtype=float)

        def tup(a):
            return None if a is None else tuple(int(v) for v in a)

        return cls(arr(d["matrix"]), d.get("kind", "affine"), tup(d.get("fixed_shape")), arr(d.get("fixed_affine")),
                   tup(d.get("moving_shape")), arr(d.get("moving_affine")), dict(d.get("info", {})))

    @property
    def translation(self) -> np.ndarray:
        return np.asarray(self.matrix)[:3, 3].copy()

    def to_ants_transform(self):
        """ANTs AffineTransform (fixed LPS point -> moving LPS point), e.g. for ants.apply_transforms."""
        ants = _ants()
        m = _LPS @ np.linalg.inv(self.matrix) @ _LPS
        tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3)
        tx.set_parameters(np.concatenate([m[:3, :3].ravel(), m[:3, 3]]))
        tx.set_fixed_parameters(np.zeros(3))
        return tx

    def write_ants(self, path) -> str:
        """Write an ITK/ANTs .mat usable by antsApplyTransforms (pulls moving into fixed space)."""
        ants = _ants()
        ants.write_transform(self.to_ants_transform(), str(path))
        return str(path)


def _matrix_from_ants(tx) -> np.ndarray:
    """4x4 LPS matrix of any linear ANTs transform (fixed -> moving), probed on 4 points."""
    ants = _ants()
    pts = [np.zeros(3), np.eye(3)[0] * 100.0, np.eye(3)[1] * 100.0, np.eye(3)[2] * 100.0]
    out = [np.asarray(ants.apply_ants_transform_to_point(tx, tuple(p)), dtype=float) for p in pts]
    m = np.eye(4)
    m[:3, 3] = out[0]
    for k in range(3):
        m[:3, k] = (out[k + 1] - out[0]) / 100.0
    return m


def _masked(img, mask):
    import nibabel as nib

    if mask is None:
        return img
    m = np.asarray(_as_nib(mask).dataobj) > 0
    d = np.asarray(img.dataobj, dtype=np.float32)
    if d.ndim > 3:
        d = d.reshape(d.shape[:3] + (-1,))[..., 0]
    if m.shape != d.shape:
        raise InputError(f"mask shape {m.shape} != image shape {d.shape}")
    return nib.Nifti1Image(d * m, img.affine)


def register(moving, fixed, kind: str = "affine", moving_mask=None, fixed_mask=None,
             seed: int = DEFAULT_SEED, work_spacing_mm: float | None = 2.0, schedule: dict | None = None,
             sampling_rate: float = 0.1, threads: int | None = None) -> LinearTransform:
    """Linear registration (``kind`` 'rigid', 'affine', 'similarity' or 'translation') of `moving`
    onto `fixed` with antspyx. Masks (if given) are applied by multiplying the images (robust with
    skull-on vs skull-stripped images). Both images are resampled to `work_spacing_mm` first (None:
    as is). Returns a :class:`LinearTransform` (moving RAS mm -> fixed RAS mm)."""
    ants = _ants(threads)
    tmap = {"rigid": "Rigid", "affine": "Affine", "similarity": "Similarity", "translation": "Translation"}
    if kind not in tmap:
        raise ValueError(f"kind must be one of {sorted(tmap)}")
    mov_n, fix_n = _as_nib(moving), _as_nib(fixed)
    mov, fix = to_ants(_masked(mov_n, moving_mask)), to_ants(_masked(fix_n, fixed_mask))
    if float(mov.numpy().std()) == 0.0 or float(fix.numpy().std()) == 0.0:
        raise InputError("cannot register a constant image")
    if work_spacing_mm:
        sp = (float(work_spacing_mm),) * 3
        if not np.allclose(mov.spacing, sp):
            mov = ants.resample_image(mov, sp, use_voxels=False, interp_type=0)
        if not np.allclose(fix.spacing, sp):
            fix = ants.resample_image(fix, sp, use_voxels=False, interp_type=0)
    sched = dict(FAST_SCHEDULE if schedule is None else schedule)
    with tempfile.TemporaryDirectory(prefix="cohortseg_reg_") as tmp, _seeded(ants, seed):
        reg = ants.registration(fixed=fix, moving=mov, type_of_transform=tmap[kind],
                                outprefix=os.path.join(tmp, "reg_"), aff_metric="mattes", aff_sampling=32,
                                aff_random_sampling_rate=sampling_rate, random_seed=int(seed), verbose=False,
                                **sched)
        fwd = [t for t in reg["fwdtransforms"] if t.endswith(".mat")]
        if len(fwd) != 1:
            raise RuntimeError(f"unexpected ANTs transforms: {reg['fwdtransforms']}")
        m_fix_to_mov_lps = _matrix_from_ants(ants.read_transform(fwd[0]))
    m = np.linalg.inv(_LPS @ m_fix_to_mov_lps @ _LPS)
    return LinearTransform(m, kind, tuple(fix_n.shape[:3]), np.asarray(fix_n.affine, dtype=float),
                           tuple(mov_n.shape[:3]), np.asarray(mov_n.affine, dtype=float),
                           {"seed": int(seed), "work_spacing_mm": work_spacing_mm, "schedule": {k: list(v) for k, v in sched.items()},
                            "sampling_rate": sampling_rate, "tool": f"antspyx {getattr(ants, '__version__', '?')}"})


def rigid(moving_img, fixed_img, **kw) -> LinearTransform:
    """Rigid (6 dof) registration of `moving_img` onto `fixed_img` (see :func:`register`)."""
    return register(moving_img, fixed_img, kind="rigid", **kw)


def affine(moving_img, fixed_img, **kw) -> LinearTransform:
    """Affine (12 dof) registration of `moving_img` onto `fixed_img` (see :func:`register`)."""
    return register(moving_img, fixed_img, kind="affine", **kw)


@functools.lru_cache(maxsize=4)
def _mni_cached(resolution: int):
    from nilearn import datasets
    import nibabel as nib

    t = datasets.load_mni152_template(resolution=resolution)
    m = datasets.load_mni152_brain_mask(resolution=resolution)
    t = nib.Nifti1Image(np.asarray(t.get_fdata(), dtype=np.float32), t.affine)
    m = nib.Nifti1Image((np.asarray(m.get_fdata()) > 0).astype(np.uint8), m.affine)
    return t, m


def mni_template(resolution: int = 2):
    """(T1 template, brain mask) of MNI152 2009c from the nilearn wheel (offline), as nibabel images."""
    return _mni_cached(int(resolution))


def affine_to_mni(t1_img, brain_mask=None, resolution: int = 2, **kw) -> LinearTransform:
    """Affine registration of a T1w image to the (skull-stripped) MNI152 template.

    `brain_mask` (same grid as `t1_img`) strips the skull of the moving image first - recommended for
    heads with neck/skull. Returns native RAS mm -> MNI RAS mm; ``fixed_*`` describe the template grid.
    """
    tpl, _ = mni_template(resolution)
    kw.setdefault("work_spacing_mm", float(resolution))
    tr = register(t1_img, tpl, kind="affine", moving_mask=brain_mask, **kw)
    tr.info["fixed"] = f"MNI152NLin2009cSym nilearn {resolution}mm"
    return tr


# ----------------------------------------------------------------------------------------------
# applying transforms
# ----------------------------------------------------------------------------------------------
def apply(transform, img, reference=None, interpolation: str = "linear", inverse: bool = False, cval: float = 0.0):
    """Resample `img` (in the transform's moving space) onto `reference` (fixed space grid).

    `reference`: nibabel image or ``(shape, affine)``; default the transform's fixed grid.
    `interpolation`: 'nearest' (labels), 'linear' or 'cubic'. With ``inverse=True`` the transform is
    inverted (fixed-space image -> moving grid). Returns a nibabel Nifti1Image (float32, or the input
    dtype for 'nearest').
    """
    import nibabel as nib

    tr = LinearTransform.from_dict(transform)
    if inverse:
        tr = tr.inverse()
    if reference is None:
        if tr.fixed_shape is None or tr.fixed_affine is None:
            raise ValueError("no reference grid given and none recorded in the transform")
        reference = (tr.fixed_shape, tr.fixed_affine)
    shape, ref_aff = _grid(reference)
    src = _as_nib(img)
    order = _INTERP.get(interpolation.lower().replace("_", ""))
    if order is None:
        raise ValueError(f"unknown interpolation {interpolation!r}")
    data = np.asarray(src.dataobj)
    if data.ndim > 3:
        data = data.reshape(data.shape[:3] + (-1,))[..., 0]
    if order > 0:
        data = data.astype(np.float32)
    # reference voxel -> reference world -> moving world -> moving voxel
    vox = np.linalg.inv(np.asarray(src.affine, dtype=float)) @ np.linalg.inv(tr.matrix) @ ref_aff
    out = ndimage.affine_transform(data, vox[:3, :3], offset=vox[:3, 3], output_shape=shape, order=order,
                                   mode="constant", cval=cval, prefilter=order > 1)
    return nib.Nifti1Image(out, ref_aff)


def voxels_to_world(ijk: Sequence, affine: np.ndarray) -> np.ndarray:
    a = np.asarray(affine, dtype=float)
    p = np.asarray(ijk, dtype=float).reshape(-1, 3)
    return p @ a[:3, :3].T + a[:3, 3]


__all__ = ["LinearTransform", "register", "rigid", "affine", "affine_to_mni", "mni_template", "apply",
           "to_ants", "from_ants", "voxels_to_world",
           "FAST_SCHEDULE", "DEFAULT_SEED"]
