"""The three steps the rules call, each on one shard of sessions: prepare (CPU), infer (GPU, every
pipeline in turn), finalize (CPU). A shard job fans its sessions out to `workers` processes.

Every session and item keeps its own files outside the jobs' declared outputs
(`work/prep/<session>.json`, `work/infer/<pipeline>/<session>/<item>.npz`, `work/records/<session>.json`)
with a *stamp*: a digest of the item's input files (size, mtime), its pipeline settings, its model
cards and its pipeline's code version (`cohortseg.pipelines.code_version`). A rerun shard job (killed, resubmitted, or with a new session in it)
reuses every item whose stamp is unchanged, so nothing already computed is lost (config `reuse`).
Data errors are recorded per item and never raised: one broken scan must not block its shard or the
cohort tables."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path


from cohortseg import __version__
from cohortseg.models.cards import pipeline_cards
from cohortseg.errors import InputError
from cohortseg.io import write_json_atomic
from cohortseg.pipelines import code_version, get_pipeline
from cohortseg.pipelines.base import Context, Item, OutputWriter, Predicted, Prepared, write_dataset_files
from cohortseg.workflow.plan import shard_input_sessions
from cohortseg.workflow.records import FAILED, OK, ItemRecord, SessionRecord

log = logging.getLogger("cohortseg")


def rows_by_session(config: dict, keys) -> dict[str, list[dict]]:
    """The manifest rows of some sessions, read in the job from the cached manifest (keeping them out
    of rule params saves planning time per job)."""
    from cohortseg.workflow.discovery import open_manifest

    return open_manifest(Path(config["output_dir"]) / "manifest.tsv").rows(keys)  # their byte ranges only


def _work(config: dict) -> Path:
    return Path(config["output_dir"]) / "work"


def prep_record_path(config: dict, key: str) -> Path:
    return _work(config) / "prep" / f"{key}.json"


def session_record_path(config: dict, key: str) -> Path:
    return _work(config) / "records" / f"{key}.json"


def _item(row: dict) -> Item:
    return Item(participant_id=row["participant_id"], session_id=row["session_id"], pipeline=row["pipeline"],
                name=row["item"], inputs=json.loads(row["inputs"]))


def _failure(stage: str, exc: BaseException, item: Item | None = None) -> ItemRecord:
    who = f"{item.session_key} {item.pipeline}" if item else ""
    return ItemRecord.from_error(stage, exc, who, contrast=item.contrast if item else "")


def _prep_path(work: Path, item: Item) -> Path:
    return work / "prep" / item.pipeline / item.session_key / f"{item.name}.npz"


def _prob_path(work: Path, pipeline: str, key: str, name: str) -> Path:
    return work / "infer" / pipeline / key / f"{name}.npz"


def _stamp(row: dict, config: dict, cards: list) -> str:
    """What an item's results depend on; equal stamps mean the stored results can be reused."""
    inputs = json.loads(row["inputs"])
    stats = {}
    for role, path in sorted(inputs.items()):
        try:
            st = os.stat(path)
            stats[role] = [st.st_size, st.st_mtime_ns]
        except OSError:
            stats[role] = None
    payload = {"version": __version__, "code": code_version(row["pipeline"]),
               "item": [row["pipeline"], row["item"], inputs], "stats": stats,
               "settings": _cfg(config, row["pipeline"]), "cards": [c.data for c in cards]}
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _reuse(config: dict) -> bool:
    return bool(config.get("reuse", True))


def _reusable(entry: ItemRecord | None, stamp: str, *files) -> bool:
    """A stored result stands in for recomputing it: it succeeded, under the same stamp, and its
    files are all still there."""
    return (entry is not None and entry.ok and entry.stamp == stamp
            and all(Path(f).is_file() for f in files))


def _cfg(config: dict, pipeline: str) -> dict:
    return dict(config.get(pipeline) or {})


def _map_sessions(fn, jobs: list[tuple], workers: int) -> list:
    """fn(*job) for every job; with workers > 1 in a process pool. A worker that dies (crash, or
    killed for memory) is retried in a pool of its own, and recorded if it dies again."""
    if workers <= 1 or len(jobs) <= 1:
        return [fn(*j) for j in jobs]
    results: dict[int, object] = {}
    try:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as ex:
            futs = {ex.submit(fn, *j): i for i, j in enumerate(jobs)}
            for f in as_completed(futs):
                results[futs[f]] = f.result()
    except BrokenProcessPool:
        log.warning("a worker process died; retrying its sessions one by one")
    for i, j in enumerate(jobs):
        if i in results:
            continue
        try:
            with ProcessPoolExecutor(max_workers=1) as ex:
                results[i] = ex.submit(fn, *j).result()
        except BrokenProcessPool:
            results[i] = BrokenProcessPool("the worker process died (crash, or killed for memory)")
    return [results[i] for i in range(len(jobs))]


# ---------------------------------------------------------------------------------------------
def prepare_shard(inputs_record, config: dict, record_path, workers: int = 1) -> dict:
    """Prepare every session of a shard (those its inputs record lists); the shard record lists
    their per-session prep records."""
    keys = shard_input_sessions(inputs_record)
    by = rows_by_session(config, keys)
    jobs = [(by[k], config, str(prep_record_path(config, k))) for k in keys]
    return _run_shard("prepare", prepare_session, jobs, workers, record_path)


def _run_shard(step: str, session_fn, jobs: list[tuple], workers: int, record_path) -> dict:
    """session_fn(rows, ..., record path) for every job (the rows first, the session's record path
    last); a session whose worker died gets a record saying so. Writes the shard record."""
    results = _map_sessions(_session_worker, [(session_fn, *j) for j in jobs], workers)
    shard = {"step": step, "sessions": {}}
    for job, res in zip(jobs, results):
        rows, path = job[0], job[-1]
        if isinstance(res, BaseException):  # the worker died: every item of the session failed
            _write_crash_record(rows, path, step, res)
        shard["sessions"][Path(path).stem] = path
    write_json_atomic(record_path, shard)
    return shard


def _session_worker(session_fn, *args) -> bool:
    session_fn(*args)
    return True  # the record is on disk; nothing large goes back through the pool


def _write_crash_record(rows: list[dict], path, stage: str, exc: BaseException) -> None:
    rec = SessionRecord(rows[0]["participant_id"], rows[0]["session_id"], cohortseg_version=__version__)
    for r in rows:
        rec.items(r["pipeline"])[r["item"] or "-"] = (
            ItemRecord(FAILED, stage, f"{type(exc).__name__}: {exc}", contrast=_item(r).contrast if r["item"] else "")
            if r["status"] == "ok" else ItemRecord.from_discovery(r))
    rec.write(path)


def prepare_session(rows: list[dict], config: dict, record_path) -> SessionRecord:
    """Prepare every item of one session for every pipeline; write the session's prep record."""
    work = _work(config)
    old = SessionRecord.read(record_path) if _reuse(config) else None
    record = SessionRecord(rows[0]["participant_id"] if rows else "", rows[0]["session_id"] if rows else "",
                           cohortseg_version=__version__)
    cards_cache: dict = {}
    ctx = Context.from_config(config)  # one per session: its memo is shared by this session's items only
    for row in rows:
        pname = row["pipeline"]
        items = record.items(pname)
        if row["status"] != "ok":  # nothing acquired (no_input), or ambiguous (failed)
            items[row["item"] or "-"] = ItemRecord.from_discovery(row)
            continue
        item = _item(row)
        t0 = time.perf_counter()
        try:
            if pname not in cards_cache:
                cards_cache[pname] = pipeline_cards(config, pname)
            stamp = _stamp(row, config, cards_cache[pname])
            prev = old.pipelines.get(pname, {}).get(item.name) if old else None
            if _reusable(prev, stamp, prev.prep if prev else ""):
                items[item.name] = dataclasses.replace(prev, contrast=item.contrast)  # (records of older versions)
                continue
            prepared = get_pipeline(pname).prepare(item, cards_cache[pname], _cfg(config, pname), ctx)
            path = _prep_path(work, item)
            prepared.save(path)
            items[item.name] = ItemRecord(OK, contrast=item.contrast, prep=str(path), stamp=stamp,
                                          warnings=prepared.meta.get("warnings", []),
                                          checks=prepared.meta.get("checks", {}),
                                          seconds=round(time.perf_counter() - t0, 2))
        except Exception as e:  # noqa: BLE001 - recorded, never fatal
            items[item.name] = _failure("prepare", e, item)
    if record != old:  # everything reused: the record (and its mtime) stays as it was
        record.write(record_path)
    return record


# ---------------------------------------------------------------------------------------------
def infer_shard(pipelines, prep_shard_record, record_path, config: dict) -> dict:
    """One GPU job per shard: for each pipeline with something left to predict, load its fold models
    once, stream the shard's prepared items through them, then free them for the next pipeline.
    The shard record has one report per pipeline."""
    recs = {key: SessionRecord.read(path)
            for key, path in json.loads(Path(prep_shard_record).read_text())["sessions"].items()}
    report = {"step": "infer", "pipelines": {p: _infer_pipeline(p, recs, config) for p in pipelines}}
    write_json_atomic(record_path, report)
    return report


def _infer_pipeline(pipeline: str, recs: dict, config: dict) -> dict:
    from cohortseg.models.ensemble import Timer, configure_tensorflow, load_models, prefetch, release_models
    from cohortseg.models.store import ModelStore

    timer = Timer()
    work = _work(config)
    inf = config.get("inference", {})
    p = get_pipeline(pipeline)
    report = {"items": {}, "model_load_seconds": 0.0}
    todo = []
    for key, rec in recs.items():
        for name, it in (rec.pipelines.get(pipeline, {}) if rec else {}).items():
            if not it.ok:
                report["items"][f"{key}/{name}"] = {"status": "skipped", "error": it.error}
                continue
            out = _prob_path(work, pipeline, key, name)
            side = ItemRecord.read(out.with_suffix(".json")) if _reuse(config) else None
            if _reusable(side, it.stamp, out):
                report["items"][f"{key}/{name}"] = {"status": "ok", "reused": True}
                continue
            todo.append((key, name, it.prep, it.stamp, out))
    if todo:
        configure_tensorflow(threads=int(inf.get("threads", 0) or 0), onednn=bool(inf.get("onednn", True)))  # the same seed for every pipeline
        cards = pipeline_cards(config, pipeline)
        store = ModelStore.from_config(config)
        models = load_models(cards, store)
        report["model_load_seconds"] = timer()
        report["models"] = {c.name: [f.sha256 for f in folds] for c, folds in zip(cards, models)}
        cfg = _cfg(config, pipeline)
        batch = int(inf.get("batch_size", 16))
        for (key, name, _, stamp, out), loaded in prefetch(lambda t: Prepared.load(t[2]), todo, int(inf.get("prefetch", 2))):
            t0 = time.perf_counter()
            try:
                if isinstance(loaded, Exception):
                    raise loaded
                predicted = p.predict(models, loaded, cards, cfg, batch)
                if not isinstance(predicted, Predicted):
                    raise TypeError(f"{pipeline}.predict must return Predicted, not {type(predicted).__name__}")
                predicted.save(out)
                entry = ItemRecord(OK, seconds=round(time.perf_counter() - t0, 3))
            except Exception as e:  # noqa: BLE001
                entry = _failure("inference", e)
                if _is_fatal(e):
                    raise
            entry.stamp = stamp
            entry.write(out.with_suffix(".json"))
            report["items"][f"{key}/{name}"] = {"status": entry.status, "seconds": entry.seconds, "error": entry.error}
        del models
        release_models()
    report["seconds"] = timer()
    return report


def _is_fatal(e: BaseException) -> bool:
    """Errors of the machine rather than of a subject: let Snakemake retry the whole job."""
    return isinstance(e, (MemoryError, KeyboardInterrupt)) or type(e).__name__ in ("InternalError", "UnavailableError")


# ---------------------------------------------------------------------------------------------
def finalize_shard(prep_shard_record, config: dict, record_path, workers: int = 1) -> dict:
    """Finalize every session of a shard, then write the shard's part of the cohort tables
    (`aggregate.write_shard_tables`); the shard record lists their per-session records."""
    from cohortseg.workflow.aggregate import shard_tables_dir, write_shard_tables

    sessions = json.loads(Path(prep_shard_record).read_text())["sessions"]
    by = rows_by_session(config, list(sessions))
    jobs = [(by[k], prep, config, str(session_record_path(config, k))) for k, prep in sessions.items()]
    shard = _run_shard("finalize", finalize_session, jobs, workers, record_path)
    write_shard_tables(shard["sessions"], config, shard_tables_dir(record_path))
    return shard


def finalize_session(rows: list[dict], prep_record, config: dict, record_path) -> SessionRecord:
    """Back to native space, outputs, metrics and QC for every item of one session."""
    rec = SessionRecord.read(prep_record)
    if rec is None:
        raise OSError(f"prep record {prep_record} is missing or unreadable")
    out_dir = Path(config["output_dir"])
    work = _work(config)
    old = SessionRecord.read(record_path) if _reuse(config) else None
    row_of = {(r["pipeline"], r["item"]): r for r in rows}
    cards_cache: dict = {}
    ctx = Context.from_config(config)
    for pname, items in rec.pipelines.items():
        write_dataset_files(out_dir / pname, pname, config.get("bids_dir"))
        for name, it in items.items():
            if not it.ok:
                continue
            prev = old.pipelines.get(pname, {}).get(name) if old else None
            if _reusable(prev, it.stamp, *(prev.files.values() if prev else ())):
                items[name] = dataclasses.replace(prev, contrast=it.contrast)
                continue
            item = _item(row_of[(pname, name)])
            writer = OutputWriter(out_dir, item)
            t0 = time.perf_counter()
            try:
                prob_file = _prob_path(work, item.pipeline, item.session_key, item.name)
                side = ItemRecord.read(prob_file.with_suffix(".json"))
                if side is None or side.stamp != it.stamp or not side.ok or not prob_file.is_file():
                    why = side.error if side is not None and side.stamp == it.stamp else ""
                    raise InputError(f"inference produced no output{': ' + why if why else ''}")
                if pname not in cards_cache:
                    cards_cache[pname] = pipeline_cards(config, pname)
                writer.describe(cards_cache[pname], _cfg(config, pname))
                metrics = get_pipeline(pname).finalize(item, Prepared.load(it.prep), Predicted.load(prob_file),
                                                       cards_cache[pname], _cfg(config, pname), ctx, writer)
                it.status, it.metrics = OK, metrics
            except Exception as e:  # noqa: BLE001
                fail = _failure("finalize", e, item)
                it.status, it.stage, it.error = fail.status, fail.stage, fail.error
            # outputs, flags and anatomy checks are kept for QC whatever the outcome
            it.files, it.sanity_flags = writer.files, writer.flags
            writer.remove_stale(prev.files.values() if prev else ())
            it.checks = {**it.checks, **writer.checks}
            it.finalize_seconds = round(time.perf_counter() - t0, 2)
    if old is not None and rec == dataclasses.replace(old, finished=""):
        return old  # everything reused: the record (and its mtime) stays as it was
    rec.finished = time.strftime("%Y-%m-%dT%H:%M:%S")
    rec.write(record_path)
    return rec
