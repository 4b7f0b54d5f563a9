"""The static QC page ``<output_dir>/qc/index.html``.

One self-contained HTML file (CSS and JS inlined, no network, no CDN) that works from ``file://``.
The rows are embedded as one JSON blob (``<script type="application/json" id="qc-data">``) and
rendered client-side by a virtualised list, so 10,000 participants x 5 pipelines stay responsive;
thumbnails are ``loading="lazy"`` and only exist for the rows in view.  Image paths are written
relative to the page, so the output directory can be moved or served as is.

A cohort of more than :data:`PAGE_ROWS` rows (100,000 sessions x 3-5 pipelines: 300,000-500,000)
gets :func:`write_qc_pages`: ``index.html`` lists pages of one pipeline and at most PAGE_ROWS rows
each, which share one ratings store, so a page stays a few MB and opens in about a second.

Keys: ``j``/``k`` (arrows) move, ``Enter``/``o`` open the full-size snapshot, ``p``/``f``/``a``
rate pass/fail/artifact, ``u`` clears, ``e`` exports ``qc_ratings.tsv``, ``/`` filters, ``?`` help.
Ratings stay in the browser's localStorage (key ``cohortseg-qc:v1:<page_id>``) until exported;
:mod:`cohortseg.qc.ratings` turns the export into the ``qc_rating`` column of ``summary.csv``.
"""
from __future__ import annotations

import hashlib
import html
import json
import math
import os
import re
from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping
from urllib.parse import quote

import numpy as np
import pandas as pd

from cohortseg.io import write_text_atomic

__all__ = ["write_qc_page", "write_qc_pages", "page_rows", "FIELDS", "PAGE_TEMPLATE_FILES", "PAGE_ROWS"]

#: rows per page of a large cohort (write_qc_pages): at ~250 bytes a row, a page of 50,000 rows
#: (~12 MB) opens in about a second in headless Chromium and filters in tens of ms (docs/BENCHMARKS.md)
PAGE_ROWS = 50_000

FIELDS = ["participant_id", "session_id", "pipeline", "status", "qc_flags", "thumb", "img",
          "metrics", "error"]
PAGE_TEMPLATE_FILES = ("page.html", "page.css", "page.js")
# Row keys that are not metrics (everything else numeric is shown as a metric).
_NOT_METRICS = {"participant_id", "session_id", "pipeline", "status", "qc_flags", "error",
                "snapshot", "thumbnail", "metrics", "qc_rating", "sanity_flags", "run", "item",
                "session_key"}
_MARK = re.compile(r"<!--QC:(TITLE|CSS|JS|DATA)-->")


def _asset(name: str) -> str:
    return resources.files("cohortseg.qc").joinpath(name).read_text(encoding="utf-8")


_BLANKS = frozenset(("", "nan", "n/a", "none"))


def _blank(v) -> bool:
    if v.__class__ is str:  # the common case first (300,000 rows x 10 fields)
        return v.strip().lower() in _BLANKS
    if v is None or v is pd.NA:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    return isinstance(v, str) and v.strip().lower() in _BLANKS


def _text(v) -> str:
    if v.__class__ is str:
        s = v.strip()
        return "" if s.lower() in _BLANKS else s
    return "" if _blank(v) else str(v).strip()


def _number(v):
    """Finite number rounded to 6 significant digits, else None (bools are not metrics)."""
    if v.__class__ is int:
        return v
    if v.__class__ is not float:
        if isinstance(v, (bool, np.bool_)) or _blank(v):
            return None
        if isinstance(v, (int, np.integer)):
            return int(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(f):
        return None
    r = float(f"{f:.6g}")
    return int(r) if r.is_integer() and abs(r) < 1e15 else r


class _Linker:
    """Path (absolute, or relative to base_dir / cwd) -> URL relative to the page directory.

    String-based (no pathlib per row): 100,000 paths take ~0.3 s instead of ~10 s.
    """

    def __init__(self, out_dir, base_dir):
        self.out = os.path.normpath(os.path.abspath(out_dir))
        self.out_parts = self.out.split(os.sep)
        self.base = os.path.normpath(os.path.abspath(base_dir if base_dir is not None else "."))
        self.drive = os.path.splitdrive(self.out)[0]
        # (levels up, ancestor + separator): the page's folder, its parent, ... (not the root)
        self.prefixes = [(up, os.sep.join(self.out_parts[:len(self.out_parts) - up]) + os.sep)
                         for up in range(len(self.out_parts) - 1)]

    def __call__(self, p) -> str:
        if _blank(p):
            return ""
        s = str(p)
        if _URL.match(s):
            return s
        for up, prefix in self.prefixes:  # fast path: a plain absolute path below an ancestor of the page
            if s.startswith(prefix) and "/." not in s and "//" not in s:
                rel = "../" * up + s[len(prefix):].replace(os.sep, "/")
                return rel if _SAFE.fullmatch(rel) else quote(rel, safe="/._-~")
        full = os.path.normpath(s if os.path.isabs(s) else os.path.join(self.base, s))
        if os.path.splitdrive(full)[0] != self.drive:  # another drive on Windows
            return Path(full).as_uri()
        parts = full.split(os.sep)
        n = 0
        for a, b in zip(parts, self.out_parts):
            if a != b:
                break
            n += 1
        rel = [".."] * (len(self.out_parts) - n) + parts[n:]
        return quote("/".join(x for x in rel if x), safe="/._-~")


_SAFE = re.compile(r"[A-Za-z0-9/._~-]*")
_URL = re.compile(r"^(https?|data|file):")


def _records(rows) -> list[dict]:
    if isinstance(rows, pd.DataFrame):
        return rows.to_dict(orient="records")
    return [r if r.__class__ is dict else dict(r) for r in rows]  # (read only)


def page_rows(rows, out_dir, *, metrics: Iterable[str] | None = None, base_dir=None,
              thumbs: Mapping[int, str] | None = None):
    """Normalise input rows to the page's compact form -> (metric names, list of row arrays).

    Each row array follows :data:`FIELDS`; its ``metrics`` entry is a flat list
    ``[metric_index, value, ...]`` of the finite metrics of that row (compact for 50,000 rows).
    """
    link = _Linker(out_dir, base_dir)
    recs = _records(rows)
    names: list[str] = list(metrics) if metrics is not None else []
    index = {m: i for i, m in enumerate(names)}
    fixed = metrics is not None
    out = []
    for n, r in enumerate(recs):
        mvals: dict = {}
        if isinstance(r.get("metrics"), Mapping):
            mvals.update(r["metrics"])
        for k, v in r.items():
            if k in _NOT_METRICS or str(k).startswith("qc_") or k in mvals:
                continue
            if _number(v) is not None:
                mvals[k] = v
        flat = []
        for k, v in mvals.items():
            val = _number(v)
            if val is None:
                continue
            if k not in index:
                if fixed:
                    continue
                index[k] = len(names)
                names.append(k)
            flat += [index[k], val]
        if fixed:  # keep the caller's order
            pairs = sorted(zip(flat[::2], flat[1::2]))
            flat = [x for pr in pairs for x in pr]
        thumb = (thumbs or {}).get(n) or r.get("thumbnail")
        snap = r.get("snapshot")
        img = link(snap)
        if img and thumb.__class__ is str and snap.__class__ is str and thumb == snap[:-4] + "_thumb.png" \
                and img.endswith(".png"):  # (the writer's thumbnail beside its snapshot: one path to link)
            th = img[:-4] + "_thumb.png"
        else:
            th = link(thumb)
        out.append([
            _text(r.get("participant_id")),
            _text(r.get("session_id")),
            _text(r.get("pipeline")),
            _text(r.get("status")),
            _text(r.get("qc_flags")),
            th,
            img,
            flat,
            _text(r.get("error"))[:500],
        ])
    return names, out


def _make_thumbnails(recs, out_dir: Path, base_dir, width: int) -> dict:
    from cohortseg.qc.snapshots import thumbnail

    made = {}
    for n, r in enumerate(recs):
        if not _blank(r.get("thumbnail")) or _blank(r.get("snapshot")):
            continue
        src = Path(str(r["snapshot"]))
        if not src.is_absolute():
            src = (Path(base_dir) if base_dir is not None else Path.cwd()) / src
        if not src.is_file():
            continue
        dst = out_dir / "thumbs" / (hashlib.sha1(str(src.resolve()).encode()).hexdigest()[:16]
                                    + ".png")
        if not dst.exists() or dst.stat().st_mtime < src.stat().st_mtime:
            thumbnail(src, dst, width=width)
        made[n] = str(dst.resolve())
    return made


def _json_for_html(obj) -> str:
    s = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    # Inside <script>: never let the data close the tag or open a comment; still valid JSON.
    return (s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def write_qc_page(rows, out_dir, *, title: str = "cohortseg QC", page_id: str | None = None,
                  metrics: Iterable[str] | None = None, max_metrics: int = 6, base_dir=None,
                  make_thumbnails: bool = False, thumb_width: int = 160,
                  statuses: Mapping[str, str] | None = None, filename: str = "index.html",
                  index: str | None = None) -> Path:
    """Write ``out_dir/index.html`` and return its path.

    rows: list of dicts or a DataFrame, one per participant x pipeline, with keys
        ``participant_id``, ``session_id``, ``pipeline``, ``status``, ``qc_flags``, ``error``,
        ``snapshot`` (full-size PNG), ``thumbnail`` (small PNG; the snapshot is used if absent),
        and metrics either as a ``metrics`` dict or as other numeric keys/columns.
    page_id: key of the ratings in localStorage (default: the resolved `out_dir`), so two QC pages
        opened from file:// never share ratings.
    metrics: which metrics to embed and in which order (default: all numeric ones, first seen
        first); the table shows the first `max_metrics` of each row, the viewer shows them all.
    base_dir: directory that relative snapshot/thumbnail paths are relative to (default: cwd).
    make_thumbnails: create missing thumbnails under ``out_dir/thumbs/`` (``width`` px).
    statuses: the status vocabulary, status -> meaning; the status filter lists it (with the
        meanings) before any other status found in the rows.
    filename: the page's name in `out_dir`; index: the page that lists this one and its siblings
        (a link in the header), for the pages of :func:`write_qc_pages`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    recs = _records(rows)
    thumbs = _make_thumbnails(recs, out_dir, base_dir, thumb_width) if make_thumbnails else None
    names, data = page_rows(recs, out_dir, metrics=metrics, base_dir=base_dir, thumbs=thumbs)
    blob = {
        "version": 1,
        "title": title,
        "page_id": page_id if page_id is not None else str(out_dir.resolve()),
        "fields": FIELDS,
        "metrics": names,
        "max_metrics": int(max_metrics),
        "statuses": dict(statuses or {}),
        "index": index or "",
        "rows": data,
    }
    parts = {
        "TITLE": html.escape(title),
        "CSS": _asset("page.css"),
        "JS": _asset("page.js").replace("</script", "<\\/script"),
        "DATA": _json_for_html(blob),
    }
    page = _MARK.sub(lambda m: parts[m.group(1)], _asset("page.html"))
    target = out_dir / filename
    write_text_atomic(target, page)
    return target


def write_qc_pages(rows: list[dict], out_dir, *, title: str = "cohortseg QC", page_rows: int = PAGE_ROWS,
                   statuses: Mapping[str, str] | None = None) -> Path:
    """``out_dir/index.html``: the QC page itself when there are at most `page_rows` rows; else an
    index of pages ``page-<pipeline>-<n>.html`` of at most `page_rows` rows each (one pipeline per
    page, in input order), which share one ratings store (their page_id is `out_dir`): a rating
    given on any page is exported from every page, and the export keeps every rating."""
    out_dir = Path(out_dir)
    if len(rows) <= page_rows:
        for old in out_dir.glob("page-*.html"):  # of a larger cohort before
            old.unlink()
        return write_qc_page(rows, out_dir, title=title, statuses=statuses)
    page_id = str(out_dir.resolve())
    by: dict[str, list] = {}
    for r in rows:
        by.setdefault(_text(r.get("pipeline")), []).append(r)
    entries, written = [], set()
    for pipeline, prows in by.items():
        for n, start in enumerate(range(0, len(prows), page_rows), start=1):
            chunk = prows[start:start + page_rows]
            name = f"page-{re.sub(r'[^A-Za-z0-9_.-]', '_', pipeline) or 'none'}-{n:03d}.html"
            first, last = (f"{_text(chunk[i].get('participant_id'))} {_text(chunk[i].get('session_id'))}".strip()
                           for i in (0, -1))
            write_qc_page(chunk, out_dir, title=f"{title}: {pipeline} {first} .. {last}", page_id=page_id,
                          statuses=statuses, filename=name, index="index.html")
            counts: dict[str, int] = {}
            for r in chunk:
                st = _text(r.get("status"))
                counts[st] = counts.get(st, 0) + 1
            flagged = sum(1 for r in chunk if _text(r.get("qc_flags")))
            entries.append((name, pipeline, first, last, len(chunk), counts, flagged))
            written.add(name)
    for old in out_dir.glob("page-*.html"):
        if old.name not in written:
            old.unlink()
    return _write_index(entries, out_dir, title, len(rows))


def _write_index(entries, out_dir: Path, title: str, n_rows: int) -> Path:
    e = html.escape

    def status(counts):
        return e(", ".join(f"{k or '-'} {v:,}" for k, v in counts.items()))

    body = "".join(
        f'<tr><td><a href="{quote(name)}">{e(name)}</a></td><td>{e(pipeline)}</td><td>{e(first)}</td>'
        f'<td>{e(last)}</td><td class="n">{n:,}</td><td>{status(counts)}</td>'
        f'<td class="n">{flagged:,}</td></tr>\n'
        for name, pipeline, first, last, n, counts, flagged in entries)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta name="generator" '
            f'content="cohortseg QC page"><title>{e(title)}</title><style>'
            "body{font:14px/1.4 system-ui,sans-serif;margin:16px;color:#1f2328}"
            "table{border-collapse:collapse}td,th{border-bottom:1px solid #dde1e6;padding:4px 10px;text-align:left}"
            "td.n{text-align:right}</style></head><body>"
            f"<h1>{e(title)}</h1><p>{n_rows:,} rows (participant x pipeline x image) on {len(entries)} pages of "
            "one pipeline each. Ratings given on any page are kept in this browser for all of them; "
            "<b>Export</b> on any page writes every rating to one <code>qc_ratings.tsv</code>.</p>"
            '<table id="pages"><tr><th>page</th><th>pipeline</th><th>first</th><th>last</th><th>rows</th>'
            f"<th>status</th><th>flagged</th></tr>\n{body}</table></body></html>\n")
    target = out_dir / "index.html"
    write_text_atomic(target, page)
    return target
