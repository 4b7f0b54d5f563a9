"""White-matter hyperintensities on T1: the ``wmh`` plugin -- deep-T1-WMH from T1 alone by default
(below), the SHIVA-WMH contract (T1 [+ FLAIR]) as an option (the SHIVA lesion pipeline
:class:`cohortseg.pipelines.cmb.ShivaLesions`).

deep-T1-WMH path (Thyreau et al. 2022, the JPSC-AD method)
----------------------------------------------------------
WM hypointensities on the T1 alone, the upstream quantities per session, and the head net's learned
intracranial mask and eTIV. :class:`Wmh` runs this path when its cards are the deep-T1-WMH
ones (``architecture.loader: deepwmh_torch``, or cards naming ``architecture.params.net`` head /
affine / rois / wmh, e.g. a stand-in) - precisely, when one of them is the ``wmh`` net. The science is :mod:`cohortseg.science.deepwmh`, the nets :mod:`cohortseg.models.nets.deepwmh_torch`:

``prepare`` (CPU): load and check the T1 (:func:`cohortseg.io.load_image`; its affine - qform and
    sform must agree), z-score it, resample it into the 64^3 LAS head box (``x``); the native voxels
    are kept (int16 when they are integers, else float32) for the MNI box of ``predict``.
``predict`` (GPU job; every net also runs in seconds on a CPU): head net -> priors; affine net ->
    native -> MNI matrix; the z-scored image in the 184x202x72 MNI box; region net -> labels; WMH
    net -> rescaled probability. Returns the small box/prior arrays and the matrix.
``finalize`` (CPU): back to the native grid: intracranial and cerebrum masks, eTIV, WMH probability
    (uint8 / 255) and mask (>= 128 / 255), the 4-region map; the upstream volumes; a per-lesion census
    (26-connected components of the mask, MNI coordinates through the same matrix); the ITK affine
    file; QC mosaics.

Outputs (keys; file names from :func:`cohortseg.pipelines.base.bids_name`, e.g.
``sub-01_space-T1w_label-WMH_mask.nii.gz``): ``label-WMH_probseg.nii.gz``, ``label-WMH_mask.nii.gz``
(+ ``.json``),
``desc-WMHregions_dseg.nii.gz`` (+ ``.tsv`` label names), ``desc-ICV_mask.nii.gz``,
``desc-cerebrum_mask.nii.gz``, ``desc-MNI_affine.txt``, ``desc-WMH_regions.tsv`` (one row, the
upstream ``*_wmh_in_lrois.csv`` columns, values truncated to integers as upstream prints them, plus
``filename``) and ``desc-WMH_census.tsv``. Session metrics (summary.csv, prefixed ``wmh_``): ``eTIV``,
``vol_total``, ``vol_<region>``, ``roisize_<region>`` - i.e. ``wmh_vol_total`` etc. as upstream names them.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cohortseg.errors import InputError
from cohortseg.models.lesion_cards import (
    card_channels,
    card_modalities,
    choose_cards,
    deep_mni,
    is_mask_card,
    net_cards,
    uses_deepwmh,
)
from cohortseg.pipelines.base import Context, Item, OutputWriter, Predicted, Prepared, Role
from cohortseg.pipelines.cmb import ShivaLesions
from cohortseg.schema import with_defaults
from cohortseg.science import deepwmh as W
from cohortseg.science.anatomy import limits
from cohortseg.science.lesion_input import INTERP_ORDER


class Wmh(ShivaLesions):
    name = "wmh"
    target = "WMH"
    description = ("White-matter hypointensities on T1 with deep-T1-WMH (Thyreau et al. 2022, JPSC-AD; default), or "
                   "hyperintensities with the SHIVA-WMH 3D U-Net fold ensemble on T1 [+ FLAIR] (Boutinaud et al.); "
                   "per-lesion census and regional volumes")
    roles = {
        "image": Role(description="T1w (the output grid)"),
        "flair": Role(required=False,
                      description="FLAIR of the same session (needed by T1+FLAIR models such as shiva_wmh)"),
    }
    group_tables = {"wmh_census.csv": "desc-WMH_census.tsv", "wmh_regions.csv": "desc-WMH_regions.tsv"}
    modality_roles = {"t1": "image", "flair": "flair"}
    region_names = ("periventricular", "deep_white", "infracortical")

    # deep-T1-WMH cards (the default) take the T1-only path (module docstring); SHIVA cards the T1
    # [+ FLAIR] path of ShivaLesions.
    def prepare(self, item: Item, cards: list, cfg: dict, ctx: Context) -> Prepared:
        if uses_deepwmh(cards):
            return _deep_prepare(item, cards, cfg, ctx)
        return self._prepare_shiva(item, cards, cfg, ctx)

    def predict(self, models, prepared, cards, cfg, batch_size):
        if uses_deepwmh(cards):
            return _deep_predict(models, prepared, cards, cfg, batch_size)
        return super().predict(models, prepared, cards, cfg, batch_size)

    def finalize(self, item: Item, prepared: Prepared, prob, cards, cfg, ctx: Context, out: OutputWriter) -> dict:
        if uses_deepwmh(cards):
            return _deep_finalize(item, prepared, prob, cards, cfg, ctx, out)
        return super().finalize(item, prepared, prob, cards, cfg, ctx, out)

    def methods(self, cards, cfg):
        if uses_deepwmh(cards):
            return {"wmh": W.METHOD, "brain_mask": W.ICV_METHOD, "etiv": W.ICV_METHOD,
                    "mni_affine": "deep-T1-WMH affine net", "regions": "deep-T1-WMH region net (4 regions)"}
        return {"wmh": "SHIVA-WMH fold ensemble", **self.mask_methods(cards, "T1w"), **self.mni_methods(cards, "T1w"),
                "regions": "MNI152 template region map"}

    def _prepare_shiva(self, item: Item, cards: list, cfg: dict, ctx: Context) -> Prepared:
        from cohortseg.science import registration
        from cohortseg.science.lesion_input import etiv_from_mni

        cfg = with_defaults(self.name, cfg)
        order = INTERP_ORDER[cfg["interpolation"]]
        available = {"t1"} | ({"flair"} if item.inputs.get("flair") else set())
        chosen, choice_warnings = choose_cards(cards, available, self.modality_roles, self.name)
        if not chosen:
            need = [c.name for c in cards if not is_mask_card(c) and "flair" in card_modalities(c)]
            raise InputError(f"model(s) {', '.join(need)} need a FLAIR but the session has none (role 'flair', "
                             f"filters {cfg['filters']['flair']}); add "
                             "the FLAIR, or list a T1-only WMH model card beside it in wmh.models")
        channels = card_channels(cards, self.modality_roles, self.name, only=chosen)
        t1 = self.t1_entry(item.inputs["image"], ctx, order, limits(self.name, cfg), antspyx_mni=not deep_mni(cards))
        conf = t1["conf"]
        meta: dict = {"warnings": list(t1["warnings"]) + choice_warnings, "registration": {}, "mni": dict(t1["mni"]),
                      "etiv_ml": etiv_from_mni(t1["mni"]), "models_used": [cards[i].name for i in chosen]}
        if t1["mni"].get("error"):
            meta["warnings"].append(f"MNI registration: {t1['mni']['error']}")
        chans = {"t1": np.asarray(conf.dataobj)}
        if "flair" in channels:
            flair, fw = ctx.load_image(item.inputs["flair"])
            meta["warnings"] += [f"FLAIR: {w}" for w in fw]
            rig = registration.rigid(flair, conf)
            f_c = registration.apply(rig, flair, reference=(conf.shape, conf.affine),
                                     interpolation="cubic" if order == 3 else "linear")
            chans["flair"] = np.asarray(f_c.dataobj, np.float32)
            if not (chans["flair"][t1["mask"]] > 0).mean() > 0.5:
                raise InputError("FLAIR does not cover the brain after registration to the T1", item.inputs["flair"])
            meta["registration"] = {"flair_to_t1": rig.matrix.tolist(), "kind": "rigid",
                                    "tool": rig.info.get("tool", ""), "flair": os.path.basename(item.inputs["flair"])}
        extra, head_meta = self.head_box_arrays(t1["img"], cards)
        meta.update(head_meta)
        return self.finish_prepare(chans, channels, t1["mask"], conf, t1["img"], meta, extra)

    def _regions(self, nshape, naff, matrix, ctx: Context):
        if matrix is None:
            return None, None
        from cohortseg.science import registration
        from cohortseg.science.lesions import WMH_REGIONS

        rimg = _mni_wmh_regions(ctx)
        tr = registration.LinearTransform(matrix)
        rmap = np.asarray(registration.apply(tr, rimg, reference=(nshape, naff), interpolation="nearest",
                                             inverse=True).dataobj).astype(np.uint8)
        return (rmap, WMH_REGIONS), rmap

    def _region_table(self, census, labels, region_vol, aff):
        from cohortseg.science.lesions import WMH_REGIONS, regional_volumes

        if region_vol is None:
            vols = {r: 0.0 for r in self.region_names}
            vols["unassigned"] = float((labels > 0).sum() * abs(np.linalg.det(np.asarray(aff)[:3, :3])))
        else:
            vols = regional_volumes(labels, region_vol, WMH_REGIONS, aff)
        rows, metrics = [], {}
        for r in (*self.region_names, "unassigned"):
            n = sum(1 for c in census if c["region"] == r)
            rows.append({"region": r, "count": n, "volume_mm3": round(float(vols.get(r, 0.0)), 3)})
            metrics[f"volume_{r}_mm3"] = round(float(vols.get(r, 0.0)), 3)
        return rows, metrics


def _mni_wmh_regions(ctx: Context):
    """The MNI152 WMH region map (:func:`cohortseg.science.lesions.mni_region_map`, 1 mm), cached on disk under
    ``<output_dir>/work/cache`` so each finalize job does not redo the distance transforms."""
    import nibabel as nib

    from cohortseg.io import atomic_path

    out_dir = ctx.output_dir
    path = Path(out_dir) / "work" / "cache" / "wmh_regions_mni152_1mm.nii.gz" if out_dir else None
    if path is not None and path.is_file():
        try:
            img = nib.load(str(path))
            return nib.Nifti1Image(np.asarray(img.dataobj, np.uint8), img.affine)
        except Exception:  # noqa: BLE001 - rebuild a bad cache
            pass
    from cohortseg.science.lesions import mni_region_map

    img = mni_region_map(1)
    if path is not None:
        try:
            with atomic_path(path) as tmp:
                nib.save(nib.Nifti1Image(np.asarray(img.dataobj, np.uint8), img.affine), str(tmp))
        except OSError:
            pass
    return img


# ----------------------------------------------------------------------------------------------
# the deep-T1-WMH path
# ----------------------------------------------------------------------------------------------
def _deep_prepare(item: Item, cards: list, cfg: dict, ctx: Context) -> Prepared:
    net_cards(cards)
    path = item.inputs["image"]
    img, warnings = ctx.load_image(path)
    data = np.asarray(img.dataobj, np.float32)
    if min(data.shape) < 8:
        raise InputError(f"image of shape {data.shape} is too small for deep-T1-WMH (a 3D T1 of the head)", path)
    try:
        z = W.zscore(data)
    except InputError as e:
        raise InputError(e.reason, path) from None
    x = W.head_box(z, img.affine)[None, ..., None]
    meta = {"warnings": list(warnings), "native_affine": np.asarray(img.affine).tolist(),
            "native_shape": [int(s) for s in data.shape], "method": W.METHOD,
            "models_used": [c.name for c in cards]}
    return Prepared(x=x.astype(np.float32), meta=meta, arrays={"t1": W.compact_voxels(data)})


def _deep_predict(models, prepared: Prepared, cards, cfg, batch_size) -> Predicted:
    from cohortseg.models.nets.deepwmh_torch import head_priors, run_folds

    idx = net_cards(cards)
    meta = prepared.meta
    aff = np.asarray(meta["native_affine"], float)
    shape = tuple(meta["native_shape"])
    pri = head_priors(models[idx["head"]], prepared.x, 1)
    params = np.asarray(run_folds(models[idx["affine"]], W.affine_input(pri)[None], 1)[0], float).ravel()
    matrix = W.mni_matrix(params, aff, shape)
    scale = W.mni_scaling(matrix)
    if not 0.3 < scale < 3.0:
        raise InputError(f"implausible affine to MNI from the deep-T1-WMH affine net (scaling {scale:.2f}); "
                         "is this a T1-weighted head image?")
    z = W.zscore(np.asarray(prepared.arrays["t1"], np.float32))
    box, coverage = W.mni_box(z, aff, matrix)
    xb = box[None, ..., None]
    labels = W.roi_labels(run_folds(models[idx["rois"]], xb, 1)[0])
    wmh = run_folds(models[idx["wmh"]], xb, 1)[0]
    wmh = W.wmh_rescale(wmh[..., 0] if wmh.ndim == 4 else wmh)
    return Predicted({"priors": pri[..., :3].astype(np.float32), "matrix": matrix, "affine_params": params,
                      "coverage": np.array(coverage), "wmh_box": wmh.astype(np.float32), "rois_box": labels})


def _deep_finalize(item: Item, prepared: Prepared, prob: Predicted, cards, cfg, ctx: Context, out: OutputWriter) -> dict:
    import nibabel as nib
    import pandas as pd

    from cohortseg.io import write_text_atomic
    from cohortseg.qc.outliers import sanity_flags
    from cohortseg.science.lesions import BRAIN_MASK_RANGE_MM3, CENSUS_COLUMNS, census_in_box

    if "wmh_box" not in prob:
        raise InputError("inference output lacks the deep-T1-WMH arrays (stale work files? rerun infer)")
    meta = prepared.meta
    aff = np.asarray(meta["native_affine"], float)
    shape = tuple(meta["native_shape"])
    matrix = np.asarray(prob["matrix"], float)
    wmh_box = np.asarray(prob["wmh_box"], np.float32)
    rois_box = np.asarray(prob["rois_box"], np.uint8)

    head = W.head_outputs(np.asarray(prob["priors"], np.float32), aff, shape)
    u8 = W.wmh_native_u8(wmh_box, aff, shape, matrix)
    mask = u8 >= W.WMH_MASK_U8
    regions = W.box_to_native(rois_box.astype(np.float32), aff, shape, matrix, order=0).astype(np.uint8)
    vols = W.volumes(u8, aff, wmh_box, rois_box, matrix, head["eTIV"])

    out.nifti("label-WMH_probseg.nii.gz", u8.astype(np.float32) / 255.0, aff)
    out.nifti("label-WMH_mask.nii.gz", mask.astype(np.uint8), aff)
    out.nifti("desc-WMHregions_dseg.nii.gz", regions, aff)
    out.table("desc-WMHregions_dseg.tsv", pd.DataFrame({"index": list(W.REGIONS), "name": list(W.REGIONS.values())}))
    out.nifti("desc-ICV_mask.nii.gz", head["icv"].astype(np.uint8), aff)
    out.nifti("desc-cerebrum_mask.nii.gz", head["cerebrum"].astype(np.uint8), aff)
    p = out.path("desc-MNI_affine.txt")
    write_text_atomic(p, W.itk_affine_text(matrix))
    out.files["desc-MNI_affine.txt"] = str(p)

    row = {"filename": os.path.basename(item.inputs["image"]), **{k: int(vols[k]) for k in W.COLUMNS}}
    out.table("desc-WMH_regions.tsv", pd.DataFrame([row]))
    _, census = census_in_box(u8.astype(np.float32) / 255.0, head["icv"], aff, (W.WMH_MASK_U8 - 0.5) / 255.0, 0, 1.0,
                        (regions, dict(W.REGIONS)), matrix)
    out.table("desc-WMH_census.tsv", pd.DataFrame(census, columns=CENSUS_COLUMNS).round(4))

    side = {
        "Description": "White-matter hypointensities on T1 (deep-T1-WMH); mask = probability >= 128/255",
        "method": W.METHOD,
        "models": [{"name": c.name, "folds": [{"file": f["file"], **{k: f[k] for k in ("sha256", "git_blob_sha1", "md5")
                                                                      if k in f}} for f in c.folds]} for c in cards],
        "brain_mask": W.ICV_METHOD, "etiv_method": W.ICV_METHOD,
        "mni_affine": "deep-T1-WMH affine net (desc-MNI_affine.txt, ITK LPS, MNI -> native)",
        "mni_scaling": W.mni_scaling(matrix), "mni_box_coverage": float(prob.get("coverage", np.nan)),
        "volumes": "upstream formulas: total on the native grid from clip(u8, 0, 192) / 192; regions and region "
                   "sizes in the MNI box divided by the affine scaling",
    }
    out.sidecar("label-WMH_mask.json", side)

    data = np.asarray(nib.load(item.inputs["image"]).dataobj, np.float32)
    data = data.reshape(data.shape[:3] + (-1,))[..., 0] if data.ndim > 3 else data
    _deep_qc(item, data, aff, mask, regions, head["icv"], out)
    out.flags += [f"brain_mask_{f}" for f in sanity_flags(head["icv"], aff, BRAIN_MASK_RANGE_MM3)]
    if float(prob.get("coverage", 1.0)) < 0.6:
        out.flags.append("mni_box_coverage_low")

    metrics = {"eTIV": round(vols["eTIV"], 1), "count": len(census)}
    metrics.update({k[len("wmh_"):] if k.startswith("wmh_") else k: round(vols[k], 1) for k in W.COLUMNS[1:]})
    metrics["cerebrum_vol"] = round(head["cerebrum_vol"], 1)
    metrics["mni_scaling"] = round(W.mni_scaling(matrix), 4)
    return metrics


def _deep_qc(item, data, aff, mask, regions, icv, out: OutputWriter) -> None:
    from cohortseg.qc.snapshots import mosaic

    out.snapshot("desc-WMH_qc.png", lambda png: mosaic(data, mask.astype(np.uint8), aff, png, view="axial",
                                                       zoom="brain", title=f"{item.name} - WMH (deep-T1-WMH)"))
    out.snapshot("desc-WMHregions_qc.png", lambda png: mosaic(data, regions, aff, png, view="axial", zoom="brain",
                                                              n=8, title=f"{item.name} - WMH regions"))
    out.snapshot("desc-ICV_mask.png", lambda png: mosaic(data, icv.astype(np.uint8), aff, png, view="axial",
                                                         zoom="brain", n=8, title=f"{item.name} - intracranial mask"))
