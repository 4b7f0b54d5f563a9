#!/usr/bin/env python
"""brain_tissue speed on a CPU: where ``predict`` spends its time, net by net, against the CPU's peak.

Two parts (both print their figures and one JSON):

``profile`` (in process, the plugin's own code path): prepare, predict and finalize of one real T1 with
the default cards (deep-T1-WMH head net, mindgrab, model5_gw_ae, model30chan18cls), the seconds of each
step of ``predict`` (``info.seconds``), the box each net ran on, its FLOPs (from the layer shapes: 2 x
kernel volume x C_in x C_out per voxel per convolution) and the rate reached, against the CPU's FP32
peak (cores x GHz x FLOP per cycle, from lscpu / /proc/cpuinfo). Wall and CPU time of every part.

``snakemake`` (``--snakemake``): the one-T1 run a new user makes, ``snakemake --cores 2 ...
'pipelines=[brain_tissue]'`` in a fresh output folder: wall of the whole run and of the prepare, infer and
finalize jobs (from the shard records), the infer job's model load and predict seconds.

    python benchmarks/brain_tissue_speed.py --threads 2 [--snakemake] [--out benchmarks/results/brain_tissue_speed.json]

On a machine shared with others the wall times are contended: the script prints ``os.getloadavg()`` and
the CPU times beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, SHARED, emit  # noqa: E402  (puts the repository on sys.path)

CARDS = ("deepwmh_head", "brainchop_mindgrab", "brainchop_gw", "brainchop_subcortical")


def cpu_peak_gflops(threads: int) -> dict:
    """FP32 peak of ``threads`` cores: GHz x FLOP/cycle (2 FMA pipes x vector width x 2)."""
    flags, mhz = "", 0.0
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags") and not flags:
            flags = line
        elif line.startswith("cpu MHz") and not mhz:
            mhz = float(line.split(":")[1])
    model = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = re.search(r"Model name:\s*(.+)", model)
    name = name.group(1).strip() if name else "?"
    avx512, avx2 = " avx512f" in flags, " avx2" in flags
    # AMD Zen 4 runs AVX-512 on two 256-bit FMA pipes (32 FP32 FLOP/cycle, as AVX2); Intel server
    # cores with two 512-bit FMA units reach 64
    amd = "AMD" in model
    per_cycle = 32 if (avx2 and (amd or not avx512)) else 64 if avx512 else 16
    return {"cpu": name, "ghz": round(mhz / 1000, 3), "avx512": avx512, "flop_per_cycle_per_core": per_cycle,
            "cores": threads, "peak_gflops": round(threads * mhz / 1000 * per_cycle, 1)}


def flop_per_voxel(model) -> int:
    """FLOP per output voxel of a fully convolutional net: 2 x prod(kernel) x C_in x C_out per conv."""
    import numpy as np

    tot = 0
    for lay in model.layers:
        cfg = lay.get_config()
        if "kernel_size" in cfg:
            tot += 2 * int(np.prod(cfg["kernel_size"])) * int(lay.input.shape[-1]) * int(cfg["filters"])
    return tot


def _voxels(box) -> int:
    lo, hi = box
    n = 1
    for a, b in zip(lo, hi):
        n *= b - a
    return n


def profile(a) -> dict:
    import numpy as np

    from cohortseg.models.cards import find_card
    from cohortseg.models.ensemble import configure_tensorflow, load_models
    from cohortseg.models.store import ModelStore
    from cohortseg.pipelines import get_pipeline
    from cohortseg.pipelines.base import Context, Item, OutputWriter
    from cohortseg.pipelines.brain_tissue import card_roles

    c0, w0 = time.process_time(), time.perf_counter()
    configure_tensorflow(threads=a.threads, onednn=not a.no_onednn)
    cards = [find_card(n) for n in CARDS]
    models = load_models(cards, ModelStore(SHARED / "models"))
    load = {"wall_s": round(time.perf_counter() - w0, 2), "cpu_s": round(time.process_time() - c0, 2)}
    p = get_pipeline("brain_tissue")
    item = Item("sub-01", "", "brain_tissue", "sub-01_T1w", {"image": a.t1})
    cfg = json.loads(a.cfg) if a.cfg else {}
    parts = {"load_models": load}
    c0, w0 = time.process_time(), time.perf_counter()
    prep = p.prepare(item, cards, cfg, Context())
    parts["prepare"] = {"wall_s": round(time.perf_counter() - w0, 2), "cpu_s": round(time.process_time() - c0, 2)}
    c0, w0 = time.process_time(), time.perf_counter()
    pred = p.predict(models, prep, cards, cfg, 1)
    parts["predict"] = {"wall_s": round(time.perf_counter() - w0, 2), "cpu_s": round(time.process_time() - c0, 2)}
    info = json.loads(str(pred["info"]))
    with tempfile.TemporaryDirectory() as tmp:
        c0, w0 = time.process_time(), time.perf_counter()
        metrics = p.finalize(item, prep, pred, cards, cfg, Context(), OutputWriter(tmp, item))
        parts["finalize"] = {"wall_s": round(time.perf_counter() - w0, 2),
                             "cpu_s": round(time.process_time() - c0, 2)}
    peak = cpu_peak_gflops(a.threads)
    per_core = peak["peak_gflops"] / a.threads
    nets = {}
    roles = card_roles(cards)
    cpu_steps = info["seconds"].get("cpu", {})
    for role, (i, spec) in roles.items():
        if spec is None or role not in info["boxes"]:
            continue
        fpv = flop_per_voxel(models[i][0].model)
        lo, hi = info["boxes"][role]
        vox_in = 1
        for x, y in zip(lo, hi):  # the net also sees its zero padding of context on every side
            vox_in *= (y - x) + 2 * spec.crop_padding
        flop = fpv * vox_in
        if role == "tissue" and info.get("tissue", {}).get("wm_level") is not None:
            flop += fpv * 128 ** 3  # the white-matter level's first pass on a central 128^3 block
        s, c = info["seconds"].get(role), cpu_steps.get(role)
        nets[role] = {"card": cards[i].name, "box": info["boxes"][role], "input_voxels": vox_in,
                      "flop_per_voxel": fpv, "tflop": round(flop / 1e12, 3), "wall_s": s, "cpu_s": c,
                      "gflop_per_s": round(flop / 1e9 / s, 1) if s else None,
                      "gflop_per_cpu_s": round(flop / 1e9 / c, 1) if c else None,
                      "fraction_of_peak_wall": round(flop / 1e9 / s / peak["peak_gflops"], 3) if s else None,
                      "fraction_of_core_peak_cpu": round(flop / 1e9 / c / per_core, 3) if c else None}
    total_flop = sum(n["tflop"] for n in nets.values()) * 1e12
    pw, pc = parts["predict"]["wall_s"], parts["predict"]["cpu_s"]
    import os as _os

    return {"t1": a.t1, "threads": a.threads, "config": cfg, "onednn": _os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
            "parts": parts, "predict_steps_s": info["seconds"], "nets": nets, "cpu": peak,
            "predict_tflop": round(total_flop / 1e12, 3),
            "predict_gflop_per_s": round(total_flop / 1e9 / pw, 1),
            "predict_fraction_of_peak_wall": round(total_flop / 1e9 / pw / peak["peak_gflops"], 3),
            "predict_fraction_of_core_peak_cpu": round(total_flop / 1e9 / pc / per_core, 3),
            "metrics": {k: metrics[k] for k in sorted(metrics)},
            "_arrays": {k: np.asarray(pred[k]) for k in ("box", "brain_mask", "tissue", "aseg", "prob_gm", "prob_wm") if k in pred}}


def snakemake_run(a) -> dict:
    """One T1 through ``snakemake --cores N 'pipelines=[brain_tissue]'``: wall of the run and of each job."""
    with tempfile.TemporaryDirectory(prefix="cohortseg-bt-", dir=os.environ.get("BT_KEEP")) as tmp:
        tmp = Path(tmp)
        bids = tmp / "bids" / "sub-01" / "anat"
        bids.mkdir(parents=True)
        (tmp / "bids" / "dataset_description.json").write_text(json.dumps({"Name": "bt", "BIDSVersion": "1.9.0"}))
        shutil.copy(a.t1, bids / "sub-01_T1w.nii.gz")
        extra = [f"brain_tissue={a.cfg}"] if a.cfg else []
        cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp), "--cores", str(a.threads),
               "--config", f"bids_dir={tmp / 'bids'}", f"output_dir={tmp / 'out'}", f"model_dir={SHARED / 'models'}",
               "pipelines=[brain_tissue]", *extra]
        r0 = os.times()
        w0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - w0
        r1 = os.times()
        if res.returncode:
            sys.stderr.write(res.stderr[-4000:])
            raise SystemExit("snakemake failed")
        out = {"wall_s": round(wall, 1),
               "cpu_s": round((r1.children_user - r0.children_user) + (r1.children_system - r0.children_system), 1)}
        inf = tmp / "out" / "work" / "shards" / "infer" / "shard-00000.json"
        if inf.is_file():
            rep = json.loads(inf.read_text())["pipelines"]["brain_tissue"]
            out["infer_job_s"] = rep.get("seconds")  # model load + predict, without the TensorFlow import
            out["infer_model_load_s"] = rep.get("model_load_seconds")
            out["predict_s"] = [v.get("seconds") for v in rep.get("items", {}).values()]
        rec = next((tmp / "out" / "brain_tissue").rglob("*desc-tissue_volumes.json"), None)
        if rec:
            out["predict_steps_s"] = json.loads(rec.read_text())["inference"]["seconds"]
        out["log_tail"] = [ln for ln in res.stderr.splitlines() if "Finished job" in ln or "rule " in ln][-10:]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--t1", default=str(SHARED / "data/brain/t1_crop.nii.gz"))
    ap.add_argument("--cfg", default="", help="brain_tissue settings as JSON, e.g. '{\"box\": \"head\"}'")
    ap.add_argument("--no-onednn", action="store_true", help="TensorFlow's plain kernels (inference.onednn: false)")
    ap.add_argument("--no-profile", action="store_true", help="only the snakemake run")
    ap.add_argument("--snakemake", action="store_true", help="also time the one-T1 snakemake run")
    ap.add_argument("--save-arrays", help="write predict's arrays to this .npz (to compare two settings)")
    ap.add_argument("--out")
    a = ap.parse_args()
    result = {"load_before": [round(x, 2) for x in os.getloadavg()]}
    if not a.no_profile:
        prof = profile(a)
        arrays = prof.pop("_arrays")
        if a.save_arrays:
            import numpy as np

            np.savez_compressed(a.save_arrays, **arrays)
        result["profile"] = prof
    if a.snakemake:
        result["snakemake"] = snakemake_run(a)
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    emit(result, a.out)


if __name__ == "__main__":
    main()
