"""The three per-subject steps the rules call: prepare (per session), infer (per shard), finalize
(per session). Data errors are recorded per item and never raised: one broken scan must not block
its shard or the cohort tables."""
from __future__ import annotations

import json
import logging
import time
import traceback
from pathlib import Path

import numpy as np

from . import __version__
from .cards import pipeline_cards
from .errors import InputError
from .io import atomic_path, write_json_atomic
from .pipelines import get_pipeline
from .pipelines.base import Item, OutputWriter, Prepared

log = logging.getLogger("cohortseg")


def session_rows(config: dict, key: str) -> list[dict]:
    """A session's manifest rows, read in the job from the cached manifest (keeping them out of
    rule params saves planning time per job)."""
    from .discovery import read_manifest
    from .plan import session_key

    rows = read_manifest(Path(config["output_dir"]) / "manifest.tsv")
    return [r for r in rows if session_key(r["participant_id"], r["session_id"]) == key]


def shard_map(shard_dirs) -> dict:
    """pipeline -> shard folder, from the finalize job's inputs (.../work/infer/<pipeline>/shard-k)."""
    return {Path(d).parent.name: str(d) for d in shard_dirs}


def _item(row: dict) -> Item:
    return Item(participant_id=row["participant_id"], session_id=row["session_id"], pipeline=row["pipeline"],
                name=row["item"], inputs=json.loads(row["inputs"]))


def _failure(stage: str, exc: BaseException, item: Item | None = None) -> dict:
    who = f"{item.session_key} {item.pipeline}" if item else ""
    if isinstance(exc, InputError):
        msg = exc.reason + (f" (file: {exc.path})" if exc.path else "")
        log.error("%s: %s failed: %s", who, stage, msg)
    else:
        msg = f"{type(exc).__name__}: {exc}"
        log.error("%s: %s failed unexpectedly: %s\n%s", who, stage, msg, traceback.format_exc())
    return {"status": "failed", "stage": stage, "error": msg}


def _prep_path(work: Path, item: Item) -> Path:
    return work / "prep" / item.pipeline / item.session_key / f"{item.name}.npz"


def _prob_path(shard_dir, item: Item) -> Path:
    return Path(shard_dir) / item.session_key / f"{item.name}.npz"


# ---------------------------------------------------------------------------------------------
def prepare_session(rows: list[dict], config: dict, record_path) -> dict:
    """Prepare every item of one session for every pipeline; write the session's prep record."""
    work = Path(config["output_dir"]) / "work"
    record = {"participant_id": rows[0]["participant_id"] if rows else "", "session_id": rows[0]["session_id"] if rows else "",
              "pipelines": {}, "cohortseg_version": __version__}
    cards_cache: dict = {}
    for row in rows:
        pname = row["pipeline"]
        items = record["pipelines"].setdefault(pname, {})
        if row["status"] != "ok":
            items[row["item"] or "-"] = {"status": "failed", "stage": "discovery", "error": row["error"]}
            continue
        item = _item(row)
        t0 = time.perf_counter()
        try:
            if pname not in cards_cache:
                cards_cache[pname] = pipeline_cards(config, pname)
            prepared = get_pipeline(pname).prepare(item, cards_cache[pname], _cfg(config, pname))
            path = _prep_path(work, item)
            prepared.save(path)
            items[item.name] = {"status": "ok", "prep": str(path), "warnings": prepared.meta.get("warnings", []),
                                "seconds": round(time.perf_counter() - t0, 2)}
        except Exception as e:  # noqa: BLE001 - recorded, never fatal
            items[item.name] = _failure("prepare", e, item)
    write_json_atomic(record_path, record)
    return record


def _cfg(config: dict, pipeline: str) -> dict:
    cfg = dict(config.get(pipeline) or {})
    cfg["_global"] = {k: config.get(k) for k in ("allow_4d", "max_voxels", "output_dir", "model_dir")}
    return cfg


# ---------------------------------------------------------------------------------------------
def infer_shard(pipeline: str, prep_records: list, shard_dir, config: dict) -> dict:
    """Load the fold models once, then stream every prepared item of the shard through them."""
    from .inference import Timer, configure_tensorflow, load_models, prefetch
    from .store import ModelStore

    shard_dir = Path(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    inf = config.get("inference", {})
    configure_tensorflow(threads=int(inf.get("threads", 0) or 0))
    p = get_pipeline(pipeline)
    cards = pipeline_cards(config, pipeline)
    store = ModelStore(config["model_dir"], allow_download=config.get("allow_download", False),
                       cache_file=Path(config["output_dir"]) / "work" / "model_checksums.json")
    models = load_models(cards, store)
    t_load = timer()
    todo, report = [], {"pipeline": pipeline, "items": {}, "model_load_seconds": t_load}
    for rec_path in prep_records:
        rec = json.loads(Path(rec_path).read_text())
        for name, it in rec["pipelines"].get(pipeline, {}).items():
            key = rec["participant_id"] + (f"_{rec['session_id']}" if rec["session_id"] else "")
            if it["status"] == "ok":
                todo.append((key, name, it["prep"]))
            else:
                report["items"][f"{key}/{name}"] = {"status": "skipped", "error": it.get("error", "")}
    cfg = _cfg(config, pipeline)
    batch = int(inf.get("batch_size", 16))
    for (key, name, prep), loaded in prefetch(lambda t: Prepared.load(t[2]), todo, int(inf.get("prefetch", 2))):
        t0 = time.perf_counter()
        try:
            if isinstance(loaded, Exception):
                raise loaded
            prob = p.predict(models, loaded, cards, cfg, batch)
            arrays = prob if isinstance(prob, dict) else {"prob": prob}
            out = shard_dir / key / f"{name}.npz"
            with atomic_path(out, suffix=".npz") as tmp, open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
            report["items"][f"{key}/{name}"] = {"status": "ok", "seconds": round(time.perf_counter() - t0, 3)}
        except Exception as e:  # noqa: BLE001
            report["items"][f"{key}/{name}"] = _failure("inference", e)
            if _is_fatal(e):
                raise
    report["seconds"] = timer()
    report["models"] = {c.name: [f.sha256 for f in folds] for c, folds in zip(cards, models)}
    write_json_atomic(shard_dir / "shard.json", report)
    return report


def _is_fatal(e: BaseException) -> bool:
    """Errors of the machine rather than of a subject: let Snakemake retry the whole job."""
    return isinstance(e, (MemoryError, KeyboardInterrupt)) or type(e).__name__ in ("InternalError", "UnavailableError")


# ---------------------------------------------------------------------------------------------
def finalize_session(rows: list[dict], prep_record, shard_dirs: dict, config: dict, record_path) -> dict:
    """Back to native space, outputs, metrics and QC for every item of one session."""
    rec = json.loads(Path(prep_record).read_text())
    out_dir = Path(config["output_dir"])
    row_of = {(r["pipeline"], r["item"]): r for r in rows}
    cards_cache: dict = {}
    for pname, items in rec["pipelines"].items():
        _dataset_description(out_dir, pname)
        for name, it in items.items():
            if it["status"] != "ok":
                continue
            item = _item(row_of[(pname, name)])
            writer = OutputWriter(out_dir, item)
            t0 = time.perf_counter()
            try:
                shard = shard_dirs.get(pname)
                prob_file = _prob_path(shard, item) if shard else None
                if prob_file is None or not prob_file.is_file():
                    why = ""
                    if shard and (Path(shard) / "shard.json").is_file():
                        why = json.loads((Path(shard) / "shard.json").read_text())["items"].get(
                            f"{item.session_key}/{name}", {}).get("error", "")
                    raise InputError(f"inference produced no output{': ' + why if why else ''}")
                with np.load(prob_file) as z:
                    arrays = {k: z[k] for k in z.files}
                prob = arrays["prob"] if list(arrays) == ["prob"] else arrays
                if pname not in cards_cache:
                    cards_cache[pname] = pipeline_cards(config, pname)
                metrics = get_pipeline(pname).finalize(item, Prepared.load(it["prep"]), prob, cards_cache[pname],
                                                       _cfg(config, pname), writer)
                it.update({"status": "ok", "metrics": metrics, "files": writer.files, "sanity_flags": writer.flags,
                           "finalize_seconds": round(time.perf_counter() - t0, 2)})
            except Exception as e:  # noqa: BLE001
                it.update(_failure("finalize", e, item))
                it.update({"files": writer.files, "sanity_flags": writer.flags})  # kept for QC
    rec["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json_atomic(record_path, rec)
    return rec


def _dataset_description(out_dir: Path, pipeline: str) -> None:
    path = out_dir / pipeline / "dataset_description.json"
    if path.is_file():
        return
    p = get_pipeline(pipeline)
    write_json_atomic(path, {
        "Name": f"cohortseg {pipeline}", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
        "Description": p.description,
        "GeneratedBy": [{"Name": "cohortseg", "Version": __version__,
                         "CodeURL": "https://github.com/cohortseg/cohortseg"}],
    })
