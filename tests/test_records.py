"""Session/item records and the status vocabulary of summary.csv (no TensorFlow, no ../shared).

Sessions go through the workflow's own functions: discovery rows without an image become records in
`prepare_session` -> `finalize_session`; measured and refused items are written as finalize writes
them (`SessionRecord`); `aggregate` and `qc_rows` read the files back.
"""
from __future__ import annotations

import json

import pytest

from cohortseg.errors import AnatomyError
from cohortseg.workflow.aggregate import aggregate
from cohortseg.workflow.records import ItemRecord, SessionRecord
from cohortseg.workflow.report import qc_rows, write_cohort_qc_page
from cohortseg.workflow.steps import finalize_session, prepare_session


def _missing(pid, pipeline):
    return {"participant_id": pid, "session_id": "", "pipeline": pipeline, "item": "", "status": "missing",
            "error": "no image for role 'image' matching {\"suffix\": \"T2starw\"}", "inputs": "{}", "body_part": ""}


def _discovered(tmp_path, config, pid, rows) -> SessionRecord:
    prep = tmp_path / "work" / "prep" / f"{pid}.json"
    prepare_session(rows, config, prep)
    final = tmp_path / "work" / "records" / f"{pid}.json"
    finalize_session(rows, prep, config, final)
    return SessionRecord.read(final)


def _csa(status, contrast, **kw):
    metrics = {"csa_mean_mm2": 70.0} if status == "ok" else {}
    return ItemRecord(status, contrast=contrast, metrics=metrics, **kw)


@pytest.fixture()
def cohort(tmp_path):
    config = {"output_dir": str(tmp_path), "pipelines": ["sc_gm", "sc_csa"],
              "sc_gm": {"models": ["gmseg_challenge", "gmseg_large"]}, "sc_csa": {"models": ["sc_csa"]}}
    refusal = ItemRecord.from_error("finalize", AnatomyError(
        "no spinal cord in the field of view: the cord is on 30% of the slices of its span",
        "/bids/sub-03/anat/sub-03_T1w.nii.gz"), contrast="T1w")
    paths = []
    for pid, csa in [("sub-01", {"sub-01_T2w": _csa("ok", "T2w")}),
                     ("sub-02", None),
                     ("sub-03", {"sub-03_T1w": refusal}),
                     ("sub-04", {"sub-04_T1w": _csa("ok", "T1w"), "sub-04_T2w": _csa("failed", "T2w", stage="prepare",
                                                                                       error="image is all zeros")})]:
        rows = [_missing(pid, "sc_gm")] + ([] if csa else [_missing(pid, "sc_csa")])
        rec = _discovered(tmp_path, config, pid, rows)
        if csa:
            rec.items("sc_csa").update(csa)  # as finalize records them
        path = tmp_path / "work" / "records" / f"{pid}.json"
        rec.write(path)
        paths.append(path)
    shard = tmp_path / "work" / "shards" / "finalize" / "shard-00000.json"
    shard.parent.mkdir(parents=True)
    shard.write_text(json.dumps({"step": "finalize", "sessions": {p.stem: str(p) for p in paths}}))
    df = aggregate([shard], tmp_path / "group", config).set_index("participant_id")  # (builds the shard's part)
    return df, paths, tmp_path, config


def test_no_input_is_no_error_and_not_counted_in_the_overall_status(cohort):
    df = cohort[0]
    s1 = df.loc["sub-01"]
    assert s1["sc_gm_status"] == "no_input" and s1["sc_csa_status"] == "ok"
    assert s1["status"] == "ok" and s1["error"] == ""  # nothing to say: the cord T2*w was never acquired
    assert s1["sc_csa_T2w_csa_mean_mm2"] == 70.0  # per-contrast column from the item's contrast
    s2 = df.loc["sub-02"]
    assert (s2["status"], s2["sc_gm_status"], s2["sc_csa_status"]) == ("no_input", "no_input", "no_input")
    assert s2["error"] == ""


def test_refused_and_partial(cohort):
    df = cohort[0]
    s3 = df.loc["sub-03"]
    assert s3["status"] == "refused" and s3["sc_csa_status"] == "refused" and s3["sc_gm_status"] == "no_input"
    assert s3["error"] == ("sc_csa/sub-03_T1w: finalize: no spinal cord in the field of view: the cord is on 30% of "
                           "the slices of its span (file: /bids/sub-03/anat/sub-03_T1w.nii.gz)")
    s4 = df.loc["sub-04"]
    assert s4["status"] == "partial" and s4["sc_csa_status"] == "partial"
    assert s4["error"] == "sc_csa/sub-04_T2w: prepare: image is all zeros"
    assert s4["sc_csa_T1w_csa_mean_mm2"] == 70.0 and "sc_csa_T2w_csa_mean_mm2" in df.columns


def test_records_round_trip_and_qc_rows(cohort):
    _, paths, tmp, config = cohort
    shard = [tmp / "work" / "shards" / "finalize" / "shard-00000.json"]
    rec = SessionRecord.read(paths[2])
    assert rec == SessionRecord.from_dict(json.loads(paths[2].read_text()))
    assert rec.items("sc_csa")["sub-03_T1w"].status == "refused"
    assert rec.items("sc_gm")["-"] == ItemRecord("no_input", stage="discovery")
    rows = {(r["participant_id"], r["pipeline"]): r for r in qc_rows(tmp / "group" / "summary.csv", shard, config)}
    assert rows[("sub-01", "sc_gm")]["status"] == "no_input" and rows[("sub-01", "sc_gm")]["error"] == ""
    assert rows[("sub-03", "sc_csa")]["status"] == "refused"
    assert "no spinal cord in the field of view" in rows[("sub-03", "sc_csa")]["error"]
    # the QC page's status filter lists the vocabulary with its meaning
    from test_qc_page import read_blob

    blob, _ = read_blob(write_cohort_qc_page(tmp / "group" / "summary.csv", shard, tmp / "qc", config))
    assert list(blob["statuses"]) == ["ok", "partial", "failed", "refused", "no_input"]
    assert "not an error" in blob["statuses"]["no_input"] and "anatomy" in blob["statuses"]["refused"]
    st = {(r[0], r[2]): r[3] for r in blob["rows"]}
    assert st[("sub-01", "sc_gm")] == "no_input" and st[("sub-03", "sc_csa")] == "refused"


def test_ambiguous_discovery_is_a_failure(tmp_path):
    config = {"output_dir": str(tmp_path), "pipelines": ["sc_gm"], "sc_gm": {"models": ["gmseg_challenge"]}}
    row = {**_missing("sub-01", "sc_gm"), "status": "ambiguous", "error": "2 images match role 'image'"}
    rec = _discovered(tmp_path, config, "sub-01", [row])
    assert rec.items("sc_gm")["-"].status == "failed" and rec.status(["sc_gm"]) == "failed"
    assert "2 images match" in rec.items("sc_gm")["-"].error
