"""White-matter hyperintensities on T1: the ``wmh`` plugin -- deep-T1-WMH from T1 alone by default
(:mod:`cohortseg.pipelines.deepwmh`), the SHIVA-WMH contract (T1 [+ FLAIR]) as an option (shared steps in
:mod:`cohortseg.pipelines.lesion`)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cohortseg.errors import InputError
from cohortseg.pipelines.base import Context, Item, OutputWriter, Prepared, Role
from cohortseg.science.anatomy import limits
from cohortseg.pipelines.lesion import (
    _INTERP_ORDER,
    _Lesion,
    _etiv_ml,
    _mask_methods,
    _mni_methods,
    _t1_entry,
    card_modalities,
    deep_mni,
    head_box_arrays,
    is_mask_card,
)


class Wmh(_Lesion):
    name = "wmh"
    target = "WMH"
    description = ("White-matter hypointensities on T1 with deep-T1-WMH (Thyreau et al. 2022, JPSC-AD; default), or "
                   "hyperintensities with the SHIVA-WMH 3D U-Net fold ensemble on T1 [+ FLAIR] (Boutinaud et al.); "
                   "per-lesion census and regional volumes")
    roles = {
        "image": Role(filters={"suffix": "T1w"}, description="T1w (the output grid)"),
        "flair": Role(filters={"suffix": "FLAIR"}, required=False,
                      description="FLAIR of the same session (needed by T1+FLAIR models such as shiva_wmh)"),
    }
    group_tables = {"wmh_census.csv": "desc-WMH_census.tsv", "wmh_regions.csv": "desc-WMH_regions.tsv"}
    modality_roles = {"t1": "image", "flair": "flair"}
    region_names = ("periventricular", "deep_white", "infracortical")

    # deep-T1-WMH cards (the default) take the T1-only path of cohortseg.pipelines.deepwmh; SHIVA cards
    # the T1 [+ FLAIR] path below.
    def prepare(self, item: Item, cards: list, cfg: dict, ctx: Context) -> Prepared:
        from cohortseg.pipelines import deepwmh

        if deepwmh.uses_deepwmh(cards):
            return deepwmh.prepare(item, cards, cfg, ctx)
        return self._prepare_shiva(item, cards, cfg, ctx)

    def predict(self, models, prepared, cards, cfg, batch_size):
        from cohortseg.pipelines import deepwmh

        if deepwmh.uses_deepwmh(cards):
            return deepwmh.predict(models, prepared, cards, cfg, batch_size)
        return super().predict(models, prepared, cards, cfg, batch_size)

    def finalize(self, item: Item, prepared: Prepared, prob, cards, cfg, ctx: Context, out: OutputWriter) -> dict:
        from cohortseg.pipelines import deepwmh

        if deepwmh.uses_deepwmh(cards):
            return deepwmh.finalize(item, prepared, prob, cards, cfg, ctx, out)
        return super().finalize(item, prepared, prob, cards, cfg, ctx, out)

    def methods(self, cards, cfg):
        from cohortseg.pipelines import deepwmh

        if deepwmh.uses_deepwmh(cards):
            return {"wmh": deepwmh.METHOD, "brain_mask": deepwmh.ICV_METHOD, "etiv": deepwmh.ICV_METHOD,
                    "mni_affine": "deep-T1-WMH affine net", "regions": "deep-T1-WMH region net (4 regions)"}
        return {"wmh": "SHIVA-WMH fold ensemble", **_mask_methods(cards, "T1w"), **_mni_methods(cards, "T1w"),
                "regions": "MNI152 template region map"}

    def _prepare_shiva(self, item: Item, cards: list, cfg: dict, ctx: Context) -> Prepared:
        from cohortseg.science import registration

        order = _INTERP_ORDER[cfg.get("interpolation", "cubic")]
        available = {"t1"} | ({"flair"} if item.inputs.get("flair") else set())
        chosen, choice_warnings = self._choose(cards, available)
        if not chosen:
            need = [c.name for c in cards if not is_mask_card(c) and "flair" in card_modalities(c)]
            raise InputError(f"model(s) {', '.join(need)} need a FLAIR but the session has none (role 'flair', "
                             f"filters {(cfg.get('filters') or {}).get('flair', self.roles['flair'].filters)}); add "
                             "the FLAIR, or list a T1-only WMH model card beside it in wmh.models")
        channels = self._channels(cards, only=chosen)
        t1 = _t1_entry(item.inputs["image"], ctx, order, limits(self.name, cfg), antspyx_mni=not deep_mni(cards))
        conf = t1["conf"]
        meta: dict = {"warnings": list(t1["warnings"]) + choice_warnings, "registration": {}, "mni": dict(t1["mni"]),
                      "etiv_ml": _etiv_ml(t1["mni"]), "models_used": [cards[i].name for i in chosen]}
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
        extra, head_meta = head_box_arrays(t1["img"], cards)
        meta.update(head_meta)
        return self._finish_prepare(chans, channels, t1["mask"], conf, t1["img"], meta, extra)

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
    """The MNI152 WMH region map (:func:`cohortseg.science.wmh.mni_region_map`, 1 mm), cached on disk under
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
    from cohortseg.science.wmh import mni_region_map

    img = mni_region_map(1)
    if path is not None:
        try:
            with atomic_path(path) as tmp:
                nib.save(nib.Nifti1Image(np.asarray(img.dataobj, np.uint8), img.affine), str(tmp))
        except OSError:
            pass
    return img
