"""Tukey outlier flags (hand-computed fences) and per-mask sanity flags."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cohortseg.qc.outliers import (add_qc_flags, combine_flags, sanity_flags, tukey_fences,
                                   tukey_flags)

# sorted: 5 10 11 11 12 12 12 13 14 30  (n = 10)
# Q1 = s[2.25] = 11 + 0.25*(11-11) = 11 ; Q3 = s[6.75] = 12 + 0.75*(13-12) = 12.75
# IQR = 1.75 ; k=1.5 -> fences 11 - 2.625 = 8.375 and 12.75 + 2.625 = 15.375 -> 5 and 30 flagged
VALUES = [12, 5, 11, 13, 12, 30, 11, 14, 12, 10]


def test_fences_hand_computed():
    assert tukey_fences(VALUES) == pytest.approx((8.375, 15.375))
    assert tukey_fences(list(range(1, 11))) == pytest.approx((3.25 - 6.75, 7.75 + 6.75))
    assert tukey_fences(VALUES, k=3.0) == pytest.approx((11 - 5.25, 12.75 + 5.25))
    assert tukey_fences(VALUES[:9]) is None


def test_tukey_flags_hand_made_series():
    df = pd.DataFrame({"gm_volume_mm3": VALUES})
    f = tukey_flags(df, ["gm_volume_mm3"])
    assert list(f.columns) == ["gm_volume_mm3"]
    assert f["gm_volume_mm3"].tolist() == [v in (5, 30) for v in VALUES]
    # k = 3: fences 5.75 / 18.0 -> 5 and 30 still out; k = 10 -> nothing
    assert f.equals(tukey_flags(df, ["gm_volume_mm3"], k=3.0))
    assert not tukey_flags(df, ["gm_volume_mm3"], k=10).any().any()


def test_value_on_the_fence_is_not_flagged():
    # n = 11, sorted 0 1 1 1 1 2 2 2 2 2 x ; Q1 = s[2.5] = 1 ; Q3 = s[7.5] = 2 ; IQR 1
    # fences -0.5 and 3.5: x = 3.5 sits on the fence (kept), x = 3.51 is outside (flagged)
    base = [0, 1, 1, 1, 1, 2, 2, 2, 2, 2]
    assert tukey_fences(base + [3.5]) == pytest.approx((-0.5, 3.5))
    on = tukey_flags(pd.DataFrame({"m": base + [3.5]}), ["m"])["m"]
    out = tukey_flags(pd.DataFrame({"m": base + [3.51]}), ["m"])["m"]
    assert not on.any()
    assert out.tolist() == [False] * 10 + [True]


def test_nan_safe_and_min_n():
    messy = VALUES + [np.nan, None, "n/a", np.inf]
    df = pd.DataFrame({"m": pd.Series(messy, dtype=object)})
    f = tukey_flags(df, ["m"])
    assert f["m"].tolist() == [v in (5, 30) for v in VALUES] + [False] * 4
    # only 9 finite values -> no fences, nothing flagged (even 1000 among them)
    few = pd.DataFrame({"m": [12, 11, 13, 12, 1000, 11, 12, 10, 12, np.nan, np.nan]})
    assert not tukey_flags(few, ["m"]).any().any()
    assert tukey_flags(few, ["m"], min_n=5)["m"].tolist()[4]


def test_by_group_and_errors():
    df = pd.DataFrame({
        "pipeline": ["a"] * 10 + ["b"] * 10,
        "v": VALUES + [x * 100 for x in VALUES],
    })
    f = tukey_flags(df, ["v"], by="pipeline")
    assert f["v"].tolist() == [v in (5, 30) for v in VALUES] * 2
    # pooled, the b-values are all far away: grouping matters
    assert not tukey_flags(df, ["v"])["v"].equals(f["v"])
    with pytest.raises(KeyError):
        tukey_flags(df, ["nope"])
    assert tukey_flags(df.iloc[:0], ["v"]).empty


def _cube(shape=(10, 10, 10)):
    return np.zeros(shape, np.uint8)


def test_sanity_flags():
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    m = _cube()
    assert sanity_flags(m, aff) == ["empty"]
    m[4:6, 4:6, 4:6] = 1  # 8 voxels x 8 mm3 = 64 mm3, interior
    assert sanity_flags(m, aff) == []
    assert sanity_flags(m, aff, expected_volume_range=(100, None)) == ["volume_low"]
    assert sanity_flags(m, aff, expected_volume_range=(None, 50)) == ["volume_high"]
    assert sanity_flags(m, aff, expected_volume_range=(64, 64)) == []
    m[0, 5, 5] = 1
    assert sanity_flags(m, aff) == ["edge"]
    # probabilities: thresholded at 0.5
    p = np.zeros((10, 10, 10), np.float32)
    p[5, 5, 5] = 0.4
    assert sanity_flags(p, aff) == ["empty"]


def test_edge_faces_follow_anatomy():
    """A cord mask running through the whole slab touches S and I: normal with ignore_edges='SI'."""
    m = _cube()
    m[4:6, 4:6, :] = 1
    ras = np.eye(4)
    assert sanity_flags(m, ras) == ["edge"]
    assert sanity_flags(m, ras, ignore_edges="SI") == []
    # LAS storage: +i points Left, so index 0 of axis 0 is the Right face
    las = np.diag([-1.0, 1.0, 1.0, 1.0])
    side = _cube()
    side[0, 5, 5] = 1
    assert sanity_flags(side, las, ignore_edges="R") == []
    assert sanity_flags(side, las, ignore_edges="L") == ["edge"]
    # axis order does not matter: S-I along axis 0 here
    m2 = np.transpose(m, (2, 0, 1))
    aff2 = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
    assert sanity_flags(m2, aff2, ignore_edges="SI") == []


def test_combine_flags_into_qc_flags():
    df = pd.DataFrame({
        "participant_id": [f"sub-{i:02d}" for i in range(12)],
        "pipeline": ["brain"] * 12,
        "gm_volume_mm3": VALUES + [12, 11],   # 12 values: recompute below
        "n_lesions": [0] * 12,
        "sanity_flags": ["", "edge", "", "", "", "", "", "", "", "", "empty", np.nan],
    })
    lo, hi = tukey_fences(df["gm_volume_mm3"])
    expected_out = [(v < lo or v > hi) for v in df["gm_volume_mm3"]]
    assert expected_out[1] and expected_out[5]
    flags = combine_flags(df)
    assert flags.name == "qc_flags"
    assert flags.iloc[1] == "edge;outlier:gm_volume_mm3"
    assert flags.iloc[5] == "outlier:gm_volume_mm3"
    assert flags.iloc[10] == "empty"
    assert flags.iloc[0] == "" and flags.iloc[11] == ""
    out = add_qc_flags(df)
    assert "qc_flags" in out and "qc_flags" not in df
    # idempotent: existing qc_flags are read back, outlier tokens recomputed, not duplicated
    again = add_qc_flags(out.drop(columns=["sanity_flags"]))
    assert again["qc_flags"].tolist() == out["qc_flags"].tolist()
    # under 10 subjects: only sanity flags survive
    small = add_qc_flags(df.iloc[:9])
    assert not small["qc_flags"].str.contains("outlier").any()
    assert small["qc_flags"].iloc[1] == "edge"
