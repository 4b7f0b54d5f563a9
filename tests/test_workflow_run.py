"""End to end: the real workflow on a small real cohort with broken participants mixed in.

One run (module-scoped, ~1-2 min on 2 cores) is checked from several angles: Dice of the workflow's
own masks against the manual labels, orientation invariance, outputs on the native grid, failure
isolation (a corrupt and an all-zero scan share shards with good ones), the cohort tables and
provenance, and read-only inputs.
"""
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from badinputs import make_bad
from cohortseg.demo import build_demo
from cohortseg.science.metrics import dice
from helpers import assert_bids_valid, output_path, snakemake, write_config
from test_anatomy import _brain_gre_slab

pytestmark = [pytest.mark.shared, pytest.mark.slow]


def _tree_state(root):
    return sorted((p, os.stat(os.path.join(p, f)).st_mtime_ns, f) for p, _, fs in os.walk(root) for f in fs)


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_dir):
    tmp = tmp_path_factory.mktemp("e2e")
    bids = build_demo(shared_dir, tmp / "bids")
    shutil.rmtree(bids / "sub-03" / "ses-02")  # keep the run small: 3 good sessions
    t2s = shared_dir / "data/spine/t2s/t2s.nii.gz"
    make_bad("truncated", t2s, bids / "sub-04/anat/sub-04_T2starw.nii.gz")
    make_bad("all_zero", t2s, bids / "sub-06/anat/sub-06_T2starw.nii.gz")
    make_bad("fov_misses_anatomy", t2s, bids / "sub-07/anat/sub-07_T2starw.nii.gz")
    (bids / "sub-05/anat").mkdir(parents=True)
    shutil.copy(shared_dir / "data/spine/t1/t1w.nii.gz", bids / "sub-05/anat/sub-05_T1w.nii.gz")
    (bids / "sub-08/anat").mkdir(parents=True)  # a brain cohort's T2*w GRE: a brain, not a cord
    nib.save(nib.Nifti1Image(*_brain_gre_slab(shared_dir)), str(bids / "sub-08/anat/sub-08_T2starw.nii.gz"))
    for p in bids.rglob("*"):
        if p.is_file():
            p.chmod(0o444)
    before = _tree_state(bids)
    out = tmp / "out"
    cfg = write_config(tmp / "cfg.yaml", bids_dir=str(bids), output_dir=str(out),
                       model_dir=str(shared_dir / "models"), pipelines=["sc_gm"], inference={"shard_size": 2})
    res = snakemake(tmp, "--cores", "2", configfile=cfg)
    return {"tmp": tmp, "bids": bids, "out": out, "res": res, "before": before, "cfg": cfg}


def _mask(run, key, stem):
    return (output_path(run["out"], "sc_gm", stem, "label-GM_mask.nii.gz"),
            output_path(run["out"], "sc_gm", stem, "label-GM_probseg.nii.gz"))


def test_dice_against_manual_labels(run, shared_dir):
    mask_p, prob_p = _mask(run, "sub-01", "sub-01_T2starw")
    mask = nib.load(mask_p)
    manual = nib.load(shared_dir / "data/spine/t2s/t2s_gmseg_manual.nii.gz")
    native = nib.load(shared_dir / "data/spine/t2s/t2s.nii.gz")
    assert mask.shape == native.shape and np.allclose(mask.affine, native.affine, atol=1e-5)
    d = dice(mask.get_fdata() > 0, manual.get_fdata() > 0)
    print(f"workflow ensemble Dice = {d:.4f}")
    assert d >= 0.84
    prob = nib.load(prob_p).get_fdata()
    assert prob.min() >= 0 and prob.max() <= 1
    assert np.array_equal(prob > 0.5, mask.get_fdata() > 0)


def test_orientation_variants_give_the_same_mask(run):
    ref = nib.load(_mask(run, "sub-01", "sub-01_T2starw")[0])
    ref_world = nib.as_closest_canonical(ref).get_fdata()
    for key, stem in [("sub-02", "sub-02_T2starw"), ("sub-03_ses-01", "sub-03_ses-01_T2starw")]:
        m = nib.load(_mask(run, key, stem)[0])
        src = nib.load(run["bids"] / key.replace("_", "/") / "anat" / f"{stem}.nii.gz")
        assert m.shape == src.shape and np.allclose(m.affine, src.affine, atol=1e-5)
        d = dice(nib.as_closest_canonical(m).get_fdata() > 0, ref_world > 0)
        assert d >= 0.95, (key, d)


def test_summary_one_row_per_session_with_failures_explained(run):
    df = pd.read_csv(run["out"] / "group/summary.csv", dtype=str, keep_default_na=False)
    keys = list(zip(df.participant_id, df.session_id))
    assert keys == [("sub-01", ""), ("sub-02", ""), ("sub-03", "ses-01"), ("sub-04", ""), ("sub-05", ""), ("sub-06", ""),
                    ("sub-07", ""), ("sub-08", "")]
    st = dict(zip(df.participant_id, df.status))
    assert st == {"sub-01": "ok", "sub-02": "ok", "sub-03": "ok", "sub-04": "failed", "sub-05": "no_input",
                  "sub-06": "failed", "sub-07": "refused", "sub-08": "refused"}
    assert dict(zip(df.participant_id, df.sc_gm_status)) == st
    err = dict(zip(df.participant_id, df.error))
    assert "corrupt or truncated" in err["sub-04"] and "sub-04_T2starw.nii.gz" in err["sub-04"]
    assert err["sub-05"] == ""  # a cord T1w only: no T2*w was acquired, which is no error
    assert "all zeros" in err["sub-06"]
    # the field of view misses the cord; a brain T1 stored as T2starw: refused, the criterion named
    assert "no spinal cord in the field of view: no gray matter segmented on any of the" in err["sub-07"]
    assert err["sub-08"].startswith("sc_gm/sub-08_T2starw: finalize: no spinal cord in the field of view: ")
    assert "anatomy.min_extent_fraction" in err["sub-08"] and "sub-08_T2starw.nii.gz" in err["sub-08"]
    assert output_path(run["out"], "sc_gm", "sub-08_T2starw", "desc-GM_qc.png", figure=True).is_file()
    assert output_path(run["out"], "sc_gm", "sub-07_T2starw", "desc-GM_qc.png", figure=True).is_file()  # kept for QC
    vol = df.set_index("participant_id")["sc_gm_gm_volume_mm3"]
    assert 500 < float(vol["sub-01"]) < 2000 and vol["sub-04"] == ""
    # the shard holding sub-04 still segmented sub-03
    assert _mask(run, "sub-03_ses-01", "sub-03_ses-01_T2starw")[0].is_file()


def test_tables_provenance_and_bids_derivatives(run):
    out = run["out"]
    prov = json.loads((out / "group/summary.json").read_text())
    assert set(prov["models"]) == {"gmseg_challenge", "gmseg_large"}
    assert prov["models"]["gmseg_large"]["folds"][0]["sha256"].startswith("85823b95")
    assert prov["thresholds"]["sc_gm"]["threshold_fine"] == 0.999
    assert "tensorflow" in "".join(prov["packages"]) and prov["config"]["pipelines"] == ["sc_gm"]
    desc = json.loads((out / "sc_gm/dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "cohortseg"
    per = pd.read_csv(out / "group/sc_gm_perslice.csv")
    assert {"participant_id", "session_id", "contrast", "slice", "gm_area_mm2"} <= set(per.columns)
    assert set(per.participant_id) == {"sub-01", "sub-02", "sub-03"}  # failed sessions add no rows
    tsv = pd.read_csv(output_path(out, "sc_gm", "sub-01_T2starw", "desc-GM_perslice.tsv"), sep="\t")
    mask = nib.load(_mask(run, "sub-01", "sub-01_T2starw")[0])
    z = np.sqrt((mask.affine[:3, :3] ** 2).sum(0))
    assert np.isclose(tsv.gm_area_mm2.sum() * z[2], mask.get_fdata().sum() * np.prod(z), rtol=1e-3)
    png = output_path(out, "sc_gm", "sub-01_T2starw", "desc-GM_qc.png", figure=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "qc/index.html").is_file()
    # a valid BIDS-derivatives dataset, refused and failed sessions' kept outputs included
    assert_bids_valid(out / "sc_gm")


def test_tables_assembled_from_shard_parts_equal_a_from_scratch_aggregate(run):
    """The rules' tables (each finalize job's part, assembled by the aggregate rule) are those of
    today's algorithm: every record and every per-session table read at once (test_aggregate)."""
    from test_aggregate import assert_same_tables

    work = run["out"] / "work"
    config = json.loads(next((work / "config").glob("*.json")).read_text())
    shards = sorted((work / "shards" / "finalize").glob("shard-*.json"))
    assert len(shards) == 4 and all((work / "shards" / "tables" / s.stem / "part.json").is_file() for s in shards)
    assert len(assert_same_tables(run["out"] / "group", shards, config)) == 8
    per = pd.read_parquet(run["out"] / "group" / "sc_gm_perslice.parquet")
    assert set(per.participant_id) == {"sub-01", "sub-02", "sub-03"} and per.gm_area_mm2.dtype == float


def test_inputs_untouched(run):
    assert _tree_state(run["bids"]) == run["before"]


def test_rerun_is_a_noop(run):
    res = snakemake(run["tmp"], "-n", "--cores", "1", configfile=run["cfg"])
    assert "Nothing to be done" in res.stdout + res.stderr


def test_jobs_read_a_content_addressed_config_that_reruns_nothing_by_its_name(run):
    """Jobs read the run's config from work/config/<sha1>.json, named in their command as a param
    Snakemake's params trigger skips: a setting that changes no result (inference.batch_size) names
    another file and reruns nothing; a setting the steps use (sc_gm.threshold_native) reruns them."""
    import yaml
    from helpers import job_counts

    base = yaml.safe_load(run["cfg"].read_text())
    configs = run["out"] / "work" / "config"
    before = set(configs.glob("*.json"))
    assert len(before) == 1
    cfg = write_config(run["tmp"] / "cfg-batch.yaml", **{**base, "inference": {**base["inference"], "batch_size": 3}})
    res = snakemake(run["tmp"], "-n", "--cores", "1", configfile=cfg)
    assert "Nothing to be done" in res.stdout + res.stderr
    (new,) = set(configs.glob("*.json")) - before
    job = json.loads(new.read_text())
    assert job["inference"]["batch_size"] == 3 and job["output_dir"] == str(run["out"])
    cfg = write_config(run["tmp"] / "cfg-thr.yaml", **{**base, "sc_gm": {"threshold_native": 0.6}})
    counts = job_counts(snakemake(run["tmp"], "-n", "--cores", "1", configfile=cfg).stdout)
    assert counts["prepare"] == counts["infer"] == counts["finalize"] == len(list((run["out"] / "work" / "shards" / "prepare").glob("*.json")))


def test_exported_qc_ratings_only_rerun_the_tables(run):
    """Ratings exported from qc/index.html flag participants in summary.csv; nothing is recomputed."""
    ratings = run["out"] / "qc" / "qc_ratings.tsv"
    ratings.write_text("participant_id\tsession_id\tpipeline\trating\trater\ttimestamp\n"
                       "sub-02\t\tsc_gm\tfail\tAB\t2026-01-01T10:00:00Z\n"
                       "sub-03\tses-01\tsc_gm\tpass\tAB\t2026-01-01T10:01:00Z\n")
    dry = snakemake(run["tmp"], "-n", "--cores", "1", configfile=run["cfg"]).stdout
    from helpers import job_counts

    assert job_counts(dry) == {"aggregate": 1, "qc_page": 1, "all": 1}
    snakemake(run["tmp"], "--cores", "1", configfile=run["cfg"])
    df = pd.read_csv(run["out"] / "group/summary.csv", dtype=str, keep_default_na=False).set_index("participant_id")
    assert df.loc["sub-02", "qc_rating"] == "fail" and df.loc["sub-03", "qc_rating"] == "pass"
    assert df.loc["sub-01", "qc_rating"] == "unrated"


def test_snakemake_report_includes_cohort_table_and_qc_page(run):
    snakemake(run["tmp"], "--report", str(run["tmp"] / "report.zip"), configfile=run["cfg"])
    import zipfile

    names = zipfile.ZipFile(run["tmp"] / "report.zip").namelist()
    assert any(n.endswith("summary.csv") for n in names) and any(n.endswith("index.html") for n in names), names
