"""Workflow runs shared by several test modules (session-scoped: each runs once per test session).

`csa_run`: sc_csa through the real Snakefile with the committed bundle (config/models/sc_csa).
sub-01 has the shared T1w and T2w of one session plus the vertebral labels drawn on the T2w
(`t2/labels.nii.gz`: C3 and C5 body centres) as `sub-01_labels.nii.gz`, carried to the T1w through
scanner coordinates; sub-02 has only the T2*w, in a session folder with an `acq-` entity, and no
labels (VertLevel n/a, whole-cord row); sub-03 a brain T1w (refused: no cord). test_pipeline_csa
checks its science, test_bids_validator its BIDS validity (sessions, acq-, several contrasts).
"""
from __future__ import annotations

import json
import shutil
import time

import pytest

from helpers import snakemake, write_config

CSA_SUB02 = "sub-02_ses-01_acq-axial_T2starw"


@pytest.fixture(scope="session")
def csa_run(tmp_path_factory, shared_dir):
    tmp = tmp_path_factory.mktemp("csa")
    bids = tmp / "bids"
    spine = shared_dir / "data/spine"
    (bids / "sub-01/anat").mkdir(parents=True)
    (bids / "sub-02/ses-01/anat").mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "csa", "BIDSVersion": "1.9.0"}))
    shutil.copy(spine / "t1/t1w.nii.gz", bids / "sub-01/anat/sub-01_T1w.nii.gz")
    shutil.copy(spine / "t2/t2.nii.gz", bids / "sub-01/anat/sub-01_T2w.nii.gz")
    shutil.copy(spine / "t2/labels.nii.gz", bids / "sub-01/anat/sub-01_labels.nii.gz")
    shutil.copy(spine / "t2s/t2s.nii.gz", bids / f"sub-02/ses-01/anat/{CSA_SUB02}.nii.gz")
    (bids / "sub-03/anat").mkdir(parents=True)  # a brain T1w: the default filters take every T1w
    shutil.copy(shared_dir / "data/brain/deep-T1-WMH/t1_image.nii.gz", bids / "sub-03/anat/sub-03_T1w.nii.gz")
    out = tmp / "out"
    cfg = write_config(tmp / "cfg.yaml", bids_dir=str(bids), output_dir=str(out),
                       model_dir=str(shared_dir / "models"), pipelines=["sc_csa"])
    t0 = time.perf_counter()
    res = snakemake(tmp, "--cores", "2", configfile=cfg)
    print(f"sc_csa workflow run: {time.perf_counter() - t0:.1f}s")
    return {"tmp": tmp, "bids": bids, "out": out, "cfg": cfg, "res": res}
