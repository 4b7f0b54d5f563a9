"""Glue between the shards' QC rows (written with their tables, cohortseg.workflow.aggregate) and
the QC page (cohortseg.qc)."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from cohortseg.workflow.aggregate import shard_parts
from cohortseg.workflow.records import STATUS_HELP


def qc_rows(summary_csv, shard_records, config: dict) -> list[dict]:
    """One row per participant x pipeline (x contrast) with its snapshot, metrics and status, in
    shard order; a row without sanity flags of its own shows its session's qc_flags (outliers)."""
    summary = pd.read_csv(summary_csv, dtype=str, keep_default_na=False,
                          usecols=["participant_id", "session_id", "qc_flags"])
    flags = dict(zip(zip(summary["participant_id"], summary["session_id"]), summary["qc_flags"]))
    rows = []
    for part_dir, _ in shard_parts(shard_records, config):
        part = json.loads((part_dir / "qc_rows.json").read_text())
        fields = part["fields"]
        for values in part["rows"]:
            r = dict(zip(fields, values))
            r["qc_flags"] = r["qc_flags"] or flags.get((r["participant_id"], r["session_id"]), "")
            rows.append(r)
    return rows


def write_cohort_qc_page(summary_csv, shard_records, page_dir, config: dict) -> Path:
    """qc/index.html: the QC page, or an index of pages of one pipeline each for a large cohort."""
    from cohortseg.qc.page import write_qc_pages

    return write_qc_pages(qc_rows(summary_csv, shard_records, config), Path(page_dir), statuses=STATUS_HELP)
