"""Cerebral microbleeds on SWI (+ T1): the ``cmb`` plugin (SHIVA-CMB fold ensemble; shared steps in
:mod:`cohortseg.pipelines.lesion`)."""
from __future__ import annotations

import os

import numpy as np

from cohortseg.pipelines.base import Context, Item, Prepared, Role
from cohortseg.science.anatomy import limits
from cohortseg.pipelines.lesion import (
    _INTERP_ORDER,
    _Lesion,
    _conformed_with_mask,
    _etiv_ml,
    _mask_methods,
    _mni,
    _mni_methods,
    _t1_entry,
    deep_mni,
    head_box_arrays,
)


class Cmb(_Lesion):
    name = "cmb"
    target = "CMB"
    description = ("Cerebral microbleeds on SWI (SHIVA-CMB 3D U-Net fold ensemble, Boutinaud et al.), "
                   "per-lesion census with MARS-like lobar/deep/infratentorial locations")
    roles = {
        "image": Role(filters={"suffix": "swi"}, description="susceptibility-weighted image (SWI/SWAN magnitude)"),
        "t1": Role(filters={"suffix": "T1w"}, required=False,
                   description="T1w of the same session: better MNI registration for locations and eTIV"),
    }
    group_tables = {"cmb_census.csv": "desc-CMB_census.tsv", "cmb_regions.csv": "desc-CMB_regions.tsv"}
    modality_roles = {"swi": "image", "t2gre": "image"}
    region_names = ("lobar", "deep", "infratentorial")

    def prepare(self, item: Item, cards: list, cfg: dict, ctx: Context) -> Prepared:
        from cohortseg.science import registration

        order = _INTERP_ORDER[cfg.get("interpolation", "cubic")]
        channels = self._channels(cards)
        anatomy = limits(self.name, cfg)
        swi, warnings, conf, mask = _conformed_with_mask(item.inputs["image"], ctx, order, anatomy)
        meta: dict = {"warnings": list(warnings), "registration": {}}
        if item.inputs.get("t1"):
            t1 = _t1_entry(item.inputs["t1"], ctx, order, anatomy, antspyx_mni=not deep_mni(cards))
            meta["warnings"] += [f"T1w: {w}" for w in t1["warnings"]]
            rig = registration.rigid(conf, t1["conf"])
            mni = dict(t1["mni"])
            if mni.get("matrix"):
                mni["matrix"] = (np.asarray(mni["matrix"]) @ rig.matrix).tolist()  # SWI world -> MNI
            mni["from"] = "T1w"
            meta["registration"] = {"swi_to_t1": rig.matrix.tolist(), "kind": "rigid", "tool": rig.info.get("tool", ""),
                                    "t1": os.path.basename(item.inputs["t1"])}
            meta["etiv_ml"] = _etiv_ml(t1["mni"])
            extra, head_meta = head_box_arrays(t1["img"], cards)
            meta.update(head_meta)
        else:
            mni = _mni(conf, mask, "swi")
            extra = {}
        if mni.get("error"):
            meta["warnings"].append(f"MNI registration: {mni['error']}")
        meta["mni"] = mni
        chans = {c: np.asarray(conf.dataobj) for c in channels}  # every CMB modality is the primary image
        return self._finish_prepare(chans, channels, mask, conf, swi, meta, extra)

    def methods(self, cards, cfg):
        return {**_mask_methods(cards, "SWI"), **_mni_methods(cards, "SWI")}

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
