"""Resume after SIGKILL and reproducibility: a killed run finishes on the next try without
half-written files, without recomputing finished sessions, and gives the same tables and masks
as an uninterrupted run."""
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from cohortseg.demo import build_demo
from helpers import REPO, snakemake, write_config

pytestmark = [pytest.mark.shared, pytest.mark.slow]


def _cohort(tmp, shared_dir):
    bids = build_demo(shared_dir, tmp / "bids")
    shutil.rmtree(bids / "sub-03" / "ses-02")
    return bids


def _cfg(tmp, bids, out, shared_dir):
    return write_config(tmp / f"{out.name}.yaml", bids_dir=str(bids), output_dir=str(out),
                        model_dir=str(shared_dir / "models"), pipelines=["sc_gm"],
                        sc_gm={"models": ["gmseg_challenge"]}, inference={"shard_size": 1})


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sigkill_then_resume_and_reproducible(tmp_path, shared_dir):
    bids = _cohort(tmp_path, shared_dir)
    out = tmp_path / "killed"
    cfg = _cfg(tmp_path, bids, out, shared_dir)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(cfg), "--cores", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    records = out / "work" / "records"
    deadline = time.time() + 600
    while time.time() < deadline and not (records.is_dir() and any(records.glob("*.json"))):
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be killed")
        time.sleep(0.2)
    time.sleep(1.0)  # let the next job start, so something is mid-flight when we kill
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in records.glob("*.json")}
    assert 1 <= len(done_before) < 3, done_before

    snakemake(tmp_path, "--unlock", configfile=cfg)
    snakemake(tmp_path, "--cores", "1", "--rerun-incomplete", configfile=cfg)
    after = {p.name: p.stat().st_mtime_ns for p in records.glob("*.json")}
    assert len(after) == 3
    for name, mtime in done_before.items():
        assert after[name] == mtime, f"{name} was recomputed"
    leftovers = [p for p in out.rglob("*") if ".part" in p.name]
    assert not leftovers, leftovers
    for m in out.rglob("*_mask.nii.gz"):
        nib.load(m).get_fdata()  # every mask is complete and readable

    # an uninterrupted run of the same cohort gives identical tables and masks
    ref = tmp_path / "reference"
    snakemake(tmp_path, "--cores", "1", configfile=_cfg(tmp_path, bids, ref, shared_dir))
    assert (ref / "group/summary.csv").read_text() == (out / "group/summary.csv").read_text()
    assert (ref / "group/sc_gm_perslice.csv").read_text() == (out / "group/sc_gm_perslice.csv").read_text()
    masks = sorted(p.relative_to(ref) for p in ref.rglob("*_label-GM_*.nii.gz"))
    assert len(masks) == 6
    for rel in masks:
        a, b = nib.load(ref / rel).get_fdata(), nib.load(out / rel).get_fdata()
        assert np.array_equal(a, b), rel
