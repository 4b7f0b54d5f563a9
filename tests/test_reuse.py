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
    infer = json.loads((work / "shards" / "infer" / "shard-00000.json").read_text())["pipelines"]["sc_gm"]["items"]
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


@pytest.mark.shared
@pytest.mark.slow
def test_new_code_of_one_pipeline_recomputes_its_items_only(tmp_path, shared_dir):
    """The code version (a digest of a pipeline's modules and what they import) is in every stamp:
    after an edit of sc_csa's module, a rerun recomputes the sc_csa items and reuses sc_gm's."""
    import subprocess
    import sys

    from helpers import REPO

    wf = tmp_path / "wf"  # a copy of the workflow whose package we can edit
    wf.mkdir()
    for part in ("Snakefile", "rules", "scripts", "config", "envs", "cohortseg"):
        (shutil.copytree if (REPO / part).is_dir() else shutil.copy)(
            REPO / part, wf / part, **({"ignore": shutil.ignore_patterns("__pycache__")} if part != "Snakefile" else {}))
    anat = tmp_path / "bids" / "sub-01" / "anat"
    anat.mkdir(parents=True)
    (tmp_path / "bids" / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    shutil.copy(shared_dir / "data" / "spine" / "t2s" / "t2s.nii.gz", anat / "sub-01_T2starw.nii.gz")
    shutil.copy(shared_dir / "data" / "spine" / "t1" / "t1w.nii.gz", anat / "sub-01_T1w.nii.gz")
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", bids_dir=str(tmp_path / "bids"), output_dir=str(out),
                       model_dir=str(shared_dir / "models"), pipelines=["sc_gm", "sc_csa"],
                       sc_gm={"models": ["gmseg_challenge"]}, sc_csa={"filters": {"image": {"suffix": "T1w"}}})

    def run():
        cmd = [sys.executable, "-m", "snakemake", "-s", str(wf / "Snakefile"), "--directory", str(tmp_path),
               "--configfile", str(cfg), "--cores", "2"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        assert res.returncode == 0, res.stderr[-4000:]
        return json.loads((out / "group" / "summary.json").read_text())["code_versions"]

    def stamps(pipeline):
        return {f"{where}/{k}": v for where, folder, pattern in (
            ("prep", out / "work" / "prep" / pipeline, "*.npz"), ("infer", out / "work" / "infer" / pipeline, "*.npz"),
            ("out", out / pipeline, "*.nii.gz")) for k, v in _mtimes(folder, pattern).items()}

    first = run()
    gm, csa = stamps("sc_gm"), stamps("sc_csa")
    assert len(gm) >= 4 and len(csa) >= 4
    with open(wf / "cohortseg" / "pipelines" / "sc_csa.py", "a") as f:
        f.write("\nRELEASE = 2  # new code (a comment or docstring alone changes no version)\n")
    second = run()
    assert second["sc_gm"] == first["sc_gm"] and second["sc_csa"] != first["sc_csa"]
    assert stamps("sc_gm") == gm  # reused: not one file rewritten
    infer = json.loads((out / "work" / "shards" / "infer" / "shard-00000.json").read_text())["pipelines"]
    assert "models" not in infer["sc_gm"] and "models" in infer["sc_csa"]  # the one infer job loaded sc_csa's folds only
    after = stamps("sc_csa")
    assert set(after) == set(csa) and all(after[k] != csa[k] for k in csa)  # every sc_csa file recomputed
    summary = pd.read_csv(out / "group" / "summary.csv")
    assert list(summary["status"]) == ["ok"]
