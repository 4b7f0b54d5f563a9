"""Discovery: BIDS parsing, filters, ambiguity/missing reports, the cached manifest."""
import json
import os
import time

import pytest

from cohortseg.workflow import discovery
from cohortseg.fakebids import make_fake_bids

ROLES = {"sc_gm": {"image": ({"suffix": "T2starw"}, True, False)}}


def test_parse_name():
    assert discovery.parse_name("sub-01_ses-2_acq-ax_run-1_T2starw.nii.gz") == (
        {"sub": "01", "ses": "2", "acq": "ax", "run": "1"}, "T2starw")
    assert discovery.parse_name("sub-01_T1w.json") is None
    assert discovery.parse_name("notbids_T1w.nii.gz") is None


def test_sessions_and_rows(tmp_path):
    make_fake_bids(tmp_path, 4, contrasts=("T2starw",), session_every=2)
    rows, fp = discovery.build_manifest(tmp_path, ROLES)
    keys = [(r["participant_id"], r["session_id"]) for r in rows]
    assert keys == [("sub-00001", "ses-01"), ("sub-00001", "ses-02"), ("sub-00002", ""),
                    ("sub-00003", "ses-01"), ("sub-00003", "ses-02"), ("sub-00004", "")]
    assert all(r["status"] == "ok" for r in rows)
    assert rows[0]["item"] == "sub-00001_ses-01_T2starw"
    assert json.loads(rows[0]["inputs"])["image"].endswith("sub-00001/ses-01/anat/sub-00001_ses-01_T2starw.nii.gz")
    assert len(fp) == 64


def test_missing_contrast_is_reported_not_dropped(tmp_path):
    make_fake_bids(tmp_path, 2, contrasts=("T1w",), session_every=0)
    rows, _ = discovery.build_manifest(tmp_path, ROLES)
    assert [r["status"] for r in rows] == ["missing", "missing"]
    assert "no image for role 'image'" in rows[0]["error"] and "T2starw" in rows[0]["error"]


def test_ambiguity_lists_candidates_and_filter(tmp_path):
    anat = tmp_path / "sub-01" / "anat"
    anat.mkdir(parents=True)
    for n in ("sub-01_acq-a_T2starw.nii.gz", "sub-01_acq-b_T2starw.nii.gz"):
        (anat / n).touch()
    rows, _ = discovery.build_manifest(tmp_path, ROLES)
    assert rows[0]["status"] == "ambiguous"
    err = rows[0]["error"]
    assert "sub-01_acq-a_T2starw.nii.gz" in err and "sub-01_acq-b_T2starw.nii.gz" in err
    assert "sc_gm.filters.image" in err and "acq" in err
    # the filter resolves it
    rows, _ = discovery.build_manifest(tmp_path, {"sc_gm": {"image": ({"suffix": "T2starw", "acq": "b"}, True, False)}})
    assert rows[0]["status"] == "ok" and rows[0]["item"] == "sub-01_acq-b_T2starw"


def test_multiple_role_gives_one_item_per_image(tmp_path):
    make_fake_bids(tmp_path, 1, contrasts=("T1w", "T2w", "T2starw"), session_every=0)
    rows, _ = discovery.build_manifest(tmp_path, {"sc_csa": {"image": ({"suffix": ["T1w", "T2w"]}, True, True)}})
    assert sorted(r["item"] for r in rows) == ["sub-00001_T1w", "sub-00001_T2w"]


def test_participant_selection(tmp_path):
    make_fake_bids(tmp_path, 5, contrasts=("T2starw",), session_every=0)
    rows, _ = discovery.build_manifest(tmp_path, ROLES, participant_label=["00002", "sub-00003"], exclude=["00003"])
    assert [r["participant_id"] for r in rows] == ["sub-00002"]


def test_manifest_cached_and_rebuilt_on_change(tmp_path):
    bids = make_fake_bids(tmp_path / "bids", 3, contrasts=("T2starw",), session_every=0)
    man = tmp_path / "out" / "manifest.tsv"
    rows = discovery.load_or_build(bids, man, ROLES)
    assert len(rows) == 3 and man.is_file()
    stamp = man.stat().st_mtime_ns
    time.sleep(0.01)
    assert len(discovery.load_or_build(bids, man, ROLES)) == 3
    assert man.stat().st_mtime_ns == stamp  # cache hit: not rewritten
    # a new participant changes the fingerprint -> rebuilt
    (bids / "sub-00009" / "anat").mkdir(parents=True)
    (bids / "sub-00009" / "anat" / "sub-00009_T2starw.nii.gz").touch()
    assert len(discovery.load_or_build(bids, man, ROLES)) == 4
    # cluster jobs trust the cache without scanning (even if the tree changed again)
    (bids / "sub-00010" / "anat").mkdir(parents=True)
    (bids / "sub-00010" / "anat" / "sub-00010_T2starw.nii.gz").touch()
    assert len(discovery.load_or_build(bids, man, ROLES, check=False)) == 4
    assert len(discovery.load_or_build(bids, man, ROLES, rebuild=True)) == 5


def test_scan_never_writes_into_bids(tmp_path):
    bids = make_fake_bids(tmp_path / "bids", 2, contrasts=("T2starw",))
    before = sorted(os.walk(bids))
    discovery.load_or_build(bids, tmp_path / "out" / "manifest.tsv", ROLES)
    assert sorted(os.walk(bids)) == before


@pytest.mark.shared
def test_body_part_routes_images_and_the_manifest_says_why(tmp_path, shared_dir):
    """A multi-protocol cohort: brain and cord T1w in one dataset. The sidecar's BodyPartExamined
    (dcm2niix) or an acq entity naming the body part route each image to the pipelines of its
    anatomy (default config, through the Snakefile's plan); an image without either goes to both."""
    import csv

    from helpers import snakemake, write_config

    bids = tmp_path / "bids"
    files = {"sub-01/anat/sub-01_T1w": "BRAIN", "sub-02/anat/sub-02_acq-cspine_T1w": None,
             "sub-03/anat/sub-03_T1w": "CSPINE", "sub-04/anat/sub-04_T1w": None}
    for stem, part in files.items():
        (bids / stem).parent.mkdir(parents=True, exist_ok=True)
        (bids / f"{stem}.nii.gz").touch()
        if part:
            (bids / f"{stem}.json").write_text(json.dumps({"BodyPartExamined": part, "Modality": "MR"}))
    cfg = write_config(tmp_path / "cfg.yaml", bids_dir=str(bids), output_dir=str(tmp_path / "out"),
                       model_dir=str(shared_dir / "models"), pipelines=["sc_csa", "brain_tissue"])
    snakemake(tmp_path, "-n", "--cores", "1", configfile=cfg)
    with open(tmp_path / "out" / "manifest.tsv", newline="") as fh:
        rows = {(r["participant_id"], r["pipeline"]): r for r in csv.DictReader(fh, delimiter="\t")}
    status = {k: r["status"] for k, r in rows.items()}
    assert status == {("sub-01", "sc_csa"): "missing", ("sub-01", "brain_tissue"): "ok",
                      ("sub-02", "sc_csa"): "ok", ("sub-02", "brain_tissue"): "missing",
                      ("sub-03", "sc_csa"): "ok", ("sub-03", "brain_tissue"): "missing",
                      ("sub-04", "sc_csa"): "ok", ("sub-04", "brain_tissue"): "ok"}
    assert rows[("sub-01", "sc_csa")]["body_part"] == "sub-01_T1w.nii.gz: BodyPartExamined BRAIN -> excluded (spine)"
    assert rows[("sub-01", "brain_tissue")]["body_part"] == "sub-01_T1w.nii.gz: BodyPartExamined BRAIN -> kept (brain)"
    assert rows[("sub-02", "brain_tissue")]["body_part"] == "sub-02_acq-cspine_T1w.nii.gz: acq-cspine -> excluded (brain)"
    assert rows[("sub-03", "brain_tissue")]["body_part"] == "sub-03_T1w.nii.gz: BodyPartExamined CSPINE -> excluded (brain)"
    assert rows[("sub-04", "brain_tissue")]["body_part"] == ""  # nothing said: kept by both
    # routing off: the filters alone choose
    cfg = write_config(tmp_path / "cfg2.yaml", bids_dir=str(bids), output_dir=str(tmp_path / "out2"),
                       model_dir=str(shared_dir / "models"), pipelines=["brain_tissue"], body_part={"route": False})
    snakemake(tmp_path, "-n", "--cores", "1", configfile=cfg)
    text = (tmp_path / "out2" / "manifest.tsv").read_text()
    assert text.count("\tok\t") == 4
