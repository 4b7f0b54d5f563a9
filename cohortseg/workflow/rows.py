"""Manifest rows: which files of a session each pipeline's roles take (BIDS entity filters, body-part
routing), one row per session x pipeline x item. The rows of a session are filled in from decisions
made once per session shape (:class:`SessionRows`).
"""
from __future__ import annotations

import csv
import io
import json
import os
import re

from cohortseg.workflow.scan import BidsFile, SESSION_ENTITIES


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


def selected(label: str, include: set, excl: set) -> bool:
    return not ((include and label not in include) or label in excl)


def label_sets(participant_label, exclude) -> tuple[set, set]:
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
        self.named_labels = tuple(k for k in SESSION_ENTITIES if k in named)  # then part of the shape
        self._memo: dict = {}
        self.tsv = TsvWriter()

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


def sessions_of(files: list[BidsFile]) -> list[tuple[tuple[str, str], list[BidsFile]]]:
    """[((participant_id, session_id), files)] sorted by session."""
    sessions: dict[tuple[str, str], list[BidsFile]] = {}
    for f in files:
        ses = f.entities.get("ses")
        sessions.setdefault((f"sub-{f.entities['sub']}", f"ses-{ses}" if ses is not None else ""), []).append(f)
    return sorted(sessions.items())


class TsvWriter:
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
