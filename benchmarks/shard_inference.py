#!/usr/bin/env python
"""Shard benchmark: N sessions through ONE inference job vs N one-session jobs (same models).

Each "job" is a fresh Python process running `cohortseg.workflow.steps.infer_shard`, exactly what the
`infer` rule runs, so the one-session variant pays the TensorFlow import and the model build N times,
as a cluster would. Uses the real sc_gm ensemble (both gmseg models) on the real T2*w scan.
Reports wall times, the speed-up (target >= 3x on CPU) and, where a GPU is visible, throughput and
utilisation samples from nvidia-smi.

    python benchmarks/shard_inference.py --n 20 --out benchmarks/results/shard_20.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import REPO, emit  # noqa: E402  (puts the repository on sys.path)

JOB = """
import json, sys
from cohortseg.workflow.steps import infer_shard
cfg = json.load(open(sys.argv[1]))
infer_shard(["sc_gm"], sys.argv[2], sys.argv[3], cfg)
"""


def gpu_sampler(stop: threading.Event, samples: list) -> None:
    if not shutil.which("nvidia-smi"):
        return
    while not stop.is_set():
        r = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True)
        if r.returncode == 0:
            samples.append([float(x) for x in r.stdout.split("\n")[0].split(",")])
        time.sleep(0.5)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--models", default="gmseg_challenge,gmseg_large",
                    help="sc_gm model cards (the default is the production ensemble)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from cohortseg.demo import build_demo
    from cohortseg.workflow.steps import prepare_session

    with tempfile.TemporaryDirectory(prefix="cohortseg-shard-") as tmp:
        tmp = Path(tmp)
        bids = build_demo(a.shared, tmp / "bids", n_extra=a.n)
        out = tmp / "out"
        cfg = {"output_dir": str(out), "model_dir": str(Path(a.shared) / "models"), "pipelines": ["sc_gm"],
               "sc_gm": {"models": a.models.split(","), "standardise": "model"},
               "inference": {"batch_size": a.batch_size, "prefetch": 2, "threads": 0},
               "reuse": False}  # every job predicts, even where an earlier job left results
        (tmp / "cfg.json").write_text(json.dumps(cfg))
        records = []
        for i in range(a.n):
            sub = f"sub-{i + 4:02d}"
            row = {"participant_id": sub, "session_id": "", "pipeline": "sc_gm", "item": f"{sub}_T2starw",
                   "status": "ok", "error": "",
                   "inputs": json.dumps({"image": str(bids / sub / "anat" / f"{sub}_T2starw.nii.gz")})}
            rec = out / "work" / "prep" / f"{sub}.json"
            prepare_session([row], cfg, rec)
            records.append(str(rec))

        def job(name, recs):  # one `infer` job: a prepare-shard record in, an infer-shard record out
            prep = out / "work" / "shards" / "prepare" / f"{name}.json"
            prep.parent.mkdir(parents=True, exist_ok=True)
            prep.write_text(json.dumps({"sessions": {Path(r).stem: r for r in recs}}))
            subprocess.run([sys.executable, "-c", JOB, str(tmp / "cfg.json"), str(prep),
                            str(out / "work" / "shards" / "infer" / f"{name}.json")], check=True, capture_output=True)

        stop, samples = threading.Event(), []
        sampler = threading.Thread(target=gpu_sampler, args=(stop, samples), daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        job("one_shard", records)
        t_shard = time.perf_counter() - t0
        stop.set()
        t0 = time.perf_counter()
        for i, r in enumerate(records):
            job(f"single-{i}", [r])
        t_single = time.perf_counter() - t0
        report = json.loads((out / "work" / "shards" / "infer" / "one_shard.json").read_text())["pipelines"]["sc_gm"]
        per_subject = [v["seconds"] for v in report["items"].values()]
        result = {
            "n_sessions": a.n, "models": list(report["models"]), "batch_size": a.batch_size,
            "one_shard_job_s": round(t_shard, 2), "n_single_jobs_s": round(t_single, 2),
            "speedup": round(t_single / t_shard, 2), "target_speedup": 3.0,
            "shard_model_load_s": report["model_load_seconds"],
            "shard_predict_s_per_session": round(sum(per_subject) / len(per_subject), 3),
            "sessions_per_s_in_shard": round(a.n / t_shard, 3),
        }
        if samples:
            util = [s[0] for s in samples]
            result["gpu"] = {"utilisation_mean_pct": round(sum(util) / len(util), 1), "utilisation_max_pct": max(util),
                             "memory_used_max_mib": max(s[1] for s in samples)}
    return emit(result, a.out)


if __name__ == "__main__":
    main()
