"""Training data: (image, mask) pairs -> normalised axial slices + (soft) labels; k-fold splits.

Sources
-------
* a TSV with columns ``image``, ``mask`` and optionally ``subject``, ``contrast`` (relative paths are
  resolved against the TSV's folder) -- :func:`read_pairs_tsv`;
* a BIDS dataset with a derivatives folder holding the masks (``derivatives/labels/sub-X/[ses-Y/]anat/
  <image stem>_<mask suffix>.nii.gz``, e.g. ``_seg-manual`` as in SCT datasets, or
  ``_label-SC_mask``) -- :func:`pairs_from_bids`;
* an inline list in the training config -- :func:`pairs_from_config` (items may add ``levels``: a
  vertebral level image for CSA per level in the CV report, and ``levels_kind``).

Preprocessing (the model grid; the inference pipeline must do the same, see ``preprocess_image``)
----------------------------------------------------------------------------------------------
``cohortseg.science.resampling.to_axial_slices``: every native slice along the S-I axis is resampled
in-plane to ``inplane_mm`` (linear) in a canonical layout (axis 0 of a slice towards the subject's
Left, axis 1 towards Anterior, whatever the storage orientation) and centre-cropped/padded to
``crop`` around the native slice centre (or ``center``); pixels outside the native field of view are
0 before normalisation. Intensities: z-score with the mean/std of the whole native volume
(``zscore_volume``), computed before resampling.

Labels
------
``binary``: the mask resampled linearly into the grid and thresholded at 0.5. ``soft``: the binary
mask is blurred in-plane with a Gaussian of ``soft_sigma_mm`` (default 0.5 mm) in native space and
then resampled linearly: values stay 1 inside the cord, fall to 0.5 at the drawn edge and spread
over about one voxel, like the average of raters who disagree by a fraction of a voxel (this dataset
has one rater per contrast, so the soft label is a partial-volume model, not a consensus). The blur
preserves the sum, so the CSA of the soft label equals the binary CSA.
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import nibabel as nib
import numpy as np

from cohortseg.errors import ConfigError, InputError
from cohortseg.science.resampling import preprocess_image


@dataclass(frozen=True)
class Pair:
    """One training example: an image, its cord mask, and grouping keys for the splits."""

    image: str
    mask: str
    subject: str
    contrast: str = ""
    levels: str = ""       # optional vertebral level image (points/centreline/map) for CSA per level
    levels_kind: str = ""  # its kind for cohortseg.science.csa.vertebral_levels ("" = auto)


@dataclass
class Volume:
    """A preprocessed pair: ``x`` (N, H, W) float32 normalised image, ``y`` (N, H, W) float32 label
    (soft or binary), ``y_bin`` (N, H, W) bool reference mask in the grid, ``valid`` (N,) bool slices
    inside the field of view, ``grid`` the geometry of ``to_axial_slices``."""

    pair: Pair
    x: np.ndarray
    y: np.ndarray
    y_bin: np.ndarray
    valid: np.ndarray
    grid: dict = field(repr=False)


# ------------------------------------------------------------------------------------ sources
def _shared_dir() -> Path:
    env = os.environ.get("COHORTSEG_SHARED")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared"


def expand_path(p: str, root: str | Path | None = None) -> str:
    """Expand ``{shared}`` (``$COHORTSEG_SHARED`` or <repo>/../shared), ``~`` and env vars; join
    relative paths to ``root``."""
    s = os.path.expanduser(os.path.expandvars(str(p).replace("{shared}", str(_shared_dir()))))
    if root is not None and not os.path.isabs(s):
        s = os.path.join(str(root), s)
    return os.path.normpath(s)


def read_pairs_tsv(path) -> list[Pair]:
    """Read a TSV of pairs (columns image, mask[, subject, contrast]); paths relative to the TSV."""
    path = Path(path)
    root = path.parent
    pairs = []
    with open(path, newline="") as f:
        for i, row in enumerate(csv.DictReader(f, delimiter="\t")):
            if "image" not in row or "mask" not in row:
                raise ConfigError(f"{path}: needs columns 'image' and 'mask'")
            img = expand_path(row["image"], root)
            pairs.append(Pair(image=img, mask=expand_path(row["mask"], root),
                              subject=(row.get("subject") or _guess_subject(img, i)),
                              contrast=(row.get("contrast") or _guess_contrast(img))))
    if not pairs:
        raise ConfigError(f"{path}: no pairs")
    return pairs


def pairs_from_bids(root, derivatives=None, suffixes: Sequence[str] | None = None,
                    mask_suffixes: Sequence[str] = ("seg-manual", "label-SC_mask", "label-SC_seg")
                    ) -> list[Pair]:
    """Pairs from a BIDS dataset: every ``sub-*/[ses-*/]anat/*_<suffix>.nii[.gz]`` image with a mask
    ``<derivatives>/sub-*/[ses-*/]anat/<stem>_<mask_suffix>.nii[.gz]`` (default derivatives:
    ``<root>/derivatives/labels``). ``suffixes`` filters the images (e.g. ["T1w", "T2w"])."""
    root = Path(root)
    deriv = Path(derivatives) if derivatives else root / "derivatives" / "labels"
    pairs = []
    for img in sorted(root.glob("sub-*/**/anat/*.nii*")):
        if "derivatives" in img.relative_to(root).parts:
            continue
        stem = re.sub(r"\.nii(\.gz)?$", "", img.name)
        suffix = stem.rsplit("_", 1)[-1]
        if suffixes and suffix not in suffixes:
            continue
        rel = img.parent.relative_to(root)
        for ms in mask_suffixes:
            cands = [deriv / rel / f"{stem}_{ms}{ext}" for ext in (".nii.gz", ".nii")]
            found = [c for c in cands if c.exists()]
            if found:
                sub = stem.split("_", 1)[0]
                pairs.append(Pair(image=str(img), mask=str(found[0]), subject=sub, contrast=suffix))
                break
    if not pairs:
        raise ConfigError(f"no image/mask pairs under {root} (masks looked up in {deriv})")
    return pairs


def pairs_from_config(data: dict) -> list[Pair]:
    """``data`` section of a training config: ``tsv``, ``bids`` (+ ``derivatives``, ``suffixes``,
    ``mask_suffixes``) or ``items`` (list of {image, mask, subject, contrast}, relative to ``root``)."""
    if not isinstance(data, dict):
        raise ConfigError("training config: 'data' must be a mapping")
    if data.get("tsv"):
        return read_pairs_tsv(expand_path(data["tsv"]))
    if data.get("bids"):
        return pairs_from_bids(expand_path(data["bids"]),
                               expand_path(data["derivatives"]) if data.get("derivatives") else None,
                               data.get("suffixes"), data.get("mask_suffixes",
                                                              ("seg-manual", "label-SC_mask", "label-SC_seg")))
    items = data.get("items")
    if not items:
        raise ConfigError("training config: data needs 'tsv', 'bids' or 'items'")
    root = expand_path(data["root"]) if data.get("root") else None
    pairs = []
    for i, it in enumerate(items):
        img = expand_path(it["image"], root)
        pairs.append(Pair(image=img, mask=expand_path(it["mask"], root),
                          subject=str(it.get("subject") or _guess_subject(img, i)),
                          contrast=str(it.get("contrast") or _guess_contrast(img)),
                          levels=expand_path(it["levels"], root) if it.get("levels") else "",
                          levels_kind=str(it.get("levels_kind") or "")))
    return pairs


def _guess_subject(path: str, i: int) -> str:
    m = re.search(r"(sub-[A-Za-z0-9]+)", path)
    return m.group(1) if m else f"item{i:03d}"


def _guess_contrast(path: str) -> str:
    stem = re.sub(r"\.nii(\.gz)?$", "", os.path.basename(path))
    return stem.rsplit("_", 1)[-1] if "_" in stem else stem


# ------------------------------------------------------------------------------- preprocessing
def soft_label(mask: np.ndarray, affine, sigma_mm: float, binarise: bool = True) -> np.ndarray:
    """Mask -> soft mask: in-plane Gaussian blur (sigma in mm, native space). ``binarise``: threshold
    at 0.5 first (manual masks); False keeps fractional values (a consensus of several masks)."""
    from scipy import ndimage

    from cohortseg.science.metrics import voxel_sizes
    from cohortseg.science.resampling import through_plane_axis

    m = np.asarray(mask, dtype=np.float64)
    m = (m > 0.5).astype(np.float64) if binarise else np.clip(m, 0.0, 1.0)
    if sigma_mm <= 0:
        return m
    t = through_plane_axis(affine)
    sig = sigma_mm / voxel_sizes(affine)
    sig[t] = 0.0
    return np.clip(ndimage.gaussian_filter(m, sig, mode="constant"), 0.0, 1.0)


def load_volume(pair: Pair, inplane_mm: float = 1.0, crop: Sequence[int] = (64, 64),
                label: str = "binary", soft_sigma_mm: float = 0.5, center=None, target=None) -> Volume:
    """Load and preprocess one pair (see module doc). ``label``: 'binary' or 'soft'. ``target``: a
    soft mask in the pair's native grid to train on instead of its own mask (e.g. the consensus of
    :func:`consensus_masks`); ``y_bin`` stays the pair's own manual mask (what Dice is measured on)."""
    from cohortseg.science.resampling import to_axial_slices

    try:
        img = nib.load(pair.image)
        msk = nib.load(pair.mask)
    except (OSError, nib.filebasedimages.ImageFileError) as e:
        raise InputError(f"cannot read training pair: {e}", pair.image) from None
    if img.shape[:3] != msk.shape[:3] or not np.allclose(img.affine, msk.affine, atol=1e-3):
        raise InputError("mask and image grids differ", pair.mask)
    x, grid = preprocess_image(img, inplane_mm, crop, center=center)
    m = np.asarray(msk.dataobj, dtype=np.float64)
    if m.ndim == 4:
        m = m[..., 0]
    if not (m > 0.5).any():
        raise InputError("empty mask", pair.mask)
    binimg = nib.Nifti1Image((m > 0.5).astype(np.float32), msk.affine)
    ybin, _ = to_axial_slices(binimg, inplane_mm=inplane_mm, crop=tuple(crop), order=1, center=center)
    if target is not None and label == "soft":
        simg = nib.Nifti1Image(soft_label(target, msk.affine, soft_sigma_mm, binarise=False).astype(np.float32),
                               msk.affine)
        y, _ = to_axial_slices(simg, inplane_mm=inplane_mm, crop=tuple(crop), order=1, center=center)
        y = np.clip(y, 0.0, 1.0).astype(np.float32)
    elif label == "soft":
        simg = nib.Nifti1Image(soft_label(m, msk.affine, soft_sigma_mm).astype(np.float32), msk.affine)
        y, _ = to_axial_slices(simg, inplane_mm=inplane_mm, crop=tuple(crop), order=1, center=center)
        y = np.clip(y, 0.0, 1.0).astype(np.float32)
    elif label == "binary":
        y = (ybin > 0.5).astype(np.float32)
    else:
        raise ConfigError(f"label must be 'binary' or 'soft', not {label!r}")
    valid = np.asarray(grid["valid_fraction"]) > 0
    return Volume(pair=pair, x=x, y=y, y_bin=ybin > 0.5, valid=valid, grid=grid)


def _slice_centroids(mask: np.ndarray, affine, t: int) -> dict[int, np.ndarray]:
    """World coordinates of the mask's centroid on every slice along axis ``t``."""
    out = {}
    for z in range(mask.shape[t]):
        sl = np.take(mask, z, axis=t)
        w = sl.sum()
        if w <= 0.5:
            continue
        ij = np.array(np.nonzero(sl > 0)).astype(float)
        c2 = (ij * sl[sl > 0]).sum(axis=1) / sl[sl > 0].sum()
        vox = np.insert(c2, t, z)
        out[z] = affine[:3, :3] @ vox + affine[:3, 3]
    return out


def align_mask(moving: nib.Nifti1Image, fixed: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """Co-register another image's binary mask of the same subject onto ``fixed``'s grid.

    Both come from one session, so scanner coordinates already align them up to subject motion and
    where each rater drew; what is left is mostly a translation of the cord. The moving mask is
    resampled into the fixed grid (linear, scanner coordinates), then shifted in-plane by the median
    difference of the two masks' slice centroids (in world mm) over the slices both cover.
    Returns (aligned soft mask in the fixed grid, the in-plane shift applied in mm)."""
    from nibabel.processing import resample_from_to
    from scipy import ndimage

    from cohortseg.science.resampling import through_plane_axis

    t = through_plane_axis(fixed.affine)
    fdat = (np.asarray(fixed.dataobj, dtype=np.float64) > 0.5).astype(np.float64)
    mimg = nib.Nifti1Image((np.asarray(moving.dataobj, dtype=np.float64) > 0.5).astype(np.float32), moving.affine)
    warped = np.clip(resample_from_to(mimg, (fixed.shape[:3], fixed.affine), order=1).get_fdata(), 0, 1)
    cf, cm = _slice_centroids(fdat, fixed.affine, t), _slice_centroids(warped, fixed.affine, t)
    both = sorted(set(cf) & set(cm))
    if not both:
        raise InputError("masks of the same subject do not overlap in scanner coordinates", str(moving.get_filename()))
    shift_world = np.median([cf[z] - cm[z] for z in both], axis=0)
    shift_vox = np.linalg.solve(fixed.affine[:3, :3], shift_world)
    shift_vox[t] = 0.0  # in-plane only: the slices were matched by position
    aligned = ndimage.shift(warped, shift_vox, order=1, mode="constant")
    return np.clip(aligned, 0.0, 1.0), fixed.affine[:3, :3] @ shift_vox


def consensus_masks(pairs: Sequence[Pair]) -> dict[int, np.ndarray]:
    """For every pair whose subject has other labelled images: the average of its own binary mask and
    the other images' masks co-registered onto it (:func:`align_mask`) -- the soft ground truth of
    the contrast-agnostic cord segmentation (one cord, whatever the contrast). Where only the own
    mask covers a slice, the own mask is kept there."""
    from cohortseg.science.resampling import through_plane_axis

    out: dict[int, np.ndarray] = {}
    by_subject: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        by_subject.setdefault(p.subject, []).append(i)
    for idx in by_subject.values():
        if len(idx) < 2:
            continue
        for i in idx:
            fixed = nib.load(pairs[i].mask)
            own = (np.asarray(fixed.dataobj, dtype=np.float64) > 0.5).astype(np.float64)
            t = through_plane_axis(fixed.affine)
            per_slice = [1, 1, 1]
            per_slice[t] = -1  # broadcasts a per-slice vector along the through-plane axis
            other_axes = tuple(a for a in range(3) if a != t)
            total, count = own.copy(), np.ones(own.shape[t])
            for j in idx:
                if j == i:
                    continue
                aligned, _ = align_mask(nib.load(pairs[j].mask), fixed)
                covered = aligned.sum(axis=other_axes) > 0.5
                total += aligned * covered.reshape(per_slice)
                count += covered
            out[i] = total / count.reshape(per_slice)
    return out


# ---------------------------------------------------------------------------------------- splits
def group_keys(pairs: Sequence[Pair], by: str) -> list[str]:
    if by not in ("subject", "contrast"):
        raise ConfigError(f"split.by must be 'subject' or 'contrast', not {by!r}")
    return [p.subject if by == "subject" else p.contrast for p in pairs]


def kfold_splits(pairs: Sequence[Pair], k: int | None = None, by: str = "subject", seed: int = 0
                 ) -> list[tuple[list[int], list[int]]]:
    """Group k-fold: (train indices, test indices) per fold; a group (subject or contrast) is never
    split. ``k`` defaults to the number of groups (leave-one-group-out); groups are shuffled with
    ``seed`` and dealt round-robin, so fold sizes differ by at most one group."""
    keys = group_keys(pairs, by)
    groups = sorted(set(keys))
    if k is None or k <= 0:
        k = len(groups)
    if len(groups) < 2:
        raise ConfigError(f"k-fold by {by} needs at least 2 groups, got {groups}")
    if k > len(groups):
        raise ConfigError(f"k={k} folds but only {len(groups)} {by} groups")
    order = np.random.default_rng(seed).permutation(len(groups))
    fold_of = {groups[g]: i % k for i, g in enumerate(order)}
    folds = []
    for f in range(k):
        test = [i for i, key in enumerate(keys) if fold_of[key] == f]
        train = [i for i, key in enumerate(keys) if fold_of[key] != f]
        folds.append((train, test))
    return folds


def validation_split(train_idx: Sequence[int], pairs: Sequence[Pair], volumes: Sequence[Volume],
                     fraction: float, by: str, seed: int):
    """Split a fold's training data into (train slices, validation slices) for early stopping.

    With >= 3 training groups, whole groups (about ``fraction`` of them, at least one) are held out.
    Otherwise a contiguous slab of ``fraction`` of the slices of each training volume (at a seeded
    random position) is held out, with a 2-slice gap on each side to limit leakage between
    neighbouring slices. Returns two lists of (volume index, slice indices array).
    """
    rng = np.random.default_rng(seed)
    keys = group_keys([pairs[i] for i in train_idx], by)
    groups = sorted(set(keys))
    tr, va = [], []
    if len(groups) >= 3:
        n_val = max(1, int(round(fraction * len(groups))))
        val_groups = set(rng.choice(groups, size=n_val, replace=False).tolist())
        for i, key in zip(train_idx, keys):
            sl = np.nonzero(volumes[i].valid)[0]
            (va if key in val_groups else tr).append((i, sl))
        return tr, va
    for i in train_idx:
        sl = np.nonzero(volumes[i].valid)[0]
        n_val = max(1, int(round(fraction * len(sl))))
        gap = 2
        if len(sl) < n_val + 2 * gap + 2:
            tr.append((i, sl))
            continue
        start = int(rng.integers(0, len(sl) - n_val + 1))
        val = sl[start:start + n_val]
        keep = np.r_[sl[:max(0, start - gap)], sl[start + n_val + gap:]]
        tr.append((i, keep))
        va.append((i, val))
    return tr, va


def stack(volumes: Sequence[Volume], selection: Iterable[tuple[int, np.ndarray]]):
    """Concatenate selected slices -> (x (B, H, W, 1), y (B, H, W, 1))."""
    xs, ys = [], []
    for i, sl in selection:
        xs.append(volumes[i].x[sl])
        ys.append(volumes[i].y[sl])
    if not xs:
        raise ConfigError("no training slices selected")
    return (np.concatenate(xs)[..., None].astype(np.float32),
            np.concatenate(ys)[..., None].astype(np.float32))
