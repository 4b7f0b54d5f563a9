"""The README's demo: `cohortseg make-demo` + config/demo.yaml plan every public-weight pipeline on
the right images (a dry-run; the full run is timed in the README)."""
import csv

import pytest

from helpers import REPO, job_counts, snakemake, write_config

pytestmark = [pytest.mark.shared]


def test_demo_config_plans_the_three_public_pipelines_on_their_images(tmp_path, shared_dir):
    from cohortseg.demo import build_demo

    bids = build_demo(shared_dir, tmp_path / "bids")
    paths = write_config(tmp_path / "paths.yaml", bids_dir=str(bids), output_dir=str(tmp_path / "out"),
                         model_dir=str(shared_dir / "models"))
    res = snakemake(tmp_path, "-n", "--cores", "2", "--configfile", str(REPO / "config" / "demo.yaml"), str(paths))
    # one shard of 4 sessions: one prepare, one infer (the three pipelines in turn), one finalize
    assert job_counts(res.stdout) == {"prepare": 1, "infer": 1, "finalize": 1, "aggregate": 1, "qc_page": 1, "all": 1}
    with open(tmp_path / "out" / "manifest.tsv") as f:
        rows = [r for r in csv.DictReader((ln for ln in f if not ln.startswith("#")), delimiter="\t")]
    items = {}
    for r in rows:
        items.setdefault(r["pipeline"], set()).add((r["item"], r["status"]))
    assert items["brain_tissue"] == {("sub-01_acq-brain_T1w", "ok"), ("", "missing")}  # the brain, nothing else
    assert {i for i, s in items["sc_csa"] if s == "ok"} == {
        "sub-01_T1w", "sub-01_T2w", "sub-01_T2starw", "sub-02_T2starw", "sub-03_ses-01_T2starw", "sub-03_ses-02_T2starw"}
    assert {i for i, _ in items["sc_gm"]} == {"sub-01_T2starw", "sub-02_T2starw", "sub-03_ses-01_T2starw",
                                              "sub-03_ses-02_T2starw"}
    assert (bids / "sub-01" / "anat" / "sub-01_labels.nii.gz").is_file()  # sc_csa per vertebral level


@pytest.mark.slow
def test_the_demo_runs_and_its_three_derivative_datasets_pass_the_bids_validator(tmp_path, shared_dir):
    """The README's demo, run for real (~100 s on 2 cores): every output the README lists is there,
    sub-02/sub-03 report brain_tissue as no_input (no brain scan: no error), and each derivative dataset passes
    bids-validator-deno with no error and no warning beyond KEPT_WARNINGS."""
    import pandas as pd

    from cohortseg.demo import build_demo
    from helpers import assert_bids_valid

    bids = build_demo(shared_dir, tmp_path / "bids")
    out = tmp_path / "results"
    paths = write_config(tmp_path / "paths.yaml", bids_dir=str(bids), output_dir=str(out),
                         model_dir=str(shared_dir / "models"))
    snakemake(tmp_path, "--cores", "2", "--configfile", str(REPO / "config" / "demo.yaml"), str(paths))
    for table in ("sc_gm_perslice", "csa_perslice", "csa_perlevel", "tissue_volumes", "summary"):
        assert (out / "group" / f"{table}.csv").stat().st_size > 0, table
    assert (out / "qc" / "index.html").is_file()
    summary = pd.read_csv(out / "group/summary.csv", dtype=str, keep_default_na=False)
    assert list(zip(summary.participant_id, summary.session_id)) == [
        ("sub-01", ""), ("sub-02", ""), ("sub-03", "ses-01"), ("sub-03", "ses-02")]
    assert list(summary.brain_tissue_status) == ["ok", "no_input", "no_input", "no_input"]
    assert list(summary.status) == list(summary.sc_gm_status) == list(summary.sc_csa_status) == ["ok"] * 4
    tissue = pd.read_csv(out / "group/tissue_volumes.csv")
    assert list(tissue.participant_id) == ["sub-01"]
    levels = pd.read_csv(out / "group/csa_perlevel.csv", dtype=str, keep_default_na=False)
    sub01 = levels[(levels.participant_id == "sub-01") & (levels.contrast == "T2w")]
    assert set(sub01.VertLevel) == {"3", "4", "5"}  # C3-C5: between the drawn C3 and C5 labels
    for pipeline in ("sc_gm", "sc_csa", "brain_tissue"):
        assert_bids_valid(out / pipeline)
