"""BIDS discovery into a cached manifest.

A fast scandir-based parser (no pybids: indexing 10,000 participants with pybids takes minutes and
every cluster job would pay it again). The result is one manifest row per session x pipeline x item.
Four files under the output dir:

``manifest.tsv``
    the rows, for people (and the truth: the other files are caches of it and of the scan).
``manifest.json``
    what was selected (pipelines' filters, participants), so a config change rebuilds the rows.
``manifest.idx.json``
    the compact cache every process reads instead of parsing the TSV: the session keys in file order,
    the byte offset of each session's rows, a bit mask of the pipelines with an ``ok`` row, stamped
    with the TSV's size and mtime. A cluster job loads it (tens of ms at 100,000 participants) and
    then reads only the byte ranges of its own sessions. A stale or corrupt index is rebuilt from
    the TSV (logged).
``manifest.scan.json``
    main process only: per subject folder the mtimes of the folders visited, the image files found
    (with the JSON sidecar fields asked for, ``sidecar_keys``) and the input files of its sessions.
    A re-plan stats those folders (no listing): a subject whose folders kept their mtimes keeps its
    rows (copied byte for byte from the TSV), only changed or new subject folders are listed again
    and only their rows rebuilt. Adding, removing or renaming a file changes its folder's mtime;
    a file rewritten in place does not (its content is noticed by the shard input lists of the plan
    and by the items' stamps, not by discovery). A changed selection rebuilds every row from the
    cached files without listing any folder.

At cohort scale (100,000 subject folders) the first plan lists every folder in a child process
(:func:`list_subjects`: system calls) while this one builds the rows (Python), and the rows of a
session are filled in from decisions made once per session shape (:class:`SessionRows`). File
system calls go to threads only when they are slow (:func:`map_io`: a network file system).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST_COLUMNS = ["participant_id", "session_id", "pipeline", "item", "status", "error", "inputs", "body_part"]
MANIFEST_VERSION = 2
CACHE_VERSION = 1  # manifest.idx.json
SCAN_VERSION = 2  # manifest.scan.json (2: the sidecars read are stamped beside the folders)
_ENTITY = re.compile(r"^([a-zA-Z0-9]+)-([a-zA-Z0-9+]+)$")
_NII = (".nii.gz", ".nii")
#: a folder modified this recently when it was listed is listed again next time (its mtime may not
#: have ticked yet for a change made in the same instant: the 'racy git' problem)
RACY_NS = 2_000_000_000

log = logging.getLogger("cohortseg.plan")


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
        self.shape = (self.suffix, self.datatype, tuple(kv for kv in self.entities.items() if kv[0] not in _LABELS),
                      _sidecar_key(self.sidecar))

    @property
    def stem(self) -> str:
        return _stem(os.path.basename(self.path))


_LABELS = ("sub", "ses")


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
_COUNT_LOCK = threading.Lock()
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
_BATCH = 256


def _scan_batches(paths, datatypes, sidecar_keys, now_ns):
    """scan_subject of the paths, a list of records per batch of _BATCH (map_io: threads only on a
    slow file system)."""
    batches = [paths[i:i + _BATCH] for i in range(0, len(paths), _BATCH)]
    return map_io(lambda b: [scan_subject(p, datatypes, sidecar_keys, now_ns) for p in b], batches,
                  SLOW_SUBJECT_S * _BATCH)


def list_subjects(paths: list[str], datatypes=("anat",), sidecar_keys=(), now_ns: int | None = None,
                  worker: bool | None = None):
    """scan_subject(path) for each path, in order (a generator). With `worker` (default: at least
    WORKER_MIN_SUBJECTS paths and more than one CPU) a child process lists them (``python -m
    cohortseg.workflow.discovery``; its records arrive a batch at a time, so the caller builds
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
    proc = subprocess.Popen([sys.executable, "-m", "cohortseg.workflow.discovery"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env)
    try:
        try:  # room for a few batches, so the listing runs ahead of the rows (Linux)
            import fcntl

            fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
        except (ImportError, AttributeError, OSError):
            pass
        proc.stdin.write(_json_bytes({"paths": paths, "datatypes": datatypes, "sidecar_keys": sidecar_keys,
                                      "now_ns": now_ns}))
        proc.stdin.close()
        n = 0
        for line in proc.stdout:
            msg = json.loads(line)
            if "counts" in msg:
                with _COUNT_LOCK:
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
        out.write(_json_bytes({"records": recs}))
    out.write(_json_bytes({"counts": {"sidecars_read": SCAN_COUNTS["sidecars_read"]}}))
    out.flush()


def _read_sidecar(path, keys) -> dict:
    with _COUNT_LOCK:
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


def matches(f: BidsFile, filters: dict) -> bool:
    """BIDS filters: {'suffix': 'T1w' | [..], 'acq': 'x' | [..] | None (entity must be absent)}."""
    for key, want in _compiled(filters):
        have = f.suffix if key == "suffix" else f.datatype if key == "datatype" else f.entities.get(key)
        if want is None:
            if have is not None:
                return False
        elif have not in want:
            return False
    return True


_COMPILED: dict[int, tuple] = {}


def _compiled(filters: dict) -> tuple:
    """filters as ((key, None | frozenset of str), ...), once per filters object (a discovery calls
    matches() millions of times with the same few dicts)."""
    hit = _COMPILED.get(id(filters))
    if hit is not None and hit[0] is filters:
        return hit[1]
    out = tuple((k, None if w is None else frozenset(str(x) for x in w) if isinstance(w, (list, tuple))
                 else frozenset([str(w)])) for k, w in filters.items())
    if len(_COMPILED) > 256:
        _COMPILED.clear()
    _COMPILED[id(filters)] = (filters, out)  # holds a reference: the id is not reused meanwhile
    return out


BODY_PART_KEY = "BodyPartExamined"


def _normalised(value) -> str:
    return re.sub(r"[^A-Z0-9]", "", str(value).upper())


def body_part_router(anatomy: str, routing: dict):
    """f(BidsFile) -> (keep, note): routes images by the body part BIDS gives, for a pipeline whose
    anatomy is `anatomy` ('brain', 'spine'; '' = takes anything).

    The body part is the JSON sidecar's ``BodyPartExamined`` (dcm2niix writes the DICOM tag; read
    when the subject folder is listed and cached with it, ``sidecar_keys``), else
    an entity value naming one (``routing['entities']``, e.g. ``acq-cspine``). A value among
    ``routing['terms'][anatomy]`` keeps the image; any other sidecar value, or an entity naming
    another anatomy's term, excludes it; no body part: kept (most datasets say nothing). `note`
    says what was found and decided, after the file's name (the manifest's body_part column is
    ``<name><note>``); '' when nothing was found."""
    terms = {a: [_normalised(t) for t in ts] for a, ts in (routing.get("terms") or {}).items()}
    entities = routing.get("entities") or []

    def route(f: BidsFile) -> tuple[bool, str]:
        if not anatomy or not routing.get("route", True):
            return True, ""
        value = str((f.sidecar or {}).get(BODY_PART_KEY) or "").strip()
        if value:
            keep = _normalised(value) in terms.get(anatomy, [])
            return keep, f": BodyPartExamined {value} -> {'kept' if keep else 'excluded'} ({anatomy})"
        for ent in entities:
            v = _normalised(f.entities.get(ent, ""))
            named = {a for a, ts in terms.items() if v and any(t and t in v for t in ts)}
            if named:
                keep = anatomy in named
                return keep, f": {ent}-{f.entities[ent]} -> {'kept' if keep else 'excluded'} ({anatomy})"
        return True, ""

    return route


def _filter_hint(candidates: list[BidsFile]) -> str:
    keys = sorted({k for c in candidates for k in c.entities if k not in ("sub", "ses")})
    differing = [k for k in keys if len({c.entities.get(k) for c in candidates}) > 1]
    if len({c.suffix for c in candidates}) > 1:
        differing.append("suffix")
    return ", ".join(differing) or "acq/run"


def _selected(label: str, include: set, excl: set) -> bool:
    return not ((include and label not in include) or label in excl)


def _labels(participant_label, exclude) -> tuple[set, set]:
    return {p.removeprefix("sub-") for p in participant_label}, {p.removeprefix("sub-") for p in exclude}


def routers_for(pipelines: dict, routing: dict | None) -> dict:
    """pipeline -> body-part router (or None): `routing` is the config's ``body_part`` section plus
    ``anatomy``: {pipeline: 'brain' | 'spine' | ''} (see :func:`body_part_router`); None routes nothing."""
    return {p: body_part_router((routing.get("anatomy") or {}).get(p, ""), routing) if routing else None
            for p in pipelines}


def _suffixes(roles: dict) -> frozenset | None:
    """The suffixes any role of a pipeline can match (None: some role has no suffix filter), so the
    role filters only see the images that can match (the same candidates, fewer tests)."""
    out = set()
    for filters, *_ in roles.values():
        want = filters.get("suffix", ...)
        if want is ... or want is None:
            return None
        out.update(str(w) for w in want) if isinstance(want, (list, tuple)) else out.add(str(want))
    return frozenset(out)


_json_str = json.encoder.encode_basestring_ascii  # what json.dumps writes for a str (the C encoder)


def _sidecar_key(sidecar) -> tuple | None:
    if not sidecar:
        return None
    return tuple((k, v if isinstance(v, (str, int, float, bool)) else json.dumps(v, sort_keys=True))
                 for k, v in sorted(sidecar.items()))


class SessionRows:
    """The manifest rows of sessions from their image files.

    What the rows say (which image fills each role of each pipeline, or why none can, and what the
    body-part routing decided) depends on each image's suffix, datatype, entities and sidecar
    fields, not on the participant and session labels: a cohort has a few session *shapes*, and
    each shape's decisions are made once (:meth:`recipe`) and then filled in with each session's
    labels, paths and names (:meth:`rows`). The labels enter the shape only when a pipeline's
    filters or the routing entities name ``sub`` or ``ses``. `plist`: the pipeline order of the
    ok masks."""

    MAX_SHAPES = 100_000  # a pathological dataset (a shape per session) only loses the cache

    def __init__(self, pipelines: dict, routers: dict | None = None, plist=None, routing: dict | None = None):
        self.pipelines = pipelines
        self.routers = routers or {}
        self.suffixes = {p: _suffixes(roles) for p, roles in pipelines.items()}
        self.bits = {p: 1 << i for i, p in enumerate(plist if plist is not None else pipelines)}
        named = {k for roles in pipelines.values() for filters, *_ in roles.values() for k in filters}
        named |= set((routing or {}).get("entities") or ())
        self.named_labels = tuple(k for k in _LABELS if k in named)  # then part of the shape
        self._memo: dict = {}
        self.tsv = _TsvWriter()

    # -- decisions, once per shape ----------------------------------------------------------------
    def recipe(self, files: list[BidsFile]) -> tuple:
        """(rows, ok mask, indices of the files the ok rows use, whether a file name goes in); a row
        is (pipeline, item file index or None, status, error, inputs, body_part): error and
        body_part are a str, or a tuple of parts when a file's name goes in (a part is a str or a
        file index); inputs is None or ((JSON key + ': ', file index), ...)."""
        key = (tuple(f.shape for f in files), *(files[0].entities.get(k) for k in self.named_labels)) if files else ()
        hit = self._memo.get(key)
        if hit is None:
            if len(self._memo) >= self.MAX_SHAPES:
                self._memo.clear()
            hit = self._memo[key] = self._decide(files)
        return hit

    def _decide(self, files: list[BidsFile]) -> tuple:
        rows = []
        for pname, roles in self.pipelines.items():
            sx = self.suffixes[pname]
            idx = [i for i, f in enumerate(files) if sx is None or f.suffix in sx]
            rows += self._pipeline(pname, roles, files, idx, self.routers.get(pname))
        mask, used = 0, set()
        for r in rows:
            if r[2] == "ok":
                mask |= self.bits.get(r[0], 0)
                used.update(i for _, i in r[4])
        names = any(not isinstance(t, str) for r in rows for t in (r[3], r[5]))
        return tuple(rows), mask, tuple(sorted(used)), names

    @staticmethod
    def _pipeline(pname, roles, files, idx, route) -> list[tuple]:
        chosen, problems, notes = {}, [], []
        primary = next(iter(roles))
        for role, (filters, required, multiple) in roles.items():
            cands = [i for i in idx if matches(files[i], filters)]
            if route is not None:
                decided = [(i, *route(files[i])) for i in cands]
                notes += [(i, note) for i, _, note in decided if note]
                cands = [i for i, keep, _ in decided if keep]
            if not cands:
                if required:
                    problems.append(("missing", [f"no image for role '{role}' matching {json.dumps(filters)}"]))
                continue
            if len(cands) > 1 and not multiple:
                names = [p for i in cands for p in (", ", i)][1:]
                problems.append(("ambiguous", [f"{len(cands)} images match role '{role}' (", *names,
                                               f"); set {pname}.filters.{role} with one of: "
                                               f"{_filter_hint([files[i] for i in cands])}"]))
                continue
            chosen[role] = cands
        body_part = _text(tuple(p for i, note in notes for p in ("; ", i, note))[1:])
        if problems:
            status = "ambiguous" if any(p[0] == "ambiguous" for p in problems) else "missing"
            error = _text(tuple(p for _, parts in problems for p in ("; ", *parts))[1:])
            return [(pname, None, status, error, None, body_part)]
        shared = {r: c[0] for r, c in chosen.items() if r != primary}
        return [(pname, i, "ok", "", tuple((f"{_json_str(r)}: ", j) for r, j in sorted({primary: i, **shared}.items())),
                 body_part) for i in chosen.get(primary, ())]

    # -- rows of one session ----------------------------------------------------------------------
    def rows(self, pid: str, sid: str, files: list[BidsFile]) -> tuple[list[list[str]], int, list[str]]:
        """(rows as lists in MANIFEST_COLUMNS order, ok mask, the input files the ok rows name)."""
        recipe, mask, used, named = self.recipe(files)
        names = [os.path.basename(f.path) for f in files] if named else None
        quoted = {i: _json_str(files[i].path) for i in used}
        stems: dict[int, str] = {}
        out = []
        for pname, item, status, error, inputs, body_part in recipe:
            if item is not None and item not in stems:
                stems[item] = files[item].stem
            out.append([pid, sid, pname, "" if item is None else stems[item], status,
                        error if isinstance(error, str) else "".join(p if isinstance(p, str) else names[p] for p in error),
                        "{}" if inputs is None else "{" + ", ".join([k + quoted[i] for k, i in inputs]) + "}",
                        body_part if isinstance(body_part, str) else
                        "".join(p if isinstance(p, str) else names[p] for p in body_part)])
        return out, mask, sorted([files[i].path for i in used])


def _text(parts: tuple):
    """Text parts (str, or the index of a file whose name goes there) as one str when no name goes in."""
    return "".join(parts) if all(isinstance(p, str) for p in parts) else parts


def _sessions(files: list[BidsFile]) -> list[tuple[tuple[str, str], list[BidsFile]]]:
    """[((participant_id, session_id), files)] sorted by session."""
    sessions: dict[tuple[str, str], list[BidsFile]] = {}
    for f in files:
        ses = f.entities.get("ses")
        sessions.setdefault((f"sub-{f.entities['sub']}", f"ses-{ses}" if ses is not None else ""), []).append(f)
    return sorted(sessions.items())


# -- files -------------------------------------------------------------------------------------------
def replace_atomic(path: Path, data: bytes) -> None:
    """Write beside `path` and rename onto it (a crash never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _json_bytes(obj, indent=None) -> bytes:
    return (json.dumps(obj, indent=indent, sort_keys=indent is not None,
                       separators=None if indent else (",", ":")) + "\n").encode()


class _TsvWriter:
    """Rows (lists in MANIFEST_COLUMNS order) as TSV bytes, quoted as the csv module quotes; one
    buffer and writer for many calls (one thread)."""

    def __init__(self):
        self.buf = io.StringIO()
        self.writer = csv.writer(self.buf, delimiter="\t", lineterminator="\n")

    def __call__(self, rows: list[list[str]]) -> bytes:
        self.buf.seek(0)
        self.buf.truncate()
        self.writer.writerows(rows)
        return self.buf.getvalue().encode()


def session_key(participant_id: str, session_id: str) -> str:
    return f"{participant_id}_{session_id}" if session_id else participant_id


def split_session_key(key: str) -> tuple[str, str]:
    """(participant_id, session_id) of a session_key (session_id "" when the dataset has none)."""
    pid, _, sid = key.partition("_")
    return pid, sid


def _ok_mask(rows, pipelines) -> int:
    bits = {p: 1 << i for i, p in enumerate(pipelines)}
    m = 0
    for r in rows:
        if r["status"] == "ok":
            m |= bits.get(r["pipeline"], 0)
    return m


def _write_all(path: Path, chunks, entries, pipelines, n_rows, meta, scan) -> Manifest:
    """manifest.tsv from per-session chunks, then manifest.json, the index (stamped with the TSV's
    stat) and the scan cache."""
    header = _TsvWriter()([MANIFEST_COLUMNS])
    replace_atomic(path, header + b"".join(chunks))
    st = path.stat()
    offsets, pos = [], len(header)
    for _, n, _ in entries:
        offsets.append(pos)
        pos += n
    offsets.append(pos)
    idx = {"version": CACHE_VERSION, "tsv": [st.st_size, st.st_mtime_ns], "pipelines": pipelines, "rows": n_rows,
           "keys": [e[0] for e in entries], "offsets": offsets, "ok": [e[2] for e in entries]}
    replace_atomic(path.with_suffix(".json"), _json_bytes({**meta, "version": MANIFEST_VERSION}, indent=2))
    replace_atomic(_idx_path(path), _json_bytes(idx))
    if scan is not None:
        replace_atomic(_scan_path(path), _json_bytes({**scan, "version": SCAN_VERSION, "tsv": idx["tsv"]}))
    return Manifest(path, idx)


def _idx_path(path: Path) -> Path:
    return path.with_suffix(".idx.json")


def _scan_path(path: Path) -> Path:
    return path.with_suffix(".scan.json")


def read_manifest(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def read_meta(path) -> dict:
    p = Path(path).with_suffix(".json")
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


# -- the manifest as the plan and the jobs see it -----------------------------------------------------
class Manifest:
    """The cached manifest through its index: session keys, which pipelines have an ``ok`` row per
    session, and the rows of any sessions read from their byte ranges of the TSV. Iterating gives
    every row (reads the whole TSV)."""

    def __init__(self, path, idx: dict, inputs: dict | None = None, notes=(), stats=None):
        self.path = Path(path)
        self.pipelines: list[str] = idx["pipelines"]
        self.keys: list[str] = idx["keys"]  # file order
        self.offsets: list[int] = idx["offsets"]
        self.ok: list[int] = idx["ok"]
        self.n_rows: int = idx["rows"]
        self._inputs = inputs  # session key -> [input paths] (main process)
        self.notes = list(notes)
        self.stats = stats or {}
        self._pos: dict | None = None

    def __len__(self) -> int:
        return self.n_rows

    def __iter__(self):
        return iter(read_manifest(self.path))

    def session(self, key: str) -> tuple[str, str]:
        return split_session_key(key)

    def ok_pipelines(self, mask: int) -> list[str]:
        return [p for i, p in enumerate(self.pipelines) if mask >> i & 1]

    def rows(self, keys) -> dict[str, list[dict]]:
        """{key: rows} for the given sessions (unknown keys: []), read from their byte ranges."""
        if self._pos is None:
            self._pos = {k: i for i, k in enumerate(self.keys)}
        want = sorted({self._pos[k] for k in keys if k in self._pos})
        out: dict[str, list[dict]] = {k: [] for k in keys}
        with open(self.path, "rb") as fh:
            i = 0
            while i < len(want):  # consecutive sessions in one read
                j = i
                while j + 1 < len(want) and want[j + 1] == want[j] + 1:
                    j += 1
                fh.seek(self.offsets[want[i]])
                data = fh.read(self.offsets[want[j] + 1] - self.offsets[want[i]]).decode()
                for rec in csv.reader(io.StringIO(data, newline=""), delimiter="\t"):
                    r = dict(zip(MANIFEST_COLUMNS, rec))
                    out.setdefault(session_key(r["participant_id"], r["session_id"]), []).append(r)
                i = j + 1
        return out

    def inputs(self, key: str) -> list[str]:
        """The input files of a session's rows (main process: from the scan cache)."""
        if self._inputs is None:
            self._inputs = _inputs_of(self.rows(self.keys))
        return self._inputs.get(key, [])


def _inputs_of(by_key: dict) -> dict:
    return {k: _session_inputs(rows) for k, rows in by_key.items()}


def _session_inputs(rows) -> list[str]:
    """The input files named by the rows' `inputs` (JSON)."""
    paths = set()
    for r in rows:
        if r["inputs"] and r["inputs"] != "{}":
            paths.update(json.loads(r["inputs"]).values())
    return sorted(paths)


def _stamp(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _load_json(path: Path):
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def _valid_index(idx, stamp) -> bool:
    try:
        return (idx["version"] == CACHE_VERSION and idx["tsv"] == stamp
                and len(idx["offsets"]) == len(idx["keys"]) + 1 == len(idx["ok"]) + 1
                and idx["offsets"][-1] == stamp[0])
    except (TypeError, KeyError):
        return False


def index_from_tsv(path: Path) -> dict | None:
    """The index of a TSV (when the cached one is stale or corrupt); None when the TSV's sessions are
    not in consecutive rows (edited by hand), which byte ranges cannot serve."""
    data = path.read_bytes()
    stamp = _stamp(path)
    nl = data.find(b"\n") + 1
    header = next(csv.reader([data[:nl].decode()], delimiter="\t")) if nl else []
    if header[: len(MANIFEST_COLUMNS)] != MANIFEST_COLUMNS:
        return None
    keys, offsets, ok, pipelines, n_rows, seen = [], [], [], {}, 0, set()
    pos = nl
    while pos < len(data):  # one record per line, except inside quotes (csv QUOTE_MINIMAL)
        end = data.find(b"\n", pos)
        end = len(data) if end < 0 else end + 1
        while data.count(b'"', pos, end) % 2 and end < len(data):
            nxt = data.find(b"\n", end)
            end = len(data) if nxt < 0 else nxt + 1
        rec = next(csv.reader(io.StringIO(data[pos:end].decode(), newline=""), delimiter="\t"))
        r = dict(zip(MANIFEST_COLUMNS, rec))
        k = session_key(r["participant_id"], r["session_id"])
        bit = 1 << pipelines.setdefault(r["pipeline"], len(pipelines))
        if not keys or keys[-1] != k:
            if k in seen:
                return None
            seen.add(k)
            keys.append(k)
            offsets.append(pos)
            ok.append(0)
        if r["status"] == "ok":
            ok[-1] |= bit
        n_rows += 1
        pos = end
    offsets.append(len(data))
    return {"version": CACHE_VERSION, "tsv": stamp, "pipelines": list(pipelines), "rows": n_rows,
            "keys": keys, "offsets": offsets, "ok": ok}


def open_manifest(path, write_index: bool = False) -> Manifest:
    """The cached manifest for reading (cluster jobs, job scripts): its index when it agrees with the
    TSV, else an index rebuilt from the TSV (logged; written back only when `write_index`)."""
    path = Path(path)
    stamp = _stamp(path)
    if stamp is None:
        raise FileNotFoundError(f"no manifest at {path}")
    idx = _load_json(_idx_path(path))
    if _valid_index(idx, stamp):
        return Manifest(path, idx)
    why = "missing" if not _idx_path(path).exists() else "corrupt" if idx is None else "stale (the TSV changed)"
    idx = index_from_tsv(path)
    if idx is None:
        rows = read_manifest(path)
        grouped: dict = {}
        for r in rows:
            grouped.setdefault(session_key(r["participant_id"], r["session_id"]), []).append(r)
        note = f"manifest index {why}, and {path.name} has a session's rows apart: planning from the full TSV"
        log.warning(note)
        return _InMemoryManifest(path, grouped, [note])
    note = f"manifest index {why}: rebuilt from {path.name}"
    log.warning(note)
    if write_index:
        replace_atomic(_idx_path(path), _json_bytes(idx))
    return Manifest(path, idx, notes=[note])


class _InMemoryManifest(Manifest):
    """A hand-edited TSV whose sessions are not in consecutive rows: every row in memory."""

    def __init__(self, path, grouped: dict, notes):
        pipelines = list(dict.fromkeys(r["pipeline"] for rows in grouped.values() for r in rows))
        super().__init__(path, {"pipelines": pipelines, "keys": list(grouped), "offsets": [],
                                "ok": [_ok_mask(g, pipelines) for g in grouped.values()],
                                "rows": sum(map(len, grouped.values()))}, notes=notes)
        self._grouped = grouped

    def rows(self, keys) -> dict[str, list[dict]]:
        return {k: list(self._grouped.get(k, [])) for k in keys}


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
    old_ranges = _subject_ranges(old) if rows_current else {}
    plist = old.pipelines if rows_current else list(pipelines)  # the ok masks of kept rows use its order
    maker = SessionRows(pipelines, routers, plist, routing)
    new_records, listed, changed, built = _refresh(
        subjects, records, old_ranges, maker, _labels(participant_label, exclude), str(Path(bids_dir)),
        datatypes, sidecar_keys, now)
    stats = {"subjects": len(subjects), "listed": listed, "changed": sorted(changed), "rows_rebuilt": 0,
             "written": False}
    if rows_current and not changed and set(new_records) == set(records):
        notes.append(f"discovery: {len(subjects):,} subject folders, {len(listed):,} listed again, "
                     f"no change; manifest current")
        for n in notes:
            log.info(n)
        if listed:  # new folder mtimes: the scan cache only (the TSV and its index stay as they are)
            replace_atomic(_scan_path(manifest_path), _json_bytes({"key": scan_key, "subjects": new_records,
                                                                   "version": SCAN_VERSION,
                                                                   "tsv": _stamp(manifest_path)}))
        return Manifest(manifest_path, _idx_of(old), inputs=_load_inputs(new_records, bids_dir),
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
    m = _write_all(manifest_path, chunks, entries, plist, n_rows,
                   {"selection": key, "bids_dir": str(Path(bids_dir).resolve())},
                   scan={"key": scan_key, "subjects": new_records})
    m._inputs = _load_inputs(new_records, bids_dir)
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
            cache = _load_json(_scan_path(manifest_path))
            if not (isinstance(cache, dict) and cache.get("version") == SCAN_VERSION and cache.get("key") == scan_key
                    and cache.get("tsv") == _stamp(manifest_path) and isinstance(cache.get("subjects"), dict)):
                why = "missing" if not _scan_path(manifest_path).exists() else "stale or corrupt"
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

    batches = [subjects[i:i + _BATCH] for i in range(0, len(subjects), _BATCH)]
    kept = [k for ks in map_io(unchanged, batches, SLOW_SUBJECT_S * _BATCH) for k in ks]
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
        if not _selected(label, include, excl):
            rec.pop("inputs", None)
            continue
        if name in old_ranges and name not in changed and "inputs" in rec:
            continue  # its rows are kept as they are in the TSV
        built[name] = _build_subject(path, rec, label, maker, root)
    with _COUNT_LOCK:
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
    for (pid, sid), sfiles in _sessions(files):
        k = session_key(pid, sid)
        rows, mask, used = maker.rows(pid, sid, sfiles)
        out.append((k, maker.tsv(rows), mask))
        inputs.append("\t".join([k, *(_rel(p, root) for p in used)]))
        rec["n_rows"] += len(rows)
    rec["inputs"] = "\n".join(inputs)
    return out


def _rel(p: str, root: str) -> str:
    return p[len(root) + 1:] if p.startswith(root + os.sep) else p


def _load_inputs(records: dict, bids_dir) -> dict:
    root = str(Path(bids_dir))
    out = {}
    for rec in records.values():
        for line in rec.get("inputs", "").split("\n") if rec.get("inputs") else ():
            k, *rels = line.split("\t")
            out[k] = [p if p.startswith("/") else f"{root}{os.sep}{p}" for p in rels]
    return out


def _idx_of(m: Manifest) -> dict:
    return {"pipelines": m.pipelines, "keys": m.keys, "offsets": m.offsets, "ok": m.ok, "rows": m.n_rows}


def _subject_ranges(m: Manifest | None) -> dict[str, tuple[int, int]]:
    """subject folder name -> (first, last + 1) session index in the TSV (sessions of a subject are
    consecutive: rows are written subject by subject)."""
    out: dict = {}
    if m is None:
        return out
    for i, k in enumerate(m.keys):
        sub = k.partition("_")[0]
        if sub in out and out[sub][1] == i:
            out[sub] = (out[sub][0], i + 1)
        elif sub in out:
            return {}  # not consecutive: rebuild everything
        else:
            out[sub] = (i, i + 1)
    return out


if __name__ == "__main__":
    _worker_main()
