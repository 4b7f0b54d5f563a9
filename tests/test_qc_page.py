"""Static QC page generation and the ratings round trip (no browser needed)."""
from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pandas as pd
import pytest

from cohortseg.qc.page import FIELDS, write_qc_page
from cohortseg.qc.ratings import COLUMNS, apply_ratings, read_ratings

PIPELINES = ["sc_gm", "brain", "cmb", "wmh"]


def fake_rows(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        failed = i % 97 == 13
        rows.append({
            "participant_id": f"sub-{i // 4:05d}",
            "session_id": "ses-01" if i % 8 < 4 else "ses-02",
            "pipeline": PIPELINES[i % 4],
            "status": "failed" if failed else "ok",
            "error": "InputError: corrupt file" if failed else "",
            "qc_flags": "outlier:gm_volume_mm3;edge" if i % 50 == 7 else "",
            "gm_volume_mm3": float(rng.normal(6e5, 5e4)) if not failed else np.nan,
            "wm_volume_mm3": float(rng.normal(4.5e5, 4e4)),
            "n_lesions": int(rng.integers(0, 9)),
        })
    return rows


def read_blob(index_html):
    text = index_html.read_text(encoding="utf-8")
    m = re.search(r'<script type="application/json" id="qc-data">(.*?)</script>', text, re.S)
    assert m, "JSON blob missing"
    return json.loads(m.group(1)), text


def test_page_with_2000_rows(tmp_path):
    rows = fake_rows(2000)
    out = write_qc_page(rows, tmp_path / "qc", title="Cohort X QC")
    assert out == tmp_path / "qc" / "index.html" and out.is_file()
    blob, text = read_blob(out)
    assert blob["fields"] == FIELDS
    assert len(blob["rows"]) == 2000
    assert blob["page_id"] == str((tmp_path / "qc").resolve())
    assert blob["metrics"] == ["gm_volume_mm3", "wm_volume_mm3", "n_lesions"]
    r0 = dict(zip(FIELDS, blob["rows"][0]))
    assert r0["participant_id"] == "sub-00000" and r0["pipeline"] == "sc_gm"
    assert r0["metrics"][0::2] == [0, 1, 2]
    failed = dict(zip(FIELDS, blob["rows"][13]))
    assert failed["status"] == "failed" and 0 not in failed["metrics"][0::2]  # NaN dropped
    assert dict(zip(FIELDS, blob["rows"][7]))["qc_flags"] == "outlier:gm_volume_mm3;edge"
    size = out.stat().st_size
    assert size < 2000 * 250 + 60_000, f"page too large: {size} bytes"
    # self-contained: no external scripts, styles or CDNs
    assert not re.search(r'<(script|link|img)[^>]+(src|href)="?(https?:)?//', text)
    assert "<script src" not in text and "<link" not in text
    assert '"lazy"' in text and "qc_ratings.tsv" in text
    assert "<title>Cohort X QC</title>" in text
    assert not list((tmp_path / "qc").glob(".*part*"))


def test_paths_are_relative_and_quoted(tmp_path):
    fig = tmp_path / "sc_gm" / "sub-01" / "figures"
    fig.mkdir(parents=True)
    (fig / "sub-01 #1_qc.png").write_bytes(b"")
    rows = [{"participant_id": "sub-01", "pipeline": "sc_gm", "status": "ok",
             "snapshot": str(fig / "sub-01 #1_qc.png"), "thumbnail": "sc_gm/sub-01/figures/t.png"}]
    out = write_qc_page(rows, tmp_path / "qc", base_dir=tmp_path)
    r = dict(zip(FIELDS, read_blob(out)[0]["rows"][0]))
    assert r["img"] == "../sc_gm/sub-01/figures/sub-01%20%231_qc.png"
    assert r["thumb"] == "../sc_gm/sub-01/figures/t.png"
    assert r["session_id"] == ""


def test_html_injection_is_neutralised(tmp_path):
    evil = "</script><script>alert(1)</script><!--"
    rows = [{"participant_id": evil, "pipeline": "brain", "status": "ok", "error": "a & b <c>"}]
    out = write_qc_page(rows, tmp_path, title="<b>t</b>", page_id="custom")
    blob, text = read_blob(out)
    assert "alert(1)</script>" not in text
    assert "<title>&lt;b&gt;t&lt;/b&gt;</title>" in text
    assert blob["rows"][0][0] == evil and blob["page_id"] == "custom"


def test_dataframe_input_metrics_and_thumbnails(tmp_path):
    from PIL import Image

    png = tmp_path / "snap.png"
    Image.new("RGB", (800, 600), (40, 40, 40)).save(png)
    df = pd.DataFrame(fake_rows(8))
    df["snapshot"] = str(png)
    df["ok_flag"] = True  # booleans are not metrics
    out = write_qc_page(df, tmp_path / "qc", metrics=["n_lesions", "gm_volume_mm3"],
                        make_thumbnails=True)
    blob, _ = read_blob(out)
    assert blob["metrics"] == ["n_lesions", "gm_volume_mm3"]
    r = dict(zip(FIELDS, blob["rows"][0]))
    assert r["metrics"][0::2] == [0, 1]
    thumbs = list((tmp_path / "qc" / "thumbs").glob("*.png"))
    assert len(thumbs) == 1 and r["thumb"].startswith("thumbs/")
    with Image.open(thumbs[0]) as im:
        assert im.size == (160, 120)


# ------------------------------------------------------------------------------------ ratings
def _ratings_tsv(path, lines):
    path.write_text("\t".join(COLUMNS) + "\n" + "".join("\t".join(l) + "\n" for l in lines))
    return path


def test_ratings_round_trip_latest_wins(tmp_path):
    p = _ratings_tsv(tmp_path / "qc_ratings.tsv", [
        ("sub-01", "ses-01", "brain", "fail", "AB", "2025-01-02T10:00:00.000Z"),
        ("sub-01", "ses-01", "brain", "pass", "CD", "2025-01-01T10:00:00.000Z"),  # older
        ("sub-02", "", "cmb", "Artifact ", "AB", "2025-01-02T10:00:00Z"),
        ("sub-03", "", "cmb", "pass", "", ""),
        ("sub-03", "", "cmb", "fail", "", ""),  # no timestamps: later line wins
    ])
    r = read_ratings(p)
    assert list(r.columns) == COLUMNS
    got = {(a, b, c): d for a, b, c, d in r[["participant_id", "session_id", "pipeline",
                                             "rating"]].itertuples(index=False)}
    assert got == {("sub-01", "ses-01", "brain"): "fail", ("sub-02", "", "cmb"): "artifact",
                   ("sub-03", "", "cmb"): "fail"}


def test_several_exports_and_unrated_clears(tmp_path):
    a = _ratings_tsv(tmp_path / "a.tsv", [("sub-01", "", "brain", "fail", "A",
                                           "2025-01-01T00:00:00Z")])
    b = _ratings_tsv(tmp_path / "b.tsv", [("01", "", "brain", "unrated", "B",
                                           "2025-02-01T00:00:00Z")])
    r = read_ratings([a, b])
    assert len(r) == 1 and r["rating"].iloc[0] == "unrated"
    summary = pd.DataFrame({"participant_id": ["sub-01"], "pipeline": ["brain"]})
    assert apply_ratings(summary, r)["qc_rating"].tolist() == ["unrated"]


@pytest.mark.parametrize("body, match", [
    ("participant_id\tpipeline\n", "missing column"),
    ("participant_id\tpipeline\trating\nsub-01\tbrain\tmaybe\n", r"line\(s\) \[2\]"),
    ("participant_id\tpipeline\trating\n\tbrain\tpass\n", "empty participant_id"),
    ("participant_id\tpipeline\trating\ttimestamp\nsub-01\tbrain\tpass\tyesterday\n",
     "timestamp"),
])
def test_read_ratings_validates(tmp_path, body, match):
    p = tmp_path / "r.tsv"
    p.write_text(body)
    with pytest.raises(ValueError, match=match):
        read_ratings(p)


def test_apply_ratings(tmp_path):
    summary = pd.DataFrame({
        "participant_id": ["sub-01", "sub-01", "sub-02", "sub-03"],
        "session_id": ["ses-01", "ses-01", np.nan, ""],
        "pipeline": ["brain", "cmb", "brain", "brain"],
        "gm_volume_mm3": [1.0, np.nan, 2.0, 3.0],
    })
    p = _ratings_tsv(tmp_path / "r.tsv", [
        ("01", "01", "cmb", "fail", "AB", "2025-01-02T10:00:00Z"),        # prefixes ignored
        ("sub-02", "", "brain", "artifact", "AB", "2025-01-02T10:00:00Z"),
        ("sub-99", "", "brain", "fail", "AB", "2025-01-02T10:00:00Z"),    # not in the summary
    ])
    with pytest.warns(UserWarning, match="match no row"):
        out = apply_ratings(summary, read_ratings(p))
    assert out["qc_rating"].tolist() == ["unrated", "fail", "artifact", "unrated"]
    assert "qc_rating" not in summary
    assert out["gm_volume_mm3"].equals(summary["gm_volume_mm3"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (apply_ratings(summary, read_ratings(p).iloc[:0])["qc_rating"] == "unrated").all()
    with pytest.raises(ValueError):
        apply_ratings(summary.drop(columns=["pipeline"]), read_ratings(p))
