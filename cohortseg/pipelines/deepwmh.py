"""``wmh`` with deep-T1-WMH (Thyreau et al. 2022, the JPSC-AD method): WM hypointensities on the T1 alone,
the upstream quantities per session, and the head net's learned intracranial mask and eTIV.

The :class:`cohortseg.pipelines.wmh.Wmh` plugin runs this path when its cards are the deep-T1-WMH
ones (``architecture.loader: deepwmh_torch``, or cards naming ``architecture.params.net`` head /
affine / rois / wmh, e.g. a stand-in) - precisely, when one of them is the ``wmh`` net. The science is :mod:`cohortseg.science.deepwmh`:

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

Outputs (``<stem>_``): ``label-WMH_probseg.nii.gz``, ``label-WMH_mask.nii.gz`` (+ ``.json``),
``desc-WMHregions_dseg.nii.gz`` (+ ``.tsv`` label names), ``desc-ICV_mask.nii.gz``,
``desc-cerebrum_mask.nii.gz``, ``desc-MNI_affine.txt``, ``desc-WMH_regions.tsv`` (one row, the
upstream ``*_wmh_in_lrois.csv`` columns, values truncated to integers as upstream prints them, plus
``filename``) and ``desc-WMH_census.tsv``. Session metrics (summary.csv, prefixed ``wmh_``): ``eTIV``,
``vol_total``, ``vol_<region>``, ``roisize_<region>`` - i.e. ``wmh_vol_total`` etc. as upstream names them.
"""
from __future__ import annotations

import os

import numpy as np

from cohortseg.errors import InputError, ModelError
from cohortseg.pipelines.base import Context, Item, OutputWriter, Predicted, Prepared
from cohortseg.science import deepwmh as W

NETS = ("head", "affine", "rois", "wmh")
METHOD = "deep-T1-WMH (Thyreau et al. 2022), Keras rebuild of the upstream networks"
ICV_METHOD = "deep-T1-WMH head net intracranial prior > 0.5 on the native grid"


def card_net(card) -> str | None:
    """The deep-T1-WMH network a card provides (``architecture.params.net``), or None."""
    arch = card["architecture"]
    net = (arch.get("params") or {}).get("net")
    if arch.get("loader") == "deepwmh_torch" or net in NETS:
        if net not in NETS:
            raise ModelError(f"model '{card.name}': architecture.params.net must be one of {', '.join(NETS)}")
        return net
    return None


def uses_deepwmh(cards) -> bool:
    """True when the WMH segmentation itself is deep-T1-WMH's (a card provides its ``wmh`` net); the head
    net alone is only a brain-mask model (e.g. before a SHIVA card)."""
    return any(card_net(c) == "wmh" for c in cards)


def net_cards(cards, need=NETS) -> dict[str, int]:
    """net -> index in `cards`; ModelError when one of `need` is missing or given twice, or when a card
    of another method is mixed in."""
    out: dict[str, int] = {}
    for i, c in enumerate(cards):
        net = card_net(c)
        if net is None:
            raise ModelError(f"model '{c.name}' is not a deep-T1-WMH network: the deep-T1-WMH cards "
                             f"({', '.join(NETS)}) cannot be mixed with other WMH models in one pipeline")
        if net in out:
            raise ModelError(f"two cards provide the deep-T1-WMH {net} net: {cards[out[net]].name}, {c.name}")
        out[net] = i
    missing = [n for n in need if n not in out]
    if missing:
        raise ModelError(f"deep-T1-WMH needs a card for each of its networks; missing: {', '.join(missing)} "
                         "(default cards: deepwmh_head, deepwmh_affine, deepwmh_rois, deepwmh_wmh)")
    return out


def compact_voxels(data: np.ndarray) -> np.ndarray:
    """The native voxels as int16 when that is lossless (most T1s), else float32."""
    d = np.asarray(data, np.float32)
    if np.all(d == np.round(d)) and d.min() >= -32768 and d.max() <= 32767:
        return d.astype(np.int16)
    return d


def prepare(item: Item, cards: list, cfg: dict, ctx: Context) -> Prepared:
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
            "native_shape": [int(s) for s in data.shape], "method": METHOD,
            "models_used": [c.name for c in cards]}
    return Prepared(x=x.astype(np.float32), meta=meta, arrays={"t1": compact_voxels(data)})


def run_folds(folds, x, batch_size):
    """Fold mean of one card's predictions (:func:`cohortseg.models.ensemble.fold_average`)."""
    from cohortseg.models.ensemble import fold_average

    return fold_average([f.predict for f in folds], x, batch_size)


def head_priors(folds, x: np.ndarray, batch_size: int = 1) -> np.ndarray:
    """The head net's (64, 64, 64, 4) priors for a prepared head box (fold mean)."""
    return np.asarray(run_folds(folds, x, batch_size)[0], np.float32)


def predict(models, prepared: Prepared, cards, cfg, batch_size) -> Predicted:
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


def finalize(item: Item, prepared: Prepared, prob: Predicted, cards, cfg, ctx: Context, out: OutputWriter) -> dict:
    import nibabel as nib
    import pandas as pd

    from cohortseg.io import write_json_atomic, write_text_atomic
    from cohortseg.pipelines.lesion import BRAIN_MASK_RANGE_MM3, CENSUS_COLUMNS, _census
    from cohortseg.qc.outliers import sanity_flags

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
    _, census = _census(u8.astype(np.float32) / 255.0, head["icv"], aff, (W.WMH_MASK_U8 - 0.5) / 255.0, 0, 1.0,
                        (regions, dict(W.REGIONS)), matrix)
    out.table("desc-WMH_census.tsv", pd.DataFrame(census, columns=CENSUS_COLUMNS).round(4))

    side = {
        "Description": "White-matter hypointensities on T1 (deep-T1-WMH); mask = probability >= 128/255",
        "Sources": [f"bids:raw:{os.path.basename(item.inputs['image'])}"],
        "method": METHOD,
        "models": [{"name": c.name, "folds": [{"file": f["file"], **{k: f[k] for k in ("sha256", "git_blob_sha1", "md5")
                                                                      if k in f}} for f in c.folds]} for c in cards],
        "brain_mask": ICV_METHOD, "etiv_method": ICV_METHOD,
        "mni_affine": "deep-T1-WMH affine net (desc-MNI_affine.txt, ITK LPS, MNI -> native)",
        "mni_scaling": W.mni_scaling(matrix), "mni_box_coverage": float(prob.get("coverage", np.nan)),
        "volumes": "upstream formulas: total on the native grid from clip(u8, 0, 192) / 192; regions and region "
                   "sizes in the MNI box divided by the affine scaling",
    }
    sp = out.path("label-WMH_mask.json")
    write_json_atomic(sp, side)
    out.files["label-WMH_mask.json"] = str(sp)

    data = np.asarray(nib.load(item.inputs["image"]).dataobj, np.float32)
    data = data.reshape(data.shape[:3] + (-1,))[..., 0] if data.ndim > 3 else data
    _qc(item, data, aff, mask, regions, head["icv"], out)
    out.flags += [f"brain_mask_{f}" for f in sanity_flags(head["icv"], aff, BRAIN_MASK_RANGE_MM3)]
    if float(prob.get("coverage", 1.0)) < 0.6:
        out.flags.append("mni_box_coverage_low")

    metrics = {"eTIV": round(vols["eTIV"], 1), "count": len(census)}
    metrics.update({k[len("wmh_"):] if k.startswith("wmh_") else k: round(vols[k], 1) for k in W.COLUMNS[1:]})
    metrics["cerebrum_vol"] = round(head["cerebrum_vol"], 1)
    metrics["mni_scaling"] = round(W.mni_scaling(matrix), 4)
    return metrics


def _qc(item, data, aff, mask, regions, icv, out: OutputWriter) -> None:
    from cohortseg.qc.snapshots import mosaic

    out.snapshot("desc-WMH_qc.png", lambda png: mosaic(data, mask.astype(np.uint8), aff, png, view="axial",
                                                       zoom="brain", title=f"{item.name} - WMH (deep-T1-WMH)"))
    out.snapshot("desc-WMHregions_qc.png", lambda png: mosaic(data, regions, aff, png, view="axial", zoom="brain",
                                                              n=8, title=f"{item.name} - WMH regions"))
    out.snapshot("desc-ICV_mask.png", lambda png: mosaic(data, icv.astype(np.uint8), aff, png, view="axial",
                                                         zoom="brain", n=8, title=f"{item.name} - intracranial mask"))
