"""The manifest store: four files under the output dir.

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
    (with the JSON sidecar fields asked for, ``sidecar_keys``) and the input files of its sessions
    (:mod:`cohortseg.workflow.scan`).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
from pathlib import Path

from cohortseg.workflow.scan import json_bytes
from cohortseg.workflow.rows import TsvWriter, session_key, split_session_key

log = logging.getLogger("cohortseg.plan")


MANIFEST_COLUMNS = ["participant_id", "session_id", "pipeline", "item", "status", "error", "inputs", "body_part"]
MANIFEST_VERSION = 2
CACHE_VERSION = 1  # manifest.idx.json
SCAN_VERSION = 2  # manifest.scan.json (2: the sidecars read are stamped beside the folders)


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


def _ok_mask(rows, pipelines) -> int:
    bits = {p: 1 << i for i, p in enumerate(pipelines)}
    m = 0
    for r in rows:
        if r["status"] == "ok":
            m |= bits.get(r["pipeline"], 0)
    return m


def write_all(path: Path, chunks, entries, pipelines, n_rows, meta, scan) -> Manifest:
    """manifest.tsv from per-session chunks, then manifest.json, the index (stamped with the TSV's
    stat) and the scan cache."""
    header = TsvWriter()([MANIFEST_COLUMNS])
    replace_atomic(path, header + b"".join(chunks))
    st = path.stat()
    offsets, pos = [], len(header)
    for _, n, _ in entries:
        offsets.append(pos)
        pos += n
    offsets.append(pos)
    idx = {"version": CACHE_VERSION, "tsv": [st.st_size, st.st_mtime_ns], "pipelines": pipelines, "rows": n_rows,
           "keys": [e[0] for e in entries], "offsets": offsets, "ok": [e[2] for e in entries]}
    replace_atomic(path.with_suffix(".json"), json_bytes({**meta, "version": MANIFEST_VERSION}, indent=2))
    replace_atomic(_idx_path(path), json_bytes(idx))
    if scan is not None:
        replace_atomic(scan_path(path), json_bytes({**scan, "version": SCAN_VERSION, "tsv": idx["tsv"]}))
    return Manifest(path, idx)


def _idx_path(path: Path) -> Path:
    return path.with_suffix(".idx.json")


def scan_path(path: Path) -> Path:
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


def tsv_stamp(path: str | Path) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def load_json(path: Path):
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
    stamp = tsv_stamp(path)
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
    stamp = tsv_stamp(path)
    if stamp is None:
        raise FileNotFoundError(f"no manifest at {path}")
    idx = load_json(_idx_path(path))
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
        replace_atomic(_idx_path(path), json_bytes(idx))
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


def load_inputs(records: dict, bids_dir) -> dict:
    root = str(Path(bids_dir))
    out = {}
    for rec in records.values():
        for line in rec.get("inputs", "").split("\n") if rec.get("inputs") else ():
            k, *rels = line.split("\t")
            out[k] = [p if p.startswith("/") else f"{root}{os.sep}{p}" for p in rels]
    return out


def index_of(m: Manifest) -> dict:
    return {"pipelines": m.pipelines, "keys": m.keys, "offsets": m.offsets, "ok": m.ok, "rows": m.n_rows}


def subject_ranges(m: Manifest | None) -> dict[str, tuple[int, int]]:
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
