"""BIDS discovery into a cached manifest.

A fast scandir-based parser (no pybids: indexing 10,000 participants with pybids takes minutes and
every cluster job would pay it again). The result is one manifest row per session x pipeline x item,
cached as TSV under the output dir together with a fingerprint of the dataset's folder tree; the
Snakefile reads the cached manifest, and only the main process checks the fingerprint.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cohortseg.io import atomic_path, write_json_atomic

MANIFEST_COLUMNS = ["participant_id", "session_id", "pipeline", "item", "status", "error", "inputs", "body_part"]
MANIFEST_VERSION = 2
_ENTITY = re.compile(r"^([a-zA-Z0-9]+)-([a-zA-Z0-9+]+)$")
_NII = (".nii.gz", ".nii")


@dataclass(frozen=True)
class BidsFile:
    path: str
    entities: dict  # 'sub', 'ses', 'acq', ... (values without prefix)
    suffix: str
    datatype: str

    @property
    def stem(self) -> str:
        name = os.path.basename(self.path)
        for ext in _NII:
            if name.endswith(ext):
                return name[: -len(ext)]
        return name


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
        m = _ENTITY.match(p)
        if not m:
            return None
        ents[m.group(1)] = m.group(2)
    if "sub" not in ents:
        return None
    return ents, parts[-1]


def _scandir(path):
    try:
        with os.scandir(path) as it:
            return sorted((e for e in it), key=lambda e: e.name)
    except FileNotFoundError:
        return []


def scan(bids_dir, datatypes=("anat",)) -> tuple[list[BidsFile], str]:
    """All NIfTI files of `datatypes` under sub-*/[ses-*/]; returns (files, fingerprint).

    The fingerprint hashes the mtimes of every folder visited: adding, removing or renaming a file
    changes its folder's mtime, so a changed dataset is noticed without reading any file.
    """
    bids_dir = Path(bids_dir)
    h = hashlib.sha256(str(bids_dir.resolve()).encode())
    files: list[BidsFile] = []

    def visit_dir(path, datatype):
        for e in _scandir(path):
            if e.is_file() or e.is_symlink():
                parsed = parse_name(e.name)
                if parsed:
                    files.append(BidsFile(e.path, parsed[0], parsed[1], datatype))

    def stamp(entry):
        h.update(f"{entry.path}:{entry.stat().st_mtime_ns}".encode())

    for sub in _scandir(bids_dir):
        if not (sub.name.startswith("sub-") and sub.is_dir()):
            continue
        stamp(sub)
        for child in _scandir(sub.path):
            if child.name.startswith("ses-") and child.is_dir():
                stamp(child)
                for dt in _scandir(child.path):
                    if dt.name in datatypes and dt.is_dir():
                        stamp(dt)
                        visit_dir(dt.path, dt.name)
            elif child.name in datatypes and child.is_dir():
                stamp(child)
                visit_dir(child.path, child.name)
    return files, h.hexdigest()


def matches(f: BidsFile, filters: dict) -> bool:
    """BIDS filters: {'suffix': 'T1w' | [..], 'acq': 'x' | [..] | None (entity must be absent)}."""
    for key, want in filters.items():
        have = f.suffix if key == "suffix" else f.datatype if key == "datatype" else f.entities.get(key)
        if want is None:
            if have is not None:
                return False
        elif isinstance(want, (list, tuple)):
            if have not in [str(w) for w in want]:
                return False
        elif have != str(want):
            return False
    return True


def _normalised(value) -> str:
    return re.sub(r"[^A-Z0-9]", "", str(value).upper())


def body_part_router(anatomy: str, routing: dict):
    """f(BidsFile) -> (keep, note): routes images by the body part BIDS gives, for a pipeline whose
    anatomy is `anatomy` ('brain', 'spine'; '' = takes anything).

    The body part is the JSON sidecar's ``BodyPartExamined`` (dcm2niix writes the DICOM tag), else
    an entity value naming one (``routing['entities']``, e.g. ``acq-cspine``). A value among
    ``routing['terms'][anatomy]`` keeps the image; any other sidecar value, or an entity naming
    another anatomy's term, excludes it; no body part: kept (most datasets say nothing). `note`
    says what was found and decided (the manifest's body_part column)."""
    terms = {a: [_normalised(t) for t in ts] for a, ts in (routing.get("terms") or {}).items()}
    entities = routing.get("entities") or []
    cache: dict = {}

    def route(f: BidsFile) -> tuple[bool, str]:
        if not anatomy or not routing.get("route", True):
            return True, ""
        if f.path not in cache:
            cache[f.path] = _sidecar_body_part(f.path)
        value = cache[f.path]
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


def _sidecar_body_part(path: str) -> str:
    """``BodyPartExamined`` of the image's own JSON sidecar ('' when absent or unreadable)."""
    for ext in _NII:
        if path.endswith(ext):
            try:
                with open(path[: -len(ext)] + ".json") as fh:
                    return str(json.load(fh).get("BodyPartExamined") or "").strip()
            except (OSError, ValueError, AttributeError):
                return ""
    return ""


def _filter_hint(candidates: list[BidsFile]) -> str:
    keys = sorted({k for c in candidates for k in c.entities if k not in ("sub", "ses")})
    differing = [k for k in keys if len({c.entities.get(k) for c in candidates}) > 1]
    if len({c.suffix for c in candidates}) > 1:
        differing.append("suffix")
    return ", ".join(differing) or "acq/run"


def build_manifest(bids_dir, pipelines: dict, participant_label=(), exclude=(),
                   routing: dict | None = None) -> tuple[list[dict], str]:
    """Rows for every session x pipeline: one per item, or a 'missing'/'ambiguous' row saying why.

    `pipelines`: name -> {role: (filters, required, multiple)}. `routing`: the config's
    ``body_part`` section plus ``anatomy``: {pipeline: 'brain' | 'spine' | ''} (see
    :func:`body_part_router`); None routes nothing.
    """
    files, fingerprint = scan(bids_dir)
    include = {p.removeprefix("sub-") for p in participant_label}
    excl = {p.removeprefix("sub-") for p in exclude}
    sessions: dict[tuple[str, str], list[BidsFile]] = {}
    for f in files:
        sub = f.entities["sub"]
        if (include and sub not in include) or sub in excl:
            continue
        sessions.setdefault((f"sub-{sub}", f"ses-{f.entities['ses']}" if "ses" in f.entities else ""), []).append(f)

    routers = {p: body_part_router((routing.get("anatomy") or {}).get(p, ""), routing) if routing else None
               for p in pipelines}
    rows = []
    for (pid, sid), sfiles in sorted(sessions.items()):
        for pname, roles in pipelines.items():
            rows.extend(_session_rows(pid, sid, pname, roles, sfiles, routers[pname]))
    return rows, fingerprint


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


def write_manifest(rows: list[dict], path, meta: dict) -> None:
    path = Path(path)
    with atomic_path(path, suffix=".tsv") as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, MANIFEST_COLUMNS, delimiter="\t", lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
    write_json_atomic(path.with_suffix(".json"), {**meta, "version": MANIFEST_VERSION})


def read_manifest(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def read_meta(path) -> dict:
    p = Path(path).with_suffix(".json")
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def load_or_build(bids_dir, manifest_path, pipelines: dict, participant_label=(), exclude=(),
                  rebuild: bool = False, check: bool = True, routing: dict | None = None) -> list[dict]:
    """The cached manifest, rebuilt when the dataset or the selection changed (or on request).

    With check=False (cluster jobs) the cached manifest is trusted as is, with no file system scan.
    """
    manifest_path = Path(manifest_path)
    selection = [str(Path(bids_dir).resolve()), pipelines, sorted(participant_label), sorted(exclude), routing]
    key = hashlib.sha256(json.dumps(selection, sort_keys=True, default=list).encode()).hexdigest()
    if manifest_path.is_file() and not rebuild:
        meta = read_meta(manifest_path)
        if not check and meta.get("selection") == key:
            return read_manifest(manifest_path)
        if meta.get("selection") == key and meta.get("version") == MANIFEST_VERSION:
            _, fingerprint = scan(bids_dir)
            if fingerprint == meta.get("fingerprint"):
                return read_manifest(manifest_path)
    rows, fingerprint = build_manifest(bids_dir, pipelines, participant_label, exclude, routing)
    write_manifest(rows, manifest_path, {"selection": key, "fingerprint": fingerprint,
                                         "bids_dir": str(Path(bids_dir).resolve())})
    return rows
