"""Brain tissue (``brain_tissue``, T1w): brain mask, GM/WM/CSF, 18 subcortical labels, volumes and eTIV
with brainchop's MeshNets. The science lives in :mod:`cohortseg.science.brain` (nets, clean-up, volumes,
eTIV) and :mod:`cohortseg.science.conform` (FreeSurfer-style conform and the way back); this module wires
it into the three steps.

``prepare`` (CPU, per session)
    :func:`cohortseg.io.load_image` checks (bad data -> InputError), then
    :func:`cohortseg.science.conform.conform` to the cards' grid (256^3, 1 mm, LIA, uint8: uint8 inputs keep
    their values, others get FreeSurfer's robust [0, 255] scaling; ``interpolation`` cubic/linear).
    ``x`` = the conformed volume cut to its non-zero bounding box (uint8, ~10 MB);
    ``meta`` = the conform info (native grid, conformed affine) + that box.
``predict`` (GPU, per shard)
    The three MeshNets one after the other, each layer by layer
    (:func:`cohortseg.science.brain.run_meshnet_crop`: two activations alive at a time), folds of a card
    averaged: (1) brain mask (card ``task: brain_mask``, mindgrab; brain probability > 0.5, largest
    component, holes filled); (2) GM/WM (``task: tissue``, model5_gw_ae) with the white-matter
    rescaling of :func:`cohortseg.science.brain.wm_gain` (``wm_target``), largest foreground
    component, then :func:`cohortseg.science.brain.tissue_dseg` (1 GM, 2 WM, 3 CSF = mask minus GM/WM);
    (3) 18 classes (``task: aseg``, model30chan18cls), largest foreground component, masked.
    Nets (2) and (3) run on the bounding box of the brain mask plus their padding of context
    (``crop: brain_mask``; ``head`` = brainchop's head box): on brainchop's t1_crop 2x faster, half
    the memory, per-structure Dice >= 0.98 and GM/WM volumes within 2 % of the head-box run.
    Returns compact arrays, all cut to the brain mask's bounding box ``box`` (6 int32, lo + hi in
    the conformed grid; nothing is non-zero outside it): ``brain_mask``, ``tissue``, ``aseg``
    (uint8), ``prob_gm``, ``prob_wm`` (float16, zero outside the mask) and ``info`` (JSON).
``finalize`` (CPU, per session)
    Volumes in the conformed 1 mm grid (the nets' own voxels, as FreeSurfer reports them);
    maps back to the native grid (:func:`crop_to_native`: labels by trilinear resampling of each
    label's indicator + argmax, probabilities trilinear, only over the native sub-grid the box
    covers); outputs ``desc-brain_mask``, ``dseg`` (+ ``dseg.tsv``), ``desc-aseg_dseg`` (+ tsv),
    ``label-GM_probseg``, ``label-WM_probseg``, ``desc-tissue_volumes.tsv`` (+ json, one row, the
    cohort's ``group/tissue_volumes.csv``); eTIV (:func:`cohortseg.science.brain.estimate_etiv` on the
    conformed T1 with the brain mask) with a registration QC figure; QC mosaics; sanity flags.

Learned intracranial mask (card ``deepwmh_head``, in the default ``models``)
    The deep-T1-WMH head net (:mod:`cohortseg.models.nets.deepwmh_torch`; ~1 s on a CPU) runs first, on the
    64^3 head box ``prepare`` makes from the *native* T1 as the upstream program does. Its intracranial
    prior, resampled onto the conformed grid, is the crop of the brain-mask MeshNet (its bounding box
    plus the net's padding, instead of brainchop's head box; ``fast_crop: false`` turns that off), and
    in ``finalize``, resampled onto the native grid and thresholded at 0.5, the measured eTIV
    ``etiv_icv_ml`` and ``desc-ICV_mask.nii.gz``, next to the atlas-scaling ``etiv_ml``. The sidecar
    records both methods (``etiv``, ``etiv_icv``) and the crop used (``brain_mask_crop``).
"""
from __future__ import annotations

import itertools
import json
import logging
import time

import numpy as np

from cohortseg.errors import AnatomyError, InputError, ModelError
from cohortseg.pipelines.base import Context, Item, OutputWriter, Pipeline, Predicted, Prepared, Role
from cohortseg.schema import with_defaults
from cohortseg.science.metrics import bounding_box
from cohortseg.science.anatomy import NOT_BRAIN, check_brain_mask, check_head, limits

log = logging.getLogger("cohortseg")

#: parts a card can play (its ``task``, else its MeshNet's role), in the order they run
ROLES = ("brain_mask", "tissue", "aseg")
#: the optional deep-T1-WMH head net (card ``deepwmh_head``): runs first, in about a second on a CPU
ICV_ROLE = "intracranial_mask"
#: aseg classes summed into ``ventricles_ml`` ("Ventricles": one class for all, the 7T protocol of
#: config/train/brain_tissue_7t.yaml)
VENTRICLES = ("Lateral-Ventricle", "Inferior-Lateral-Ventricle", "3rd-Ventricle", "4th-Ventricle", "Ventricles")
#: plausible WM / (GM + WM) (adults ~0.40-0.50); outside it the session is flagged
WM_FRACTION_RANGE = (0.25, 0.65)
#: plausible brain mask / eTIV (t1_crop: 1.08); outside it the session is flagged
MASK_ETIV_RANGE = (0.7, 1.3)
_ORDER = {"cubic": 3, "linear": 1}


# ----------------------------------------------------------------------------------------------
# cards
# ----------------------------------------------------------------------------------------------
def card_roles(cards) -> dict:
    """{role: (card index, MeshNetSpec)}; ModelError when a role is doubled, unknown or the mask is missing."""
    from cohortseg.models.lesion_cards import card_net
    from cohortseg.science.brain import meshnet_spec

    out: dict = {}
    for i, card in enumerate(cards):
        net = card_net(card)
        if net is not None:  # the deep-T1-WMH head net: intracranial mask, measured eTIV, fast crop
            if net != "head":
                raise ModelError(f"model '{card.name}': of the deep-T1-WMH networks brain_tissue uses only the "
                                 f"head net (intracranial prior), not '{net}'")
            if ICV_ROLE in out:
                raise ModelError(f"brain_tissue.models has two intracranial-mask models ({cards[out[ICV_ROLE][0]].name}, "
                                 f"{card.name})")
            out[ICV_ROLE] = (i, None)
            continue
        if card["architecture"].get("loader") != "tfjs_layers":
            raise ModelError(f"model '{card.name}': brain_tissue runs brainchop MeshNets (loader tfjs_layers), "
                             f"not {card['architecture'].get('loader')!r}")
        spec = meshnet_spec(card)
        role = card.get("task") or spec.role
        if role not in ROLES:
            raise ModelError(f"model '{card.name}': task {role!r} is not one of {', '.join(ROLES)}")
        if role in out:
            raise ModelError(f"brain_tissue.models has two '{role}' models ({cards[out[role][0]].name}, {card.name}); "
                             "list several folds in one card to average them")
        out[role] = (i, spec)
    if "brain_mask" not in out:
        raise ModelError("brain_tissue.models needs a brain-mask model (task: brain_mask, e.g. brainchop_mindgrab): "
                         "it defines the CSF, the crop of the other nets and the eTIV skull strip")
    return out


def _grid(cards) -> dict:
    from cohortseg.models.lesion_cards import card_net

    cards = [c for c in cards if card_net(c) is None]  # the head net makes its own box from the native T1
    grids = {json.dumps(c.get("grid") or {}, sort_keys=True) for c in cards}
    if len(grids) > 1:
        raise ModelError(f"brain_tissue models disagree on the grid: {sorted(grids)}")
    g = cards[0].get("grid") or {}
    shape = [int(s) for s in g.get("conform_shape", [256, 256, 256])]
    if len(set(shape)) != 1:
        raise ModelError(f"conform_shape must be a cube, got {shape}")
    return {"shape": shape[0], "voxel_mm": float(g.get("voxel_mm", 1.0)), "orientation": str(g.get("orientation", "LIA"))}


# ----------------------------------------------------------------------------------------------
# geometry helpers
# ----------------------------------------------------------------------------------------------
def _slices(lo, hi) -> tuple[slice, ...]:
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def conformed_volume(prepared: Prepared) -> np.ndarray:
    """The whole conformed uint8 volume from the stored bounding box of ``prepared.x``."""
    shape = (int(prepared.meta["grid"]["shape"]),) * 3
    out = np.zeros(shape, np.uint8)
    lo, hi = prepared.meta["x_box"]
    out[_slices(lo, hi)] = np.asarray(prepared.x).reshape(tuple(b - a for a, b in zip(lo, hi)))
    return out


def _shift(offset) -> np.ndarray:
    m = np.eye(4)
    m[:3, 3] = offset
    return m


def crop_to_native(crop: np.ndarray, lo, conformed_affine, native, kind: str = "prob", pad: int = 2) -> np.ndarray:
    """Map a crop of the conformed grid (its first voxel at conformed index ``lo``; zero outside) onto
    the native grid ``native = (shape, affine)``, resampling only the native voxels the crop covers.

    kind 'labels': :func:`cohortseg.science.conform.labels_to_native` (trilinear indicator per label + argmax,
    dtype kept); 'prob': trilinear, float32. The crop is zero-padded by ``pad`` voxels first, so a
    native voxel near its edge sees the background it really has."""
    from cohortseg.science.conform import labels_to_native, to_native

    nshape, naff = tuple(int(s) for s in native[0][:3]), np.asarray(native[1], float)
    crop = np.pad(np.asarray(crop), pad)
    caff = np.asarray(conformed_affine, float) @ _shift(np.asarray(lo, float) - pad)
    corners = np.array(list(itertools.product(*[(-1.0, float(s)) for s in crop.shape])))
    c2n = np.linalg.inv(naff) @ caff
    nv = corners @ c2n[:3, :3].T + c2n[:3, 3]
    nlo = np.maximum(np.floor(nv.min(0)).astype(int) - 1, 0)
    nhi = np.minimum(np.ceil(nv.max(0)).astype(int) + 2, nshape)
    out = np.zeros(nshape, crop.dtype if kind == "labels" else np.float32)
    if np.any(nhi <= nlo):
        return out  # the crop lies outside the native field of view
    sub = (tuple(int(s) for s in nhi - nlo), naff @ _shift(nlo))
    if kind == "labels":
        res = labels_to_native(crop, caff, sub)
    elif kind == "prob":
        res = to_native(crop.astype(np.float32), caff, sub, order=1)
    else:
        raise ValueError(f"kind must be 'labels' or 'prob', got {kind!r}")
    out[_slices(nlo, nhi)] = res
    return out


# ----------------------------------------------------------------------------------------------
# the plugin
# ----------------------------------------------------------------------------------------------
class BrainTissue(Pipeline):
    name = "brain_tissue"
    anatomy = "brain"
    description = ("Brain mask, GM/WM/CSF and 18 subcortical labels of a T1w with brainchop MeshNets "
                   "(mindgrab, model5_gw_ae, model30chan18cls) on a FreeSurfer-conformed grid; volumes and eTIV")
    roles = {"image": Role(description="T1-weighted head (any grid; conformed to 256^3 1 mm)")}
    group_tables = {"tissue_volumes.csv": "desc-tissue_volumes.tsv"}

    def methods(self, cards, cfg):
        roles, cfg = card_roles(cards), with_defaults(self.name, cfg)
        out = {"brain_mask": cards[roles["brain_mask"][0]].name,
               "etiv": "atlas scaling (antspyx affine to MNI152, brain-masked)" if cfg["etiv"] else "off"}
        if ICV_ROLE in roles:
            from cohortseg.science.deepwmh import ICV_METHOD

            out["etiv_icv"] = ICV_METHOD
            out["brain_mask_crop"] = ("deep-T1-WMH intracranial mask box" if cfg["fast_crop"]
                                      else "brainchop head box")
        return out

    # -- prepare ---------------------------------------------------------------------------------
    def prepare(self, item: Item, cards: list, cfg: dict, ctx: Context) -> Prepared:
        import nibabel as nib

        from cohortseg.science.conform import conform

        card_roles(cards)  # a bad model list fails here, before any GPU time is spent
        cfg = with_defaults(self.name, cfg)
        path = item.inputs["image"]
        img, warnings = ctx.load_image(path)
        data = np.asarray(img.dataobj)
        checks: dict = {}
        # a cord scan is refused here in a second, before minutes of MeshNets
        check_head(data, img.affine, limits(self.name, cfg), path, warnings, checks)
        stored = nib.load(str(path)).get_data_dtype()
        if stored == np.uint8 and data.min() >= 0 and data.max() <= 255 and np.array_equal(data, np.rint(data)):
            # FreeSurfer keeps the values of uint8 images (e.g. an already conformed T1): so do we
            img = nib.Nifti1Image(data.astype(np.uint8), img.affine)
        grid = _grid(cards)
        conformed, info = conform(img, shape=grid["shape"], voxel_mm=grid["voxel_mm"], orientation=grid["orientation"],
                                  order=_ORDER[cfg["interpolation"]], snap=cfg["snap_to_native"])
        if info["fov_clipped"]:
            warnings.append(f"field of view larger than the {grid['shape']} mm conformed cube: what lies outside "
                            "it is not segmented")
        vol = np.asarray(conformed.dataobj)
        fg = vol > 0
        if not fg.any():
            raise InputError("image is empty after conforming to the 1 mm grid", path)
        lo, hi = bounding_box(fg)
        x = np.ascontiguousarray(vol[_slices(lo, hi)])[None, ..., None]
        meta = {"conform": info, "grid": grid, "x_box": [lo, hi], "warnings": warnings, "checks": checks}
        arrays = {}
        if ICV_ROLE in card_roles(cards):  # the head net's input, from the native T1 as upstream makes it
            from cohortseg.science.deepwmh import head_box, zscore

            native = np.asarray(img.dataobj, np.float32)
            arrays["head_box"] = head_box(zscore(native), img.affine)
            meta["native"] = {"affine": np.asarray(img.affine).tolist(), "shape": [int(v) for v in native.shape[:3]]}
        return Prepared(x=x, meta=meta, arrays=arrays)

    # -- predict ---------------------------------------------------------------------------------
    def predict(self, models, prepared, cards, cfg, batch_size):
        roles, cfg = card_roles(cards), with_defaults(self.name, cfg)
        vol = conformed_volume(prepared)
        info: dict = {"crop": cfg["crop"], "models": {r: cards[i].name for r, (i, _) in roles.items()},
                      "boxes": {}, "seconds": {}}
        clock = _Clock(info["seconds"])
        out: dict = {}
        # 0. the deep-T1-WMH intracranial prior: the crop of the mask net and, in finalize, the measured eTIV
        mask_crop = _icv_crop(models, roles, prepared, vol.shape, cfg, out)
        if "icv_prior" in out:
            clock(ICV_ROLE)
        info["brain_mask_crop"] = ("deep-T1-WMH intracranial mask + padding" if mask_crop else
                                   "head box (intensity threshold, brainchop)")
        # 1. brain mask (mindgrab) on that box; brain probability > 0.5, largest component
        mask, box = _brain_mask(models, roles, vol, mask_crop)
        info["boxes"]["brain_mask"] = _box_list(box)
        clock("brain_mask")
        lo, hi = bounding_box(mask)
        mbox = _slices(lo, hi)
        out.update({"box": np.array(lo + hi, np.int32), "brain_mask": mask[mbox].astype(np.uint8)})
        # 2. GM/WM with the white-matter-anchored input gain (brain.wm_gain)
        if "tissue" in roles:
            out.update(_tissue(models, roles, vol, mask, mbox, cfg, info))
            clock("tissue")
        # 3. the 18 classes: brainchop's plain recipe (gain-insensitive net)
        if "aseg" in roles:
            # a net trained on brain-masked input (cohortseg.training.brain3d bundles) gets the masked volume
            masked = (cards[roles["aseg"][0]].get("normalisation") or {}).get("brain_masked")
            out["aseg"] = _aseg(models, roles, np.where(mask, vol, 0) if masked else vol, mask, mbox, cfg, info)
            clock("aseg")
        out["info"] = np.array(json.dumps(info))
        return Predicted(out)

    # -- finalize --------------------------------------------------------------------------------
    def finalize(self, item: Item, prepared: Prepared, prob: Predicted, cards, cfg, ctx: Context,
                 out: OutputWriter) -> dict:
        import nibabel as nib

        cfg = with_defaults(self.name, cfg)
        if "box" not in prob or "brain_mask" not in prob:
            raise InputError("inference output lacks the brain_tissue arrays (stale work files? rerun infer)")
        caff = np.asarray(prepared.meta["conform"]["conformed_affine"], float)
        lo = [int(v) for v in prob["box"]][:3]
        info = json.loads(str(prob["info"])) if "info" in prob else {}
        native = nib.load(item.inputs["image"])
        naff = np.asarray(native.affine, float)
        mask_c = np.asarray(prob["brain_mask"]).astype(bool)
        # volumes, in the conformed 1 mm grid (exact label counts of the nets' output)
        vols = conformed_volumes(mask_c, prob.get("tissue"), prob.get("aseg"), caff, info.get("aseg_labels"))
        mask_n, tissue_n, aseg_n = _native_outputs(prob, lo, caff, (tuple(native.shape[:3]), naff), info, out)
        etiv = {}
        if cfg["etiv"]:  # atlas scaling on the conformed T1, skull-stripped by the brain mask
            etiv = self._etiv(item, prepared, mask_c, lo, caff, out)
            if "etiv_ml" in etiv:
                vols["etiv_ml"] = etiv["etiv_ml"]
        icv_info = _icv_output(prob, native, vols, out)
        metrics = {k: round(float(v), 3) for k, v in vols.items()}
        if "tissue" in info:
            metrics["wm_gain"] = round(float(info["tissue"]["gain"]), 4)
        _volume_table(metrics, native, cards, info, prepared.meta, etiv, icv_info, out)
        data = np.asarray(native.dataobj, dtype=np.float32)
        if data.ndim > 3:
            data = data.reshape(data.shape[:3] + (-1,))[..., 0]
        self._qc(item, data, naff, mask_n, tissue_n, aseg_n, out)
        out.flags += self._flags(mask_n, naff, vols, cfg, etiv)
        # a plausible intracranial volume, not touching the field of view on most sides, or refused
        check_brain_mask(mask_n, naff, limits(self.name, cfg), item.inputs["image"], out.flags, out.checks)
        return metrics

    # -- helpers ---------------------------------------------------------------------------------
    def _etiv(self, item, prepared, mask_c, lo, caff, out: OutputWriter) -> dict:
        """eTIV from the conformed T1 + brain mask; a failure is a flag, not a failed session."""
        import nibabel as nib

        from cohortseg.science.brain import estimate_etiv

        vol = conformed_volume(prepared)
        mask = np.zeros(vol.shape, np.uint8)
        mask[_slices(lo, np.asarray(lo) + mask_c.shape)] = mask_c
        t1 = nib.Nifti1Image(vol, caff)
        try:
            e = estimate_etiv(t1, mask)
        except Exception as ex:  # noqa: BLE001 - eTIV is one measure among many
            log.warning("%s: eTIV failed: %s", item.session_key, ex)
            return {"error": f"{type(ex).__name__}: {ex}"}
        res = {"etiv_ml": e["etiv_ml"], "det": e["det"], "template_icv_ml": e["template_icv_ml"],
               "matrix": e["matrix"], "method": e["method"]}
        try:
            self._registration_qc(item, vol, mask, caff, e["matrix"], out)
        except Exception as ex:  # noqa: BLE001 - a figure must not fail the session
            log.warning("%s: registration QC figure failed: %s", item.session_key, ex)
        return res

    @staticmethod
    def _registration_qc(item, vol, mask, caff, matrix, out: OutputWriter) -> None:
        import nibabel as nib

        from cohortseg.science import registration
        from cohortseg.io import atomic_path
        from cohortseg.qc.snapshots import registration_check

        tpl, _ = registration.mni_template(2)
        stripped = nib.Nifti1Image(vol.astype(np.float32) * mask, caff)
        moved = registration.apply(registration.LinearTransform(np.asarray(matrix, float)), stripped,
                                   reference=tpl, interpolation="linear")
        with atomic_path(out.figure_path("desc-MNI_regcheck.png")) as tmp:
            registration_check(moved, tpl, tmp, title=f"{item.name} -> MNI152 (eTIV affine): template edges")

    @staticmethod
    def _qc(item, data, aff, mask, tissue, aseg, out: OutputWriter) -> None:
        from cohortseg.io import atomic_path
        from cohortseg.qc.snapshots import mosaic

        main = tissue if tissue is not None else mask.astype(np.uint8)
        what = "GM/WM/CSF" if tissue is not None else "brain mask"
        # the one snapshot with a thumbnail: the QC page shows it
        # filled: with outlines the GM ribbon's contour hides under the WM and CSF ones
        out.snapshot("desc-tissue_qc.png", lambda png: mosaic(data, main, aff, png, view="axial", zoom="brain",
                                                               contour=False, title=f"{item.name} - {what}"))
        if aseg is not None:
            with atomic_path(out.figure_path("desc-aseg_mosaic.png")) as tmp:
                mosaic(data, aseg, aff, tmp, view="coronal", zoom="brain", contour=False,
                       title=f"{item.name} - subcortical (18 classes)")

    @staticmethod
    def _flags(mask, aff, vols, cfg, etiv) -> list[str]:
        from cohortseg.qc.outliers import sanity_flags

        lo_ml, hi_ml = cfg["brain_mask_range_ml"]
        flags = [f"brain_mask_{f}" for f in sanity_flags(mask, aff, (lo_ml * 1000.0, hi_ml * 1000.0))]
        if vols.get("brain_ml"):
            frac = vols["wm_ml"] / vols["brain_ml"]
            if not WM_FRACTION_RANGE[0] <= frac <= WM_FRACTION_RANGE[1]:
                flags.append("wm_fraction_implausible")
        if cfg["etiv"]:
            if "etiv_ml" not in etiv:
                flags.append("etiv_failed")
            elif not MASK_ETIV_RANGE[0] <= vols["brain_mask_ml"] / etiv["etiv_ml"] <= MASK_ETIV_RANGE[1]:
                flags.append("brain_mask_etiv_mismatch")
        return flags


class _Clock:
    """Wall seconds of each step of predict into ``seconds[step]``, CPU seconds (all threads of the
    process) into ``seconds['cpu'][step]``: on a shared machine the CPU time is the steadier figure."""

    def __init__(self, seconds: dict):
        self.seconds, self.t0, self.c0 = seconds, time.perf_counter(), time.process_time()
        seconds["cpu"] = {}

    def __call__(self, step: str) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        self.seconds[step], self.seconds["cpu"][step] = round(now - self.t0, 2), round(cpu - self.c0, 2)
        self.t0, self.c0 = now, cpu


def _icv_crop(models, roles, prepared, shape, cfg, out: dict) -> dict:
    """The deep-T1-WMH head net on the native T1's head box: its intracranial prior goes into ``out``
    (``icv_prior``, for the measured eTIV); returns the brain-mask net's crop ({'mask': prior > 0.5 on the
    conformed grid}, or {} for brainchop's head box)."""
    if ICV_ROLE not in roles or "head_box" not in prepared.arrays:
        return {}
    from cohortseg.models.nets.deepwmh_torch import head_priors
    from cohortseg.science.deepwmh import PRIOR_THRESHOLD, native_prior

    pri = head_priors(models[roles[ICV_ROLE][0]], np.asarray(prepared.arrays["head_box"])[None, ..., None])
    nat = prepared.meta["native"]
    caff = np.asarray(prepared.meta["conform"]["conformed_affine"], float)
    out["icv_prior"] = pri[..., 0].astype(np.float32)
    if not cfg["fast_crop"]:
        return {}
    icv = native_prior(pri[..., 0], nat["affine"], nat["shape"], target=(shape, caff)) > PRIOR_THRESHOLD
    return {"mask": icv} if icv.any() else {}


def _brain_mask(models, roles, vol, mask_crop: dict):
    """(brain mask on the conformed grid, the box the net ran on): brain probability > 0.5, largest component."""
    from cohortseg.science.metrics import largest_component

    i, spec = roles["brain_mask"]
    box, p = _run_folds(models[i], vol, spec, **mask_crop)
    mask = np.zeros(vol.shape, bool)
    mask[box] = p[..., 1] > 0.5
    del p
    mask = largest_component(mask)
    if not mask.any():
        raise AnatomyError(f"{NOT_BRAIN}: the brain mask is empty")
    return mask, box


def _crop_kw(spec, mask, cfg) -> dict:
    if cfg["crop"] == "head":
        return {"padding": spec.crop_padding, "threshold": spec.crop_threshold}
    return {"padding": spec.crop_padding, "mask": mask}


def _tissue(models, roles, vol, mask, mbox, cfg, info) -> dict:
    """GM/WM net with the WM-anchored gain: {'tissue' (1 GM, 2 WM, 3 CSF), 'prob_gm', 'prob_wm'} on the
    mask's box ``mbox`` (probabilities float16, zero outside the mask)."""
    from cohortseg.science import brain

    i, spec = roles["tissue"]
    names = [n.lower() for n in spec.labels]
    wm_i = next(k for k, n in enumerate(names) if n.startswith("white"))
    gm_i = next(k for k, n in enumerate(names) if n.startswith("gr"))
    level, gain = brain.wm_gain(_model(models[i][0]), vol, spec, cfg["wm_target"])
    box, p = _run_folds(models[i], vol, spec, gain=gain, **_crop_kw(spec, mask, cfg))
    gw = np.zeros(vol.shape, np.uint8)
    gw[box] = brain.argmax(p)
    out = {}
    inside = mask[mbox]
    for key, k in (("prob_gm", gm_i), ("prob_wm", wm_i)):
        full = np.zeros(vol.shape, np.float16)
        full[box] = p[..., k]
        out[key] = (full[mbox] * inside).astype(np.float16)
    del p
    out["tissue"] = brain.tissue_dseg(brain.keep_largest_foreground(gw), mask, spec.labels)[mbox]
    info["tissue"] = {"wm_level": level, "gain": gain, "wm_target": cfg["wm_target"]}
    info["boxes"]["tissue"] = _box_list(box)
    return out


def _aseg(models, roles, vol, mask, mbox, cfg, info) -> np.ndarray:
    """The 18-class net on the mask's box ``mbox``: largest foreground component, zero outside the mask."""
    from cohortseg.science import brain

    i, spec = roles["aseg"]
    gain = info.get("tissue", {}).get("gain", 1.0) if brain.ASEG_USES_WM_GAIN else 1.0
    box, p = _run_folds(models[i], vol, spec, gain=gain, **_crop_kw(spec, mask, cfg))
    a = np.zeros(vol.shape, np.uint8)
    a[box] = brain.argmax(p)
    del p
    a = brain.keep_largest_foreground(a)
    a[~mask] = 0
    info["aseg_labels"] = list(spec.labels)
    info["boxes"]["aseg"] = _box_list(box)
    return a[mbox]


def _native_outputs(prob, lo, caff, grid, info, out: OutputWriter):
    """The maps on the native grid ``grid = (shape, affine)``: brain mask, dseg (+ tsv), GM/WM probseg,
    aseg (+ tsv); returns (mask, tissue, aseg) there (None for a part that did not run)."""
    from cohortseg.science import brain

    naff = grid[1]
    mask_n = crop_to_native(np.asarray(prob["brain_mask"], np.float32), lo, caff, grid, "prob") > 0.5
    out.nifti("desc-brain_mask.nii.gz", mask_n.astype(np.uint8), naff)
    tissue_n = aseg_n = None
    if "tissue" in prob:
        tissue_n = crop_to_native(np.asarray(prob["tissue"]), lo, caff, grid, "labels")
        tissue_n[~mask_n] = 0
        tissue_n[mask_n & (tissue_n == 0)] = 3  # CSF = mask minus GM/WM, as in the conformed grid
        out.nifti("dseg.nii.gz", tissue_n.astype(np.uint8), naff)
        out.table("dseg.tsv", brain.dseg_table(brain.TISSUE_DSEG))
        for label in ("GM", "WM"):
            p = np.clip(crop_to_native(np.asarray(prob[f"prob_{label.lower()}"], np.float32), lo, caff, grid,
                                       "prob"), 0.0, 1.0) * mask_n
            out.nifti(f"label-{label}_probseg.nii.gz", p.astype(np.float32), naff)
            del p
    if "aseg" in prob:
        aseg_n = crop_to_native(np.asarray(prob["aseg"]), lo, caff, grid, "labels")
        aseg_n[~mask_n] = 0
        out.nifti("desc-aseg_dseg.nii.gz", aseg_n.astype(np.uint8), naff)
        out.table("desc-aseg_dseg.tsv", brain.dseg_table(_aseg_table(info.get("aseg_labels"))))
    return mask_n, tissue_n, aseg_n


def _icv_output(prob, native, vols: dict, out: OutputWriter) -> dict:
    """Measured eTIV: the head net's intracranial prior > 0.5 on the native grid (desc-ICV_mask,
    ``vols['etiv_icv_ml']``); the sidecar's ``etiv_icv`` entry ({} without the head net)."""
    if "icv_prior" not in prob:
        return {}
    from cohortseg.science.deepwmh import ICV_METHOD, PRIOR_THRESHOLD, native_prior

    naff = np.asarray(native.affine, float)
    icv_n = native_prior(np.asarray(prob["icv_prior"], np.float32), naff, tuple(native.shape[:3])) > PRIOR_THRESHOLD
    out.nifti("desc-ICV_mask.nii.gz", icv_n.astype(np.uint8), naff)
    vols["etiv_icv_ml"] = float(icv_n.sum()) * abs(float(np.linalg.det(naff[:3, :3]))) / 1000.0
    return {"method": ICV_METHOD, "file": "desc-ICV_mask.nii.gz"}


def _volume_table(metrics, native, cards, info, meta, etiv, icv_info, out: OutputWriter) -> None:
    """desc-tissue_volumes.tsv (one row) and its sidecar."""
    import pandas as pd

    out.table("desc-tissue_volumes.tsv", pd.DataFrame([metrics]))
    side = {
        "Description": "Volumes (mL) in the conformed 256^3 1 mm grid the networks ran on (label counts); "
                       "brain_mask_ml = mindgrab mask (brain + CSF), brain_ml = GM + WM, csf_ml = mask minus "
                       "GM/WM, ventricles_ml = " + " + ".join(VENTRICLES) + ", aseg_<structure>_ml = "
                       "18-class net, etiv_ml = atlas-scaling eTIV (MNI152 ICV / det(affine)), etiv_icv_ml = measured "
                       "intracranial volume (deep-T1-WMH head net, desc-ICV_mask, native grid), wm_gain = "
                       "white-matter rescaling of the GM/WM net's input (1 = none)",
        "models": [{"name": c.name, "task": c.get("task"),
                    "folds": [{"file": f["file"], "sha256": f.get("sha256")} for f in c.folds]} for c in cards],
        "inference": info,
        "conform": {k: meta["conform"].get(k) for k in ("native_orientation", "native_zooms", "intensity_rescaled",
                                                         "interpolation_order", "fov_clipped")},
        "etiv": {k: v for k, v in etiv.items() if k != "etiv_ml"},
        "etiv_icv": icv_info,
        "brain_mask_crop": info.get("brain_mask_crop"),
    }
    out.sidecar("desc-tissue_volumes.json", side)


def conformed_volumes(mask, tissue, aseg, affine, aseg_labels=None) -> dict[str, float]:
    """Volumes (mL) from the conformed-grid crops: brain_mask_ml, gm/wm/csf/brain_ml (tissue),
    ventricles_ml + aseg_<structure>_ml (aseg)."""
    from cohortseg.science.brain import ASEG18_LABELS, TISSUE_LABELS, metric_name, tissue_volumes, voxel_volume_ml

    vols = {"brain_mask_ml": float(np.count_nonzero(mask)) * voxel_volume_ml(affine)}
    if tissue is not None:
        tv = tissue_volumes(tissue, TISSUE_LABELS, affine)
        vols.update({"gm_ml": tv["GM"], "wm_ml": tv["WM"], "csf_ml": tv["CSF"], "brain_ml": tv["GM"] + tv["WM"]})
    if aseg is not None:
        av = tissue_volumes(aseg, list(aseg_labels or ASEG18_LABELS), affine)
        vols["ventricles_ml"] = sum(av.get(n, 0.0) for n in VENTRICLES)
        vols.update({f"aseg_{metric_name(n)}_ml": v for n, v in av.items()})
    return vols


def _aseg_table(labels):
    from cohortseg.science.brain import ASEG18_DSEG

    if not labels or tuple(labels) == tuple(t[1] for t in ASEG18_DSEG):
        return ASEG18_DSEG
    return tuple((i, n, n) for i, n in enumerate(labels))


def _model(fold):
    return getattr(fold, "model", fold)


def _box_list(box) -> list[list[int]]:
    return [[int(s.start) for s in box], [int(s.stop) for s in box]]


def _run_folds(folds, vol, spec, gain: float = 1.0, padding: int | None = None, threshold: float | None = None,
               mask=None):
    """(box, mean softmax of the folds on the box) with :func:`cohortseg.science.brain.run_meshnet_crop` (layer by
    layer; one fold's activations alive at a time)."""
    from cohortseg.science.brain import run_meshnet_crop

    kw = {"norm": spec.norm, "padding": spec.crop_padding if padding is None else padding,
          "threshold": spec.crop_threshold if threshold is None else threshold, "mask": mask, "gain": gain}
    box, acc = None, None
    for fold in folds:
        b, p = run_meshnet_crop(_model(fold), vol, **kw)
        if acc is None:
            box, acc = b, p
        else:
            acc += p
        del p
    if len(folds) > 1:
        acc /= len(folds)
    return box, acc


__all__ = ["BrainTissue", "card_roles", "crop_to_native", "conformed_volume", "conformed_volumes"]
