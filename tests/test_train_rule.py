"""The `train` target of the Snakefile: a CI-sized training run writes a valid model bundle, which the
workflow then uses for inference (`sc_csa.models: [<bundle folder>]`) on a tiny BIDS cohort.

The training config is the shipped recipe (config/train/sc_csa.yaml, found relative to the
repository because it is not in the working directory) with the CI-sized overrides of
docs/TRAINING.md passed as `train_set`; `train_config`/`train_dir` come on the command line.
"""
from __future__ import annotations

import json
import shutil
import time

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from helpers import job_counts, output_path, snakemake, write_config

pytestmark = [pytest.mark.shared, pytest.mark.slow]

CI_SET = {"net.base_filters": 4, "net.depth": 2, "train.epochs": 3, "train.slices_per_epoch": 48,
          "train.patience": 2, "train.min_epochs": 1}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_dir):
    tmp = tmp_path_factory.mktemp("train_rule")
    bids = tmp / "bids"
    (bids / "sub-01/anat").mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.9.0"}))
    shutil.copy(shared_dir / "data/spine/t2/t2.nii.gz", bids / "sub-01/anat/sub-01_T2w.nii.gz")
    common = dict(bids_dir=str(bids), model_dir=str(shared_dir / "models"), pipelines=["sc_csa"])
    cfg = write_config(tmp / "train.yaml", output_dir=str(tmp / "out_train"), train_set=CI_SET, **common)
    bundle = tmp / "models" / "sc_csa_ci"
    cli = ["--config", "train_config=config/train/sc_csa.yaml", f"train_dir={bundle}"]
    t0 = time.perf_counter()
    res = snakemake(tmp, "--cores", "2", "train", *cli, configfile=cfg)  # target after --cores: --configfile is nargs
    t_train = time.perf_counter() - t0
    icfg = write_config(tmp / "infer.yaml", output_dir=str(tmp / "out"), sc_csa={"models": [str(bundle)]},
                        **common)
    t0 = time.perf_counter()
    snakemake(tmp, "--cores", "2", configfile=icfg)
    t_infer = time.perf_counter() - t0
    print(f"snakemake train: {t_train:.1f}s, inference run with the new bundle: {t_infer:.1f}s")
    return {"tmp": tmp, "bids": bids, "bundle": bundle, "cfg": cfg, "icfg": icfg, "cli": cli, "res": res}


def test_train_target_writes_a_valid_bundle(trained):
    from cohortseg.io import sha256sum
    from cohortseg.training.bundle import verify_bundle

    bundle = trained["bundle"]
    card = verify_bundle(bundle)  # schema + fold checksums
    assert card["pipeline"] == "sc_csa" and card["architecture"]["loader"] == "keras_full"
    assert len(card["folds"]) == 2 and all(sha256sum(bundle / f["file"]) == f["sha256"] for f in card["folds"])
    used = card["training"]["config"]
    assert used["net"]["base_filters"] == 4 and used["net"]["depth"] == 2  # train_set reached the trainer
    assert used["train"]["epochs"] == 3 and max(card["training"]["epochs"]) <= 3
    rep = json.loads((bundle / "cv_report.json").read_text())
    assert set(rep["leave_one_contrast_out"]) == {"T1w", "T2w"}
    assert (bundle / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")]  # no half-written bundle left
    assert (trained["tmp"] / "out_train/logs/train/sc_csa_ci.log").is_file()


def test_train_is_up_to_date_and_stays_out_of_the_default_target(trained):
    res = snakemake(trained["tmp"], "-n", "--cores", "1", "train", *trained["cli"], configfile=trained["cfg"])
    assert "Nothing to be done" in res.stdout + res.stderr
    # the default target never plans `train`, even with a training config that does not exist
    res = snakemake(trained["tmp"], "-n", "--cores", "1", "--config", "train_config=/nonexistent/train.yaml",
                    configfile=trained["icfg"])
    assert "Nothing to be done" in res.stdout + res.stderr
    fresh = snakemake(trained["tmp"], "-n", "--cores", "1", "--config", f"output_dir={trained['tmp'] / 'dry'}",
                      configfile=trained["cfg"]).stdout
    assert "train" not in job_counts(fresh) and job_counts(fresh).get("infer") == 1


def test_workflow_runs_with_the_trained_bundle(trained):
    tmp, bundle = trained["tmp"], trained["bundle"]
    out = tmp / "out"
    native = nib.load(trained["bids"] / "sub-01/anat/sub-01_T2w.nii.gz")
    prob = nib.load(output_path(out, "sc_csa", "sub-01_T2w", "label-SC_probseg.nii.gz"))
    mask = nib.load(output_path(out, "sc_csa", "sub-01_T2w", "label-SC_mask.nii.gz"))
    assert prob.shape == native.shape and np.allclose(prob.affine, native.affine, atol=1e-5)
    p = prob.get_fdata()
    assert 0 <= p.min() and p.max() <= 1 and np.array_equal(p > 0.5, mask.get_fdata() > 0)
    df = pd.read_csv(out / "group/summary.csv").set_index("participant_id")
    row = df.loc["sub-01"]
    print(f"tiny bundle on sub-01_T2w: status {row['status']}, mean CSA "
          f"{row.get('sc_csa_T2w_csa_mean_mm2')} mm2, error {row.get('error')!r}")
    # the workflow applied exactly the trained models: the same bundle through the plugin gives the
    # same probabilities, bit for bit, and the same outcome (a 3-epoch, 7.7k-parameter net may miss
    # the cord; then both fail with the same reason and the outputs are kept for QC)
    from cohortseg.errors import AnatomyError, InputError
    from helpers import run_item

    try:
        direct = run_item("sc_csa", {"image": native.get_filename()}, tmp / "direct", {"models": [str(bundle)]},
                          name="sub-01_T2w")
        error = refused = None
    except InputError as e:
        direct, error, refused = None, e.reason, isinstance(e, AnatomyError)
    again = nib.load(output_path(tmp / "direct", "sc_csa", "sub-01_T2w", "label-SC_probseg.nii.gz")).get_fdata()
    np.testing.assert_array_equal(again, p)
    if error is None:
        assert row["status"] == "ok"
        assert row["sc_csa_T2w_csa_mean_mm2"] == pytest.approx(direct["metrics"]["csa_mean_mm2"], abs=1e-3)
        assert output_path(out, "sc_csa", "sub-01_T2w", "desc-csa_perslice.tsv").is_file()
        assert output_path(out, "sc_csa", "sub-01_T2w", "desc-csa_perlevel.tsv").is_file()
    else:  # refused: wrong anatomy (no cord found), failed: another data problem
        assert row["status"] == ("refused" if refused else "failed") and error in str(row["error"])
    assert (out / "group/csa_perslice.csv").is_file() and (out / "group/csa_perlevel.csv").is_file()
    assert output_path(out, "sc_csa", "sub-01_T2w", "desc-SC_qc.png", figure=True).is_file()
    prov = json.loads((out / "group/summary.json").read_text())
    model = prov["models"]["sc_csa"]
    assert model["source"] == str(bundle / "card.yaml")
    card = yaml.safe_load((bundle / "card.yaml").read_text())
    assert [f["sha256"] for f in model["folds"]] == [f["sha256"] for f in card["folds"]]
