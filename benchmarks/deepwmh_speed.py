#!/usr/bin/env python
"""deep-T1-WMH speed on CPU: the head + affine + region nets per T1, and the whole ``wmh`` item
(prepare -> predict -> finalize of the plugin) with the WMH net, on deep-T1-WMH's example T1.

The head, affine and region nets are the real ones (../shared); the WMH net is the real one when
``--wmh`` points at ``params_finalwide_train7500.pt``, else the same architecture (Cap5eModel) with
random weights: the speed does not depend on the values. Upstream figure: ~5 s per T1 on 2 CPU cores
with PyTorch (README of bthyreau/deep-T1-WMH).

    python benchmarks/deepwmh_speed.py --threads 2 --repeat 3 --out benchmarks/results/deepwmh_speed.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

from _common import REPO, SHARED, emit  # noqa: E402  (puts the repository on sys.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--wmh", help="params_finalwide_train7500.pt (default: random weights, same architecture)")
    ap.add_argument("--t1", default=str(SHARED / "data/brain/deep-T1-WMH/t1_image.nii.gz"))
    ap.add_argument("--torch", action="store_true",
                    help="also time the PyTorch versions of the nets (tests/torch_deepwmh.py) on this machine")
    ap.add_argument("--out")
    a = ap.parse_args()

    import numpy as np

    from cohortseg.models.cards import find_card
    from cohortseg.models.ensemble import FoldModel, configure_tensorflow
    from cohortseg.models.nets import deepwmh_torch as nets
    from cohortseg.pipelines import get_pipeline
    from cohortseg.pipelines.base import Context, Item, OutputWriter
    from cohortseg.science import deepwmh as W

    configure_tensorflow(threads=a.threads)
    t0 = time.perf_counter()
    cards = [find_card(n) for n in ("deepwmh_head", "deepwmh_affine", "deepwmh_rois", "deepwmh_wmh")]
    tp = SHARED / "models/deep-T1-WMH/torchparams"
    built = {"head": nets.load_net("head", tp / "params_head_00075_00000.pt"),
             "affine": nets.load_net("affine", tp / "paramsaffineta_00079_00000.pt"),
             "rois": nets.load_net("rois", tp / "paramsLRoiNo184_t1fs7_00105_train3800.pt"),
             "wmh": nets.load_net("wmh", a.wmh) if a.wmh else nets.build_wmh()}
    models = [[FoldModel(card=c, index=0, sha256="", model=built[deepwmh.card_net(c)], params={})] for c in cards]
    load_s = time.perf_counter() - t0

    item = Item("sub-01", "", "wmh", "sub-01_T1w", {"image": a.t1})
    steps: dict[str, list[float]] = {k: [] for k in ("prepare", "head", "affine", "mni_box", "rois", "three_nets",
                                                      "wmh_net", "predict", "finalize", "item")}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(a.repeat + 1):  # the first run warms TensorFlow up and is not counted
            t = {}
            s = time.perf_counter()
            prep = get_pipeline("wmh").prepare(item, cards, {}, Context())
            t["prepare"] = time.perf_counter() - s
            aff = np.asarray(prep.meta["native_affine"])
            shape = tuple(prep.meta["native_shape"])
            s = time.perf_counter()
            pri = deepwmh.head_priors(models[0], prep.x)
            t["head"] = time.perf_counter() - s
            s = time.perf_counter()
            params = np.asarray(models[1][0].predict(W.affine_input(pri)[None]))[0]
            matrix = W.mni_matrix(params, aff, shape)
            t["affine"] = time.perf_counter() - s
            s = time.perf_counter()
            box, _ = W.mni_box(W.zscore(np.asarray(prep.arrays["t1"], np.float32)), aff, matrix)
            t["mni_box"] = time.perf_counter() - s
            s = time.perf_counter()
            W.roi_labels(np.asarray(models[2][0].predict(box[None, ..., None]))[0])
            t["rois"] = time.perf_counter() - s
            t["three_nets"] = t["head"] + t["affine"] + t["mni_box"] + t["rois"]
            s = time.perf_counter()
            prob = get_pipeline("wmh").predict(models, prep, cards, {}, 1)
            t["predict"] = time.perf_counter() - s
            s = time.perf_counter()
            get_pipeline("wmh").finalize(item, prep, prob, cards, {}, Context(), OutputWriter(tmp, item))
            t["finalize"] = time.perf_counter() - s
            t["wmh_net"] = t["predict"] - t["three_nets"]  # predict = the three nets + the WMH net
            t["item"] = t["prepare"] + t["predict"] + t["finalize"]
            if rep:
                for k, v in t.items():
                    steps[k].append(v)
    torch_s = _torch_times(a.threads, a.repeat) if a.torch else None
    result = {"threads": a.threads, "pytorch_same_machine_s": torch_s, "repeat": a.repeat, "t1": a.t1, "wmh_weights": a.wmh or "random (same architecture)",
              "model_load_s": round(load_s, 2),
              "median_s": {k: round(statistics.median(v), 2) for k, v in steps.items()},
              "upstream_pytorch_2_cores_s": 5.0}
    emit(result, a.out)


def _torch_times(threads: int, repeat: int) -> dict:
    """Median forward time of the PyTorch reference nets (random weights, same shapes) on this machine."""
    import statistics

    import torch

    sys.path.insert(0, str(REPO / "tests"))
    import torch_deepwmh

    torch.set_num_threads(threads)
    shapes = {"head": (1, 1, 64, 64, 64), "affine": (1, 2, 64, 64, 64), "rois": (1, 1, 184, 202, 72),
              "wmh": (1, 1, 184, 202, 72)}
    out = {}
    for net, shape in shapes.items():
        m, x, ts = torch_deepwmh.randomised(net), torch.randn(*shape), []
        with torch.no_grad():
            for rep in range(repeat + 1):
                s = time.perf_counter()
                m(x)
                if rep:
                    ts.append(time.perf_counter() - s)
        out[net] = round(statistics.median(ts), 2)
    return out


if __name__ == "__main__":
    main()
