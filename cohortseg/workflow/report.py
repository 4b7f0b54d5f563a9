"""Glue between the per-session records and the QC page (cohortseg.qc)."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from cohortseg.workflow.records import STATUS_HELP, SessionRecord


def qc_rows(summary_csv, record_paths, page_dir) -> list[dict]:
    """One row per participant x pipeline (x contrast) with its snapshot, metrics and status."""
    summary = pd.read_csv(summary_csv, dtype={"participant_id": str, "session_id": str}, keep_default_na=False)
    flags = {(r.participant_id, r.session_id): getattr(r, "qc_flags", "") for r in summary.itertuples()}
    rows = []
    for p in record_paths:
        rec = SessionRecord.read(p)
        if rec is None:
            continue
        pid, sid = rec.participant_id, rec.session_id
        for pipeline, items in rec.pipelines.items():
            for name, it in items.items():
                key = next((k for k in sorted(it.files) if k.endswith("_qc.png")), "")
                png, thumb = it.files.get(key, ""), it.files.get(key.replace(".png", "_thumb.png"), "")
                thumb = thumb if thumb and os.path.isfile(thumb) else ""
                rows.append({
                    "participant_id": pid, "session_id": sid, "pipeline": pipeline, "item": name,
                    "status": it.status, "error": it.error,
                    "snapshot": os.path.abspath(png) if png else "", "thumbnail": os.path.abspath(thumb) if thumb else "",
                    "metrics": it.metrics,
                    "qc_flags": ";".join(it.sanity_flags) or flags.get((pid, sid), ""),
                })
    return rows


def write_cohort_qc_page(summary_csv, record_paths, page_dir) -> Path:
    from cohortseg.qc.page import write_qc_page

    page_dir = Path(page_dir)
    return write_qc_page(qc_rows(summary_csv, record_paths, page_dir), page_dir, statuses=STATUS_HELP)
