"""Cohort tables built per shard and assembled: the same tables as a from-scratch aggregate (today's
algorithm, kept here as the reference: every record and every per-session table read at once),
one shard's rerun rebuilds its part only, and bad parts are rebuilt, never dropped or mixed in."""
from __future__ import annotations

import json
import logging
import os
import sys

import numpy as np
import pandas as pd
import pytest

from cohortseg.pipelines import get_pipeline
from cohortseg.pipelines.base import Item, OutputWriter
from cohortseg.workflow import aggregate as agg
from cohortseg.workflow.records import FAILED, ItemRecord, SessionRecord
from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from aggregate_cohort import clone_cohort, synthetic_templates  # noqa: E402

PIPELINES = ["sc_gm", "sc_csa", "brain_tissue"]
# the per-item tables the pipelines name for the cohort tables
(GM_PERSLICE,), (PERSLICE, PERLEVEL), (TISSUE,) = (list(get_pipeline(p).group_tables.values()) for p in PIPELINES)
PERSLICE_TABLE = next(t for t, k in get_pipeline("sc_csa").group_tables.items() if k == PERSLICE)
CONFIG = {"pipelines": PIPELINES, "sc_gm": {"models": ["gmseg_challenge"]}, "sc_csa": {"models": ["sc_csa"]},
          "brain_tissue": {"models": ["brainchop_gw_ae"]}}


# ------------------------------------------------------------------ the reference: today's aggregate
def reference(shard_records, config, ratings=None):
    """summary DataFrame and {table: DataFrame}: every record read, every per-session table read with
    pandas, concatenated in (participant, session) order (the aggregate before per-shard parts)."""
    from cohortseg.pipelines import get_pipeline
    from cohortseg.workflow.rows import split_session_key

    records, seen = [], set()
    sessions = {}
    for p in shard_records:
        sessions.update(json.loads(open(p).read())["sessions"])
    for key, path in sessions.items():
        rec = SessionRecord.read(path)
        if rec is None:
            pid, sid = split_session_key(key)
            rec = SessionRecord(pid, sid, pipelines={p: {"-": ItemRecord(
                FAILED, "workflow", "no record (job did not run or failed)")} for p in config["pipelines"]})
        records.append(rec)
        seen.add((rec.participant_id, rec.session_id))
    records.sort(key=lambda r: (r.participant_id, r.session_id))
    pipelines = config["pipelines"]
    df = pd.DataFrame(agg.summary_rows(records, pipelines))
    status_cols = [f"{p}_status" for p in pipelines if f"{p}_status" in df.columns]
    metric_cols = sorted(c for c in df.columns if c not in agg.ID_COLUMNS + agg.QC_COLUMNS and c not in status_cols)
    df = df.reindex(columns=agg.ID_COLUMNS + ["qc_flags"] + status_cols + metric_cols)
    df = agg._add_qc(df, config, ratings)
    tables = {}
    for pname in pipelines:
        for table_name, key in get_pipeline(pname).group_tables.items():
            frames = []
            for rec in records:
                for it in rec.pipelines.get(pname, {}).values():
                    f = it.files.get(key)
                    if not it.ok or not f or not os.path.isfile(f):
                        continue
                    t = pd.read_csv(f, sep="\t" if f.endswith(".tsv") else ",")
                    t.insert(0, "contrast", it.contrast)
                    t.insert(0, "session_id", rec.session_id)
                    t.insert(0, "participant_id", rec.participant_id)
                    frames.append(t)
            tables[table_name] = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
                columns=["participant_id", "session_id", "contrast"])
    return df, tables


def _read(path):
    return pd.read_csv(path, dtype={"participant_id": str, "session_id": str, "contrast": str},
                       keep_default_na=True)


def assert_same_tables(out_dir, shard_records, config, ratings=None):
    """group/ as written == the reference: same columns in the same order, same rows, same values
    (CSV read back, and the Parquet copy)."""
    ref_summary, ref_tables = reference(shard_records, config, ratings)
    got = _read(out_dir / "summary.csv")
    ref = pd.read_csv(__import__("io").StringIO(ref_summary.to_csv(index=False, na_rep="")),
                      dtype={"participant_id": str, "session_id": str})
    assert list(got.columns) == list(ref.columns)
    pd.testing.assert_frame_equal(got, ref, check_dtype=False)
    for name, ref_t in ref_tables.items():
        ref_t = pd.read_csv(__import__("io").StringIO(ref_t.to_csv(index=False, na_rep="")),
                            dtype={"participant_id": str, "session_id": str, "contrast": str})
        got_t = _read(out_dir / name)
        assert list(got_t.columns) == list(ref_t.columns), name
        pd.testing.assert_frame_equal(got_t, ref_t, check_dtype=False, obj=name)
        pq = pd.read_parquet(out_dir / (name[:-4] + ".parquet"))
        assert list(pq.columns) == list(ref_t.columns)
        for c in pq.columns:
            a, b = pq[c], ref_t[c]
            if pd.api.types.is_numeric_dtype(b) and pd.api.types.is_numeric_dtype(a):
                np.testing.assert_allclose(a.astype(float), b.astype(float), rtol=0, atol=0, err_msg=f"{name}:{c}")
            else:
                assert a.fillna("").astype(str).tolist() == b.fillna("").astype(str).tolist(), (name, c)
    return got


# ------------------------------------------------------------------------ a cohort with edge cases
def _write_item(out, pid, sid, pipeline, name, contrast, metrics, tables):
    item = Item(pid, sid, pipeline, name, {"image": f"/bids/{name}.nii.gz"})
    w = OutputWriter(out, item)
    for key, df in tables.items():
        w.table(key, df)
    return ItemRecord("ok", contrast=contrast, metrics=metrics, files=dict(w.files), stamp="s")


def _session(out, pid, sid, i):
    rec = SessionRecord(pid, sid)
    stem = f"{pid}_{sid}" if sid else pid
    n = 3 + i % 4
    gm = pd.DataFrame({"slice": range(n), "gm_area_mm2": np.round(np.linspace(10, 12, n) + i * 0.01, 4),
                       "wm_area_mm2": [np.nan if (i + s) % 5 == 0 else 50.0 + s for s in range(n)]})
    rec.items("sc_gm")[f"{stem}_T2starw"] = _write_item(
        out, pid, sid, "sc_gm", f"{stem}_T2starw", "T2starw", {"gm_volume_mm3": 700.0 + 37 * (i % 11)},
        {GM_PERSLICE: gm})
    csa = rec.items("sc_csa")
    for c in (["T1w", "T2w"] if i % 3 == 0 else ["T2w"]):
        per = pd.DataFrame({"Filename": f"{stem}_{c}.nii.gz", "Slice (I->S)": range(n),
                            "VertLevel": [pd.NA] * n if i % 2 else [3] * n, "MEAN(area)": 70.0 + np.arange(n) / 3})
        if i % 7 == 3:  # another header in some sessions (a column more)
            per["DistancePMJ"] = 1.5
        csa[f"{stem}_{c}"] = _write_item(
            out, pid, sid, "sc_csa", f"{stem}_{c}", c, {"csa_mean_mm2": 70.0 + i % 9, "n_slices": n},
            {PERSLICE: per, PERLEVEL: per.head(1)})
    if i % 4 == 0 and i < 12:  # brain_tissue measured in the first two shards only: other columns
        rec.items("brain_tissue")[f"{stem}_T1w"] = _write_item(
            out, pid, sid, "brain_tissue", f"{stem}_T1w", "T1w", {"gm_ml": 600.0 + i, "etiv_ml": None},
            {TISSUE: pd.DataFrame([{"gm_ml": 600.0 + i, "wm_ml": 450.5, "label": "a, \"b\""}])})
    else:
        rec.items("brain_tissue")["-"] = ItemRecord("no_input", stage="discovery")
    if i % 10 == 9:
        rec.items("sc_csa")[f"{stem}_T2w"] = ItemRecord("failed", "finalize", "image is all zeros", contrast="T2w")
    return rec


@pytest.fixture()
def cohort(tmp_path, monkeypatch):
    """24 sessions in 4 shards of consecutive session keys; sub-01 has sessions and sub-010.. exist
    (their keys sort otherwise than their ids); sub-0103's record is missing."""
    monkeypatch.setattr(agg, "provenance", lambda config, n: {"n_sessions": n})  # (no model cards here)
    out = tmp_path / "out"
    keys = [f"sub-01_ses-0{s}" for s in (1, 2)] + [f"sub-01{k}" for k in range(10)] + [f"sub-{k:04d}" for k in range(100, 112)]
    keys.sort()
    config = {**CONFIG, "output_dir": str(out)}
    shards = []
    for k in range(4):
        sessions = {}
        for i, key in enumerate(keys[k * 6:(k + 1) * 6], start=k * 6):
            pid, _, sid = key.partition("_")
            path = out / "work" / "records" / f"{key}.json"
            if key != "sub-0103":
                _session(out, pid, sid, i).write(path)
            sessions[key] = str(path)
        rec = out / "work" / "shards" / "finalize" / f"shard-{k:05d}.json"
        rec.parent.mkdir(parents=True, exist_ok=True)
        rec.write_text(json.dumps({"step": "finalize", "sessions": sessions}))
        agg.write_shard_tables(sessions, config, agg.shard_tables_dir(rec))  # as finalize_shard does
        shards.append(rec)
    return out, shards, config


def test_assembled_tables_equal_a_from_scratch_aggregate(cohort):
    out, shards, config = cohort
    df = agg.aggregate(shards, out / "group", config)
    got = assert_same_tables(out / "group", shards, config)
    assert len(got) == 24 and got.participant_id.iloc[:3].tolist() == ["sub-01", "sub-01", "sub-010"]
    row = got.set_index("participant_id").loc["sub-0103"]
    assert row["status"] == "failed" and "no record" in row["error"]  # a planned session is never lost
    assert "sc_csa_T1w_csa_mean_mm2" in got.columns and "DistancePMJ" in _read(out / "group/csa_perslice.csv")
    assert df.columns.tolist() == got.columns.tolist()
    # brain_tissue only in the first two shards (i = 0, 8; i = 4 is sub-0103): one header all the same
    assert got.set_index("participant_id").brain_tissue_gm_ml.dropna().to_dict() == {"sub-010": 600.0, "sub-0107": 608.0}
    assert not list((out / "group").glob(".*"))  # no temporary file left


def test_ratings_and_outliers_are_cohort_wide(cohort):
    out, shards, config = cohort
    ratings = out / "qc_ratings.tsv"
    ratings.write_text("participant_id\tsession_id\tpipeline\trating\trater\ttimestamp\n"
                       "sub-01\tses-02\tsc_gm\tpass\tAB\t2026-01-01T00:00:00Z\n"
                       "sub-01\tses-02\tsc_csa\tartifact\tAB\t2026-01-01T00:00:00Z\n"
                       "sub-0105\t\tsc_gm\tfail\tAB\t2026-01-01T00:00:00Z\n")
    agg.aggregate(shards, out / "group", config, ratings=ratings)
    got = assert_same_tables(out / "group", shards, config, ratings=ratings)
    by = got.set_index(["participant_id", got.session_id.fillna("")])
    assert by.loc[("sub-01", "ses-02"), "qc_rating"] == "artifact" and by.loc[("sub-0105", ""), "qc_rating"] == "fail"
    assert (got.qc_rating == "unrated").sum() == 22
    # sc_gm_gm_volume_mm3 = 700 + 37 * (i % 11): Tukey fences over the whole cohort (24 rows, 4 shards)
    flagged = got.qc_flags.fillna("").str.contains("outlier:")
    assert flagged.sum() == 0 or got.loc[flagged, "qc_flags"].str.contains("outlier:").all()


def test_one_shard_rerun_rebuilds_its_part_only(cohort):
    out, shards, config = cohort
    agg.aggregate(shards, out / "group", config)
    parts = [agg.shard_tables_dir(s) / "part.json" for s in shards]
    before = [p.stat().st_mtime_ns for p in parts]
    sessions = json.loads(shards[2].read_text())["sessions"]
    key, path = next(iter(sessions.items()))
    rec = SessionRecord.read(path)
    rec.items("sc_gm")[next(iter(rec.items("sc_gm")))].metrics["gm_volume_mm3"] = 12345.0
    rec.write(path)
    agg.write_shard_tables(sessions, config, agg.shard_tables_dir(shards[2]))  # the rerun finalize job
    for s in shards[:2] + shards[3:]:  # the other shards' finalize jobs did not run; unchanged parts kept
        agg.write_shard_tables(json.loads(s.read_text())["sessions"], config, agg.shard_tables_dir(s))
    after = [p.stat().st_mtime_ns for p in parts]
    assert [a != b for a, b in zip(after, before)] == [False, False, True, False]
    agg.aggregate(shards, out / "group", config)
    got = assert_same_tables(out / "group", shards, config)
    assert 12345.0 in got.sc_gm_gm_volume_mm3.tolist()


def test_a_cohort_table_is_kept_while_its_parts_are_the_same_and_rebuilt_when_they_change(cohort):
    """group/<table>.csv + .parquet are linked back from work/shards/tables/cohort/ when their parts'
    content did not change (Snakemake removes the rule's outputs before it runs), and assembled again
    when a part's rows changed or a kept file was edited."""
    out, shards, config = cohort
    group, kept = out / "group", agg.shard_tables_dir(shards[0]).parent / "cohort"
    tables = [f for p in PIPELINES for t in get_pipeline(p).group_tables for f in (t, t[:-4] + ".parquet")]
    gm_table = next(t for t in get_pipeline("sc_gm").group_tables)
    agg.aggregate(shards, group, config)
    first = {f: (group / f).stat().st_ino for f in tables}
    assert first == {f: (kept / f).stat().st_ino for f in tables}  # kept: links, not copies

    sessions = json.loads(shards[2].read_text())["sessions"]
    path = next(iter(sessions.values()))
    rec = SessionRecord.read(path)
    gm = rec.items("sc_gm")[next(iter(rec.items("sc_gm")))]
    gm.metrics["gm_volume_mm3"] = 12345.0  # a metric changed, none of the tables
    rec.write(path)
    agg.write_shard_tables(sessions, config, agg.shard_tables_dir(shards[2]))
    for f in group.iterdir():  # as Snakemake does before the rule runs
        f.unlink()
    agg.aggregate(shards, group, config)
    assert {f: (group / f).stat().st_ino for f in tables} == first  # every table kept
    got = assert_same_tables(group, shards, config)
    assert 12345.0 in got.sc_gm_gm_volume_mm3.tolist()

    perslice = pd.read_csv(gm.files[GM_PERSLICE])  # the session's sc_gm rows changed (its job reran)
    perslice.loc[0, "gm_area_mm2"] = 98.765
    perslice.to_csv(gm.files[GM_PERSLICE], index=False)
    rec.write(path)
    agg.write_shard_tables(sessions, config, agg.shard_tables_dir(shards[2]))
    agg.aggregate(shards, group, config)
    now = {f: (group / f).stat().st_ino for f in tables}
    assert [f for f in tables if now[f] != first[f]] == [gm_table, gm_table[:-4] + ".parquet"]
    assert "98.765" in (group / gm_table).read_text()
    assert_same_tables(group, shards, config)

    with open(group / PERSLICE_TABLE, "a") as f:  # a kept file edited in place: not trusted any more
        f.write("sub-x,,T2w\n")
    agg.aggregate(shards, group, config)
    assert (group / PERSLICE_TABLE).stat().st_ino != now[PERSLICE_TABLE]
    assert_same_tables(group, shards, config)
    assert not list(group.glob(".*")) and not list(kept.glob(".*"))


@pytest.mark.parametrize("fault", ["missing", "truncated", "older_version", "stale_record"])
def test_bad_parts_are_rebuilt_never_dropped(cohort, fault, caplog):
    out, shards, config = cohort
    part = agg.shard_tables_dir(shards[1])
    if fault == "missing":
        (part / "part.json").unlink()
    elif fault == "truncated":
        p = part / "csa_perslice.csv"
        p.write_bytes(p.read_bytes()[:-40])
    elif fault == "older_version":
        m = json.loads((part / "part.json").read_text())
        (part / "part.json").write_text(json.dumps({**m, "version": "an older one"}))
    else:  # a record rewritten after its shard's part (a finalize job killed between the two)
        path = next(iter(json.loads(shards[1].read_text())["sessions"].values()))
        rec = SessionRecord.read(path)
        rec.items("sc_gm")[next(iter(rec.items("sc_gm")))].metrics["gm_volume_mm3"] = 999.5
        rec.write(path)
    with caplog.at_level(logging.WARNING, logger="cohortseg.aggregate"):
        agg.aggregate(shards, out / "group", config)
    assert "shard-00001.json" in caplog.text and "rebuilt from its records" in caplog.text
    got = assert_same_tables(out / "group", shards, config)
    assert len(got) == 24
    assert (fault == "stale_record") == (999.5 in got.sc_gm_gm_volume_mm3.tolist())


def test_a_crash_while_assembling_keeps_the_previous_tables(cohort, monkeypatch):
    out, shards, config = cohort
    agg.aggregate(shards, out / "group", config)
    before = {p.name: p.read_bytes() for p in (out / "group").iterdir()}

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(agg, "_assemble_parquet", crash)
    (out / "work" / "records" / "sub-0100.json").unlink()  # something changed
    with pytest.raises(OSError, match="disk full"):
        agg.aggregate(shards, out / "group", config)
    assert {p.name: p.read_bytes() for p in (out / "group").iterdir()} == before  # nothing half-written


def test_a_cloned_cohort_equals_a_from_scratch_aggregate(tmp_path, monkeypatch):
    """The benchmark's cohort (its session records cloned from templates) through the rules' code path."""
    monkeypatch.setattr(agg, "provenance", lambda config, n: {"n_sessions": n})
    templates, config = synthetic_templates(tmp_path / "templates")
    out = tmp_path / "out"
    shards = clone_cohort(templates, out, 130, shard_size=40)
    config = {**config, "output_dir": str(out)}
    for s in shards:
        agg.write_shard_tables(json.loads(s.read_text())["sessions"], config, agg.shard_tables_dir(s))
    agg.aggregate(shards, out / "group", config)
    got = assert_same_tables(out / "group", shards, config)
    assert len(got) == 130 and len(shards) == 4


def test_benchmark_reports_what_it_claims(tmp_path):
    """benchmarks/aggregate_cohort.py on a small cohort: the JSON's figures, the kept outputs, and the
    re-aggregate after one shard changed (figures are not asserted: speed targets live there)."""
    import subprocess

    res = tmp_path / "r.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "aggregate_cohort.py"), "--sessions", "60",
                    "--shard-size", "25", "--out", str(tmp_path / "out"), "--json", str(res)],
                   check=True, capture_output=True, timeout=600)
    r = json.loads(res.read_text())
    assert r["sessions"] == 60 and r["shards"] == 3 and r["templates"] == "synthetic"
    for k in ("wall_s", "peak_rss_mb", "reaggregate_wall_s", "qc_page_wall_s"):
        assert r[k] > 0, k
    assert r["steps"]["shards"]["cpu_s"] > 0 and "qc_page_open_s" not in r  # no --browser
    summary = pd.read_csv(tmp_path / "out" / "group" / "summary.csv")
    assert len(summary) == 60 and r["group_bytes"]["summary.csv"] == (tmp_path / "out/group/summary.csv").stat().st_size
    assert (tmp_path / "out" / "qc" / "index.html").is_file()
