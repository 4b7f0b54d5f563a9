"""Rater exports from the QC page (``qc_ratings.tsv``) -> ``qc_rating`` column in summary.csv.

The page exports one line per rated row::

    participant_id  session_id  pipeline  rating  rater  timestamp
    sub-01                      sc_gm     fail    AB     2025-01-31T10:00:00.000Z

``rating`` is one of ``pass``, ``fail``, ``artifact`` (``unrated`` is accepted too and clears an
earlier rating).  Several exports (raters, sessions) can be read together; for each
(participant_id, session_id, pipeline) the latest timestamp wins, and on equal or missing
timestamps the later line (later file) wins.  Matching ignores the ``sub-``/``ses-`` prefixes, so
``01`` and ``sub-01`` are the same participant.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable

import pandas as pd


__all__ = ["RATINGS", "COLUMNS", "read_ratings", "apply_ratings"]

RATINGS = ("pass", "fail", "artifact")
UNRATED = "unrated"
COLUMNS = ["participant_id", "session_id", "pipeline", "rating", "rater", "timestamp"]
_REQUIRED = ("participant_id", "pipeline", "rating")
_KEY = ["participant_id", "session_id", "pipeline"]


def _norm_id(value, prefix: str) -> str:
    if value is None or (isinstance(value, float) and value != value) or value is pd.NA:
        return ""
    s = str(value).strip()
    if s.lower() in ("", "nan", "n/a", "none"):
        return ""
    return s[len(prefix):] if s.startswith(prefix) else s


def _keys(df: pd.DataFrame) -> pd.Series:
    sub = df["participant_id"].map(lambda v: _norm_id(v, "sub-"))
    ses = (df["session_id"] if "session_id" in df.columns else pd.Series("", index=df.index))
    ses = ses.map(lambda v: _norm_id(v, "ses-"))
    pipe = df["pipeline"].map(lambda v: _norm_id(v, ""))
    return sub + "\x1f" + ses + "\x1f" + pipe


def _read_one(path) -> pd.DataFrame:
    path = Path(path)
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_filter=False)
    df.columns = [str(c).strip().lower() for c in df.columns]
    missing = [c for c in _REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected {COLUMNS}")
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = ""
    df = df[COLUMNS].copy()
    for c in COLUMNS:
        df[c] = df[c].astype(str).str.strip()
    df["rating"] = df["rating"].str.lower()
    bad = ~df["rating"].isin(RATINGS + (UNRATED,))
    if bad.any():
        lines = (df.index[bad] + 2).tolist()[:10]  # +2: header line, 1-based
        raise ValueError(f"{path}: invalid rating(s) {sorted(set(df.loc[bad, 'rating']))} on "
                         f"line(s) {lines}; allowed: {list(RATINGS) + [UNRATED]}")
    empty = (df["participant_id"] == "") | (df["pipeline"] == "")
    if empty.any():
        lines = (df.index[empty] + 2).tolist()[:10]
        raise ValueError(f"{path}: empty participant_id/pipeline on line(s) {lines}")
    ts = pd.to_datetime(df["timestamp"].replace("", None), errors="coerce", utc=True,
                        format="ISO8601")
    badts = ts.isna() & (df["timestamp"] != "")
    if badts.any():
        lines = (df.index[badts] + 2).tolist()[:10]
        raise ValueError(f"{path}: unparseable timestamp(s) on line(s) {lines} (use ISO 8601)")
    df["_ts"] = ts
    return df


def read_ratings(path: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Read one or several ``qc_ratings.tsv`` files; validate; keep the latest rating per row.

    Returns a DataFrame with columns :data:`COLUMNS` (strings; ``session_id``/``rater``/
    ``timestamp`` may be ""), one row per (participant_id, session_id, pipeline).  A row whose
    latest rating is ``unrated`` is kept (it clears older ratings when applied).
    Raises ValueError (with line numbers) on missing columns, unknown ratings, empty ids or bad
    timestamps.
    """
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    frames = [_read_one(p) for p in paths]
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    df = pd.concat(frames, ignore_index=True)
    df["_order"] = range(len(df))
    df["_key"] = _keys(df)
    # NaT (no timestamp) sorts first so any timestamped rating beats it; ties -> file order.
    df = df.sort_values(["_ts", "_order"], na_position="first", kind="stable")
    df = df.drop_duplicates("_key", keep="last").sort_values("_order", kind="stable")
    return df[COLUMNS].reset_index(drop=True)


def apply_ratings(summary_df: pd.DataFrame, ratings_df: pd.DataFrame,
                  column: str = "qc_rating") -> pd.DataFrame:
    """Copy of `summary_df` with `column` = pass / fail / artifact / unrated per row.

    Matching is on (participant_id, session_id, pipeline) with sub-/ses- prefixes ignored; a
    summary without ``session_id`` matches ratings with an empty session.  Ratings that match no
    summary row are reported with a warning (typo'd ids, another cohort's export).
    """
    for c in ("participant_id", "pipeline"):
        if c not in summary_df.columns:
            raise ValueError(f"summary table has no {c!r} column")
    out = summary_df.copy()
    if ratings_df is None or len(ratings_df) == 0:
        out[column] = UNRATED
        return out
    r = ratings_df.copy()
    if "session_id" not in r.columns:
        r["session_id"] = ""
    if "_ts" not in r.columns and "timestamp" in r.columns:
        r["_ts"] = pd.to_datetime(r["timestamp"].replace("", None), errors="coerce", utc=True,
                                  format="ISO8601")
    r["_key"] = _keys(r)
    r["_order"] = range(len(r))
    if "_ts" in r.columns:
        r = r.sort_values(["_ts", "_order"], na_position="first", kind="stable")
    r = r.drop_duplicates("_key", keep="last")
    lookup = dict(zip(r["_key"], r["rating"].astype(str).str.strip().str.lower()))
    bad = sorted(set(lookup.values()) - set(RATINGS) - {UNRATED})
    if bad:
        raise ValueError(f"invalid rating(s) {bad}; allowed: {list(RATINGS) + [UNRATED]}")
    keys = _keys(out)
    out[column] = keys.map(lambda k: lookup.get(k, UNRATED)).astype(object)
    unmatched = set(lookup) - set(keys)
    if unmatched:
        shown = sorted(k.replace("\x1f", "/") for k in unmatched)[:5]
        warnings.warn(f"{len(unmatched)} rating(s) match no row of the summary (e.g. {shown})",
                      stacklevel=2)
    return out
