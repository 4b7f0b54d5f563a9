"""What the lesion pipelines share -- cerebral microbleeds (``cmb``, SWI [+ T1], :mod:`cohortseg.pipelines.cmb`)
and white-matter hyperintensities (``wmh``, T1 [+ FLAIR] with SHIVA cards, :mod:`cohortseg.pipelines.wmh`) with
the SHIVA 3D U-Nets (Boutinaud et al.), following the SHIVA contract of :mod:`cohortseg.models.shiva`: conforming,
brain masks, registrations, the ``_Lesion`` plugin base, census and flags.

Steps and where they run
------------------------
``prepare`` (CPU, per session)
    * every input is loaded with :func:`cohortseg.io.load_image` (bad data -> InputError);
    * the primary image (SWI for cmb, T1 for wmh) is conformed to a 256^3, 1 mm, RAS grid centred on
      the centre of its field of view (:func:`conform_ras`; FreeSurfer's centring rule, pure
      re-indexing when the image already is such a grid, else ``interpolation`` = cubic/linear);
    * cmb with a T1: rigid SWI -> T1 (antspyx, :func:`cohortseg.science.registration.rigid`); wmh with a FLAIR
      the model needs: rigid FLAIR -> T1, the FLAIR resampled once into the T1's conformed grid;
    * affine to MNI152 (:func:`cohortseg.science.registration.affine_to_mni`) of the T1 (cmb without a T1: of
      the SWI itself), only for MNI coordinates, lesion locations/regions and eTIV;
    * a *fallback brain mask* (:func:`fallback_brain_mask`, below) on the conformed grid, used to
      skull-strip the images for the MNI registration and, unless a brain-mask model is configured,
      as the SHIVA brain mask;
    * ``x`` = the conformed volume(s), channels in the order of ``meta["channels"]`` (the union of the
      cards' SHIVA modalities), cut to the bounding box of the head (``meta["x_box"]``; the rest of the
      256^3 grid is zero) and stored as float16 after division by a robust per-channel scale (the p99
      normalisation of ``predict`` is scale-free): ~15-20 MB per channel and session.
``predict`` (GPU, per shard)
    * brain mask: if the **first card** of ``<pipeline>.models`` is a brain-mask model (a brainchop
      MeshNet card, ``architecture.loader: tfjs_layers``, e.g. ``brainchop_mindgrab``), it runs on the
      first conformed channel (the SWI; the T1 for T1-based WMH cards) (reoriented to the LIA order the MeshNets were trained in, FreeSurfer-like
      uint8 scaling) and its largest component is the mask; otherwise the prepared fallback mask;
    * SHIVA crop 160x214x176 around the mask (:func:`cohortseg.models.shiva.crop_box`), p99 normalisation in
      the mask per channel, and the **mean over every fold of every SHIVA card** (each card gets the
      channels its modalities name);
    * returns compact arrays: ``prob`` (float16, the crop), ``box`` (10 int32: start, shape, centre,
      shift_up) and ``brain_mask`` (the 256^3 mask as ``np.packbits``).
``finalize`` (CPU, per session)
    * uncrop, back to the native grid of the primary image (trilinear; the mask by nearest neighbour);
    * ``threshold`` (strict ``>``), 26-connected clusters, clusters of <= ``min_cluster_voxels``
      dropped, clusters with more than ``max_outside_fraction`` of their voxels outside the brain mask
      dropped (:func:`cohortseg.science.lesions.lesion_census`); the values used are written to the dseg sidecar
      JSON and the session record;
    * outputs: ``<stem>_label-CMB_probseg.nii.gz``, ``_label-CMB_dseg.nii.gz`` (lesions numbered 1..n)
      + ``.json`` sidecar, ``_desc-brain_mask.nii.gz``, ``_desc-CMB_census.tsv`` (one row per lesion),
      ``_desc-CMB_regions.tsv``; ``WMH`` likewise; QC mosaic + lesion crops + brain-mask mosaic;
    * regions: cmb: MARS-like ``lobar`` / ``deep`` / ``infratentorial`` from each lesion's MNI centroid
      (:func:`cohortseg.science.lesions.cmb_location_mni`, coarse MNI boxes); wmh: ``periventricular`` /
      ``deep_white`` / ``infracortical`` voxel-wise from the MNI152 template region map
      (:func:`cohortseg.science.wmh.mni_region_map`, cached once per output folder) pulled into the native
      grid with the inverse of the MNI affine (no subject tissue segmentation needed);
    * eTIV (atlas scaling, as :func:`cohortseg.science.brain.estimate_etiv`) from the T1 -> MNI affine.

Learned intracranial mask (default for sessions with a T1)
----------------------------------------------------------
With the deep-T1-WMH head net first in ``<pipeline>.models`` (card ``deepwmh_head``, the default of
``cmb``), ``prepare`` also stores the session T1's 64^3 head box and ``predict`` runs the head net (about
a second on a CPU): its intracranial prior, resampled from the T1's native grid onto the primary
image's conformed grid through the rigid SWI -> T1 registration, > 0.5, is the SHIVA brain mask
(:func:`head_net_mask`). SWI-only sessions keep the fallback mask below. The sidecar's ``brain_mask``
says which was used. With ``deepwmh_affine`` listed too (the ``cmb`` default), the same head priors give
the T1's affine to MNI152 (deep-T1-WMH's affine net) and the measured eTIV, so ``prepare`` skips the
antspyx affine registration of the T1 (~20-40 s per session on 2 cores): measured on two real T1s
(``benchmarks/deepwmh_mni_affine.py``, docs/BENCHMARKS.md) the learned affine is as good as antspyx's
where antspyx works and right where it failed. The sidecar's ``mni.tool`` says which affine was used.

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

Models
------
``shiva_cmb`` (SWI-CMB v2 SavedModel folds) and ``shiva_wmh`` (T1-FLAIR WMH v1 ``.h5`` folds: SHIVA has
no T1-only WMH model, so a session without FLAIR fails with a clear error unless a T1-only card is used).
A SHIVA ``model_info_*.json`` path works as a card as is (:func:`cohortseg.models.cards.find_card`).
"""
from __future__ import annotations

import os

import numpy as np

from cohortseg.errors import AnatomyError, InputError, ModelError
from cohortseg.pipelines.base import Context, Item, OutputWriter, Pipeline, Predicted, Prepared
from cohortseg.science.metrics import bounding_box
from cohortseg.science.anatomy import NOT_BRAIN


CONFORM_SHAPE = 256
#: brain mask volumes outside this range (mm^3) are flagged (`brain_mask_volume_low/high`)
BRAIN_MASK_RANGE_MM3 = (700_000.0, 2_200_000.0)
#: plausible range of det(native -> MNI affine); outside it the registration is treated as failed
MNI_DET_RANGE = (0.4, 2.5)
CENSUS_COLUMNS = ["lesion_id", "n_voxels", "volume_mm3", "centroid_i", "centroid_j", "centroid_k", "x_mm", "y_mm",
                  "z_mm", "mni_x", "mni_y", "mni_z", "prob_max", "prob_mean", "outside_brain_frac", "region"]
_INTERP_ORDER = {"linear": 1, "cubic": 3}


# ----------------------------------------------------------------------------------------------
# geometry helpers
# ----------------------------------------------------------------------------------------------
def conform_ras(img, order: int = 3, shape: int = CONFORM_SHAPE):
    """Resample a nibabel image onto a ``shape``^3, 1 mm, RAS grid centred on the centre of its field
    of view (the RAS point of voxel ``dims/2`` lands on voxel ``shape/2``, as FreeSurfer's conform).

    When the grids differ only by axis permutations/flips and whole-voxel shifts (e.g. an image that is
    already a 1 mm 256^3 conformed volume in another orientation) the data are re-indexed exactly;
    otherwise spline interpolation of `order` (prefiltered for order > 1). Returns float32 Nifti1Image.
    """
    import nibabel as nib
    from scipy import ndimage

    from cohortseg.science.conform import conformed_affine

    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim > 3:
        data = data.reshape(data.shape[:3] + (-1,))[..., 0]
    aff_c = conformed_affine(np.asarray(img.affine, float), data.shape, shape, 1.0, "RAS")
    vox = np.linalg.inv(np.asarray(img.affine, float)) @ aff_c  # conformed voxel -> native voxel
    out = _reindex(data, vox, shape)
    if out is None:
        out = ndimage.affine_transform(data, vox[:3, :3], offset=vox[:3, 3], output_shape=(shape,) * 3,
                                       order=order, mode="constant", cval=0.0, prefilter=order > 1)
    return nib.Nifti1Image(out.astype(np.float32, copy=False), aff_c)


def _reindex(data: np.ndarray, vox: np.ndarray, shape: int):
    """Exact resampling when `vox` is a signed permutation with integer offsets, else None."""
    r, t = vox[:3, :3], vox[:3, 3]
    ra = np.abs(np.round(r))
    if not (np.allclose(r, np.round(r), atol=1e-4) and np.allclose(ra.sum(0), 1) and np.allclose(ra.sum(1), 1)
            and np.allclose(t, np.round(t), atol=1e-3)):
        return None
    r = np.round(r).astype(int)
    t = np.round(t).astype(int)
    src_axis = [int(np.flatnonzero(r[:, a])[0]) for a in range(3)]  # output axis a reads source axis s
    idx, valid = [], []
    for a in range(3):
        s = src_axis[a]
        i = r[s, a] * np.arange(shape) + t[s]
        valid.append((i >= 0) & (i < data.shape[s]))
        idx.append(np.clip(i, 0, data.shape[s] - 1))
    perm = np.argsort(src_axis)  # source axis order -> gather per source axis, then transpose
    src_idx = [idx[perm[s]] for s in range(3)]
    sub = data[np.ix_(*src_idx)]  # axes in source order
    out = np.transpose(sub, src_axis).copy()  # out axis a = source axis src_axis[a]
    vmask = valid[0][:, None, None] & valid[1][None, :, None] & valid[2][None, None, :]
    out[~vmask] = 0
    return out


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


# ----------------------------------------------------------------------------------------------
# cards
# ----------------------------------------------------------------------------------------------
def is_mask_card(card) -> bool:
    """A brain-mask model: a brainchop MeshNet (loader tfjs_layers), a card saying ``task: brain_mask``,
    or the deep-T1-WMH head net (:func:`is_head_card`)."""
    return (card.get("task") == "brain_mask" or card["architecture"].get("loader") == "tfjs_layers"
            or is_head_card(card))


def is_head_card(card) -> bool:
    """The deep-T1-WMH head net: an intracranial mask from the session's T1 (seconds on a CPU)."""
    from cohortseg.pipelines.deepwmh import card_net

    return card_net(card) == "head"


def is_affine_card(card) -> bool:
    """The deep-T1-WMH affine net: with the head net, the T1 -> MNI affine in seconds (instead of antspyx)."""
    from cohortseg.pipelines.deepwmh import card_net

    return card_net(card) == "affine"


def deep_mni(cards) -> bool:
    """Whether sessions with a T1 take their MNI affine from the deep-T1-WMH nets (head first + affine)."""
    return bool(cards) and is_head_card(cards[0]) and any(is_affine_card(c) for c in cards)


def head_box_arrays(t1_img, cards) -> tuple[dict, dict]:
    """(arrays, meta) for the head net when the first card is one: the z-scored native T1 in its 64^3
    head box, and that T1's grid (the prior is resampled from it in ``predict``)."""
    if not cards or not is_head_card(cards[0]):
        return {}, {}
    from cohortseg.science.deepwmh import head_box, zscore

    d = np.asarray(t1_img.dataobj, np.float32)
    d = d.reshape(d.shape[:3] + (-1,))[..., 0] if d.ndim > 3 else d
    return ({"head_box": head_box(zscore(d), t1_img.affine)},
            {"head_t1": {"affine": np.asarray(t1_img.affine).tolist(), "shape": [int(v) for v in d.shape]}})


def card_modalities(card) -> list[str]:
    """SHIVA modalities of a card (``modalities`` key, else derived from ``contrasts``)."""
    mods = card.get("modalities")
    if mods:
        return [str(m).lower() for m in mods]
    from cohortseg.models.shiva import MODALITY_CONTRAST

    back = {v.lower(): k for k, v in MODALITY_CONTRAST.items()}
    return [back.get(str(c).lower(), str(c).lower()) for c in card["contrasts"]]


def split_cards(cards: list) -> tuple[int | None, list[int]]:
    """(index of the brain-mask card or None, indices of the segmentation cards)."""
    mask_i = None
    seg = []
    for i, c in enumerate(cards):
        if is_affine_card(c):
            if not (cards and is_head_card(cards[0])):
                raise ModelError(f"model '{c.name}' (deep-T1-WMH affine net) needs the deep-T1-WMH head net "
                                 "(deepwmh_head) first in the pipeline's `models` list")
            continue
        if is_mask_card(c):
            if i != 0:
                raise ModelError(f"model '{c.name}' is a brain-mask model: it must be the first card of the "
                                 "pipeline's `models` list")
            mask_i = i
        else:
            seg.append(i)
    if not seg:
        raise ModelError("no lesion segmentation model (SHIVA card) in the pipeline's `models` list")
    return mask_i, seg


# ----------------------------------------------------------------------------------------------
# registration (memoised in the session's Context: cmb and wmh of one session share the T1's work)
# ----------------------------------------------------------------------------------------------
def _conformed_with_mask(path, ctx: Context, order: int, anatomy: dict):
    """(native image, warnings, conformed image, fallback mask on the conformed grid). Every image of
    cmb and wmh passes here, so this is where they check it is a head (`anatomy`: the limits of
    :mod:`cohortseg.science.anatomy`): before anything else from the image, then the fallback mask's
    volume against the lower end of ``icv_range_ml`` only (the crude mask can leak into the scalp:
    3.0 L on the deep-T1-WMH brain; and its sides are not checked: it lives on the conformed grid)."""
    from cohortseg.science.anatomy import check_brain_mask, check_head

    img, warnings = ctx.load_image(path)
    check_head(np.asarray(img.dataobj), img.affine, anatomy, path, warnings, {})
    conf = conform_ras(img, order=order)
    try:
        mask = fallback_brain_mask(np.asarray(conf.dataobj), conf.affine)
    except InputError as e:
        raise InputError(e.reason, path) from None
    check_brain_mask(mask, conf.affine, {**anatomy, "icv_range_ml": [anatomy["icv_range_ml"][0], float("inf")],
                                         "max_sides_touched": 6}, path, warnings, {})
    return img, warnings, conf, mask


def _mni(conf, mask, source: str) -> dict:
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
    if not MNI_DET_RANGE[0] < det < MNI_DET_RANGE[1]:
        out.update(matrix=None, error=f"implausible scaling to MNI152 (det {det:.3f}); registration failed?")
    return out


def _t1_entry(path, ctx: Context, order: int, anatomy: dict, antspyx_mni: bool = True) -> dict:
    """The session T1, conformed, its fallback mask and (unless the deep-T1-WMH nets give it in
    ``predict``) its antspyx affine to MNI152; memoised in the session's Context."""
    key = ("lesion_t1", str(path), order, repr(sorted(anatomy.items())), antspyx_mni)
    if key not in ctx.session:
        img, warnings, conf, mask = _conformed_with_mask(path, ctx, order, anatomy)
        mni = _mni(conf, mask, "T1w") if antspyx_mni else {"matrix": None, "det": None, "from": "T1w", "error": "",
                                                           "tool": DEEP_MNI_TOOL}
        ctx.session[key] = {"img": img, "warnings": warnings, "conf": conf, "mask": mask, "mni": mni}
    return ctx.session[key]


DEEP_MNI_TOOL = "deep-T1-WMH affine net (in predict)"


def _deep_mni_in_predict(folds_aff, pri, prepared: Prepared) -> dict:
    """Arrays for finalize from the head priors and the affine net: the primary image's world -> MNI
    matrix (through the primary -> T1 registration) and the intracranial prior (measured eTIV)."""
    from cohortseg.pipelines.deepwmh import run_folds
    from cohortseg.science.deepwmh import affine_input, mni_matrix

    t1 = prepared.meta["head_t1"]
    params = np.asarray(run_folds(folds_aff, affine_input(pri)[None], 1)[0], float).ravel()
    m_t1 = mni_matrix(params, t1["affine"], t1["shape"])
    to_t1 = np.asarray((prepared.meta.get("registration") or {}).get("swi_to_t1", np.eye(4)), float)
    return {"mni_matrix": m_t1 @ to_t1, "mni_matrix_t1": m_t1, "icv_prior": pri[..., 0].astype(np.float32)}


def _etiv_ml(mni: dict) -> float | None:
    if not mni.get("matrix") or mni.get("from") != "T1w":
        return None
    try:
        from cohortseg.science.brain import template_icv_ml

        return float(template_icv_ml() / mni["det"])
    except Exception:  # noqa: BLE001 - eTIV is a bonus
        return None


# ----------------------------------------------------------------------------------------------
# the plugins
# ----------------------------------------------------------------------------------------------
class _Lesion(Pipeline):
    target = ""  # CMB / WMH
    anatomy = "brain"
    #: SHIVA modality -> input role
    modality_roles: dict = {}
    region_names: tuple = ()

    # -- prepare ---------------------------------------------------------------------------------
    def _choose(self, cards, available: set) -> tuple[list[int], list[str]]:
        """The segmentation cards a session can run: those whose modalities it has, and of those the
        ones using the most modalities (a T1+FLAIR card where the FLAIR exists, a T1-only card listed
        beside it where it does not). Returns (card indices, warnings)."""
        _, seg = split_cards(cards)
        self._channels(cards)  # every modality must be one the pipeline provides
        usable = [i for i in seg if set(card_modalities(cards[i])) <= available]
        if not usable:
            return [], []
        best = max(len(card_modalities(cards[i])) for i in usable)
        chosen = [i for i in usable if len(card_modalities(cards[i])) == best]
        skipped = [cards[i].name for i in seg if i not in chosen]
        warn = [f"models used: {', '.join(cards[i].name for i in chosen)}; not used: {', '.join(skipped)} "
                f"(session has {', '.join(sorted(available))})"] if skipped else []
        return chosen, warn

    def _channels(self, cards, only=None) -> list[str]:
        _, seg = split_cards(cards)
        chans: list[str] = []
        for i in (seg if only is None else only):
            for m in card_modalities(cards[i]):
                if m not in self.modality_roles:
                    raise ModelError(f"model '{cards[i].name}' needs modality '{m}', which the {self.name} pipeline "
                                     f"does not provide (it knows {sorted(self.modality_roles)})")
                if m not in chans:
                    chans.append(m)
        return chans

    def _finish_prepare(self, chans: dict, channels: list, mask: np.ndarray, conf, native_img, meta: dict,
                        extra_arrays: dict | None = None) -> Prepared:
        scales = [robust_scale(np.asarray(chans[c]), mask) for c in channels]
        # only the bounding box of the head (and mask) is stored: ~half of the 256^3 grid
        fg = mask.copy()
        for c, s in zip(channels, scales):
            fg |= np.asarray(chans[c]) > 0.02 * s  # above background noise
        if not fg.any():
            raise InputError("image is empty after conforming to the 1 mm RAS grid")
        lo, hi = bounding_box(fg, margin=4)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        x = np.stack([np.asarray(chans[c], np.float32)[sl] / s for c, s in zip(channels, scales)], axis=-1)
        meta.update({
            "channels": channels, "scales": scales, "x_box": [list(lo), list(hi)],
            "conformed_shape": [CONFORM_SHAPE] * 3, "conformed_affine": np.asarray(conf.affine).tolist(),
            "native_shape": [int(s) for s in native_img.shape[:3]],
            "native_affine": np.asarray(native_img.affine).tolist(),
            "brain_mask_fallback": "otsu-morphology (cohortseg.pipelines.lesion.fallback_brain_mask)",
        })
        return Prepared(x=x[None].astype(np.float16), meta=meta,
                        arrays={"brain_mask": np.packbits(mask.astype(bool)), **(extra_arrays or {})})

    # -- predict ---------------------------------------------------------------------------------
    def predict(self, models, prepared, cards, cfg, batch_size):
        from cohortseg.models import shiva
        from cohortseg.models.ensemble import fold_average

        mask_i, seg = split_cards(cards)
        used = prepared.meta.get("models_used")
        if used is not None:
            seg = [i for i in seg if cards[i].name in used]
        vol = full_volume(prepared)  # (256, 256, 256, C) float32
        channels = prepared.meta["channels"]
        extra = {}
        if mask_i is not None and is_head_card(cards[mask_i]):
            mask, source, pri = head_net_mask(models[mask_i], prepared, vol.shape[:3])
            if pri is not None and deep_mni(cards) and "head_t1" in prepared.meta:
                aff_i = next(i for i, c in enumerate(cards) if is_affine_card(c))
                extra = _deep_mni_in_predict(models[aff_i], pri, prepared)
            if mask is None:
                mask, source = unpack_mask(prepared.arrays["brain_mask"], vol.shape[:3]), "fallback"
            else:
                source = f"model:{cards[mask_i].name} ({source})"
        elif mask_i is not None:
            from cohortseg.science.brain import meshnet_spec

            mask = meshnet_brain_mask(models[mask_i], vol[..., 0], meshnet_spec(cards[mask_i]))
            source = f"model:{cards[mask_i].name}"
        else:
            mask = unpack_mask(prepared.arrays["brain_mask"], vol.shape[:3])
            source = "fallback"
        if not mask.any():
            raise AnatomyError(f"{NOT_BRAIN}: the brain mask is empty")
        box = shiva.crop_box(mask)
        mcrop = shiva.crop(mask, box)
        acc, n = None, 0
        for i in seg:
            idx = [channels.index(m) for m in card_modalities(cards[i])]
            xin = shiva.normalise_p99(shiva.crop(vol[..., idx], box), mcrop)[None]
            folds = models[i]
            p = fold_average([f.predict for f in folds], xin, batch_size).astype(np.float64)
            p = p[..., -1] if p.ndim == 5 else p  # (1, X, Y, Z): the lesion channel
            acc = p * len(folds) if acc is None else acc + p * len(folds)
            n += len(folds)
        prob = (acc / n)[0].astype(np.float16)
        boxarr = np.array([*box.start, *box.shape, *box.centre, box.shift_up], dtype=np.int32)
        return Predicted({"prob": prob, "box": boxarr, "brain_mask": np.packbits(mask.astype(bool)),
                          "mask_source": np.array(source), **extra})

    # -- finalize --------------------------------------------------------------------------------
    def finalize(self, item: Item, prepared: Prepared, prob: Predicted, cards, cfg, ctx: Context,
                 out: OutputWriter) -> dict:
        import nibabel as nib

        from cohortseg.models import shiva
        from cohortseg.science.conform import to_native

        if "box" not in prob:
            raise InputError("inference output lacks the crop box (stale work files? rerun infer)")
        meta = prepared.meta
        t = self.target
        b = [int(v) for v in prob["box"]]
        box = shiva.CropBox(tuple(b[0:3]), tuple(b[3:6]), tuple(b[6:9]), b[9])
        cshape = tuple(meta["conformed_shape"])
        caff = np.asarray(meta["conformed_affine"], float)
        naff = np.asarray(meta["native_affine"], float)
        nshape = tuple(meta["native_shape"])
        p_native = shiva.to_native(np.asarray(prob["prob"], np.float32),
                                   {"box": box.to_dict(), "conformed_shape": list(cshape),
                                    "conformed_affine": caff.tolist(), "native_shape": list(nshape),
                                    "native_affine": naff.tolist()}, order=1)
        p_native = np.clip(p_native, 0.0, 1.0)
        mask_c = unpack_mask(prob["brain_mask"], cshape)
        mask_native = to_native(mask_c.astype(np.uint8), caff, (nshape, naff), order=0) > 0
        mask_source = str(prob.get("mask_source", "fallback"))

        thr = float(cfg.get("threshold", 0.5))
        min_vox = int(cfg.get("min_cluster_voxels", 1))
        max_out = float(cfg.get("max_outside_fraction", 0.25))
        mni = dict(meta.get("mni") or {})
        etiv = meta.get("etiv_ml")
        if "mni_matrix" in prob:  # the deep-T1-WMH affine of the session's T1 (predict), not antspyx
            m = np.asarray(prob["mni_matrix"], float)
            det = float(np.linalg.det(m[:3, :3]))
            mni.update(matrix=m.tolist(), det=det, tool="deep-T1-WMH affine net", error="")
            if not MNI_DET_RANGE[0] < det < MNI_DET_RANGE[1]:
                mni.update(matrix=None, error=f"implausible scaling to MNI152 (det {det:.3f})")
            from cohortseg.science.deepwmh import PRIOR_THRESHOLD, native_prior

            t1 = meta["head_t1"]
            icv = native_prior(np.asarray(prob["icv_prior"], np.float32), t1["affine"], t1["shape"]) > PRIOR_THRESHOLD
            etiv = float(icv.sum()) * abs(float(np.linalg.det(np.asarray(t1["affine"], float)[:3, :3]))) / 1000.0
            mni["etiv_method"] = "deep-T1-WMH head net intracranial prior > 0.5 on the T1's native grid"
        matrix = np.asarray(mni["matrix"], float) if mni.get("matrix") else None
        regions, region_vol = self._regions(nshape, naff, matrix, ctx)
        labels, census = _census(p_native, mask_native, naff, thr, min_vox, max_out, regions, matrix)

        # -- outputs
        n = len(census)
        ldtype = np.uint16 if n < 65535 else np.int32
        out.nifti(f"label-{t}_probseg.nii.gz", p_native.astype(np.float32), naff)
        out.nifti(f"label-{t}_dseg.nii.gz", labels.astype(ldtype), naff)
        out.nifti("desc-brain_mask.nii.gz", mask_native.astype(np.uint8), naff)
        import pandas as pd

        out.table(f"desc-{t}_census.tsv", pd.DataFrame(census, columns=CENSUS_COLUMNS).round(4))
        reg_rows, reg_metrics = self._region_table(census, labels, region_vol, naff)
        out.table(f"desc-{t}_regions.tsv", pd.DataFrame(reg_rows))
        params = {"threshold": thr, "min_cluster_voxels": min_vox, "max_outside_fraction": max_out,
                  "connectivity": 26, "threshold_rule": "prob > threshold (strict), on the native grid"}
        side = {
            "Description": f"{t} lesions (SHIVA 3D U-Net fold ensemble), numbered 1..n in scan order; "
                           "see the census TSV for one row per lesion",
            "Sources": [f"bids:raw:{os.path.basename(p)}" for p in item.inputs.values()],
            "postprocessing": params,
            "models": [{"name": c.name, "folds": [{"file": f["file"], **{k: f[k] for k in ("md5", "sha256") if k in f}}
                                                  for f in c.folds]} for c in cards
                       if is_mask_card(c) or c.name in meta.get("models_used", [c.name])],
            "brain_mask": mask_source if mask_source != "fallback" else meta.get("brain_mask_fallback", "fallback"),
            "crop_box": box.to_dict(),
            "mni": {k: mni.get(k) for k in ("from", "det", "error", "tool", "fixed", "etiv_method")},
            "registration": meta.get("registration", {}),
        }
        from cohortseg.io import write_json_atomic

        sp = out.path(f"label-{t}_dseg.json")
        write_json_atomic(sp, side)
        out.files[f"label-{t}_dseg.json"] = str(sp)

        # -- QC
        native_img = nib.load(item.inputs["image"])
        data = np.asarray(native_img.dataobj, dtype=np.float32)
        if data.ndim > 3:
            data = data.reshape(data.shape[:3] + (-1,))[..., 0]
        self._qc(item, data, naff, labels, mask_native, out)
        out.flags += _flags(mask_native, naff, labels, box, mni, caff)

        metrics = {"count": n, "volume_mm3": round(float(sum(r["volume_mm3"] for r in census)), 3)}
        metrics.update(reg_metrics)
        metrics["brain_mask_ml"] = round(float(mask_native.sum()) * float(abs(np.linalg.det(naff[:3, :3]))) / 1000.0, 3)
        if etiv:
            metrics["etiv_ml"] = round(float(etiv), 1)
        return metrics

    def _qc(self, item, data, aff, labels, mask, out: OutputWriter) -> None:
        from cohortseg.qc.snapshots import lesion_crops, mosaic

        t = self.target
        les = (labels > 0).astype(np.uint8)
        out.snapshot(f"desc-{t}_qc.png", lambda png: mosaic(data, les, aff, png, view="axial", zoom="brain",
                                                             title=f"{item.name} - {t}"))
        out.snapshot(f"desc-{t}_lesions.png", lambda png: lesion_crops(data, labels, aff, png,
                                                                        title=f"{item.name} - {t}"))
        out.snapshot("desc-brain_mask.png", lambda png: mosaic(data, mask.astype(np.uint8), aff, png, view="axial",
                                                               zoom="brain", n=8, title=f"{item.name} - brain mask"))

    def _regions(self, nshape, naff, matrix, ctx: Context):
        return None, None

    def _region_table(self, census, labels, region_vol, aff):
        raise NotImplementedError


def full_volume(prepared: Prepared) -> np.ndarray:
    """The conformed channels (256^3 x C, float32) from the stored head box of ``prepared.x``."""
    x = np.asarray(prepared.x[0])
    shape = tuple(prepared.meta.get("conformed_shape", [CONFORM_SHAPE] * 3))
    box = prepared.meta.get("x_box")
    if box is None:
        return x.astype(np.float32)
    out = np.zeros(shape + x.shape[-1:], np.float32)
    out[tuple(slice(a, b) for a, b in zip(*box))] = x
    return out


def unpack_mask(packed: np.ndarray, shape) -> np.ndarray:
    n = int(np.prod(shape))
    return np.unpackbits(np.asarray(packed, np.uint8), count=n).astype(bool).reshape(tuple(shape))


def meshnet_brain_mask(folds: list, vol_ras: np.ndarray, spec) -> np.ndarray:
    """Brain mask from a brainchop MeshNet (mindgrab) on a conformed RAS volume: reoriented to LIA (the
    MeshNets' training orientation, pure re-indexing), FreeSurfer-like uint8 scaling (0 .. 99.9th
    percentile of the non-zero voxels), brainchop's min-max + crop recipe (:func:`cohortseg.science.brain.run_meshnet`),
    mean of the folds' brain probability > 0.5, largest component with holes filled."""
    import nibabel as nib

    from cohortseg.science.brain import largest_component, run_meshnet

    ras, lia = nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt("LIA")
    to_lia = nib.orientations.ornt_transform(ras, lia)
    back = nib.orientations.ornt_transform(lia, ras)
    v = np.asarray(vol_ras, np.float32)
    pos = v[v > 0]
    hi = float(np.percentile(pos, 99.9)) if pos.size else 1.0
    u8 = np.clip(np.rint(np.clip(v, 0, None) / max(hi, 1e-6) * 255.0), 0, 255).astype(np.uint8)
    u8 = nib.orientations.apply_orientation(u8, to_lia)
    acc = None
    for f in folds:
        model = getattr(f, "model", f)
        p = run_meshnet(model, u8, norm=spec.norm, padding=spec.crop_padding, threshold=spec.crop_threshold)[..., 1]
        acc = p if acc is None else acc + p
    m = largest_component(acc / len(folds) > 0.5)
    return np.ascontiguousarray(nib.orientations.apply_orientation(m, back)).astype(bool)


def head_net_mask(folds, prepared: Prepared, shape) -> tuple:
    """The deep-T1-WMH intracranial mask (prior > 0.5) on the conformed grid of the primary image, from
    the head box of the session's T1 (``prepared.arrays['head_box']``); the primary image's conformed
    grid is put into the T1's world through the rigid primary -> T1 registration (``registration
    ['swi_to_t1']``; identity when the T1 is the primary). Returns (mask, how, head priors); (None, why,
    None) when the session has no T1."""
    if "head_box" not in prepared.arrays:
        return None, "no T1", None
    from cohortseg.pipelines.deepwmh import head_priors
    from cohortseg.science.deepwmh import PRIOR_THRESHOLD, native_prior

    meta = prepared.meta
    to_t1 = np.asarray((meta.get("registration") or {}).get("swi_to_t1", np.eye(4)), float)
    grid = to_t1 @ np.asarray(meta["conformed_affine"], float)
    pri = head_priors(folds, np.asarray(prepared.arrays["head_box"], np.float32)[None, ..., None])
    t1 = meta["head_t1"]
    mask = native_prior(pri[..., 0], t1["affine"], t1["shape"], target=(shape, grid)) > PRIOR_THRESHOLD
    if not mask.any():
        return None, "empty intracranial prior", pri
    how = "intracranial prior of the T1, through the rigid registration" if "swi_to_t1" in (
        meta.get("registration") or {}) else "intracranial prior"
    return mask, how, pri


def _census(prob, mask, aff, thr, min_vox, max_out, regions, matrix):
    """:func:`cohortseg.science.lesions.lesion_census` on the bounding box of the supra-threshold voxels (+1
    voxel): the same clusters, numbering (raster order is kept by a shift), rules and world/MNI
    coordinates, for a fraction of the cost on a whole-head grid. Returns (labels on the full grid,
    census rows with every CENSUS_COLUMNS key, voxel centroids in full-grid indices)."""
    from cohortseg.science.lesions import lesion_census

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
    return labels, _complete_census(census)


def _complete_census(census: list[dict]) -> list[dict]:
    rows = []
    for r in census:
        row = {c: r.get(c, np.nan) for c in CENSUS_COLUMNS}
        if "region" not in r:
            row["region"] = "unassigned"
        rows.append(row)
    return rows


def _flags(mask, naff, labels, box, mni, caff) -> list[str]:
    """QC flags: ``brain_mask_{empty,edge,volume_low,volume_high}``, ``mni_registration_failed``,
    ``lesion_at_crop_edge`` (a lesion voxel within one voxel of the network's field of view)."""
    from cohortseg.qc.outliers import sanity_flags

    flags = [f"brain_mask_{f}" for f in sanity_flags(mask, naff, BRAIN_MASK_RANGE_MM3)]
    if mni.get("error") or not mni.get("matrix"):
        flags.append("mni_registration_failed")
    if labels.any():
        # a lesion touching the network's field of view (the crop box) may be cut
        ijk = np.argwhere(labels > 0)
        world = ijk @ naff[:3, :3].T + naff[:3, 3]
        c = np.linalg.inv(caff)
        cv = world @ c[:3, :3].T + c[:3, 3]
        lo = np.array(box.start) + 0.5
        hi = np.array(box.start) + np.array(box.shape) - 1.5
        if ((cv < lo) | (cv > hi)).any():
            flags.append("lesion_at_crop_edge")
    return flags


def _mask_methods(cards, primary: str) -> dict:
    mask_i, _ = split_cards(cards)
    if mask_i is not None and is_head_card(cards[mask_i]):
        how = (f"{cards[mask_i].name}: deep-T1-WMH head net intracranial prior of the session's T1 (through the "
               f"{primary} -> T1 rigid registration); sessions without a T1: otsu-morphology fallback")
    elif mask_i is not None:
        how = f"{cards[mask_i].name} (brainchop MeshNet on the {primary})"
    else:
        how = "otsu-morphology fallback (cohortseg.pipelines.lesion.fallback_brain_mask)"
    return {"brain_mask": how}


def _mni_methods(cards, primary: str) -> dict:
    if deep_mni(cards):
        return {"mni_affine": f"deep-T1-WMH head + affine nets on the session's T1 (through the {primary} -> T1 "
                              "registration); sessions without a T1: antspyx affine of the primary image",
                "etiv": "deep-T1-WMH head net intracranial prior > 0.5 on the T1's native grid"}
    return {"mni_affine": "antspyx affine to MNI152 (T1 when the session has one)",
            "etiv": "atlas scaling (MNI152 ICV / det of the antspyx affine of the T1)"}


__all__ = ["conform_ras", "fallback_brain_mask", "meshnet_brain_mask", "unpack_mask", "split_cards", "card_modalities",
           "is_mask_card"]
