#!/usr/bin/env python
"""Time of the 3D fine-tuning recipe (config/train/brain_tissue_7t.yaml) from measured steps.

Measures, with the recipe's code (``cohortseg.training.brain3d``): loading one label map onto the
1 mm grid, seconds per training step (patch cut + warp + synthesis + one Adam step of the MeshNet;
the classifier alone, as in the probe epochs, and every layer) at the recipe's patch size (and any
``--patch`` given), and one whole-brain prediction; then extrapolates the recipe: 4 folds x
(probe_epochs + epochs) x (3 volumes x copies) steps + per fold
``eval.contrasts`` x 2 predictions (fine-tuned, pretrained). Report the load (``uptime``) with it.

    python benchmarks/train_3d_step.py --threads 2 --steps 3 --out benchmarks/results/train_3d_step.json
"""
from __future__ import annotations

import argparse
import os
import time

from _common import REPO, emit  # noqa: E402  (puts the repository on sys.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--config", default=str(REPO / "config/train/brain_tissue_7t.yaml"))
    ap.add_argument("--patch", type=int, action="append", default=[])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per patch size (after one warm-up)")
    ap.add_argument("--no-predict", action="store_true", help="skip the whole-brain prediction")
    ap.add_argument("--out")
    a = ap.parse_args()

    import numpy as np

    from cohortseg.training import brain3d as b3
    from cohortseg.training import load_config
    from cohortseg.training.augment import draw_warp3d
    from cohortseg.training.train import setup_tf

    cfg = b3.merge_config(load_config(a.config))
    setup_tf(a.threads)
    src = b3.source_net(cfg["init_from"])
    t0 = time.perf_counter()
    subj = b3.load_subject(cfg["data"]["items"][0], b3.expand_path(cfg["data"]["root"]), cfg["protocol"],
                           int(cfg["data"]["margin_vox"]), partial_volume=bool(cfg["data"].get("partial_volume", True)))
    t_load = time.perf_counter() - t0
    n = 1 + max(int(c) for c in cfg["protocol"])
    res = {"load_label_map_s": round(t_load, 1), "grid": list(subj.labels.shape), "threads": a.threads,
           "load_average": [round(x, 2) for x in os.getloadavg()], "step_s": {}}
    warp = draw_warp3d(subj.labels.shape, np.random.default_rng(0))
    rng = np.random.default_rng(1)
    res["probe_step_s"] = {}
    for patch in sorted(set(a.patch + [int(cfg["train"]["patch"])])):
        model = b3.build_finetune_net(src[2], src[0]["labels"], cfg["protocol"], np.random.default_rng(0))
        for key, body in (("probe_step_s", False), ("step_s", True)):  # classifier alone, then every layer
            b3.compile_phase(model, body, 1e-3, min(16, patch // 4), n)
            times = []
            for i in range(a.steps + 1):
                t0 = time.perf_counter()
                x, y = b3.training_patch(subj, warp, rng, patch, n, cfg["synth"], float(cfg["train"]["class_balance"]))
                model.train_on_batch(x[None, ..., None], b3.one_hot(y, n)[None])
                if i:
                    times.append(time.perf_counter() - t0)
            res[key][str(patch)] = round(float(np.median(times)), 2)
    if not a.no_predict:
        img = b3.synth_image(subj.labels, n, rng, cfg["synth"])
        t0 = time.perf_counter()
        b3.predict_labels(model, img, subj.labels > 0, int(cfg["crop_padding"]))
        res["predict_whole_brain_s"] = round(time.perf_counter() - t0, 1)
    per_epoch = 4 * 3 * int(cfg["augment"]["copies"])  # 4 folds, 3 training volumes
    steps, probe = per_epoch * int(cfg["train"]["epochs"]), per_epoch * int(cfg["train"]["probe_epochs"])
    patch = str(int(cfg["train"]["patch"]))
    train_s = steps * res["step_s"][patch] + probe * res["probe_step_s"][patch]
    predict = res.get("predict_whole_brain_s", 0.0) * 4 * int(cfg["eval"]["contrasts"]) * 2
    res["recipe"] = {"steps": steps, "probe_steps": probe, "train_h": round(train_s / 3600, 2),
                     "eval_h": round(predict / 3600, 2),
                     "load_h": round(4 * t_load / 3600, 2),
                     "total_h": round((train_s + predict + 4 * t_load) / 3600, 2)}
    res["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    emit(res, a.out)


if __name__ == "__main__":
    main()
