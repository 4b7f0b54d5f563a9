"""Shard jobs resume at session granularity: when a shard job reruns (a new participant joined its
shard, a resubmission after a kill), every item whose inputs, settings and models are unchanged is
reused, and nothing already computed is lost. Also: a worker process that dies is isolated."""
import json
import os
import shutil
from concurrent.futures.process import BrokenProcessPool

import pandas as pd
import pytest

from cohortseg.workflow import steps
from cohortseg.demo import build_demo
from helpers import snakemake, write_config


def _mtimes(folder, pattern):
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob(pattern)}


@pytest.mark.shared
@pytest.mark.slow
def test_new_participant_in_a_finished_shard_reuses_the_others(tmp_path, shared_dir):
    bids = build_demo(shared_dir, tmp_path / "bids")
    shutil.rmtree(bids / "sub-03")
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", bids_dir=str(bids), output_dir=str(out),
                       model_dir=str(shared_dir / "models"), pipelines=["sc_gm"],
                       sc_gm={"models": ["gmseg_challenge"]}, inference={"shard_size": 20})
    snakemake(tmp_path, "--cores", "2", configfile=cfg)
    work = out / "work"
    records, preps = _mtimes(work / "records", "*.json"), _mtimes(work / "prep", "*.npz")
    probs, masks = _mtimes(work / "infer", "*.npz"), _mtimes(out / "sc_gm", "*_mask.nii.gz")
    assert sorted(records) == ["sub-01.json", "sub-02.json"] and len(preps) == len(probs) == 2 and len(masks) == 2

    build_demo(shared_dir, bids, n_extra=1)  # sub-03 (two sessions) and sub-04 join the cohort
    res = snakemake(tmp_path, "--cores", "2", configfile=cfg)
    assert "rule prepare" in res.stdout + res.stderr  # the one shard did rerun...
    # ...but the finished sessions were reused, not recomputed
    assert {k: v for k, v in _mtimes(work / "records", "*.json").items() if k in records} == records
    assert {k: v for k, v in _mtimes(work / "prep", "*.npz").items() if k in preps} == preps
    assert {k: v for k, v in _mtimes(work / "infer", "*.npz").items() if k in probs} == probs
    assert {k: v for k, v in _mtimes(out / "sc_gm", "*_mask.nii.gz").items() if k in masks} == masks
    infer = json.loads((work / "shards" / "infer" / "sc_gm" / "shard-00000.json").read_text())["items"]
    assert {k for k, v in infer.items() if v.get("reused")} == {"sub-01/sub-01_T2starw", "sub-02/sub-02_T2starw"}
    assert {k for k, v in infer.items() if v["status"] == "ok" and not v.get("reused")} == {
        "sub-03_ses-01/sub-03_ses-01_T2starw", "sub-03_ses-02/sub-03_ses-02_T2starw", "sub-04/sub-04_T2starw"}
    summary = pd.read_csv(out / "group" / "summary.csv")
    assert len(summary) == 5 and set(summary["status"]) == {"ok"}

    # reuse: false recomputes (e.g. with --forcerun)
    nocache = write_config(tmp_path / "nocache.yaml", **{**__import__("yaml").safe_load(cfg.read_text()), "reuse": False})
    snakemake(tmp_path, "--cores", "2", "--forcerun", "finalize", configfile=nocache)
    after = _mtimes(work / "records", "*.json")
    assert all(after[k] != v for k, v in records.items())


def _maybe_die(x):
    if x == 2:
        os._exit(3)  # a segfault or an out-of-memory kill looks like this to the pool
    return x * 10


def test_a_dying_worker_only_costs_its_own_session():
    res = steps._map_sessions(_maybe_die, [(i,) for i in range(5)], workers=2)
    assert [r for i, r in enumerate(res) if i != 2] == [0, 10, 30, 40]
    assert isinstance(res[2], BrokenProcessPool)
    assert steps._map_sessions(_maybe_die, [(0,), (1,)], workers=1) == [0, 10]  # in process
