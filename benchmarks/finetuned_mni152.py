#!/usr/bin/env python
"""Real-image check of a fine-tuned brain bundle: does fine-tuning lose accuracy on a real T1?

Runs the ``brain_tissue`` plugin (prepare -> predict -> finalize, its own code path) on the MNI152
2009 T1 template (nilearn) twice, with the cards ``brainchop_mindgrab, brainchop_gw, X``: X the
source net of the fine-tuning (default ``brainchop_subcortical``) and X the fine-tuned bundle
(``--bundle``). Both take the ``aseg`` role, so both write ``desc-aseg_dseg`` on the template grid;
its cortical grey-matter class and its cerebral white-matter class (found by name in each card's
``labels``) are compared with the template's own GM and WM maps (> 0.5), as tests/test_brain.py
checks brainchop_gw. The template's GM map also holds deep and cerebellar grey matter, which neither
net calls cortex, so the figures compare the two nets with each other, not with brainchop_gw's
GM (which is all grey matter).

    python benchmarks/finetuned_mni152.py --bundle models/brain_tissue_7t --out benchmarks/results/finetuned_mni152.json
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _common import SHARED, emit  # noqa: E402  (puts the repository on sys.path)

GM_NAMES = ("cerebral-cortex", "grey matter", "gray matter")
WM_NAMES = ("cerebral-white-matter", "white matter")


def class_of(card, names) -> int:
    """The card's label index whose name is one of ``names`` (case-insensitive)."""
    for k, v in card["labels"].items():
        if str(v).lower() in names:
            return int(k)
    raise SystemExit(f"{card.name}: no class named one of {names} in its labels {card['labels']}")


def run(aseg_card: str, t1: Path, threads: int) -> dict:
    import nibabel as nib
    import numpy as np

    from cohortseg.models.cards import find_card
    from cohortseg.models.ensemble import load_models
    from cohortseg.models.store import ModelStore
    from cohortseg.pipelines import get_pipeline
    from cohortseg.pipelines.base import Context, Item, OutputWriter
    from cohortseg.schema import with_defaults

    cards = [find_card(n) for n in ("brainchop_mindgrab", "brainchop_gw", aseg_card)]
    models = load_models(cards, ModelStore(SHARED / "models"))
    cfg = with_defaults("brain_tissue", {"etiv": False, "anatomy": {"refuse": False}})
    p = get_pipeline("brain_tissue")
    item = Item("sub-MNI152", "", "brain_tissue", "sub-MNI152_T1w", {"image": str(t1)})
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = OutputWriter(tmp, item)
        prep = p.prepare(item, cards, cfg, Context())
        pred = p.predict(models, prep, cards, cfg, 1)
        p.finalize(item, prep, pred, cards, cfg, Context(), out)
        aseg = np.asarray(nib.load(out.files["desc-aseg_dseg.nii.gz"]).dataobj)
    return {"card": cards[2].name, "aseg": aseg, "gm": class_of(cards[2], GM_NAMES),
            "wm": class_of(cards[2], WM_NAMES), "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, help="the fine-tuned bundle (folder with card.yaml)")
    ap.add_argument("--source", default="brainchop_subcortical", help="the card it was fine-tuned from")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    a = ap.parse_args()

    import nibabel as nib
    import numpy as np
    from nilearn import datasets

    from cohortseg.models.ensemble import configure_tensorflow
    from cohortseg.science.metrics import dice

    configure_tensorflow(threads=a.threads)
    mni = datasets.load_mni152_template(resolution=1)
    gm_ref = datasets.load_mni152_gm_template(resolution=1).get_fdata() > 0.5
    wm_ref = datasets.load_mni152_wm_template(resolution=1).get_fdata() > 0.5
    res = {"t1": "nilearn MNI152 2009 template, 1 mm", "reference": "template GM / WM maps > 0.5",
           "threads": a.threads, "load_average": [round(x, 2) for x in os.getloadavg()], "nets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        t1 = Path(tmp) / "mni.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(mni.dataobj, np.float32), mni.affine), t1)
        for role, card in (("source", a.source), ("fine_tuned", str(Path(a.bundle).resolve()))):
            r = run(card, t1, a.threads)
            seg = r["aseg"]
            res["nets"][role] = {"card": r["card"], "gm_class": r["gm"], "wm_class": r["wm"],
                                 "gm_dice": round(dice(seg == r["gm"], gm_ref), 4),
                                 "wm_dice": round(dice(seg == r["wm"], wm_ref), 4),
                                 "gm_ml": round(float((seg == r["gm"]).sum()) / 1000, 1),
                                 "wm_ml": round(float((seg == r["wm"]).sum()) / 1000, 1),
                                 "seconds": r["seconds"]}
    res["template_ml"] = {"gm": round(float(gm_ref.sum()) / 1000, 1), "wm": round(float(wm_ref.sum()) / 1000, 1)}
    res["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    emit(res, a.out)


if __name__ == "__main__":
    main()
