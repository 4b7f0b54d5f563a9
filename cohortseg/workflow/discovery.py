"""BIDS discovery into a cached manifest: :func:`load_or_build`, one manifest row per session x
pipeline x item, brought up to date one subject folder at a time. Three modules do the work:
:mod:`cohortseg.workflow.scan` (listing subject folders, parsing names, sidecars, stamps),
:mod:`cohortseg.workflow.rows` (filters, body-part routing, rows) and :mod:`cohortseg.workflow.manifest`
(the TSV, its index and the scan cache); the names the rules, scripts and tests use stay importable here.

A re-plan stats the subject folders (no listing): a subject whose folders kept their mtimes keeps its
rows (copied byte for byte from the TSV), only changed or new subject folders are listed again and
only their rows rebuilt. Adding, removing or renaming a file changes its folder's mtime; a file
rewritten in place does not (its content is noticed by the shard input lists of the plan and by the
items' stamps, not by discovery), except a JSON sidecar that discovery reads (stamped too). A changed
selection rebuilds every row from the cached files without listing any folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

# the re-exported names (MANIFEST_COLUMNS ... scan_subject): what the plan, steps, scripts and tests
# import from here
from cohortseg.workflow.manifest import (  # noqa: F401
    CACHE_VERSION, MANIFEST_COLUMNS, MANIFEST_VERSION, SCAN_VERSION, Manifest, index_from_tsv, index_of, load_inputs,
    load_json, open_manifest, read_manifest, read_meta, replace_atomic, scan_path, subject_ranges, tsv_stamp, write_all,
)
from cohortseg.workflow.rows import (  # noqa: F401
    BODY_PART_KEY, SessionRows, label_sets, matches, routers_for, selected, session_key, sessions_of, split_session_key,
)
from cohortseg.workflow.scan import (  # noqa: F401
    COUNT_LOCK, LIST_BATCH, RACY_NS, SCAN_COUNTS, SLOW_SUBJECT_S, BidsFile, json_bytes, list_subjects, map_io,
    parse_name, scan_subject, subject_files, subject_folders, subject_unchanged,
)

log = logging.getLogger("cohortseg.plan")


# -- load or build -------------------------------------------------------------------------------------
def load_or_build(bids_dir, manifest_path, pipelines: dict, participant_label=(), exclude=(),
                  rebuild: bool = False, check: bool = True, datatypes=("anat",), sidecar_keys=(),
                  routing: dict | None = None) -> Manifest:
    """The cached manifest, brought up to date one subject folder at a time (or rebuilt on request).
    `routing`: body-part routing (:func:`routers_for`; the sidecars' ``BodyPartExamined`` is then
    among the cached sidecar fields).

    With check=False (cluster jobs) the cached manifest is trusted as is, with no file system scan,
    also when it was built for another selection (a warning: hundreds of jobs must never re-list
    the dataset, e.g. where a compute node mounts bids_dir under another path); `rebuild` is then
    ignored.
    `sidecar_keys`: fields of each image's JSON sidecar to keep (``BidsFile.sidecar``); read when a
    subject folder is listed, cached with it.
    """
    manifest_path = Path(manifest_path)
    selection = [str(Path(bids_dir).resolve()), pipelines, sorted(participant_label), sorted(exclude), routing]
    key = hashlib.sha256(json.dumps(selection, sort_keys=True, default=list).encode()).hexdigest()
    meta = read_meta(manifest_path) if manifest_path.is_file() else {}
    if not check:  # a cluster job: the main process has just written the manifest of this run
        return _cluster_manifest(manifest_path, meta, key, bids_dir)

    routers = routers_for(pipelines, routing)
    if routing:
        sidecar_keys = tuple(sorted(set(sidecar_keys) | {BODY_PART_KEY}))
    scan_key = hashlib.sha256(json.dumps([str(Path(bids_dir).resolve()), list(datatypes), sorted(sidecar_keys)]
                                         ).encode()).hexdigest()
    notes: list[str] = []
    old, cache = _cached(manifest_path, meta, rebuild, scan_key, notes)
    records = (cache or {}).get("subjects", {})
    rows_current = old is not None and cache is not None and meta.get("selection") == key

    now = time.time_ns()
    subjects = subject_folders(bids_dir)
    old_ranges = subject_ranges(old) if rows_current else {}
    plist = old.pipelines if rows_current else list(pipelines)  # the ok masks of kept rows use its order
    maker = SessionRows(pipelines, routers, plist, routing)
    new_records, listed, changed, built = _refresh(
        subjects, records, old_ranges, maker, label_sets(participant_label, exclude), str(Path(bids_dir)),
        datatypes, sidecar_keys, now)
    stats = {"subjects": len(subjects), "listed": listed, "changed": sorted(changed), "rows_rebuilt": 0,
             "written": False}
    if rows_current and not changed and set(new_records) == set(records):
        notes.append(f"discovery: {len(subjects):,} subject folders, {len(listed):,} listed again, "
                     f"no change; manifest current")
        for n in notes:
            log.info(n)
        if listed:  # new folder mtimes: the scan cache only (the TSV and its index stay as they are)
            replace_atomic(scan_path(manifest_path), json_bytes({"key": scan_key, "subjects": new_records,
                                                                   "version": SCAN_VERSION,
                                                                   "tsv": tsv_stamp(manifest_path)}))
        return Manifest(manifest_path, index_of(old), inputs=load_inputs(new_records, bids_dir),
                        notes=notes, stats=stats)

    # write a new manifest: unchanged subjects' rows are copied from the old TSV, the others rebuilt
    chunks, entries, n_rows = _assemble(subjects, new_records, built, old, old_ranges, manifest_path)
    if listed:
        notes.append(f"discovery: {len(subjects):,} subject folders, {len(listed):,} listed "
                     f"({', '.join(listed[:3])}{', ...' if len(listed) > 3 else ''}), "
                     f"{len(subjects) - len(listed):,} unchanged (stat only), {len(changed):,} changed or new")
    notes.append(f"manifest written: rows of {len(built):,} subject(s) rebuilt, "
                 f"{len(subjects) - len(built):,} kept ({n_rows:,} rows)")
    for n in notes:
        log.info(n)
    m = write_all(manifest_path, chunks, entries, plist, n_rows,
                   {"selection": key, "bids_dir": str(Path(bids_dir).resolve())},
                   scan={"key": scan_key, "subjects": new_records})
    m._inputs = load_inputs(new_records, bids_dir)
    m.notes, m.stats = notes, {**stats, "rows_rebuilt": len(built), "written": True}
    return m


def _cluster_manifest(manifest_path: Path, meta: dict, key: str, bids_dir) -> Manifest:
    """A cluster job's manifest: the one the main process wrote, used as it is (no scan)."""
    if not manifest_path.is_file():
        from cohortseg.errors import CohortsegError

        raise CohortsegError(f"no manifest at {manifest_path}: cluster jobs read the one the main "
                             f"snakemake process writes when it plans the run")
    m = open_manifest(manifest_path)
    if meta.get("selection") != key:  # e.g. bids_dir mounted under another path on this node
        note = (f"{manifest_path.name} was built for another selection (bids_dir "
                f"{meta.get('bids_dir')!r}, here {str(Path(bids_dir).resolve())!r}, or other filters); "
                f"a cluster job uses it as it is and never lists the dataset")
        log.warning(note)
        m.notes.append(note)
    return m


def _cached(manifest_path: Path, meta: dict, rebuild: bool, scan_key: str, notes: list) -> tuple:
    """(the old manifest or None, its scan cache or None), each only when usable; why not in `notes`."""
    old, cache = None, None
    if meta and not rebuild and meta.get("version") == MANIFEST_VERSION:
        try:
            old = open_manifest(manifest_path, write_index=True)
            notes += old.notes
        except OSError:
            old = None
        if old is not None and type(old) is Manifest:
            cache = load_json(scan_path(manifest_path))
            if not (isinstance(cache, dict) and cache.get("version") == SCAN_VERSION and cache.get("key") == scan_key
                    and cache.get("tsv") == tsv_stamp(manifest_path) and isinstance(cache.get("subjects"), dict)):
                why = "missing" if not scan_path(manifest_path).exists() else "stale or corrupt"
                notes.append(f"discovery cache {why}: listing every subject folder")
                cache = None
    return old, cache


def _refresh(subjects, records: dict, old_ranges: dict, maker: SessionRows, labels: tuple, root: str,
             datatypes, sidecar_keys, now_ns: int) -> tuple[dict, list, set, dict]:
    """Every subject folder's scan record, the folder listed again only when its stamps changed, and
    the rows rebuilt of the selected subjects whose files changed (or that have no rows yet):
    (records, names listed, names changed, {name: [(session key, TSV chunk, ok mask)]} rebuilt)."""
    include, excl = labels

    def unchanged(batch):  # stats only; in threads on a slow file system (map_io)
        out = []
        for name, path in batch:
            rec = records.get(name)
            try:
                out.append(rec is not None and subject_unchanged(path, rec))
            except (KeyError, TypeError, ValueError, AttributeError):  # a damaged record: list again
                out.append(False)
        return out

    batches = [subjects[i:i + LIST_BATCH] for i in range(0, len(subjects), LIST_BATCH)]
    kept = [k for ks in map_io(unchanged, batches, SLOW_SUBJECT_S * LIST_BATCH) for k in ks]
    to_list = [path for (_, path), k in zip(subjects, kept) if not k]
    fresh = list_subjects(to_list, datatypes, sidecar_keys, now_ns)  # listed while the rows are built
    new_records, listed, changed, built = {}, [], set(), {}
    for (name, path), was_kept in zip(subjects, kept):
        rec = records[name] if was_kept else next(fresh)
        new_records[name] = rec
        if not was_kept:
            listed.append(name)
            old_rec = records.get(name)
            if (isinstance(old_rec, dict) and rec["files"] == old_rec.get("files")
                    and rec.get("sidecars") == old_rec.get("sidecars")):
                for k in ("inputs", "n_rows"):  # same files (a folder touched, or 'racy'): same rows
                    if k in old_rec:
                        rec[k] = old_rec[k]
            else:
                changed.add(name)
        label = name[4:]
        if not selected(label, include, excl):
            rec.pop("inputs", None)
            continue
        if name in old_ranges and name not in changed and "inputs" in rec:
            continue  # its rows are kept as they are in the TSV
        built[name] = _build_subject(path, rec, label, maker, root)
    with COUNT_LOCK:
        SCAN_COUNTS["subjects_listed"] += len(listed)
    return new_records, listed, changed, built


def _assemble(subjects, records: dict, built: dict, old: Manifest | None, old_ranges: dict,
              manifest_path: Path) -> tuple[list, list, int]:
    """The new TSV's (chunks, index entries, row count), subject by subject: rebuilt rows, or the
    unchanged subjects' rows copied from the old TSV."""
    old_bytes = manifest_path.read_bytes() if old_ranges else b""
    chunks, entries, n_rows = [], [], 0
    for name, _ in subjects:
        rec = records[name]
        if name in built:
            for k, chunk, mask in built[name]:
                chunks.append(chunk)
                entries.append((k, len(chunk), mask))
            n_rows += rec["n_rows"]
        elif "inputs" in rec and name in old_ranges:
            i0, i1 = old_ranges[name]
            chunks.append(old_bytes[old.offsets[i0]:old.offsets[i1]])
            entries.extend((old.keys[i], old.offsets[i + 1] - old.offsets[i], old.ok[i]) for i in range(i0, i1))
            n_rows += rec.get("n_rows", 0)
    return chunks, entries, n_rows


def _build_subject(path: str, rec: dict, label: str, maker: SessionRows, root: str) -> list:
    """The rows of one subject folder as [(session key, TSV chunk, ok mask)]; records its sessions'
    input files and row count in `rec`."""
    files = [f for f in subject_files(path, rec) if f.entities["sub"] == label]
    out, inputs, rec["n_rows"] = [], [], 0
    for (pid, sid), sfiles in sessions_of(files):
        k = session_key(pid, sid)
        rows, mask, used = maker.rows(pid, sid, sfiles)
        out.append((k, maker.tsv(rows), mask))
        inputs.append("\t".join([k, *(_rel(p, root) for p in used)]))
        rec["n_rows"] += len(rows)
    rec["inputs"] = "\n".join(inputs)
    return out


def _rel(p: str, root: str) -> str:
    return p[len(root) + 1:] if p.startswith(root + os.sep) else p
