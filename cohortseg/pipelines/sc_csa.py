"""Spinal cord cross-sectional area (CSA) per contrast: the project's own 2D U-Net (config/models/sc_csa).

Roles
-----
* ``image`` (multiple): every T1w / T2w / T2starw of a session is one item (one segmentation and one
  CSA table per contrast).
* ``levels`` (optional, one per session): a vertebral level image in ``anat/`` beside the images,
  default filter ``suffix: labels`` (e.g. ``sub-01[_ses-01]_labels.nii.gz`` or, BIDS-derivative
  style, ``sub-01_space-T2w_desc-vertebral_labels.nii.gz``). It may be drawn on any image of the
  session: it is carried to every contrast through scanner (world) coordinates, which assumes the
  participant did not move between the scans. Point labels (one voxel per vertebral body centre,
  as SCT's ``labels.nii.gz``: 3 = C3), a labelled centreline or a full level map are recognised
  (``sc_csa.levels_kind``; ``levels_convention: disc`` for disc labels as SCT's ``label_disc``).
  Alternatively ``sc_csa.levels_dir`` names a BIDS-derivatives folder holding one level file per
  image (``<levels_dir>/sub-X/[ses-Y/]anat/<image stem>_<levels_suffix>.nii.gz``, first of
  ``levels_suffixes`` found), which wins over the session file. Without levels, ``VertLevel`` is
  n/a and the per-level table holds one whole-cord row.

Steps
-----
prepare: ``cohortseg.io.load_image`` + ``science.resampling.preprocess_image`` (as training) on the card's grid
(z-score with the volume's mean/std, as the card's ``normalisation: zscore_volume`` says), plus the
vertebral level of every native slice. predict: soft fold average (base class). finalize: back to
native space, the card's ``postprocess`` (tube filter / largest component), soft values kept only
within one voxel (in-plane) of the thresholded cord, ``label-SC_probseg`` (soft) and
``label-SC_mask`` (exactly ``probseg > threshold``), CSA per slice of the SOFT map
(``cohortseg.science.csa.csa_per_slice``, angle-corrected per config) and per vertebral level, QC snapshot
(axial + sagittal) and sanity flags. ``session_metrics``: SD and CV of CSA across a session's
contrasts (per vertebral level and of the mean CSA).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from cohortseg.errors import InputError, ModelError
from cohortseg.pipelines.base import Context, Item, OutputWriter, Pipeline, Predicted, Prepared, Role
from cohortseg.schema import with_defaults
from cohortseg.science.anatomy import check_cord, limits

PERSLICE = "desc-csa_perslice.tsv"
PERLEVEL = "desc-csa_perlevel.tsv"
_LEVEL_METRIC = re.compile(r"^csa_((?:[CTLS]\d+)|mean)_mm2$")


def level_name(level) -> str:
    """SCT level number -> name: 1-7 C1-C7, 8-19 T1-T12, 20-24 L1-L5, 25+ S1..."""
    n = int(level)
    if n < 1:
        return f"level{n}"
    if n <= 7:
        return f"C{n}"
    if n <= 19:
        return f"T{n - 7}"
    if n <= 24:
        return f"L{n - 19}"
    return f"S{n - 24}"


def _si_axis(affine) -> int:
    from cohortseg.science.csa import si_axis

    return si_axis(affine)


def _auto_kind(lv: np.ndarray, affine) -> str:
    """Same rule as csa.vertebral_levels(kind='auto'), in the level image's own grid."""
    ax = _si_axis(affine)
    counts = np.moveaxis(lv > 0, ax, 2).sum(axis=(0, 1))
    return "map" if np.median(counts[counts > 0]) > 4 else "centerline"


def levels_on_image(level_img, target_shape, target_affine, kind: str = "auto",
                    convention: str = "body") -> np.ndarray:
    """Vertebral level (float, NaN = unknown) of every slice of a target image along its S-I axis.

    ``level_img`` (nibabel image) may live on another grid of the same session: it is carried
    through world coordinates (point/centreline labels: their positions; maps: nearest-neighbour
    resampling).
    """
    from cohortseg.science.csa import vertebral_levels
    from cohortseg.science.resampling import resample_like

    data = np.asarray(level_img.dataobj, dtype=np.float64)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"vertebral level image must be 3-D, got shape {data.shape}")
    lv = np.rint(np.nan_to_num(data)).astype(np.int64)
    if not (lv > 0).any():
        raise InputError("vertebral level image holds no label")
    la = np.asarray(level_img.affine, dtype=float)
    ta = np.asarray(target_affine, dtype=float)
    target_shape = tuple(int(s) for s in target_shape[:3])
    if kind == "auto":
        kind = _auto_kind(lv, la)
    same = lv.shape == target_shape and np.allclose(la, ta, atol=1e-3)
    if same:
        return vertebral_levels(lv, ta, kind=kind, convention=convention)
    if kind == "map":
        res = resample_like(lv, la, target_shape, ta, order=0)
        if not (res > 0).any():
            raise InputError("vertebral level map does not overlap the image")
        return vertebral_levels(res, ta, kind="map")
    vox = np.argwhere(lv > 0)
    vals = lv[lv > 0]
    world = vox @ la[:3, :3].T + la[:3, 3]
    tvox = (world - ta[:3, 3]) @ np.linalg.inv(ta[:3, :3]).T
    k = tvox[:, _si_axis(ta)]
    n = target_shape[_si_axis(ta)]
    if kind == "points":
        pts = [(float(k[vals == v].mean()), float(v)) for v in np.unique(vals)]
    elif kind == "centerline":
        pts = [(float(kk), float(v)) for kk, v in zip(k, vals)]
        convention = "body"
    else:
        raise InputError(f"unknown levels_kind {kind!r} (auto, map, centerline, points)")
    return vertebral_levels(pts, ta, n_slices=n, convention=convention)


def find_levels_file(item: Item, cfg: dict) -> str | None:
    """The level image of an item: ``levels_dir`` per-image derivative first, then the session's
    ``levels`` role input."""
    cfg = with_defaults("sc_csa", cfg)
    root = cfg["levels_dir"]
    if root:
        sub = Path(root) / item.participant_id
        if item.session_id:
            sub = sub / item.session_id
        for suffix in cfg["levels_suffixes"]:
            for ext in (".nii.gz", ".nii"):
                p = sub / "anat" / f"{item.name}_{suffix}{ext}"
                if p.is_file():
                    return str(p)
    return item.inputs.get("levels") or None


class ScCsa(Pipeline):
    name = "sc_csa"
    anatomy = "spine"
    description = ("Spinal cord segmentation (cohortseg's own 2D U-Net, soft output) and cross-sectional "
                   "area per slice and vertebral level, per contrast")
    roles = {
        "image": Role(required=True, multiple=True,
                      description="every T1w/T2w/T2starw of the cervical cord (one item each)"),
        "levels": Role(required=False, multiple=False,
                       description="vertebral labels of the session (points, centreline or map), carried "
                                   "to every contrast through scanner coordinates"),
    }
    group_tables = {"csa_perslice.csv": PERSLICE, "csa_perlevel.csv": PERLEVEL}

    # ------------------------------------------------------------------------------- prepare
    def prepare(self, item: Item, cards: list, cfg: dict, ctx: Context) -> Prepared:
        import nibabel as nib

        from cohortseg.science.resampling import preprocess_image

        if not cards:
            raise ModelError("sc_csa: no model card configured (sc_csa.models)")
        grid_spec = _common_grid(cards)
        img, warnings = ctx.load_image(item.inputs["image"])
        x, grid = preprocess_image(img, float(grid_spec["inplane_mm"]), grid_spec["crop"])
        trained = sorted({c for card in cards for c in card.get("contrasts", [])})
        if trained and item.contrast not in trained:
            warnings.append(f"contrast {item.contrast} is outside the model's training contrasts "
                            f"({', '.join(trained)}): check the QC snapshot")
        arrays = {}
        meta = {"grid": grid, "warnings": warnings, "levels_file": None}
        cfg = with_defaults(self.name, cfg)
        lfile = find_levels_file(item, cfg)
        if lfile:
            try:
                lv_img = nib.load(lfile)
                lv = levels_on_image(lv_img, img.shape, img.affine, kind=cfg["levels_kind"],
                                     convention=cfg["levels_convention"])
                if not np.isfinite(lv).any():
                    raise InputError("no labelled level falls inside the image")
                arrays["levels"] = lv.astype(np.float32)
                meta["levels_file"] = lfile
                meta["levels_carried"] = not (tuple(lv_img.shape[:3]) == tuple(img.shape[:3])
                                              and np.allclose(lv_img.affine, img.affine, atol=1e-3))
            except Exception as e:  # noqa: BLE001 - levels are optional: CSA still runs without them
                reason = e.reason if isinstance(e, InputError) else f"{type(e).__name__}: {e}"
                warnings.append(f"vertebral levels {Path(lfile).name} unusable ({reason}): VertLevel is n/a")
        return Prepared(x=x[..., None].astype(np.float32), meta=meta, arrays=arrays)

    def predict(self, models, prepared, cards, cfg, batch_size):
        """Soft fold average over every fold of every card; a card with ``tta.flip_lr`` also averages
        the prediction of the left-right mirrored slices (axis 1 of the stack runs towards the Left)."""
        from cohortseg.models.ensemble import fold_average

        acc, n = 0.0, 0
        for card, folds in zip(cards, models):
            mirror = 1 if (card.get("tta") or {}).get("flip_lr") else None
            acc = acc + fold_average([f.predict for f in folds], prepared.x, batch_size, mirror).astype(np.float64) * len(folds)
            n += len(folds)
        return Predicted({"prob": (acc / n).astype(np.float32)})

    # ------------------------------------------------------------------------------ finalize
    def finalize(self, item: Item, prepared: Prepared, predicted: Predicted, cards, cfg, ctx: Context,
                 out: OutputWriter) -> dict:
        import pandas as pd

        from cohortseg.science import csa
        from cohortseg.science.resampling import slices_to_native

        native, _ = ctx.load_image(item.inputs["image"])
        aff = native.affine
        grid = prepared.meta["grid"]
        cfg = with_defaults(self.name, cfg)
        thr = float(cfg["threshold"])
        p = np.asarray(predicted.prob, dtype=np.float32)
        if p.ndim == 4:
            p = p[..., 0]
        p = np.where((np.asarray(grid["valid_fraction"]) > 0)[:, None, None], p, 0.0)
        soft = np.clip(slices_to_native(p, grid, order=1), 0.0, 1.0)
        pp = {k: any(bool((c.get("postprocess") or {}).get(k, False)) for c in cards)
              for k in ("tube_filter", "largest_component")}
        if pp["tube_filter"]:
            soft = csa.tube_filter(soft, aff, thr)
        if pp["largest_component"]:
            soft = csa.largest_component(soft, thr)
        soft = _near_mask(soft, thr, aff)
        mask = soft > thr
        out.nifti("label-SC_probseg.nii.gz", soft.astype(np.float32), aff, dtype=np.float32)
        out.nifti("label-SC_mask.nii.gz", mask.astype(np.uint8), aff, dtype=np.uint8)
        data = np.asarray(native.dataobj, dtype=np.float32)
        _qc(data, mask, aff, out, item)
        # one tube through the field of view, of a plausible CSA, or refused (outputs kept for QC)
        check_cord(mask, aff, limits(self.name, cfg), item.contrast, item.inputs["image"], out.flags, out.checks)

        levels = prepared.arrays.get("levels")
        perslice = csa.csa_per_slice(soft, aff, angle_correction=bool(cfg["angle_correction"]),
                                     levels=None if levels is None else np.asarray(levels, dtype=float))
        has_levels = bool(perslice["VertLevel"].notna().any())
        if has_levels:
            perlevel = csa.csa_per_level(perslice)
        else:  # SCT without -vert: one row over the whole cord, VertLevel n/a
            whole = perslice.assign(VertLevel=0)
            perlevel = csa.csa_per_level(whole)
            perlevel["VertLevel"] = pd.NA
        fname = Path(item.inputs["image"]).name
        out.table(PERSLICE, perslice.assign(Filename=fname)[["Filename", *perslice.columns]])
        out.table(PERLEVEL, perlevel.assign(Filename=fname)[["Filename", *perlevel.columns]])

        area = perslice["MEAN(area)"].to_numpy(dtype=float)
        area = area[np.isfinite(area)]
        metrics = {
            "csa_mean_mm2": round(float(area.mean()), 3) if area.size else None,
            "csa_std_mm2": round(float(area.std()), 3) if area.size else None,
            "n_slices": int(area.size),
            "cord_length_mm": round(float(np.nansum(perslice["SUM(length)"].to_numpy(dtype=float))), 2),
            "cord_volume_mm3": round(float(soft.sum() * abs(np.linalg.det(aff[:3, :3]))), 2),
        }
        if has_levels:
            for _, r in perlevel.iterrows():
                if np.isfinite(r["MEAN(area)"]):
                    metrics[f"csa_{level_name(r['VertLevel'])}_mm2"] = round(float(r["MEAN(area)"]), 3)
        return metrics

    # ----------------------------------------------------------------------- across contrasts
    def session_metrics(self, items: dict) -> dict:
        """SD (sample, ddof=1) and CV (%) of CSA across a session's contrasts: per vertebral level
        (``csa_C3_sd_mm2``, ``csa_C3_cv_pct``) where at least two contrasts have that level, and of
        the mean CSA over each image's whole cord (``csa_mean_sd_mm2``, ``csa_mean_cv_pct``; the
        field of view differs between contrasts, so the per-level values are the comparable ones).
        ``n_contrasts``: items measured."""
        values: dict[str, list[float]] = {}
        n_ok = 0
        for it in items.values():
            if not it.ok:
                continue
            n_ok += 1
            for k, v in it.metrics.items():
                m = _LEVEL_METRIC.match(k)
                if m and v is not None and np.isfinite(float(v)):
                    values.setdefault(m.group(1), []).append(float(v))
        out: dict = {"n_contrasts": n_ok}
        for key in sorted(values, key=_level_sort_key):
            v = np.asarray(values[key])
            if v.size < 2:
                continue
            sd = float(v.std(ddof=1))
            mean = float(v.mean())
            out[f"csa_{key}_sd_mm2"] = round(sd, 3)
            out[f"csa_{key}_cv_pct"] = round(100.0 * sd / mean, 2) if mean > 0 else None
        return out


def _level_sort_key(key: str):
    if key == "mean":
        return (0, 0)
    order = {"C": 0, "T": 7, "L": 19, "S": 24}
    return (1, order.get(key[0], 99) + int(key[1:]))


def _common_grid(cards) -> dict:
    """The model grid all cards share (their folds are averaged on the same input)."""
    specs = []
    for c in cards:
        norm = (c.get("normalisation") or {}).get("method", "zscore_volume")
        if norm != "zscore_volume":
            raise ModelError(f"sc_csa: card {c.name}: normalisation {norm!r} is not supported (zscore_volume)")
        gs = c.get("grid") or {}
        crop = gs.get("crop", [64, 64])
        crop = [int(crop), int(crop)] if isinstance(crop, int) else [int(x) for x in crop]
        specs.append({"inplane_mm": float(gs.get("inplane_mm", 1.0)), "crop": crop})
    if any(s != specs[0] for s in specs[1:]):
        raise ModelError(f"sc_csa: the configured cards use different grids {specs}; they cannot be averaged")
    return specs[0]


def _near_mask(soft: np.ndarray, thr: float, affine) -> np.ndarray:
    """Soft values kept only within one voxel (in-plane, per slice) of the thresholded cord: faint
    probabilities elsewhere would add to the soft CSA (a sum over the slice)."""
    from scipy import ndimage

    ax = _si_axis(affine)
    b = soft > thr
    st = np.ones((3, 3, 3), bool)
    idx = [slice(None)] * 3
    idx[ax] = 0
    st[tuple(idx)] = False
    idx[ax] = 2
    st[tuple(idx)] = False  # in-plane 3x3 only
    keep = ndimage.binary_dilation(b, structure=st)
    return np.where(keep, soft, 0.0).astype(np.float32)


def _qc(data, mask, affine, out: OutputWriter, item: Item) -> None:
    from cohortseg.qc.outliers import sanity_flags

    out.snapshot("desc-SC_qc.png", lambda png: qc_figure(data, mask, affine, png, f"{item.name} - SC"))
    # the cord runs through the top and bottom of a cervical slab: touching S/I edges is normal
    out.flags += sanity_flags(mask, affine, ignore_edges="SI")


def qc_figure(data, mask, affine, png, title: str) -> None:
    """Axial mosaic above a sagittal mosaic (both zoomed on the cord), one PNG."""
    import tempfile

    from PIL import Image

    from cohortseg.qc.snapshots import mosaic, to_ras

    with tempfile.TemporaryDirectory(prefix="cohortseg-qc-") as d:
        a, s = Path(d) / "axial.png", Path(d) / "sagittal.png"
        mosaic(data, mask.astype(np.uint8), affine, a, view="axial", zoom="cord", n=12, title=title)
        # sagittal: the three central slices of the cord's left-right extent (the edges show little)
        img_r, aff_r, _ = to_ras(data, affine)
        m_r = to_ras(mask.astype(np.uint8), affine)[0]
        cols = np.flatnonzero(m_r.any(axis=(1, 2)))
        if cols.size:
            mid = int(round((cols[0] + cols[-1]) / 2))
            keep = np.zeros(m_r.shape[0], bool)
            keep[max(0, mid - 2):mid + 3] = True
            m_r = np.where(keep[:, None, None], m_r, 0).astype(np.uint8)
        mosaic(img_r, m_r, aff_r, s, view="sagittal", zoom="cord", n=3, title=title)
        ia, isg = Image.open(a).convert("RGB"), Image.open(s).convert("RGB")
        w = max(ia.width, isg.width)
        canvas = Image.new("RGB", (w, ia.height + isg.height), (0, 0, 0))
        canvas.paste(ia, ((w - ia.width) // 2, 0))
        canvas.paste(isg, ((w - isg.width) // 2, ia.height))
        canvas.save(str(png), format="PNG", optimize=True)
