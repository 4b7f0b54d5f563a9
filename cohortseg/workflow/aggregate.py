"""Cohort tables, written once by the aggregate rule from the per-session records.

summary.csv has one row per discovered participant/session whatever happened to it (status, error),
plus `<pipeline>_<metric>` columns (`<pipeline>_<contrast>_<metric>` for pipelines that run on several
contrasts). Provenance (versions, model checksums, thresholds, config) goes to summary.json.
"""
from __future__ import annotations

import platform
import time
from pathlib import Path

import pandas as pd

from cohortseg import __version__
from cohortseg.io import write_json_atomic, write_text_atomic
from cohortseg.pipelines import get_pipeline
from cohortseg.workflow.records import FAILED, NO_INPUT, ItemRecord, SessionRecord

ID_COLUMNS = ["participant_id", "session_id", "status", "error", "warnings"]
QC_COLUMNS = ["qc_flags", "qc_rating"]
RATING_ORDER = ["fail", "artifact", "pass"]  # the worst rating of a session's pipelines wins


def summary_rows(records: list[SessionRecord], pipelines: list[str]) -> list[dict]:
    """One row per session: overall and per-pipeline status (cohortseg.workflow.records vocabulary),
    the errors of failed/refused items, flags, warnings and metrics."""
    rows = []
    for rec in records:
        row = {"participant_id": rec.participant_id, "session_id": rec.session_id}
        errors, flags, warns = [], [], []
        for pname in pipelines:
            items = rec.pipelines.get(pname)
            if items is None:
                continue
            multiple = any(r.multiple for r in get_pipeline(pname).roles.values())
            for name, it in items.items():
                if it.error and it.status != NO_INPUT:
                    errors.append(f"{pname}/{name}: {it.stage}: {it.error}")
                prefix = f"{pname}_{it.contrast}_" if multiple and it.contrast else f"{pname}_"
                flags += [f"{prefix}{f}" for f in it.sanity_flags]
                warns += [f"{pname}/{name}: {w}" for w in it.warnings]
                for k, v in it.metrics.items():
                    row[prefix + k] = v
            for k, v in get_pipeline(pname).session_metrics(items).items():
                row[f"{pname}_{k}"] = v
            row[f"{pname}_status"] = rec.pipeline_status(pname)
        row["status"] = rec.status(pipelines)
        row["error"] = " | ".join(errors)
        row["qc_flags"] = ";".join(flags)
        row["warnings"] = " | ".join(warns)
        rows.append(row)
    return rows


def aggregate(record_paths: list, out_dir, config: dict, expected: list[tuple[str, str]] | None = None,
              ratings=None) -> pd.DataFrame:
    """Write group/summary.csv (+ summary.json) and every pipeline's cohort table."""
    out_dir = Path(out_dir)
    records, seen = [], set()
    for p in record_paths:
        rec = SessionRecord.read(p)
        if rec is None:
            continue
        records.append(rec)
        seen.add((rec.participant_id, rec.session_id))
    for pid, sid in expected or []:  # never lose a row, even if its record is missing
        if (pid, sid) not in seen:
            records.append(SessionRecord(pid, sid, pipelines={
                p: {"-": ItemRecord(FAILED, "workflow", "no record (job did not run or failed)")}
                for p in config["pipelines"]}))
    records.sort(key=lambda r: (r.participant_id, r.session_id))
    pipelines = config["pipelines"]
    df = pd.DataFrame(summary_rows(records, pipelines))
    status_cols = [f"{p}_status" for p in pipelines if f"{p}_status" in df.columns]
    metric_cols = sorted(c for c in df.columns if c not in ID_COLUMNS + QC_COLUMNS and c not in status_cols)
    df = df.reindex(columns=ID_COLUMNS + ["qc_flags"] + status_cols + metric_cols)
    df = _add_qc(df, config, ratings)
    write_text_atomic(out_dir / "summary.csv", df.to_csv(index=False, na_rep=""))
    _group_tables(records, pipelines, out_dir)
    write_json_atomic(out_dir / "summary.json", provenance(config, records))
    return df


def _add_qc(df, config, ratings):
    """Automatic flags (sanity flags from finalize + Tukey outliers across the cohort) and the
    raters' verdicts from qc_ratings.tsv (per pipeline, and the worst of them as `qc_rating`)."""
    from cohortseg.qc.outliers import add_qc_flags
    from cohortseg.qc.ratings import apply_ratings, read_ratings

    metric_cols = [c for c in df.columns if c not in ID_COLUMNS + QC_COLUMNS and not c.endswith("_status")
                   and pd.api.types.is_numeric_dtype(df[c])]
    df = add_qc_flags(df, metric_cols, by=None, sanity_col="qc_flags")
    table = read_ratings(ratings) if ratings and Path(ratings).is_file() else None
    per = []
    for p in config["pipelines"]:
        keyed = df[["participant_id", "session_id"]].assign(pipeline=p)
        col = f"{p}_qc_rating"
        df[col] = apply_ratings(keyed, table)["qc_rating"].values if table is not None else "unrated"
        per.append(col)

    def worst(row):
        got = set(row)
        return next((r for r in RATING_ORDER if r in got), "unrated")

    df.insert(df.columns.get_loc("qc_flags") + 1, "qc_rating", df[per].apply(worst, axis=1) if per else "unrated")
    return df


def _group_tables(records, pipelines, out_dir: Path) -> None:
    for pname in pipelines:
        p = get_pipeline(pname)
        for table_name, key in p.group_tables.items():
            frames = []
            for rec in records:
                for it in rec.pipelines.get(pname, {}).values():
                    f = it.files.get(key)
                    if not it.ok or not f or not Path(f).is_file():
                        continue
                    sep = "\t" if f.endswith(".tsv") else ","
                    t = pd.read_csv(f, sep=sep)
                    t.insert(0, "contrast", it.contrast)
                    t.insert(0, "session_id", rec.session_id)
                    t.insert(0, "participant_id", rec.participant_id)
                    frames.append(t)
            table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
                columns=["participant_id", "session_id", "contrast"])
            write_text_atomic(out_dir / table_name, table.to_csv(index=False, na_rep=""))


def provenance(config: dict, records: list[dict]) -> dict:
    from importlib import metadata

    from cohortseg.models.cards import pipeline_cards
    from cohortseg.pipelines import code_version
    from cohortseg.science.anatomy import limits as anatomy_limits

    versions = {}
    for pkg in ("snakemake", "tensorflow", "tensorflow-cpu", "keras", "nibabel", "antspyx", "numpy", "pandas",
                "scipy", "scikit-image"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    models, methods = {}, {}
    for pname in config["pipelines"]:
        cards = pipeline_cards(config, pname)
        m = get_pipeline(pname).methods(cards, config.get(pname) or {})
        if m:
            methods[pname] = m
        for card in cards:
            models[card.name] = {"pipeline": pname, "source": str(card.source),
                                 "folds": [{"file": f["file"], "sha256": f.get("sha256"), "md5": f.get("md5"),
                                            **({"git_blob_sha1": f["git_blob_sha1"]} if "git_blob_sha1" in f else {})}
                                           for f in card.folds],
                                 "thresholds": card.get("thresholds", {})}
    return {
        "cohortseg_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "python": platform.python_version(), "platform": platform.platform(), "packages": versions,
        "code_versions": {p: code_version(p) for p in config["pipelines"]},
        "models": models, "methods": methods, "config": config,
        "thresholds": {p: {k: v for k, v in (config.get(p) or {}).items()
                           if any(w in k for w in ("threshold", "min_cluster", "max_outside"))}
                       for p in config["pipelines"]},
        # what an image must show to be measured rather than refused (cohortseg.science.anatomy)
        "anatomy": {p: anatomy_limits(p, config.get(p) or {}) for p in config["pipelines"]},
        "body_part": config.get("body_part"),
        "n_sessions": len(records),
    }
