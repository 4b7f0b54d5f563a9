"""Cohort tables: each shard's part is built by its finalize job, the aggregate rule only assembles.

summary.csv has one row per planned participant/session whatever happened to it (status, error),
plus `<pipeline>_<metric>` columns (`<pipeline>_<contrast>_<metric>` for pipelines that run on several
contrasts). Provenance (versions, model checksums, thresholds, config) goes to summary.json.

**Per shard** (`write_shard_tables`, called by `steps.finalize_shard`), in
``work/shards/tables/shard-<k>/``:

* ``summary.arrow``: the shard's summary rows (everything but the cohort-wide columns);
* ``<table>.csv`` + ``<table>.arrow``: its part of every group table (the per-item tables of its
  sessions with participant_id, session_id and contrast in front; the CSV keeps each session's text,
  missing values written as "");
* ``qc_rows.json``: its rows of the QC page;
* ``part.json``, written last: the parts' version (`parts_version`), the sessions and the stamps
  (size, mtime) of their records, every file's size, the tables' columns and rows per session.

**Cohort** (`aggregate`): every part is checked against its shard record and its files; a part
that is missing, truncated, stale (a record changed after it) or of another code version is rebuilt
from the shard's records (logged), never dropped or mixed in. Then the summary parts are
concatenated (one header: status and metric columns of every shard), the cohort-wide columns are
computed column-wise on it (Tukey outlier flags, the raters' qc_rating), and every group table is
streamed part by part into ``group/<table>.csv`` (bytes copied when a part's header is the cohort's)
and ``group/<table>.parquet``. A cohort table whose parts did not change (the same content digests,
columns, types and sessions: its key) is not assembled again: the one assembled last is kept as hard
links in ``work/shards/tables/cohort/`` (with its key and the files' stamps) and linked back into
``group/``. Every cohort file is written (or linked) beside its final name and renamed into place
only once all of them are complete: a crash leaves the previous tables.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import platform
import re
import shutil
import time
from pathlib import Path

import pandas as pd

from cohortseg import __version__
from cohortseg.io import atomic_path, write_json_atomic
from cohortseg.pipelines import code_version, get_pipeline
from cohortseg.workflow.manifest import load_json, tsv_stamp
from cohortseg.workflow.records import FAILED, NO_INPUT, ItemRecord, SessionRecord

log = logging.getLogger("cohortseg.aggregate")

ID_COLUMNS = ["participant_id", "session_id", "status", "error", "warnings"]
QC_COLUMNS = ["qc_flags", "qc_rating"]
RATING_ORDER = ["fail", "artifact", "pass"]  # the worst rating of a session's pipelines wins
TABLE_KEYS = ["participant_id", "session_id", "contrast"]
#: bump when the layout or content of a shard part changes (older parts are then rebuilt)
PARTS_FORMAT = 3
#: what pandas' CSV reader took for missing in the per-session tables (the cohort CSV writes "")
_NA = re.compile(r"(?<![^,\n])(?:n/a|N/A|NA|nan|NaN|None|null|NULL|<NA>)(?![^,\n])")
QC_FIELDS = ["participant_id", "session_id", "pipeline", "item", "status", "error", "snapshot", "thumbnail",
             "metrics", "qc_flags"]


# ------------------------------------------------------------------------------------- rows
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


def qc_page_rows(rec: SessionRecord) -> list[list]:
    """The QC page's rows of one session (QC_FIELDS): one per pipeline x item, with its snapshot
    and thumbnail (absolute paths, '' when absent), metrics, status and sanity flags."""
    rows = []
    for pipeline, items in rec.pipelines.items():
        for name, it in items.items():
            png = next((f for k, f in sorted(it.files.items()) if k.endswith("_qc.png")), "")
            thumb = png[: -len(".png")] + "_thumb.png" if png else ""
            thumb = thumb if thumb and os.path.isfile(thumb) else ""
            rows.append([rec.participant_id, rec.session_id, pipeline, name, it.status, it.error,
                         os.path.abspath(png) if png else "", os.path.abspath(thumb) if thumb else "",
                         it.metrics, ";".join(it.sanity_flags)])
    return rows


def _missing_record(key: str, pipelines) -> SessionRecord:
    """The row of a planned session without a readable record: never lose a row."""
    from cohortseg.workflow.rows import split_session_key

    pid, sid = split_session_key(key)
    return SessionRecord(pid, sid, pipelines={
        p: {"-": ItemRecord(FAILED, "workflow", "no record (job did not run or failed)")} for p in pipelines})


# ------------------------------------------------------------------------------ shard parts
def shard_tables_dir(shard_record) -> Path:
    """work/shards/finalize/shard-<k>.json -> work/shards/tables/shard-<k>/"""
    p = Path(shard_record)
    return p.parent.parent / "tables" / p.stem


def parts_version(pipelines) -> str:
    """What a shard part depends on besides its records: this module, the records' reader, the
    pipelines' code (session_metrics) and their list."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha1(json.dumps([PARTS_FORMAT, __version__, list(pipelines),
                                 {p: code_version(p) for p in pipelines}]).encode())
    for name in ("aggregate.py", "records.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()


def write_shard_tables(sessions: dict, config: dict, part_dir) -> dict:
    """Write the shard's part of summary.csv, of every group table and of the QC page from the
    records of its sessions ({session key: record path}); a part that is already up to date (same
    version, sessions and record stamps, files intact) is kept. Returns the part's manifest."""
    part_dir = Path(part_dir)
    pipelines = list(config["pipelines"])
    version = parts_version(pipelines)
    sessions = {k: str(v) for k, v in sessions.items()}
    stamps = {k: tsv_stamp(p) for k, p in sessions.items()}
    old = _read_manifest(part_dir)
    if old is not None and not _part_problem(old, part_dir, version, sessions, stamps):
        return old
    records = []
    for key, path in sessions.items():
        rec = SessionRecord.read(path)
        records.append(rec if rec is not None else _missing_record(key, pipelines))
    records.sort(key=lambda r: (r.participant_id, r.session_id))
    manifest = {"version": version, "pipelines": pipelines, "sessions": sessions, "stamps": stamps,
                "order": [[r.participant_id, r.session_id] for r in records], "files": {}, "tables": {}}
    part_dir.mkdir(parents=True, exist_ok=True)
    _write_summary_part(records, pipelines, part_dir / "summary.arrow")
    for pname in pipelines:
        for table_name, key in get_pipeline(pname).group_tables.items():
            manifest["tables"][table_name] = _write_table_part(records, pname, key, part_dir, table_name)
    qc = [row for rec in records for row in qc_page_rows(rec)]
    with atomic_path(part_dir / "qc_rows.json") as tmp:
        Path(tmp).write_text(json.dumps({"fields": QC_FIELDS, "rows": qc}, separators=(",", ":"), default=str))
    for f in sorted(os.listdir(part_dir)):
        if f != "part.json" and not f.startswith("."):
            manifest["files"][f] = os.path.getsize(part_dir / f)
    write_json_atomic(part_dir / "part.json", manifest)  # last: its presence says the part is whole
    return manifest


def _key(pid: str, sid: str) -> str:
    return f"{pid}_{sid}" if sid else pid


def _read_manifest(part_dir: Path) -> dict | None:
    try:
        m = json.loads((Path(part_dir) / "part.json").read_text())
        return m if isinstance(m, dict) and "version" in m else None
    except (OSError, ValueError):
        return None


def _part_problem(m: dict, part_dir: Path, version: str, sessions: dict, stamps: dict | None) -> str:
    """Why a part cannot be used as it is ('' when it can)."""
    if m.get("version") != version:
        return "written by another code version"
    if m.get("sessions") != sessions:
        return "covers other sessions than its shard record"
    if stamps is not None and m.get("stamps") != stamps:
        return "a session record changed after it was written"
    for f, size in m.get("files", {}).items():
        got = tsv_stamp(part_dir / f)
        if got is None:
            return f"{f} is missing"
        if got[0] != size:
            return f"{f} is truncated or changed ({got[0]} bytes, {size} written)"
    return ""


def _write_summary_part(records, pipelines, path: Path) -> None:
    import pyarrow as pa

    df = pd.DataFrame(summary_rows(records, pipelines))
    try:
        table = pa.Table.from_pandas(df, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # a metric of mixed types: keep it as text
        for c in df.columns:
            if df[c].dtype == object:
                try:
                    pa.array(df[c], from_pandas=True)
                except (pa.ArrowInvalid, pa.ArrowTypeError):
                    log.warning("summary column %s mixes types; kept as text", c)
                    df[c] = df[c].map(lambda v: v if v is None or v != v else str(v))
        table = pa.Table.from_pandas(df, preserve_index=False)
    with atomic_path(path) as tmp:
        _write_arrow(table, tmp)


def _write_arrow(table, path) -> None:
    """An Arrow IPC file (a part: read whole, often, by the aggregate; ~0.2 ms a read against
    ~5 ms for a small Parquet file)."""
    import pyarrow as pa

    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema, options=pa.ipc.IpcWriteOptions(
            compression="zstd", use_threads=False)) as w:
        w.write_table(table)


def _read_arrow(path):
    import pyarrow as pa

    with pa.memory_map(str(path)) as src:
        return pa.ipc.open_file(src).read_all()


def _session_table(path: str, prefix: list[str]) -> tuple[list[str], list[list[str]] | str]:
    """(header, body) of one per-session table with the key columns in front; the body as CSV
    text (fast path: no quoting needed) or as parsed rows. Missing values become ""."""
    sep = "\t" if path.endswith(".tsv") else ","
    with open(path, newline="") as f:
        text = f.read()
    head, _, body = text.partition("\n")
    lead = ",".join(prefix) + ","
    if '"' not in text and (sep == "," or "," not in text) and "\r" not in text:
        header = head.split(sep)
        if sep == "\t":
            body = body.replace("\t", ",")
        body = _NA.sub("", body)
        return TABLE_KEYS + header, "".join(lead + line + "\n" for line in body.split("\n") if line)
    rows = list(csv.reader(io.StringIO(text), delimiter=sep))
    na = {"n/a", "N/A", "NA", "nan", "NaN", "None", "null", "NULL", "<NA>"}
    return TABLE_KEYS + rows[0], [prefix + ["" if v in na else v for v in r] for r in rows[1:] if r]


def _csv_text(rows: list[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _write_table_part(records, pname: str, key: str, part_dir: Path, table_name: str) -> dict:
    """The shard's part of one group table: CSV (each session's rows in one block) + Parquet."""
    pieces = []  # (session key, header, body)
    for rec in records:
        for it in rec.pipelines.get(pname, {}).values():
            f = it.files.get(key)
            if not it.ok or not f or not os.path.isfile(f):
                continue
            header, body = _session_table(f, [rec.participant_id, rec.session_id, it.contrast])
            pieces.append((_key(rec.participant_id, rec.session_id), header, body))
    columns = list(TABLE_KEYS)
    for _, header, _ in pieces:  # one header: the columns in the order they first appear
        columns += [c for c in header if c not in columns]
    counts: dict[str, list[int]] = {}  # session key -> [rows, bytes]
    out = [_csv_text([columns])]
    for skey, header, body in pieces:
        if header != columns:  # another header than the part's: rows in the part's columns
            parsed = body if isinstance(body, list) else list(csv.reader(io.StringIO(body)))
            pos = {c: i for i, c in enumerate(header)}
            body = [[r[pos[c]] if c in pos and pos[c] < len(r) else "" for c in columns] for r in parsed]
        text = body if isinstance(body, str) else _csv_text(body)
        c = counts.setdefault(skey, [0, 0])
        c[0] += text.count("\n")
        c[1] += len(text.encode())
        out.append(text)
    data = "".join(out).encode()
    csv_path, pq_path = part_dir / table_name, part_dir / (Path(table_name).stem + ".arrow")
    with atomic_path(csv_path) as tmp:
        Path(tmp).write_bytes(data)
    table = _csv_to_arrow(data, columns)
    with atomic_path(pq_path) as tmp:
        _write_arrow(table, tmp)
    return {"columns": columns, "types": [str(f.type) for f in table.schema], "header_bytes": len(out[0].encode()),
            "sessions": counts, "sha1": hashlib.sha1(data).hexdigest()}


def _csv_to_arrow(data: bytes, columns: list[str]):
    import pyarrow as pa
    import pyarrow.csv as pcsv

    types = {c: pa.string() for c in TABLE_KEYS}
    if data.count(b"\n") <= 1:  # header only: no values to infer a type from
        table = pa.table({c: pa.array([], type=types.get(c, pa.null())) for c in columns})
    else:
        table = pcsv.read_csv(io.BytesIO(data), read_options=pcsv.ReadOptions(use_threads=False),
                              convert_options=pcsv.ConvertOptions(column_types=types, strings_can_be_null=True))
    return table


# --------------------------------------------------------------------------------- cohort
def aggregate(shard_records: list, out_dir, config: dict, ratings=None) -> pd.DataFrame:
    """Assemble group/summary.csv (+ summary.json) and every pipeline's cohort table (CSV +
    Parquet) from the shards' parts (`shard_records`: the finalize jobs' records, which list their
    sessions); a part that cannot be used is rebuilt first. Returns the summary table."""
    out_dir = Path(out_dir)
    pipelines = list(config["pipelines"])
    parts = shard_parts(shard_records, config)
    # the cohort's order: by participant, then session (a shard holds consecutive session keys)
    order = sorted(((i, j) for i, (_, m) in enumerate(parts) for j in range(len(m["order"]))),
                   key=lambda t: tuple(parts[t[0]][1]["order"][t[1]]))
    runs = _runs(order)
    cache = shard_tables_dir(shard_records[0]).parent / "cohort" if shard_records else None
    staged, fresh = [], []  # (temporary file, final path); (table, key) of the tables assembled
    try:
        df = _summary(parts, runs, pipelines, config, ratings)
        staged.append(_stage(out_dir / "summary.csv", lambda f: df.to_csv(f, index=False, na_rep="")))
        for pname in pipelines:
            for table_name in get_pipeline(pname).group_tables:
                key = _table_key(table_name, parts, runs)
                if not _reuse_table(table_name, key, cache, out_dir, staged):
                    _assemble_table(table_name, parts, runs, out_dir, staged)
                    fresh.append((table_name, key))
        for tmp, final in staged:  # every file is complete: now replace the previous ones
            os.replace(tmp, final)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
    for table_name, key in fresh:
        _keep_table(table_name, key, cache, out_dir)
    write_json_atomic(out_dir / "summary.json", provenance(config, len(df)))
    return df


def shard_parts(shard_records: list, config: dict) -> list[tuple[Path, dict]]:
    """[(part folder, manifest)] of every shard, in shard order; a part that is missing, truncated,
    stale or of another code version is rebuilt from the shard's records (with a warning naming the
    shard and the reason), never skipped."""
    version = parts_version(config["pipelines"])
    parts = []
    for rec_path in shard_records:
        sessions = {k: str(v) for k, v in json.loads(Path(rec_path).read_text())["sessions"].items()}
        part_dir = shard_tables_dir(rec_path)
        m = _read_manifest(part_dir)
        why = "missing" if m is None else _part_problem(m, part_dir, version, sessions,
                                                        {k: tsv_stamp(p) for k, p in sessions.items()})
        if why:
            log.warning("tables of %s: part %s %s: rebuilt from its records", Path(rec_path).name, part_dir, why)
            m = write_shard_tables(sessions, config, part_dir)
        parts.append((part_dir, m))
    return parts


def _runs(order) -> list[tuple[int, int, int]]:
    """The cohort's order as runs of consecutive sessions of one part: [(part, first, stop)] (positions
    in the part's order). One run per part unless session keys sort otherwise than their ids."""
    runs: list = []
    for i, j in order:
        if runs and runs[-1][0] == i and runs[-1][2] == j:
            runs[-1][2] = j + 1
        else:
            runs.append([i, j, j + 1])
    return runs


def _stage(final: Path, write, mode: str = "w", link: Path | None = None) -> tuple[str, Path]:
    """final's next content written (`write(file)`) or linked (`link`: a file kept) beside it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{os.getpid()}.part"
    try:
        if link is not None:
            tmp.unlink(missing_ok=True)
            try:
                os.link(link, tmp)
            except OSError:  # another file system
                shutil.copyfile(link, tmp)
            return str(tmp), final
        with open(tmp, mode, newline="" if mode == "w" else None) as f:
            write(f)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.chmod(tmp, 0o644)
    return str(tmp), final


def _summary(parts, runs, pipelines, config, ratings) -> pd.DataFrame:
    import pyarrow as pa

    tables = [_read_arrow(d / "summary.arrow") for d, _ in parts]
    try:  # one conversion: int + float columns give float, a column missing in a part gives nulls
        df = pa.concat_tables(tables, promote_options="permissive").to_pandas(use_threads=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # a column of other types in other parts: as pandas does
        df = pd.concat([t.to_pandas(use_threads=False) for t in tables], ignore_index=True)
    if not tables:
        df = pd.DataFrame(columns=ID_COLUMNS)
    if len(parts) > 1 or len(runs) > 1:  # the cohort's order (the parts are sorted within)
        df = df.sort_values(["participant_id", "session_id"], kind="stable", ignore_index=True)
    status_cols = [f"{p}_status" for p in pipelines if f"{p}_status" in df.columns]
    metric_cols = sorted(c for c in df.columns if c not in ID_COLUMNS + QC_COLUMNS and c not in status_cols)
    df = df.reindex(columns=ID_COLUMNS + ["qc_flags"] + status_cols + metric_cols)
    return _add_qc(df, config, ratings)


def _add_qc(df, config, ratings):
    """Automatic flags (sanity flags from finalize + Tukey outliers across the cohort) and the
    raters' verdicts from qc_ratings.tsv (per pipeline, and the worst of them as `qc_rating`),
    column by column."""
    import numpy as np

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
    worst = np.full(len(df), "unrated", dtype=object)
    for r in reversed(RATING_ORDER):  # the worst last, so it wins
        if per:
            worst[(df[per].to_numpy() == r).any(axis=1)] = r
    df.insert(df.columns.get_loc("qc_flags") + 1, "qc_rating", worst)
    return df


def _table_files(table_name: str) -> list[str]:
    return [table_name, Path(table_name).stem + ".parquet"]


def _table_key(table_name: str, parts, runs) -> str:
    """What a cohort table is made of: the parts' code version, and per run its part's table (content
    digest, columns, types, rows and bytes per session) and sessions."""
    import pyarrow as pa

    h = hashlib.sha1(json.dumps([table_name, pa.__version__]).encode())
    for i, first, stop in runs:
        m = parts[i][1]
        h.update(json.dumps([m["version"], m["tables"][table_name], m["order"][first:stop], first, stop]).encode())
    return h.hexdigest()


def _reuse_table(table_name: str, key: str, cache: Path | None, out_dir: Path, staged: list) -> bool:
    """Stage the cohort table (CSV + Parquet) kept in `cache` (work/shards/tables/cohort/, hard links
    of the group files: Snakemake removes a rule's outputs before it runs) when it was assembled from
    the same parts (its key) and is intact; else forget it (before anything is replaced)."""
    if cache is None:
        return False
    names = _table_files(table_name)
    state = load_json(cache / f"{table_name}.json")
    if isinstance(state, dict) and state.get("key") == key and state.get("stamps") == [tsv_stamp(cache / n) for n in names]:
        for n in names:
            staged.append(_stage(out_dir / n, None, link=cache / n))
        return True
    (cache / f"{table_name}.json").unlink(missing_ok=True)
    return False


def _keep_table(table_name: str, key: str, cache: Path | None, out_dir: Path) -> None:
    """Keep the cohort table just written (hard links, no copy) for `_reuse_table`."""
    if cache is None:
        return
    cache.mkdir(parents=True, exist_ok=True)
    names = _table_files(table_name)
    for n in names:
        tmp = cache / f".{n}.{os.getpid()}.part"
        tmp.unlink(missing_ok=True)
        try:
            os.link(out_dir / n, tmp)
        except OSError:  # no hard links here: not kept (a copy would cost what assembling does)
            return
        os.replace(tmp, cache / n)
    write_json_atomic(cache / f"{table_name}.json", {"key": key, "stamps": [tsv_stamp(cache / n) for n in names]})


def _assemble_table(table_name: str, parts, runs, out_dir: Path, staged: list) -> None:
    """group/<table>.csv and .parquet from the parts, one part at a time (staged: appended to)."""
    columns = list(TABLE_KEYS)
    for i, _, _ in runs:
        columns += [c for c in parts[i][1]["tables"][table_name]["columns"] if c not in columns]
    header = _csv_text([columns]).encode()

    def write_csv(f):
        f.write(header)
        for i, first, stop in runs:
            d, m = parts[i]
            t = m["tables"][table_name]
            ranges = _ranges(t, m["order"], first, stop, "bytes")
            if ranges is None:
                continue
            start, stop = ranges
            with open(d / table_name, "rb") as src:
                src.seek(t["header_bytes"] + start)
                if t["columns"] == columns:
                    _copy(src, f, stop - start)
                else:  # another header: this run's rows in the cohort's columns
                    rows = list(csv.reader(io.StringIO(src.read(stop - start).decode())))
                    pos = {c: j for j, c in enumerate(t["columns"])}
                    f.write(_csv_text([[r[pos[c]] if c in pos else "" for c in columns] for r in rows]).encode())

    staged.append(_stage(out_dir / table_name, write_csv, "wb"))
    staged.append(_assemble_parquet(table_name, columns, parts, runs, out_dir / (Path(table_name).stem + ".parquet")))


def _ranges(t: dict, order: list, first: int, stop: int, what: str):
    """(start, stop) of the sessions order[first:stop] in a part's CSV body ('bytes') or Parquet
    rows ('rows'); None when they have no rows."""
    j = 0 if what == "rows" else 1
    n = [t["sessions"].get(_key(*ids), (0, 0))[j] for ids in order]
    start, size = sum(n[:first]), sum(n[first:stop])
    return (start, start + size) if size else None


def _copy(src, dst, n: int, chunk: int = 1 << 22) -> None:
    while n > 0:
        b = src.read(min(chunk, n))
        if not b:
            raise OSError(f"{src.name} is shorter than its part.json says")
        dst.write(b)
        n -= len(b)


def _assemble_parquet(table_name, columns, parts, runs, final: Path, group_rows: int = 1 << 19):
    """group/<table>.parquet: the parts' rows in the cohort's columns and order, cast to one schema,
    in row groups of about `group_rows` rows (a few parts each; memory: one row group)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    stem = Path(table_name).stem
    types: dict[str, list] = {}  # the parts' types, from their part.json
    for i in sorted({r[0] for r in runs}):
        t = parts[i][1]["tables"][table_name]
        for c, name in zip(t["columns"], t["types"]):
            try:
                types.setdefault(c, []).append(pa.type_for_alias(name))
            except ValueError:  # a type without an alias (inferred from text): as text
                types.setdefault(c, []).append(pa.string())
    schema = pa.schema([pa.field(c, _common_type(types.get(c, []))) for c in columns])

    def write(f):
        with pq.ParquetWriter(f, schema) as w:
            batch, n = [], 0
            for i, first, stop in runs:
                d, m = parts[i]
                r = _ranges(m["tables"][table_name], m["order"], first, stop, "rows")
                if r is None:
                    continue
                t = _read_arrow(d / f"{stem}.arrow").slice(r[0], r[1] - r[0])
                batch.append(pa.table([t.column(c).cast(schema.field(c).type) if c in t.column_names
                                       else pa.nulls(len(t), schema.field(c).type) for c in columns], schema=schema))
                n += len(t)
                if n >= group_rows:
                    w.write_table(pa.concat_tables(batch), row_group_size=n)
                    batch, n = [], 0
            if batch or not runs:
                w.write_table(pa.concat_tables(batch) if batch else schema.empty_table())

    return _stage(final, write, "wb")


def _common_type(types):
    """One type for a column whose parts inferred different ones: null < int64 < double; else text."""
    import pyarrow as pa

    got = {t for t in types if not pa.types.is_null(t)}
    if not got:
        return pa.null()
    if len(got) == 1:
        return got.pop()
    if all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in got):
        return pa.float64() if any(pa.types.is_floating(t) for t in got) else pa.int64()
    return pa.string()


def provenance(config: dict, n_sessions: int) -> dict:
    from importlib import metadata

    from cohortseg.models.cards import pipeline_cards
    from cohortseg.science.anatomy import limits as anatomy_limits

    versions = {}
    for pkg in ("snakemake", "tensorflow", "tensorflow-cpu", "keras", "nibabel", "antspyx", "numpy", "pandas",
                "pyarrow", "scipy", "scikit-image"):
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
        "n_sessions": n_sessions,
    }
