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
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import operator
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
CACHE_VERSION = 1  # manifest.idx.json and manifest.scan.json
_ENTITY = re.compile(r"^([a-zA-Z0-9]+)-([a-zA-Z0-9+]+)$")
_NII = (".nii.gz", ".nii")
#: a folder modified this recently when it was listed is listed again next time (its mtime may not
#: have ticked yet for a change made in the same instant: the 'racy git' problem)
RACY_NS = 2_000_000_000

log = logging.getLogger("cohortseg.plan")


@dataclass(frozen=True)
class BidsFile:
    path: str
    entities: dict  # 'sub', 'ses', 'acq', ... (values without prefix)
    suffix: str
    datatype: str
    sidecar: dict | None = field(default=None, compare=False)  # fields of its JSON sidecar (sidecar_keys)

    @property
    def stem(self) -> str:
        return _stem(os.path.basename(self.path))


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
LIST_THREADS = 4  # subject folders stat'ed / listed concurrently (system calls release the GIL)


def _mtime(path) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -2


def scan_subject(sub_path: str, datatypes=("anat",), sidecar_keys=(), now_ns: int | None = None) -> dict:
    """List one subject folder: {'dirs': 'rel\tmtime_ns\t...', 'files': 'rel\trel...', 'sidecars': {rel: {..}}}
    (tab-joined strings: the cache of 100,000 subjects loads in a fraction of the time of nested lists).

    Each folder is stat'ed before it is listed, so a change during the listing leaves a newer mtime
    than the one recorded. `rel` paths are relative to the subject folder.
    """
    now_ns = time.time_ns() if now_ns is None else now_ns
    dirs, files, sidecars = [], [], {}

    def stamp(rel, path):
        m = _mtime(path)
        dirs.extend((rel, str(m if now_ns - m > RACY_NS else -1)))

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
                if sidecar_keys and _stem(name) + ".json" in jsons:
                    sidecars[frel] = _read_sidecar(os.path.join(path, _stem(name) + ".json"), sidecar_keys)

    stamp("", sub_path)
    for child in _scandir(sub_path):
        if child.name.startswith("ses-") and _SAFE(child.name) and child.is_dir():
            stamp(child.name, child.path)
            for dt in _scandir(child.path):
                if dt.name in datatypes and dt.is_dir():
                    visit(f"{child.name}/{dt.name}", dt.path)
        elif child.name in datatypes and child.is_dir():
            visit(child.name, child.path)
    rec = {"dirs": "\t".join(dirs), "files": "\t".join(files)}
    if sidecars:
        rec["sidecars"] = sidecars
    return rec


_SAFE = re.compile(r"^[^\t\n/]+$").match  # folder names the tab-joined cache can hold


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
    """Whether every folder the subject's record visited still has its recorded mtime (stats only)."""
    parts = rec["dirs"].split("\t")
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
    says what was found and decided (the manifest's body_part column)."""
    terms = {a: [_normalised(t) for t in ts] for a, ts in (routing.get("terms") or {}).items()}
    entities = routing.get("entities") or []

    def route(f: BidsFile) -> tuple[bool, str]:
        if not anatomy or not routing.get("route", True):
            return True, ""
        value = str((f.sidecar or {}).get(BODY_PART_KEY) or "").strip()
        name = os.path.basename(f.path)
        if value:
            keep = _normalised(value) in terms.get(anatomy, [])
            return keep, f"{name}: BodyPartExamined {value} -> {'kept' if keep else 'excluded'} ({anatomy})"
        for ent in entities:
            v = _normalised(f.entities.get(ent, ""))
            named = {a for a, ts in terms.items() if v and any(t and t in v for t in ts)}
            if named:
                keep = anatomy in named
                return keep, f"{name}: {ent}-{f.entities[ent]} -> {'kept' if keep else 'excluded'} ({anatomy})"
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


def subject_rows(files: list[BidsFile], pipelines: dict, routers: dict | None = None) -> dict[tuple[str, str], list[dict]]:
    """(participant_id, session_id) -> rows, sessions sorted, for the files of one subject."""
    sessions: dict[tuple[str, str], list[BidsFile]] = {}
    for f in files:
        sessions.setdefault((f"sub-{f.entities['sub']}", f"ses-{f.entities['ses']}" if "ses" in f.entities else ""),
                            []).append(f)
    suffixes = {p: _suffixes(roles) for p, roles in pipelines.items()}
    routers = routers or {}
    out = {}
    for (pid, sid), sfiles in sorted(sessions.items()):
        rows = []
        for pname, roles in pipelines.items():
            sx = suffixes[pname]
            rows += _session_rows(pid, sid, pname, roles, sfiles if sx is None else [f for f in sfiles if f.suffix in sx],
                                  routers.get(pname))
        out[(pid, sid)] = rows
    return out


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


def _session_rows(pid, sid, pname, roles, sfiles, route=None):
    base = {"participant_id": pid, "session_id": sid, "pipeline": pname}
    chosen, problems, notes = {}, [], []
    primary = next(iter(roles))
    for role, (filters, required, multiple) in roles.items():
        cands = [f for f in sfiles if matches(f, filters)]
        if route is not None:
            decided = [(f, *route(f)) for f in cands]
            notes += [note for _, _, note in decided if note]
            cands = [f for f, keep, _ in decided if keep]
        if not cands:
            if required:
                problems.append(("missing", f"no image for role '{role}' matching {json.dumps(filters)}"))
            continue
        if len(cands) > 1 and not multiple:
            names = ", ".join(os.path.basename(c.path) for c in cands)
            problems.append(("ambiguous", f"{len(cands)} images match role '{role}' ({names}); "
                                          f"set {pname}.filters.{role} with one of: {_filter_hint(cands)}"))
            continue
        chosen[role] = cands
    body_part = "; ".join(notes)
    if problems:
        status = "ambiguous" if any(p[0] == "ambiguous" for p in problems) else "missing"
        return [{**base, "item": "", "status": status, "error": "; ".join(p[1] for p in problems), "inputs": "{}",
                 "body_part": body_part}]
    rows = []
    shared_inputs = {r: c[0].path for r, c in chosen.items() if r != primary}
    for f in chosen[primary]:
        rows.append({**base, "item": f.stem, "status": "ok", "error": "",
                     "inputs": json.dumps({primary: f.path, **shared_inputs}, sort_keys=True), "body_part": body_part})
    return rows


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


def _tsv_bytes(rows: list[dict], header: bool = False) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    if header:
        w.writerow(MANIFEST_COLUMNS)
    try:
        values = list(map(_ROW, rows))
    except KeyError:  # a row without some column: empty, as csv.DictWriter writes it
        values = [[r.get(c, "") for c in MANIFEST_COLUMNS] for r in rows]
    w.writerows(values)
    return buf.getvalue().encode()


_ROW = operator.itemgetter(*MANIFEST_COLUMNS)


def session_key(participant_id: str, session_id: str) -> str:
    return f"{participant_id}_{session_id}" if session_id else participant_id


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
    header = _tsv_bytes([], header=True)
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
        replace_atomic(_scan_path(path), _json_bytes({**scan, "version": CACHE_VERSION, "tsv": idx["tsv"]}))
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
        pid, _, sid = key.partition("_")
        return pid, sid

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


def _session_inputs(rows, files=None) -> list[str]:
    """The input files named by the rows' `inputs` (JSON). With the session's `files`, by a substring
    test of each file's JSON-quoted path (no JSON parse per row), when every path is plain ASCII."""
    texts = [r["inputs"] for r in rows if r["inputs"] and r["inputs"] != "{}"]
    if files is not None and all(f.path.isascii() and '"' not in f.path and "\\" not in f.path for f in files):
        quoted = [(f.path, f'"{f.path}"') for f in files]
        return sorted({p for p, q in quoted if any(q in t for t in texts)})
    paths = set()
    for t in texts:
        paths.update(json.loads(t).values())
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

    With check=False (cluster jobs) the cached manifest is trusted as is, with no file system scan.
    `sidecar_keys`: fields of each image's JSON sidecar to keep (``BidsFile.sidecar``); read when a
    subject folder is listed, cached with it.
    """
    manifest_path = Path(manifest_path)
    selection = [str(Path(bids_dir).resolve()), pipelines, sorted(participant_label), sorted(exclude), routing]
    key = hashlib.sha256(json.dumps(selection, sort_keys=True, default=list).encode()).hexdigest()
    meta = read_meta(manifest_path) if manifest_path.is_file() else {}
    if not check and meta.get("selection") == key and not rebuild:
        return open_manifest(manifest_path)

    routers = routers_for(pipelines, routing)
    if routing:
        sidecar_keys = tuple(sorted(set(sidecar_keys) | {BODY_PART_KEY}))
    scan_key = hashlib.sha256(json.dumps([str(Path(bids_dir).resolve()), list(datatypes), sorted(sidecar_keys)]
                                         ).encode()).hexdigest()
    notes: list[str] = []
    old, cache = None, None
    if meta and not rebuild and meta.get("version") == MANIFEST_VERSION:
        try:
            old = open_manifest(manifest_path, write_index=True)
            notes += old.notes
        except OSError:
            old = None
        if old is not None and type(old) is Manifest:
            cache = _load_json(_scan_path(manifest_path))
            if not (isinstance(cache, dict) and cache.get("version") == CACHE_VERSION and cache.get("key") == scan_key
                    and cache.get("tsv") == _stamp(manifest_path) and isinstance(cache.get("subjects"), dict)):
                why = "missing" if not _scan_path(manifest_path).exists() else "stale or corrupt"
                notes.append(f"discovery cache {why}: listing every subject folder")
                cache = None
    records = (cache or {}).get("subjects", {})
    rows_current = old is not None and cache is not None and meta.get("selection") == key

    include, excl = _labels(participant_label, exclude)
    now = time.time_ns()
    subjects = subject_folders(bids_dir)
    new_records, listed, rebuilt, changed = {}, [], [], set()
    old_ranges = _subject_ranges(old) if rows_current else {}
    plist = old.pipelines if rows_current else list(pipelines)  # the ok masks of kept rows use its order
    root = str(Path(bids_dir))
    built: dict[str, list] = {}  # subject -> [(session key, TSV chunk, ok mask)] of rebuilt rows

    def probe(batch):  # in threads: stat (and list) folders, the system calls overlap
        out = []
        for name, path in batch:
            rec = records.get(name)
            try:
                if rec is not None and subject_unchanged(path, rec):
                    out.append((name, path, rec, False))
                    continue
            except (KeyError, TypeError, ValueError, AttributeError):  # a damaged record: list again
                pass
            out.append((name, path, scan_subject(path, datatypes, sidecar_keys, now), True))
        return out

    batches = [subjects[i:i + 256] for i in range(0, len(subjects), 256)]
    with ThreadPoolExecutor(max_workers=LIST_THREADS) as pool:
        for batch in pool.map(probe, batches):  # in order; rows are built here while threads list ahead
            for name, path, rec, was_listed in batch:
                new_records[name] = rec
                if was_listed:
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
                rebuilt.append(name)
                built[name] = _build_subject(path, rec, label, pipelines, plist, root, routers)
    with _COUNT_LOCK:
        SCAN_COUNTS["subjects_listed"] += len(listed)
    stats = {"subjects": len(subjects), "listed": listed, "changed": sorted(changed), "rows_rebuilt": 0,
             "written": False}
    if rows_current and not changed and set(new_records) == set(records):
        notes.append(f"discovery: {len(subjects):,} subject folders, {len(listed):,} listed again, "
                     f"no change; manifest current")
        for n in notes:
            log.info(n)
        if listed:  # new folder mtimes: the scan cache only (the TSV and its index stay as they are)
            replace_atomic(_scan_path(manifest_path), _json_bytes({"key": scan_key, "subjects": new_records,
                                                                   "version": CACHE_VERSION,
                                                                   "tsv": _stamp(manifest_path)}))
        return Manifest(manifest_path, _idx_of(old), inputs=_load_inputs(new_records, bids_dir),
                        notes=notes, stats=stats)

    # write a new manifest: unchanged subjects' rows are copied from the old TSV, the others rebuilt
    old_bytes = manifest_path.read_bytes() if old_ranges else b""
    chunks, entries, n_rows = [], [], 0
    for name, _ in subjects:
        rec = new_records[name]
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
    if listed:
        notes.append(f"discovery: {len(subjects):,} subject folders, {len(listed):,} listed "
                     f"({', '.join(listed[:3])}{', ...' if len(listed) > 3 else ''}), "
                     f"{len(subjects) - len(listed):,} unchanged (stat only), {len(changed):,} changed or new")
    notes.append(f"manifest written: rows of {len(rebuilt):,} subject(s) rebuilt, "
                 f"{len(subjects) - len(rebuilt):,} kept ({n_rows:,} rows)")
    for n in notes:
        log.info(n)
    m = _write_all(manifest_path, chunks, entries, plist, n_rows,
                   {"selection": key, "bids_dir": str(Path(bids_dir).resolve())},
                   scan={"key": scan_key, "subjects": new_records})
    m._inputs = _load_inputs(new_records, bids_dir)
    m.notes, m.stats = notes, {**stats, "rows_rebuilt": len(rebuilt), "written": True}
    return m


def _build_subject(path: str, rec: dict, label: str, pipelines: dict, plist: list, root: str,
                   routers: dict | None = None) -> list:
    """The rows of one subject folder as [(session key, TSV chunk, ok mask)]; records its sessions'
    input files and row count in `rec`."""
    files = [f for f in subject_files(path, rec) if f.entities["sub"] == label]
    out, inputs, rec["n_rows"] = [], [], 0
    for (pid, sid), srows in subject_rows(files, pipelines, routers).items():
        k = session_key(pid, sid)
        out.append((k, _tsv_bytes(srows), _ok_mask(srows, plist)))
        inputs.append("\t".join([k, *(_rel(p, root) for p in _session_inputs(srows, files))]))
        rec["n_rows"] += len(srows)
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
