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
