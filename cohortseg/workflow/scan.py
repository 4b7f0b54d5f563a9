"""Scanning a BIDS tree: subject folders listed with scandir (no pybids: indexing 10,000 participants
with pybids takes minutes and every cluster job would pay it again), file names parsed into entities
(:class:`BidsFile`), the JSON sidecar fields asked for read, and the stamps (folder and sidecar mtimes)
that tell a re-plan which folders to list again (:func:`subject_unchanged`).

At cohort scale (100,000 subject folders) the first plan lists every folder in a child process
(:func:`list_subjects`: system calls; ``python -m cohortseg.workflow.scan`` is that child) while the
caller builds the rows (Python). File system calls go to threads only when they are slow
(:func:`map_io`: a network file system).
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("cohortseg.plan")


_ENTITY = re.compile(r"^([a-zA-Z0-9]+)-([a-zA-Z0-9+]+)$")
_NII = (".nii.gz", ".nii")
#: a folder modified this recently when it was listed is listed again next time (its mtime may not
#: have ticked yet for a change made in the same instant: the 'racy git' problem)
RACY_NS = 2_000_000_000


@dataclass(slots=True)
class BidsFile:
    path: str
    entities: dict  # 'sub', 'ses', 'acq', ... (values without prefix)
    suffix: str
    datatype: str
    sidecar: dict | None = field(default=None, compare=False)  # fields of its JSON sidecar (sidecar_keys)
    #: what the manifest's decisions may depend on, the sub/ses labels left out (SessionRows)
    shape: tuple = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        self.shape = (self.suffix, self.datatype, tuple(kv for kv in self.entities.items() if kv[0] not in SESSION_ENTITIES),
                      sidecar_shape(self.sidecar))

    @property
    def stem(self) -> str:
        return _stem(os.path.basename(self.path))


SESSION_ENTITIES = ("sub", "ses")


def parse_name(name: str) -> tuple[dict, str] | None:
    """'sub-01_ses-2_acq-ax_T2starw.nii.gz' -> ({'sub': '01', 'ses': '2', 'acq': 'ax'}, 'T2starw')."""
    for ext in _NII:
        if name.endswith(ext):
            stem = name[: -len(ext)]
            break
    else:
        return None
    parts = stem.split("_")
    ents = {}
    for p in parts[:-1]:
        k, sep, v = p.partition("-")
        bare = v.replace("+", "")
        if not (sep and k.isascii() and k.isalnum() and v and v.isascii() and (not bare or bare.isalnum())):
            return None  # (the rule of _ENTITY, without a regex per entity)
        ents[k] = v
    if "sub" not in ents:
        return None
    return ents, parts[-1]


def _stem(name: str) -> str:
    for ext in _NII:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _scandir(path):
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return []


# -- the scan, one subject folder at a time ---------------------------------------------------------
SCAN_COUNTS = {"subjects_listed": 0, "sidecars_read": 0}  # for tests: what the last scans did
COUNT_LOCK = threading.Lock()
IO_THREADS = 8  # threads for file system calls when they are slow (see map_io)
#: a subject folder that takes longer than this to list (or stat) means a slow file system
SLOW_SUBJECT_S = 0.0005


def map_io(fn, items: list, slow_s: float, threads: int = IO_THREADS):
    """fn(item) for every item, in order, serially while the calls are fast, else in threads.

    The first item is run here and timed: under `slow_s`, a local file system with the metadata
    cached, where threads only fight over the GIL (measured: 4 threads made the 100,000-subject
    plan slower, 19 s more system time); over it, a network file system or a cold disk, where
    the calls' latency overlaps in `threads` threads. The results are the same either way."""
    if not items:
        return
    t0 = time.perf_counter()
    yield fn(items[0])
    rest = items[1:]
    if time.perf_counter() - t0 < slow_s:
        yield from map(fn, rest)
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            yield from pool.map(fn, rest)


def _mtime(path) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -2


def scan_subject(sub_path: str, datatypes=("anat",), sidecar_keys=(), now_ns: int | None = None) -> dict:
    """List one subject folder: {'stamps': 'rel\tmtime_ns\t...', 'files': 'rel\trel...', 'sidecars': {rel: {..}}}
    (tab-joined strings: the cache of 100,000 subjects loads in a fraction of the time of nested lists).

    Each folder is stat'ed before it is listed, so a change during the listing leaves a newer mtime
    than the one recorded. `rel` paths are relative to the subject folder. The JSON sidecars read
    (`sidecar_keys`) are stamped too, each before it is read: a sidecar edited in place
    changes its own mtime but not its folder's, and its subject is then listed again.
    """
    now_ns = time.time_ns() if now_ns is None else now_ns
    stamps, files, sidecars = [], [], {}

    def stamp(rel, path):
        m = _mtime(path)
        stamps.extend((rel, str(m if now_ns - m > RACY_NS else -1)))

    def visit(rel, path):
        stamp(rel, path)
        entries = _scandir(path)
        jsons = {e.name for e in entries if e.name.endswith(".json")} if sidecar_keys else ()
        for e in entries:
            name = e.name
            if (name.endswith(".nii.gz") or name.endswith(".nii")) and (e.is_file() or e.is_symlink()) \
                    and parse_name(name):
                frel = f"{rel}/{name}"
                files.append(frel)
                side = _stem(name) + ".json"
                if side in jsons:
                    stamp(f"{rel}/{side}", os.path.join(path, side))
                    sidecars[frel] = _read_sidecar(os.path.join(path, side), sidecar_keys)

    stamp("", sub_path)
    for child in _scandir(sub_path):
        if child.name.startswith("ses-") and _SAFE(child.name) and child.is_dir():
            stamp(child.name, child.path)
            for dt in _scandir(child.path):
                if dt.name in datatypes and dt.is_dir():
                    visit(f"{child.name}/{dt.name}", dt.path)
        elif child.name in datatypes and child.is_dir():
            visit(child.name, child.path)
    rec = {"stamps": "\t".join(stamps), "files": "\t".join(files)}
    if sidecars:
        rec["sidecars"] = sidecars
    return rec


_SAFE = re.compile(r"^[^\t\n/]+$").match  # folder names the tab-joined cache can hold


#: at least this many subject folders to list: a second process lists them while this one builds
#: their rows (the listing is system calls, the rows Python: on two cores they overlap; threads
#: would fight over the GIL instead)
WORKER_MIN_SUBJECTS = 2000
LIST_BATCH = 256


def _scan_batches(paths, datatypes, sidecar_keys, now_ns):
    """scan_subject of the paths, a list of records per batch of LIST_BATCH (map_io: threads only on a
    slow file system)."""
    batches = [paths[i:i + LIST_BATCH] for i in range(0, len(paths), LIST_BATCH)]
    return map_io(lambda b: [scan_subject(p, datatypes, sidecar_keys, now_ns) for p in b], batches,
                  SLOW_SUBJECT_S * LIST_BATCH)


def list_subjects(paths: list[str], datatypes=("anat",), sidecar_keys=(), now_ns: int | None = None,
                  worker: bool | None = None):
    """scan_subject(path) for each path, in order (a generator). With `worker` (default: at least
    WORKER_MIN_SUBJECTS paths and more than one CPU) a child process lists them (``python -m
    cohortseg.workflow.scan``; its records arrive a batch at a time, so the caller builds
    rows meanwhile); should it fail, the rest is listed here. The records are the same."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    if worker is None:
        worker = len(paths) >= WORKER_MIN_SUBJECTS and (os.cpu_count() or 1) > 1
    done = 0
    if worker and paths:
        try:
            for rec in _worker_records(paths, list(datatypes), list(sidecar_keys), now_ns):
                done += 1
                yield rec
        except (OSError, ValueError) as e:
            log.warning(f"discovery: the listing process failed ({e}); listing the remaining "
                        f"{len(paths) - done:,} subject folders here")
    for recs in _scan_batches(paths[done:], datatypes, sidecar_keys, now_ns):
        yield from recs


def _worker_records(paths, datatypes, sidecar_keys, now_ns):
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[2])  # the package's folder, also when not installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "cohortseg.workflow.scan"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env)
    try:
        try:  # room for a few batches, so the listing runs ahead of the rows (Linux)
            import fcntl

            fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
        except (ImportError, AttributeError, OSError):
            pass
        proc.stdin.write(json_bytes({"paths": paths, "datatypes": datatypes, "sidecar_keys": sidecar_keys,
                                      "now_ns": now_ns}))
        proc.stdin.close()
        n = 0
        for line in proc.stdout:
            msg = json.loads(line)
            if "counts" in msg:
                with COUNT_LOCK:
                    SCAN_COUNTS["sidecars_read"] += msg["counts"]["sidecars_read"]
                continue
            for rec in msg["records"]:
                n += 1
                yield rec
        if proc.wait() != 0 or n != len(paths):
            raise OSError(f"exit status {proc.returncode}, {n:,} of {len(paths):,} folders listed")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def _worker_main() -> None:
    """The listing process: a task (JSON) on stdin, a line of records per batch on stdout."""
    import sys

    task = json.load(sys.stdin)
    out = sys.stdout.buffer
    for recs in _scan_batches(task["paths"], tuple(task["datatypes"]), tuple(task["sidecar_keys"]), task["now_ns"]):
        out.write(json_bytes({"records": recs}))
    out.write(json_bytes({"counts": {"sidecars_read": SCAN_COUNTS["sidecars_read"]}}))
    out.flush()


def _read_sidecar(path, keys) -> dict:
    with COUNT_LOCK:
        SCAN_COUNTS["sidecars_read"] += 1
    try:
        with open(path) as fh:
            data = json.load(fh)
        return {k: data[k] for k in keys if isinstance(data, dict) and k in data}
    except (OSError, ValueError):
        return {}


def subject_unchanged(sub_path: str, rec: dict) -> bool:
    """Whether every folder the subject's record visited, and every sidecar it read, still has its
    recorded mtime (stats only)."""
    parts = rec["stamps"].split("\t")
    for i in range(0, len(parts), 2):
        rel, m = parts[i], int(parts[i + 1])
        if m < 0 or _mtime(f"{sub_path}/{rel}" if rel else sub_path) != m:
            return False
    return True


def subject_files(sub_path: str, rec: dict) -> list[BidsFile]:
    files = []
    sidecars = rec.get("sidecars") or {}
    for rel in rec["files"].split("\t") if rec["files"] else ():
        folder, name = rel.rsplit("/", 1)
        ents, suffix = parse_name(name)
        files.append(BidsFile(f"{sub_path}{os.sep}{rel}", ents, suffix, folder.rpartition("/")[2], sidecars.get(rel)))
    return files


def subject_folders(bids_dir) -> list[tuple[str, str]]:
    """[(name, path)] of the sub-* folders, sorted."""
    return [(e.name, e.path) for e in _scandir(str(Path(bids_dir))) if e.name.startswith("sub-") and e.is_dir()]


def sidecar_shape(sidecar) -> tuple | None:
    if not sidecar:
        return None
    return tuple((k, v if isinstance(v, (str, int, float, bool)) else json.dumps(v, sort_keys=True))
                 for k, v in sorted(sidecar.items()))


def json_bytes(obj, indent=None) -> bytes:
    return (json.dumps(obj, indent=indent, sort_keys=indent is not None,
                       separators=None if indent else (",", ":")) + "\n").encode()


if __name__ == "__main__":
    _worker_main()
