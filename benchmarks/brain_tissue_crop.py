#!/usr/bin/env python
"""brain_tissue per session with and without the fast crop of the brain-mask net.

The real models (mindgrab, model5_gw_ae, model30chan18cls, deep-T1-WMH head net) on a real T1:
``predict`` once with ``fast_crop: false`` (brainchop's head box for mindgrab) and once with the
head net's intracranial box, timing each step (``info.seconds``) and comparing the results (brain
mask Dice, tissue agreement, volumes). Also the measured eTIV (``etiv_icv_ml``).

    python benchmarks/brain_tissue_crop.py --threads 2 --out benchmarks/results/brain_tissue_crop.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

from _common import SHARED, emit  # noqa: E402  (puts the repository on sys.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--t1", default=str(SHARED / "data/brain/t1_crop.nii.gz"))
    ap.add_argument("--out")
    a = ap.parse_args()

    import numpy as np

    from cohortseg.models.cards import find_card
    from cohortseg.models.ensemble import configure_tensorflow, load_models
    from cohortseg.models.store import ModelStore
    from cohortseg.pipelines import get_pipeline
    from cohortseg.pipelines.base import Context, Item, OutputWriter

    configure_tensorflow(threads=a.threads)
    cards = [find_card(n) for n in ("brainchop_mindgrab", "brainchop_gw", "brainchop_subcortical", "deepwmh_head")]
    models = load_models(cards, ModelStore(SHARED / "models"))
    p = get_pipeline("brain_tissue")
    item = Item("sub-01", "", "brain_tissue", "sub-01_T1w", {"image": a.t1})
    cfg = {"etiv": False}
    s = time.perf_counter()
    prep = p.prepare(item, cards, cfg, Context())
    prep_s = time.perf_counter() - s
    runs = {}
    for fast in (False, True):
        s = time.perf_counter()
        arrays = p.predict(models, prep, cards, dict(cfg, fast_crop=fast), 1)
        wall = time.perf_counter() - s
        info = json.loads(str(arrays["info"]))
        with tempfile.TemporaryDirectory() as tmp:
            s = time.perf_counter()
            m = p.finalize(item, prep, arrays, cards, dict(cfg, fast_crop=fast), Context(), OutputWriter(tmp, item))
            fin = time.perf_counter() - s
        lo = np.asarray(arrays["box"][:3])
        full = np.zeros((256, 256, 256), bool)
        full[tuple(slice(a_, a_ + n) for a_, n in zip(lo, arrays["brain_mask"].shape))] = arrays["brain_mask"] > 0
        tissue = np.zeros((256, 256, 256), np.uint8)
        tissue[tuple(slice(a_, a_ + n) for a_, n in zip(lo, arrays["tissue"].shape))] = arrays["tissue"]
        runs["fast" if fast else "head_box"] = {"predict_s": round(wall, 1), "finalize_s": round(fin, 1),
                                                "steps_s": info["seconds"], "boxes": info["boxes"],
                                                "metrics": {k: m[k] for k in ("brain_mask_ml", "gm_ml", "wm_ml", "csf_ml")
                                                            if k in m} | {"etiv_icv_ml": m.get("etiv_icv_ml")},
                                                "_mask": full, "_tissue": tissue}
    a_, b_ = runs["head_box"].pop("_mask"), runs["fast"].pop("_mask")
    ta, tb = runs["head_box"].pop("_tissue"), runs["fast"].pop("_tissue")
    both = (ta > 0) | (tb > 0)
    result = {"t1": a.t1, "threads": a.threads, "prepare_s": round(prep_s, 1), "runs": runs,
              "brain_mask_dice_fast_vs_head_box": round(float(2 * (a_ & b_).sum() / (a_.sum() + b_.sum())), 4),
              "tissue_agreement_fast_vs_head_box": round(float((ta[both] == tb[both]).mean()), 4),
              "session_s": {k: round(prep_s + v["predict_s"] + v["finalize_s"], 1) for k, v in runs.items()}}
    emit(result, a.out)


if __name__ == "__main__":
    main()
