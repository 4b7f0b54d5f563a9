"""Quality control: snapshots, outlier flags, the static QC page and rater exports.

* :mod:`.snapshots` - orientation-labelled PNG mosaics, lesion crops, registration checks, thumbnails
* :mod:`.outliers`  - Tukey IQR outlier flags and per-mask sanity flags -> ``qc_flags``
* :mod:`.page`      - ``qc/index.html`` (static, virtualised, keyboard rating, TSV export; pages + index past 50,000 rows)
* :mod:`.ratings`   - ``qc_ratings.tsv`` -> ``qc_rating`` column of ``summary.csv``

Submodules are imported lazily so that ``import cohortseg.qc.ratings`` does not pull matplotlib.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "mosaic": "snapshots", "lesion_crops": "snapshots", "registration_check": "snapshots",
    "thumbnail": "snapshots",
    "tukey_flags": "outliers", "tukey_fences": "outliers", "sanity_flags": "outliers",
    "combine_flags": "outliers", "add_qc_flags": "outliers",
    "write_qc_page": "page", "write_qc_pages": "page",
    "read_ratings": "ratings", "apply_ratings": "ratings",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
