"""Spinal cord gray matter (Perone et al. 2017, gmseg): 0.25 mm axial slices, dilated-conv ensemble."""
from __future__ import annotations

import numpy as np

from cohortseg.errors import InputError
from cohortseg.pipelines.base import Context, Item, OutputWriter, Pipeline, Predicted, Prepared, Role
from cohortseg.schema import with_defaults
from cohortseg.science.anatomy import check_cord, limits


class ScGm(Pipeline):
    name = "sc_gm"
    anatomy = "spine"
    description = "Spinal cord gray matter segmentation (Perone et al. 2017 dilated convolutions, fold ensemble)"
    roles = {"image": Role(description="axial T2*w of the cervical cord")}
    group_tables = {"sc_gm_perslice.csv": "desc-GM_perslice.tsv"}

    def prepare(self, item: Item, cards: list, cfg: dict, ctx: Context) -> Prepared:
        from cohortseg.science.resampling import to_axial_slices

        img, warnings = ctx.load_image(item.inputs["image"])
        grid_spec = cards[0].get("grid", {})
        slices, grid = to_axial_slices(img, inplane_mm=float(grid_spec.get("inplane_mm", 0.25)),
                                       crop=tuple(grid_spec.get("crop", (200, 200))))
        from cohortseg.science.resampling import fov_mask

        inside = slices[fov_mask(grid)]  # SCT's "volume" standardisation: the resampled slices in the FOV
        meta = {"grid": grid, "volume_mean": float(inside.mean()), "volume_std": float(inside.std()),
                "warnings": warnings}
        return Prepared(x=slices[..., None].astype(np.float32), meta=meta)

    def predict(self, models, prepared, cards, cfg, batch_size):
        from cohortseg.models.ensemble import fold_average

        x, cfg = prepared.x, with_defaults(self.name, cfg)
        per_card = []
        for card, folds in zip(cards, models):
            for fold in folds:
                if cfg["standardise"] == "volume":
                    mean, std = prepared.meta["volume_mean"], prepared.meta["volume_std"]
                    if not std > 0:
                        raise InputError("constant image inside the field of view: cannot standardise it")
                else:
                    norm = {**card["normalisation"], **fold.params}
                    mean, std = float(norm["mean"]), float(norm["std"])
                xs = (x - mean) / std
                # flip_tta: left-right mirror of each slice (axis 1 of the slice grid runs R->L)
                per_card.append(fold_average([fold.predict], xs, batch_size,
                                             mirror_axis=1 if cfg["flip_tta"] else None))
        return Predicted({"prob": np.mean(per_card, axis=0).astype(np.float32)})

    def finalize(self, item: Item, prepared: Prepared, predicted: Predicted, cards, cfg, ctx: Context,
                 out: OutputWriter) -> dict:
        import nibabel as nib
        import pandas as pd

        from cohortseg.science.metrics import area_per_slice, volume_mm3
        from cohortseg.models.nets.gmseg import fine_to_native

        native, cfg = nib.load(item.inputs["image"]), with_defaults(self.name, cfg)
        prob = predicted.prob
        fine = prob[..., 0] if prob.ndim == 4 else prob
        grid = prepared.meta["grid"]
        # binarise at threshold_fine in the 0.25 mm grid, map back linearly: probseg is the GM
        # fraction of each native voxel and the mask is exactly probseg > threshold_native
        prob_native, mask_native = fine_to_native(fine, grid, native,
                                                  threshold_fine=float(cfg["threshold_fine"]),
                                                  threshold_native=float(cfg["threshold_native"]))
        mask_native = mask_native.astype(bool)
        aff = native.affine
        out.nifti("label-GM_probseg.nii.gz", np.clip(prob_native, 0, 1).astype(np.float32), aff)
        out.nifti("label-GM_mask.nii.gz", mask_native.astype(np.uint8), aff)

        axis = int(grid["through_axis"])
        area = area_per_slice(mask_native, aff, axis)
        volume = volume_mm3(mask_native, aff)
        table = pd.DataFrame({"slice": np.arange(len(area)), "gm_area_mm2": np.round(area, 4)})
        out.table("desc-GM_perslice.tsv", table)
        nonzero = area[area > 0]
        metrics = {
            "gm_volume_mm3": round(volume, 3),
            "gm_area_mean_mm2": round(float(nonzero.mean()), 4) if nonzero.size else 0.0,
            "gm_area_max_mm2": round(float(area.max()), 4) if area.size else 0.0,
            "n_slices_with_gm": int((area > 0).sum()),
        }
        _qc(native, mask_native, out, item)
        # cord GM through the field of view, of a plausible area, or refused (outputs kept for QC)
        check_cord(mask_native, aff, limits(self.name, cfg), item.contrast, item.inputs["image"], out.flags,
                   out.checks, structure="gray matter")
        return metrics


def _qc(native, mask, out: OutputWriter, item: Item) -> None:
    from cohortseg.qc.outliers import sanity_flags
    from cohortseg.qc.snapshots import mosaic

    data = np.asarray(native.dataobj, dtype=np.float32)
    out.snapshot("desc-GM_qc.png", lambda png: mosaic(data, mask.astype(np.uint8), native.affine, png,
                                                       view="axial", zoom="cord", title=f"{item.name} - GM"))
    # the cord runs through the top and bottom of an axial slab: touching S/I edges is normal
    out.flags += sanity_flags(mask, native.affine, ignore_edges="SI")
