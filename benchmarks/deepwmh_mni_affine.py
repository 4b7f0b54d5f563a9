#!/usr/bin/env python
"""Is deep-T1-WMH's learned MNI affine as good as the antspyx one the lesion pipelines use?

For each real T1 (deep-T1-WMH's example, brainchop's t1_crop): the affine native -> MNI152 from
(a) the deep-T1-WMH head + affine nets and (b) antspyx as ``cmb``/SHIVA ``wmh`` compute it
(``conform_ras`` + ``fallback_brain_mask`` + ``registration.affine_to_mni``). Reported: wall time of
each; how far apart they put the corners and the centre of the MNI box (mm); and the quality of each,
the same way for both: the subject's intracranial mask (head net) carried into MNI152 space, Dice
with the MNI152 brain mask, and the distance of its centroid from the template mask's.

    python benchmarks/deepwmh_mni_affine.py --threads 2 --out benchmarks/results/deepwmh_mni_affine.json
"""
from __future__ import annotations

import argparse
import time

from _common import SHARED, emit  # noqa: E402  (puts the repository on sys.path)
T1S = {"deepwmh_example": SHARED / "data/brain/deep-T1-WMH/t1_image.nii.gz",
       "brainchop_t1_crop": SHARED / "data/brain/t1_crop.nii.gz"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    a = ap.parse_args()

    import nibabel as nib
    import numpy as np
    from nilearn import datasets

    from cohortseg.io import load_image
    from cohortseg.models.cards import find_card
    from cohortseg.models.ensemble import FoldModel, configure_tensorflow
    from cohortseg.models.nets import deepwmh_torch as nets
    from cohortseg.pipelines import get_pipeline
    from cohortseg.pipelines.base import Context, Item
    from cohortseg.science.conform import conform_ras
    from cohortseg.science.lesion_input import fallback_brain_mask
    from cohortseg.science import deepwmh as W
    from cohortseg.science import registration

    configure_tensorflow(threads=a.threads)
    tp = SHARED / "models/deep-T1-WMH/torchparams"
    head = [FoldModel(None, 0, "", nets.load_net("head", tp / "params_head_00075_00000.pt"), {})]
    aff = [FoldModel(None, 0, "", nets.load_net("affine", tp / "paramsaffineta_00079_00000.pt"), {})]
    cards = [find_card(n) for n in ("deepwmh_head", "deepwmh_affine", "deepwmh_rois", "deepwmh_wmh")]
    tpl_mask = datasets.load_mni152_brain_mask(resolution=1)
    tm = np.asarray(tpl_mask.dataobj) > 0
    t_centroid = nib.affines.apply_affine(tpl_mask.affine, np.argwhere(tm).mean(0))
    corners = np.array([[i, j, k, 1.0] for i in (0, 183) for j in (0, 201) for k in (0, 71)]).T
    box_mni = np.c_[W.BOX_AFFINE @ corners, [0.0, -16.5, 20.25, 1.0]]  # 8 corners + the box centre

    out = {}
    for name, path in T1S.items():
        img, _ = load_image(path)
        item = Item("sub-01", "", "wmh", name, {"image": str(path)})
        get_pipeline("wmh").prepare(item, cards, {}, Context())  # warm-up of the z-score / resampling code paths
        s = time.perf_counter()
        prep = get_pipeline("wmh").prepare(item, cards, {}, Context())
        pri = deepwmh.head_priors(head, prep.x)
        params = np.asarray(aff[0].predict(W.affine_input(pri)[None]))[0]
        m_deep = W.mni_matrix(params, img.affine, img.shape)
        t_deep = time.perf_counter() - s
        icv = W.head_outputs(pri, img.affine, img.shape)["icv"]

        s = time.perf_counter()
        conf = conform_ras(img, order=1)
        mask = fallback_brain_mask(np.asarray(conf.dataobj), conf.affine)
        tr = registration.affine_to_mni(conf, brain_mask=nib.Nifti1Image(mask.astype(np.uint8), conf.affine))
        m_ants = np.asarray(tr.matrix, float)
        t_ants = time.perf_counter() - s

        def quality(m):
            vox = np.linalg.inv(img.affine) @ np.linalg.inv(m) @ tpl_mask.affine  # template voxel -> native voxel
            warped = W.resample(icv.astype(np.float32), tm.shape, vox) > 0.5
            dice = 2 * (warped & tm).sum() / (warped.sum() + tm.sum())
            c = nib.affines.apply_affine(tpl_mask.affine, np.argwhere(warped).mean(0))
            return {"dice_icv_vs_mni152_mask": round(float(dice), 4),
                    "centroid_offset_mm": round(float(np.linalg.norm(c - t_centroid)), 2),
                    "scaling_det": round(float(np.linalg.det(m[:3, :3])), 4)}

        d = np.linalg.norm((np.linalg.inv(m_deep) @ box_mni - np.linalg.inv(m_ants) @ box_mni)[:3], axis=0)
        out[name] = {"seconds": {"deepwmh_nets": round(t_deep, 2), "antspyx_conform_mask_affine": round(t_ants, 2)},
                     "deep_vs_ants_box_corners_mm": {"max": round(float(d[:8].max()), 2),
                                                     "mean": round(float(d[:8].mean()), 2)},
                     "deep_vs_ants_box_centre_mm": round(float(d[8]), 2),
                     "deepwmh": quality(m_deep), "antspyx": quality(m_ants)}
    emit({"threads": a.threads, "t1s": out}, a.out)


if __name__ == "__main__":
    main()
