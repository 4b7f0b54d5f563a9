"""Cohort-level outlier flags (Tukey IQR fences) and per-mask sanity flags -> ``qc_flags``.

Flags are short tokens joined with ``;`` in the ``qc_flags`` column of ``summary.csv``:

* ``outlier:<metric>``  value outside [Q1 - k*IQR, Q3 + k*IQR] of its group (cohort-level),
* ``empty``             the mask has no voxel,
* ``edge``              the mask touches a face of the field of view,
* ``volume_low`` / ``volume_high``  mask volume outside ``expected_volume_range`` (mm^3).

Quartiles use linear interpolation (``pandas.Series.quantile`` default, same as ``numpy.percentile``).
Fences are computed only when a metric has at least ``min_n`` (default 10) finite values in its
group, as in SHiVAi, so a pilot of 5 subjects gets no statistical flags at all.  Missing and
non-finite values are never flagged and never enter the quartiles.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "tukey_fences",
    "tukey_flags",
    "sanity_flags",
    "combine_flags",
    "add_qc_flags",
    "split_flags",
    "NON_METRIC_COLUMNS",
]

# Columns that are never treated as metrics when `metrics` is not given explicitly.
NON_METRIC_COLUMNS = frozenset({
    "participant_id", "session_id", "run", "pipeline", "item", "status", "error", "qc_flags",
    "qc_rating", "sanity_flags", "snapshot", "thumbnail", "session_key", "model", "model_version",
    "age", "sex",
})


def tukey_fences(values, k: float = 1.5, min_n: int = 10):
    """``(low, high)`` fences of the finite `values`, or ``None`` with fewer than `min_n` of them."""
    v = pd.to_numeric(pd.Series(values, dtype="object"), errors="coerce").astype(float)
    v = v[np.isfinite(v)]
    if len(v) < max(int(min_n), 1):
        return None
    q1, q3 = v.quantile(0.25), v.quantile(0.75)
    iqr = q3 - q1
    return float(q1 - k * iqr), float(q3 + k * iqr)


def tukey_flags(df: pd.DataFrame, metrics: Sequence[str], k: float = 1.5, min_n: int = 10,
                by: str | Sequence[str] | None = None) -> pd.DataFrame:
    """Boolean DataFrame (same index as `df`, one column per metric): True = outside the fences.

    by: optional grouping column(s) (e.g. ``"pipeline"``); fences are computed within each group
        and rows with a missing group key are never flagged.
    A value strictly below the low fence or strictly above the high fence is an outlier; values on
    a fence are not.  Non-numeric entries are treated as missing.
    """
    missing = [m for m in metrics if m not in df.columns]
    if missing:
        raise KeyError(f"metrics not in the table: {missing}")
    out = pd.DataFrame(False, index=df.index, columns=list(metrics), dtype=bool)
    if df.empty:
        return out
    if by is None:
        groups = [(None, df.index)]
    else:
        keys = [by] if isinstance(by, str) else list(by)
        grouper = df.groupby(keys[0] if len(keys) == 1 else keys, dropna=True, sort=True)
        groups = list(grouper.groups.items())
    for m in metrics:
        col = pd.to_numeric(df[m], errors="coerce").astype(float)
        for _, idx in groups:
            vals = col.loc[idx]
            f = tukey_fences(vals.to_numpy(), k=k, min_n=min_n)
            if f is None:
                continue
            lo, hi = f
            finite = np.isfinite(vals)
            out.loc[idx, m] = (finite & ((vals < lo) | (vals > hi))).to_numpy()
    return out


def sanity_flags(mask, affine, expected_volume_range=None, *, ignore_edges: str = "",
                 threshold: float = 0.5) -> list[str]:
    """Flags for one mask: ``empty``, ``edge``, ``volume_low``, ``volume_high`` (in that order).

    mask: array (binary, probabilities or labels: voxels > `threshold` count).
    affine: voxel -> mm; gives the voxel volume and, for `ignore_edges`, the anatomical axes.
    expected_volume_range: ``(min_mm3, max_mm3)`` (either may be None) for plausible volumes.
    ignore_edges: anatomical faces where touching the FOV is normal, e.g. ``"SI"`` for a cord
        mask cut by the axial slab (letters among L, R, A, P, S, I).
    """
    import nibabel as nib

    m = np.asarray(mask)
    while m.ndim > 3 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.ndim != 3:
        raise ValueError(f"sanity_flags: expected a 3D mask, got shape {m.shape}")
    fg = np.nan_to_num(m.astype(np.float32, copy=False)) > threshold
    flags: list[str] = []
    n = int(fg.sum())
    if n == 0:
        return ["empty"]
    codes = nib.aff2axcodes(np.asarray(affine, float))  # e.g. ('R', 'A', 'S'): the + end of axis
    opposite = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}
    ignore = set(ignore_edges.upper())
    touches = False
    for ax in range(3):
        hi_face = codes[ax]
        lo_face = opposite.get(hi_face, hi_face)
        first = np.take(fg, 0, axis=ax).any()
        last = np.take(fg, fg.shape[ax] - 1, axis=ax).any()
        if (first and lo_face not in ignore) or (last and hi_face not in ignore):
            touches = True
    if touches:
        flags.append("edge")
    if expected_volume_range is not None:
        lo, hi = expected_volume_range
        # rounded: det() of diag(2, 2, 2) is 7.999999999999998, not 8
        vol = round(n * abs(float(np.linalg.det(np.asarray(affine, float)[:3, :3]))), 6)
        if lo is not None and vol < lo:
            flags.append("volume_low")
        if hi is not None and vol > hi:
            flags.append("volume_high")
    return flags


def split_flags(value) -> list[str]:
    """``"a;b"`` / list / NaN -> list of non-empty tokens."""
    if value is None:
        return []
    if isinstance(value, float) and np.isnan(value):
        return []
    if isinstance(value, (list, tuple, set, np.ndarray)):
        return [str(t).strip() for t in value if str(t).strip()]
    if value is pd.NA:
        return []
    return [t.strip() for t in str(value).split(";") if t.strip()]


def _default_metrics(df: pd.DataFrame) -> list[str]:
    cols = []
    for c in df.columns:
        if c in NON_METRIC_COLUMNS or str(c).startswith("qc_"):
            continue
        if pd.api.types.is_bool_dtype(df[c]):
            continue
        if pd.api.types.is_numeric_dtype(df[c]):
            cols.append(c)
    return cols


def combine_flags(df: pd.DataFrame, metrics: Iterable[str] | None = None, *, k: float = 1.5,
                  min_n: int = 10, by: str | Sequence[str] | None = "auto",
                  sanity_col: str | Sequence[str] | None = ("sanity_flags", "qc_flags")
                  ) -> pd.Series:
    """The ``qc_flags`` string column: sanity flags already in the table + Tukey outliers.

    metrics: metric columns (default: numeric columns not in NON_METRIC_COLUMNS / ``qc_*``).
    by: grouping for the fences; ``"auto"`` = ``"pipeline"`` when that column exists.
    sanity_col: column(s) holding per-row flags written at finalize time (``"edge;empty"`` strings
        or lists); existing tokens are kept (deduplicated, order preserved) and outlier tokens are
        appended as ``outlier:<metric>``.  Old ``outlier:`` tokens are recomputed, not kept.
    Returns a string Series aligned on ``df.index`` ("" when nothing is flagged).
    """
    metrics = _default_metrics(df) if metrics is None else [m for m in metrics if m in df.columns]
    if by == "auto":
        by = "pipeline" if "pipeline" in df.columns else None
    flags = tukey_flags(df, metrics, k=k, min_n=min_n, by=by) if metrics else None
    cols = [sanity_col] if isinstance(sanity_col, str) else list(sanity_col or [])
    cols = [c for c in cols if c in df.columns]
    tokens: list[list[str]] = [[] for _ in range(len(df))]
    for c in cols:  # column by column (a cohort has 100,000 rows)
        for row, value in zip(tokens, df[c].tolist()):
            for t in split_flags(value):
                if not t.startswith("outlier:") and t not in row:
                    row.append(t)
    if flags is not None:
        for r, j in zip(*np.nonzero(flags.to_numpy(dtype=bool))):  # row by row, metrics in order
            tokens[r].append(f"outlier:{metrics[j]}")
    out = [";".join(t) for t in tokens]
    return pd.Series(out, index=df.index, name="qc_flags", dtype=object)


def add_qc_flags(df: pd.DataFrame, metrics: Iterable[str] | None = None, **kw) -> pd.DataFrame:
    """Copy of `df` with the ``qc_flags`` column (see :func:`combine_flags`)."""
    out = df.copy()
    out["qc_flags"] = combine_flags(df, metrics, **kw)
    return out
