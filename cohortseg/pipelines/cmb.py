"""Cerebral microbleeds on SWI (+ T1): the ``cmb`` plugin, and :class:`ShivaLesions`, the SHIVA lesion
pipeline it shares with ``wmh``'s T1 [+ FLAIR] path (:mod:`cohortseg.pipelines.wmh`), with the SHIVA 3D
U-Nets (Boutinaud et al.), following the SHIVA contract of :mod:`cohortseg.models.shiva`. The science
is in :mod:`cohortseg.science.lesion_input` (conforming, fallback mask, MNI affine, stored input) and
:mod:`cohortseg.science.lesions` (census, regions); which card is which net in
:mod:`cohortseg.models.lesion_cards`, running them in :mod:`cohortseg.models.lesion_nets` and
:mod:`cohortseg.models.nets.deepwmh_torch`.

Steps and where they run
------------------------
``prepare`` (CPU, per session)
    * every input is loaded with :func:`cohortseg.io.load_image` (bad data -> InputError);
    * the primary image (SWI for cmb, T1 for wmh) is conformed to a 256^3, 1 mm, RAS grid centred on
      the centre of its field of view (:func:`cohortseg.science.conform.conform_ras`; FreeSurfer's centring rule, pure
      re-indexing when the image already is such a grid, else ``interpolation`` = cubic/linear);
    * cmb with a T1: rigid SWI -> T1 (antspyx, :func:`cohortseg.science.registration.rigid`); wmh with a FLAIR
      the model needs: rigid FLAIR -> T1, the FLAIR resampled once into the T1's conformed grid;
    * affine to MNI152 (:func:`cohortseg.science.registration.affine_to_mni`) of the T1 (cmb without a T1: of
      the SWI itself), only for MNI coordinates, lesion locations/regions and eTIV;
    * a *fallback brain mask* (:func:`cohortseg.science.lesion_input.fallback_brain_mask`) on the conformed grid, used to
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
    * outputs (keys; file names from :func:`cohortseg.pipelines.base.bids_name`, e.g.
      ``sub-01_space-swi_seg-CMB_dseg.nii.gz``): ``label-CMB_probseg.nii.gz``, ``label-CMB_dseg.nii.gz``
      (lesions numbered 1..n) + ``.json`` sidecar, ``desc-brain_mask.nii.gz``, ``desc-CMB_census.tsv`` (one
      row per lesion), ``desc-CMB_regions.tsv``; ``WMH`` likewise; QC mosaic + lesion crops + brain-mask mosaic;
    * regions: cmb: MARS-like ``lobar`` / ``deep`` / ``infratentorial`` from each lesion's MNI centroid
      (:func:`cohortseg.science.lesions.cmb_location_mni`, coarse MNI boxes); wmh: ``periventricular`` /
      ``deep_white`` / ``infracortical`` voxel-wise from the MNI152 template region map
      (:func:`cohortseg.science.lesions.mni_region_map`, cached once per output folder) pulled into the native
      grid with the inverse of the MNI affine (no subject tissue segmentation needed);
    * eTIV (atlas scaling, as :func:`cohortseg.science.brain.estimate_etiv`) from the T1 -> MNI affine.

Learned intracranial mask (default for sessions with a T1)
----------------------------------------------------------
With the deep-T1-WMH head net first in ``<pipeline>.models`` (card ``deepwmh_head``, the default of
``cmb``), ``prepare`` also stores the session T1's 64^3 head box and ``predict`` runs the head net (about
a second on a CPU): its intracranial prior, resampled from the T1's native grid onto the primary
image's conformed grid through the rigid SWI -> T1 registration, > 0.5, is the SHIVA brain mask
(:func:`cohortseg.models.nets.deepwmh_torch.head_net_mask`). SWI-only sessions keep the fallback mask. The sidecar's ``brain_mask``
says which was used. With ``deepwmh_affine`` listed too (the ``cmb`` default), the same head priors give
the T1's affine to MNI152 (deep-T1-WMH's affine net) and the measured eTIV, so ``prepare`` skips the
antspyx affine registration of the T1 (~20-40 s per session on 2 cores): measured on two real T1s
(``benchmarks/deepwmh_mni_affine.py``, docs/BENCHMARKS.md) the learned affine is as good as antspyx's
where antspyx works and right where it failed. The sidecar's ``mni.tool`` says which affine was used.

Fallback brain mask: :mod:`cohortseg.science.lesion_input` (why it is crude, when to use mindgrab).

Models
------
``shiva_cmb`` (SWI-CMB v2 SavedModel folds) and ``shiva_wmh`` (T1-FLAIR WMH v1 ``.h5`` folds: SHIVA has
no T1-only WMH model, so a session without FLAIR fails with a clear error unless a T1-only card is used).
A SHIVA ``model_info_*.json`` path works as a card as is (:func:`cohortseg.models.cards.find_card`).
"""
from __future__ import annotations

import os

import numpy as np

from cohortseg.errors import AnatomyError, InputError
from cohortseg.models.lesion_cards import (
    card_channels,
    choose_cards,
    deep_mni,
    is_affine_card,
    is_head_card,
    is_mask_card,
    split_cards,
)
from cohortseg.pipelines.base import Context, Item, OutputWriter, Pipeline, Predicted, Prepared, Role
from cohortseg.schema import with_defaults
from cohortseg.science.anatomy import NOT_BRAIN, limits
from cohortseg.science.lesion_input import CONFORM_SHAPE, FALLBACK_MASK, INTERP_ORDER

DEEP_MNI_TOOL = "deep-T1-WMH affine net (in predict)"


class ShivaLesions(Pipeline):
    """The SHIVA lesion pipeline: ``cmb`` below, ``wmh`` with SHIVA cards (:mod:`cohortseg.pipelines.wmh`)."""

    target = ""  # CMB / WMH
    anatomy = "brain"
    #: SHIVA modality -> input role
    modality_roles: dict = {}
    region_names: tuple = ()

    # -- prepare ---------------------------------------------------------------------------------
    def conformed_with_mask(self, path, ctx: Context, order: int, anatomy: dict):
        """(native image, warnings, conformed image, fallback mask on the conformed grid)
        (:func:`cohortseg.science.lesion_input.conformed_with_mask`: the head checks)."""
        from cohortseg.science.lesion_input import conformed_with_mask

        img, warnings = ctx.load_image(path)
        conf, mask = conformed_with_mask(img, path, order, anatomy, warnings)
        return img, warnings, conf, mask

    def t1_entry(self, path, ctx: Context, order: int, anatomy: dict, antspyx_mni: bool = True) -> dict:
        """The session T1, conformed, its fallback mask and (unless the deep-T1-WMH nets give it in
        ``predict``) its antspyx affine to MNI152; memoised in the session's Context (cmb and wmh of one
        session share the T1's work)."""
        from cohortseg.science.lesion_input import mni_record

        key = ("lesion_t1", str(path), order, repr(sorted(anatomy.items())), antspyx_mni)
        if key not in ctx.session:
            img, warnings, conf, mask = self.conformed_with_mask(path, ctx, order, anatomy)
            mni = mni_record(conf, mask, "T1w") if antspyx_mni else {"matrix": None, "det": None, "from": "T1w",
                                                                     "error": "", "tool": DEEP_MNI_TOOL}
            ctx.session[key] = {"img": img, "warnings": warnings, "conf": conf, "mask": mask, "mni": mni}
        return ctx.session[key]

    def finish_prepare(self, chans: dict, channels: list, mask: np.ndarray, conf, native_img, meta: dict,
                       extra_arrays: dict | None = None) -> Prepared:
        from cohortseg.science.lesion_input import stored_input

        x, stored = stored_input(chans, channels, mask)
        meta.update({
            "channels": channels, **stored,
            "conformed_shape": [CONFORM_SHAPE] * 3, "conformed_affine": np.asarray(conf.affine).tolist(),
            "native_shape": [int(s) for s in native_img.shape[:3]],
            "native_affine": np.asarray(native_img.affine).tolist(),
            "brain_mask_fallback": FALLBACK_MASK,
        })
        return Prepared(x=x, meta=meta, arrays={"brain_mask": np.packbits(mask.astype(bool)), **(extra_arrays or {})})

    @staticmethod
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

    # -- predict ---------------------------------------------------------------------------------
    def brain_mask(self, models, prepared: Prepared, cards, vol: np.ndarray) -> tuple[np.ndarray, str, dict]:
        """(mask on the conformed grid of `vol`, its source, extra arrays for finalize): the first card's
        mask (deep-T1-WMH head net, with the affine net's MNI matrix; or a brainchop MeshNet), else the
        prepared fallback mask."""
        from cohortseg.science.lesion_input import unpack_mask

        shape = vol.shape[:3]
        mask_i, _ = split_cards(cards)
        fallback = unpack_mask(prepared.arrays["brain_mask"], shape)
        if mask_i is None:
            return fallback, "fallback", {}
        if not is_head_card(cards[mask_i]):
            from cohortseg.models.lesion_nets import meshnet_brain_mask
            from cohortseg.science.brain import meshnet_spec

            return (meshnet_brain_mask(models[mask_i], vol[..., 0], meshnet_spec(cards[mask_i])),
                    f"model:{cards[mask_i].name}", {})
        if "head_box" not in prepared.arrays:
            return fallback, "fallback", {}
        from cohortseg.models.nets.deepwmh_torch import deep_mni_arrays, head_net_mask

        meta = prepared.meta
        reg = meta.get("registration") or {}
        to_t1 = np.asarray(reg.get("swi_to_t1", np.eye(4)), float)
        mask, pri = head_net_mask(models[mask_i], prepared.arrays["head_box"], meta["head_t1"], to_t1,
                                  meta["conformed_affine"], shape)
        extra = {}
        if deep_mni(cards) and "head_t1" in meta:
            aff_i = next(i for i, c in enumerate(cards) if is_affine_card(c))
            extra = deep_mni_arrays(models[aff_i], pri, meta["head_t1"], to_t1)
        if mask is None:
            return fallback, "fallback", extra
        how = "intracranial prior of the T1, through the rigid registration" if "swi_to_t1" in reg else \
            "intracranial prior"
        return mask, f"model:{cards[mask_i].name} ({how})", extra

    def predict(self, models, prepared, cards, cfg, batch_size):
        from cohortseg.models.lesion_nets import shiva_probability
        from cohortseg.science.lesion_input import full_volume

        _, seg = split_cards(cards)
        used = prepared.meta.get("models_used")
        if used is not None:
            seg = [i for i in seg if cards[i].name in used]
        vol = full_volume(prepared.x, prepared.meta.get("conformed_shape"), prepared.meta.get("x_box"))
        mask, source, extra = self.brain_mask(models, prepared, cards, vol)
        if not mask.any():
            raise AnatomyError(f"{NOT_BRAIN}: the brain mask is empty")
        prob, box = shiva_probability(models, cards, seg, vol, prepared.meta["channels"], mask, batch_size)
        boxarr = np.array([*box.start, *box.shape, *box.centre, box.shift_up], dtype=np.int32)
        return Predicted({"prob": prob, "box": boxarr, "brain_mask": np.packbits(mask.astype(bool)),
                          "mask_source": np.array(source), **extra})

    # -- finalize --------------------------------------------------------------------------------
    def native(self, prepared: Prepared, prob: Predicted):
        """(crop box, lesion probability and brain mask on the native grid of the primary image)."""
        from cohortseg.models import shiva
        from cohortseg.science.conform import to_native
        from cohortseg.science.lesion_input import unpack_mask

        meta = prepared.meta
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
        mask_c = unpack_mask(prob["brain_mask"], cshape)
        mask_native = to_native(mask_c.astype(np.uint8), caff, (nshape, naff), order=0) > 0
        return box, np.clip(p_native, 0.0, 1.0), mask_native

    @staticmethod
    def mni_and_etiv(meta: dict, prob: Predicted) -> tuple[dict, float | None]:
        """The session's MNI record and eTIV: the deep-T1-WMH affine and intracranial prior of its T1
        when ``predict`` gave them, else those of ``prepare`` (antspyx)."""
        from cohortseg.science.registration import MNI_DET_RANGE

        mni = dict(meta.get("mni") or {})
        etiv = meta.get("etiv_ml")
        if "mni_matrix" in prob:
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
        return mni, etiv

    def finalize(self, item: Item, prepared: Prepared, prob: Predicted, cards, cfg, ctx: Context,
                 out: OutputWriter) -> dict:
        import pandas as pd

        from cohortseg.science.lesions import CENSUS_COLUMNS, census_in_box

        if "box" not in prob:
            raise InputError("inference output lacks the crop box (stale work files? rerun infer)")
        meta = prepared.meta
        t = self.target
        box, p_native, mask_native = self.native(prepared, prob)
        naff = np.asarray(meta["native_affine"], float)
        nshape = tuple(meta["native_shape"])
        cfg = with_defaults(self.name, cfg)
        thr, min_vox, max_out = float(cfg["threshold"]), int(cfg["min_cluster_voxels"]), float(cfg["max_outside_fraction"])
        mni, etiv = self.mni_and_etiv(meta, prob)
        matrix = np.asarray(mni["matrix"], float) if mni.get("matrix") else None
        regions, region_vol = self._regions(nshape, naff, matrix, ctx)
        labels, census = census_in_box(p_native, mask_native, naff, thr, min_vox, max_out, regions, matrix)

        # -- outputs
        n = len(census)
        ldtype = np.uint16 if n < 65535 else np.int32
        out.nifti(f"label-{t}_probseg.nii.gz", p_native.astype(np.float32), naff)
        out.nifti(f"label-{t}_dseg.nii.gz", labels.astype(ldtype), naff)
        out.nifti("desc-brain_mask.nii.gz", mask_native.astype(np.uint8), naff)
        out.table(f"desc-{t}_census.tsv", pd.DataFrame(census, columns=CENSUS_COLUMNS).round(4))
        reg_rows, reg_metrics = self._region_table(census, labels, region_vol, naff)
        out.table(f"desc-{t}_regions.tsv", pd.DataFrame(reg_rows))
        params = {"threshold": thr, "min_cluster_voxels": min_vox, "max_outside_fraction": max_out,
                  "connectivity": 26, "threshold_rule": "prob > threshold (strict), on the native grid"}
        self._sidecar(item, meta, cards, out, params, str(prob.get("mask_source", "fallback")), box, mni)

        # -- QC
        import nibabel as nib

        data = np.asarray(nib.load(item.inputs["image"]).dataobj, dtype=np.float32)
        if data.ndim > 3:
            data = data.reshape(data.shape[:3] + (-1,))[..., 0]
        self._qc(item, data, naff, labels, mask_native, out)
        out.flags += _flags(mask_native, naff, labels, box, mni, np.asarray(meta["conformed_affine"], float))

        metrics = {"count": n, "volume_mm3": round(float(sum(r["volume_mm3"] for r in census)), 3)}
        metrics.update(reg_metrics)
        metrics["brain_mask_ml"] = round(float(mask_native.sum()) * float(abs(np.linalg.det(naff[:3, :3]))) / 1000.0, 3)
        if etiv:
            metrics["etiv_ml"] = round(float(etiv), 1)
        return metrics

    def _sidecar(self, item: Item, meta: dict, cards, out: OutputWriter, params: dict, mask_source: str, box,
                 mni: dict) -> None:
        t = self.target
        side = {
            "Description": f"{t} lesions (SHIVA 3D U-Net fold ensemble), numbered 1..n in scan order; "
                           "see the census TSV for one row per lesion",
            "postprocessing": params,
            "models": [{"name": c.name, "folds": [{"file": f["file"], **{k: f[k] for k in ("md5", "sha256") if k in f}}
                                                  for f in c.folds]} for c in cards
                       if is_mask_card(c) or c.name in meta.get("models_used", [c.name])],
            "brain_mask": mask_source if mask_source != "fallback" else meta.get("brain_mask_fallback", "fallback"),
            "crop_box": box.to_dict(),
            "mni": {k: mni.get(k) for k in ("from", "det", "error", "tool", "fixed", "etiv_method")},
            "registration": meta.get("registration", {}),
        }
        out.sidecar(f"label-{t}_dseg.json", side)

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

    # -- provenance ------------------------------------------------------------------------------
    def mask_methods(self, cards, primary: str) -> dict:
        mask_i, _ = split_cards(cards)
        if mask_i is not None and is_head_card(cards[mask_i]):
            how = (f"{cards[mask_i].name}: deep-T1-WMH head net intracranial prior of the session's T1 (through the "
                   f"{primary} -> T1 rigid registration); sessions without a T1: otsu-morphology fallback")
        elif mask_i is not None:
            how = f"{cards[mask_i].name} (brainchop MeshNet on the {primary})"
        else:
            how = FALLBACK_MASK.replace("otsu-morphology (", "otsu-morphology fallback (")
        return {"brain_mask": how}

    def mni_methods(self, cards, primary: str) -> dict:
        if deep_mni(cards):
            return {"mni_affine": f"deep-T1-WMH head + affine nets on the session's T1 (through the {primary} -> T1 "
                                  "registration); sessions without a T1: antspyx affine of the primary image",
                    "etiv": "deep-T1-WMH head net intracranial prior > 0.5 on the T1's native grid"}
        return {"mni_affine": "antspyx affine to MNI152 (T1 when the session has one)",
                "etiv": "atlas scaling (MNI152 ICV / det of the antspyx affine of the T1)"}


def _flags(mask, naff, labels, box, mni, caff) -> list[str]:
    """QC flags: ``brain_mask_{empty,edge,volume_low,volume_high}``, ``mni_registration_failed``,
    ``lesion_at_crop_edge`` (a lesion voxel within one voxel of the network's field of view)."""
    from cohortseg.qc.outliers import sanity_flags
    from cohortseg.science.lesions import BRAIN_MASK_RANGE_MM3, touches_box

    flags = [f"brain_mask_{f}" for f in sanity_flags(mask, naff, BRAIN_MASK_RANGE_MM3)]
    if mni.get("error") or not mni.get("matrix"):
        flags.append("mni_registration_failed")
    if touches_box(labels, naff, caff, box.start, box.shape):
        flags.append("lesion_at_crop_edge")
    return flags


class Cmb(ShivaLesions):
    name = "cmb"
    target = "CMB"
    description = ("Cerebral microbleeds on SWI (SHIVA-CMB 3D U-Net fold ensemble, Boutinaud et al.), "
                   "per-lesion census with MARS-like lobar/deep/infratentorial locations")
    roles = {
        "image": Role(description="susceptibility-weighted image (SWI/SWAN magnitude)"),
        "t1": Role(required=False,
                   description="T1w of the same session: better MNI registration for locations and eTIV"),
    }
    group_tables = {"cmb_census.csv": "desc-CMB_census.tsv", "cmb_regions.csv": "desc-CMB_regions.tsv"}
    modality_roles = {"swi": "image", "t2gre": "image"}
    region_names = ("lobar", "deep", "infratentorial")

    def prepare(self, item: Item, cards: list, cfg: dict, ctx: Context) -> Prepared:
        from cohortseg.science import registration
        from cohortseg.science.lesion_input import etiv_from_mni, mni_record

        order = INTERP_ORDER[with_defaults(self.name, cfg)["interpolation"]]
        channels = card_channels(cards, self.modality_roles, self.name)
        anatomy = limits(self.name, cfg)
        swi, warnings, conf, mask = self.conformed_with_mask(item.inputs["image"], ctx, order, anatomy)
        meta: dict = {"warnings": list(warnings), "registration": {}}
        if item.inputs.get("t1"):
            t1 = self.t1_entry(item.inputs["t1"], ctx, order, anatomy, antspyx_mni=not deep_mni(cards))
            meta["warnings"] += [f"T1w: {w}" for w in t1["warnings"]]
            rig = registration.rigid(conf, t1["conf"])
            mni = dict(t1["mni"])
            if mni.get("matrix"):
                mni["matrix"] = (np.asarray(mni["matrix"]) @ rig.matrix).tolist()  # SWI world -> MNI
            mni["from"] = "T1w"
            meta["registration"] = {"swi_to_t1": rig.matrix.tolist(), "kind": "rigid", "tool": rig.info.get("tool", ""),
                                    "t1": os.path.basename(item.inputs["t1"])}
            meta["etiv_ml"] = etiv_from_mni(t1["mni"])
            extra, head_meta = self.head_box_arrays(t1["img"], cards)
            meta.update(head_meta)
        else:
            mni = mni_record(conf, mask, "swi")
            extra = {}
        if mni.get("error"):
            meta["warnings"].append(f"MNI registration: {mni['error']}")
        meta["mni"] = mni
        chans = {c: np.asarray(conf.dataobj) for c in channels}  # every CMB modality is the primary image
        return self.finish_prepare(chans, channels, mask, conf, swi, meta, extra)

    def methods(self, cards, cfg):
        return {**self.mask_methods(cards, "SWI"), **self.mni_methods(cards, "SWI")}

    def _regions(self, nshape, naff, matrix, ctx: Context):
        from cohortseg.science.lesions import cmb_location_mni

        return (cmb_location_mni if matrix is not None else None), None

    def _region_table(self, census, labels, region_vol, aff):
        from cohortseg.science.lesions import lesion_counts_by_region

        counts = lesion_counts_by_region(census, (*self.region_names, "unassigned"))
        rows, metrics = [], {}
        for r in (*self.region_names, "unassigned"):
            vol = round(float(sum(c["volume_mm3"] for c in census if c["region"] == r)), 3)
            rows.append({"region": r, "count": counts[r], "volume_mm3": vol})
            metrics[f"count_{r}"] = counts[r]
        return rows, metrics
