"""Cord CSA / shape metrics (cohortseg.science.csa): synthetic geometry with known answers + the shared t2."""
from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from cohortseg.science import csa
from cohortseg.errors import InputError

R_MM = 4.0
AREA = math.pi * R_MM ** 2


def tilted_cylinder(tilt_rl_deg=20.0, tilt_ap_deg=0.0, r=R_MM, vox=0.5, shape=(64, 64, 40), ss=3):
    """Partial-volume cylinder (3x3x3 supersampling) through the volume centre, RAS affine.

    Its axis leans towards Right by `tilt_rl_deg` (rotation about A-P) and towards Anterior by
    `tilt_ap_deg` (rotation about R-L) going superior."""
    aff = np.diag([vox, vox, vox, 1.0])
    aff[:3, 3] = -(np.array(shape) - 1) / 2 * vox
    t = np.array([math.tan(math.radians(tilt_rl_deg)), math.tan(math.radians(tilt_ap_deg)), 1.0])
    t /= np.linalg.norm(t)
    off = (np.arange(ss) + 0.5) / ss - 0.5
    ii, jj, kk = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    acc = np.zeros(shape)
    for a in off:
        for b in off:
            for c in off:
                p = np.stack([ii + a, jj + b, kk + c], -1) * vox + aff[:3, 3]
                d2 = (p ** 2).sum(-1) - (p @ t) ** 2
                acc += d2 <= r * r
    return acc / ss ** 3, aff


@pytest.fixture(scope="module")
def cyl20():
    return tilted_cylinder(20.0)


def _interior(df, margin=4):
    return df.iloc[margin:-margin]


def test_si_axis_from_affine():
    assert csa.si_axis(np.eye(4)) == 2
    psr = nib.orientations.inv_ornt_aff(nib.orientations.axcodes2ornt(("P", "S", "R")), (10, 10, 10))
    assert csa.si_axis(np.linalg.inv(psr)) in (0, 1, 2)
    a = np.array([[0, 0, 1, 0], [-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1.0]])  # PSR (shared t2)
    assert csa.si_axis(a) == 1


def test_tilted_cylinder_csa_angle_corrected(cyl20):
    m, aff = cyl20
    df = csa.csa_per_slice(m, aff, angle_correction=True)
    assert list(df.columns[:3]) == ["Slice (I->S)", "VertLevel", "MEAN(area)"]
    inner = _interior(df)
    assert np.all(np.abs(inner["MEAN(area)"] / AREA - 1) < 0.02), inner["MEAN(area)"].describe()
    # leaning towards Right going up = negative angle_AP (SCT: positive towards Left); no A-P tilt
    assert np.allclose(inner["MEAN(angle_AP)"], -20.0, atol=0.5)
    assert np.allclose(inner["MEAN(angle_RL)"], 0.0, atol=0.5)
    # diameters of the perpendicular section: the circle's
    assert np.allclose(inner["MEAN(diameter_RL)"], 2 * R_MM, rtol=0.03)
    assert np.allclose(inner["MEAN(diameter_AP)"], 2 * R_MM, rtol=0.03)
    # centreline length per 0.5 mm slice = 0.5 / cos(20)
    assert np.allclose(inner["SUM(length)"], 0.5 / math.cos(math.radians(20)), rtol=0.01)


def test_tilted_cylinder_uncorrected_is_larger(cyl20):
    m, aff = cyl20
    df = _interior(csa.csa_per_slice(m, aff, angle_correction=False))
    expected = AREA / math.cos(math.radians(20))
    assert np.all(np.abs(df["MEAN(area)"] / expected - 1) < 0.02)
    assert (df["MEAN(angle_AP)"] == 0).all() and np.allclose(df["SUM(length)"], 0.5)
    # the oblique (elliptical) section is wider in R-L than in A-P
    assert (df["MEAN(diameter_RL)"] > df["MEAN(diameter_AP)"] * 1.03).all()


def test_two_axis_tilt():
    m, aff = tilted_cylinder(15.0, 10.0, shape=(64, 64, 32))
    df = _interior(csa.csa_per_slice(m, aff))
    assert np.all(np.abs(df["MEAN(area)"] / AREA - 1) < 0.02)
    assert np.allclose(df["MEAN(angle_AP)"], -15.0, atol=0.6)
    assert np.allclose(df["MEAN(angle_RL)"], 10.0, atol=0.6)
    ang = csa.angle_per_slice(m, aff)
    t = np.array([math.tan(math.radians(15)), math.tan(math.radians(10)), 1.0])
    theta = math.degrees(math.acos(1 / np.linalg.norm(t)))
    assert np.allclose(ang["angle"].iloc[4:-4], theta, atol=0.6)


def test_any_orientation_gives_same_table(cyl20):
    m, aff = cyl20
    img = nib.Nifti1Image(m.astype(np.float32), aff)
    ras = csa.csa_per_slice(m, aff)
    for codes in [("P", "S", "R"), ("L", "P", "I"), ("S", "R", "A")]:
        tr = nib.orientations.ornt_transform(nib.orientations.io_orientation(aff),
                                             nib.orientations.axcodes2ornt(codes))
        re = img.as_reoriented(tr)
        assert nib.aff2axcodes(re.affine) == codes
        df = csa.csa_per_slice(np.asarray(re.dataobj), re.affine)
        pd.testing.assert_series_equal(df["Slice (I->S)"], ras["Slice (I->S)"])
        np.testing.assert_allclose(df["MEAN(area)"], ras["MEAN(area)"], rtol=1e-6)
        np.testing.assert_allclose(df["MEAN(angle_AP)"], ras["MEAN(angle_AP)"], atol=1e-6)
        np.testing.assert_allclose(df["MEAN(diameter_RL)"], ras["MEAN(diameter_RL)"], rtol=1e-6)


def test_soft_vs_binary_partial_volume_ring():
    """5x5 square per slice at 0.5 x 0.5 mm; the soft version has its outer ring of 16 voxels at 0.5.

    binary: 25 voxels x 0.25 mm^2 = 6.25 mm^2; soft: (9 + 16 x 0.5) x 0.25 = 4.25 mm^2."""
    binary = np.zeros((15, 15, 6))
    binary[5:10, 5:10, :] = 1.0
    soft = binary * 0.5
    soft[6:9, 6:9, :] = 1.0
    aff = np.diag([0.5, 0.5, 1.0, 1.0])
    b = csa.csa_per_slice(binary, aff)
    s = csa.csa_per_slice(soft, aff)
    np.testing.assert_allclose(b["MEAN(area)"], 6.25)
    np.testing.assert_allclose(s["MEAN(area)"], 4.25)
    np.testing.assert_allclose(b["MEAN(area)"] - s["MEAN(area)"], 16 * 0.5 * 0.25)
    np.testing.assert_allclose(b["MEAN(angle_AP)"], 0.0, atol=1e-9)
    # a straight column has no angle and a length of one slice
    np.testing.assert_allclose(b["SUM(length)"], 1.0)


def test_centerline_polynomial_fit_smooths_noise():
    rng = np.random.default_rng(0)
    m = np.zeros((40, 40, 30))
    for k in range(30):
        c = 20 + 0.3 * (k - 15) + rng.uniform(-0.5, 0.5)
        i0 = int(round(c))
        m[i0 - 2:i0 + 3, 18:23, k] = 1
    cl = csa.centerline(m, np.eye(4))
    assert cl.axis == 2 and len(cl.slices) == 30
    truth = 20 + 0.3 * (np.arange(30) - 15)
    assert np.abs(cl.fit[:, 0] - truth).max() < 0.35  # raw centres are off by up to 1 voxel
    np.testing.assert_allclose(cl.deriv[3:-3, 0], 0.3, atol=0.1)
    np.testing.assert_allclose(cl.fit[:, 1], 20.0, atol=1e-6)


def test_empty_mask_raises():
    with pytest.raises(InputError):
        csa.csa_per_slice(np.zeros((5, 5, 5)), np.eye(4))


# ----------------------------------------------------------------------------- vertebral levels
def test_levels_from_body_points_interpolated():
    # RAS: slice index grows superior; C3 body centre at slice 30, C5 at slice 10
    lab = np.zeros((5, 5, 40))
    lab[2, 2, 30] = 3
    lab[2, 2, 10] = 5
    lev = csa.vertebral_levels(lab, np.eye(4), kind="points")
    # L(k) = 3 + (30 - k) / 10: C4 spans L in [3.5, 4.5) -> k in (15, 25]
    assert np.isnan(lev[5]) and lev[6] == 5 and lev[15] == 5
    assert lev[16] == 4 and lev[25] == 4 and lev[26] == 3
    assert lev[34] == 3 and np.isnan(lev[35])  # C3 completed up to the mid-way C2/C3 boundary only
    # same from a list of (slice, level) pairs and from a {level: slice} mapping
    np.testing.assert_array_equal(lev, csa.vertebral_levels([(30, 3), (10, 5)], np.eye(4), n_slices=40))
    np.testing.assert_array_equal(lev, csa.vertebral_levels({3: 30, 5: 10}, np.eye(4), n_slices=40))
    full = csa.vertebral_levels({3: 30, 5: 10}, np.eye(4), n_slices=40, extrapolate=np.inf)
    assert full[39] == 2 and full[0] == 6


def test_levels_from_disc_points():
    # SCT disc convention: value 3 = C2/C3 disc (top of C3) at slice 30, value 5 = C4/C5 at slice 10
    lev = csa.vertebral_levels({3: 30, 5: 10}, np.eye(4), n_slices=40, convention="disc")
    assert lev[30] == 3 and lev[21] == 3 and lev[20] == 4 and lev[11] == 4 and lev[10] == 5
    assert lev[31] == 2 and lev[39] == 2  # C2 above the top disc (within one level)
    assert lev[1] == 5 and np.isnan(lev[0])  # C5 below the bottom disc, until one level further


def test_levels_from_full_map_with_mask():
    lvl = np.zeros((6, 6, 8), int)
    lvl[:, :, 0:4] = 5
    lvl[:, :, 4:8] = 4
    lvl[0, :, 3] = 4  # a few voxels of the other level outside the cord on slice 3
    lvl[:, :, 3][:4] = 4  # now level 4 dominates slice 3 overall...
    mask = np.zeros_like(lvl)
    mask[4:6, 2:4, :] = 1  # ...but the cord voxels of slice 3 are level 5
    assert csa.vertebral_levels(lvl, np.eye(4), kind="map")[3] == 4
    lev = csa.vertebral_levels(lvl, np.eye(4), kind="map", mask=mask)
    np.testing.assert_array_equal(lev, [5, 5, 5, 5, 4, 4, 4, 4])
    assert csa.vertebral_levels(lvl, np.eye(4))[0] == 5  # auto -> map (dense)


def test_per_level_aggregation_hand_computed():
    """Square cross-sections of side 3, 3, 5, 5, 5, 7 voxels (1 mm) on slices 0-5; levels 5,5,4,4,4,3."""
    sides = [3, 3, 5, 5, 5, 7]
    m = np.zeros((11, 11, 6))
    for k, s in enumerate(sides):
        m[5 - s // 2:5 - s // 2 + s, 5 - s // 2:5 - s // 2 + s, k] = 1
    lvl = np.zeros_like(m)
    for k, v in enumerate([5, 5, 4, 4, 4, 3]):
        lvl[:, :, k] = v
    levels = csa.vertebral_levels(lvl, np.eye(4), kind="map")
    per_slice = csa.csa_per_slice(m, np.eye(4), angle_correction=False, levels=levels)
    assert per_slice["VertLevel"].tolist() == [5, 5, 4, 4, 4, 3]
    np.testing.assert_allclose(per_slice["MEAN(area)"], [9, 9, 25, 25, 25, 49])
    per_level = csa.csa_per_level(per_slice)
    assert per_level["VertLevel"].tolist() == [3, 4, 5]
    assert per_level["N slices"].tolist() == [1, 3, 2]
    assert per_level["Slice (I->S)"].tolist() == ["5:5", "2:4", "0:1"]
    np.testing.assert_allclose(per_level["MEAN(area)"], [49, 25, 9])
    np.testing.assert_allclose(per_level["STD(area)"], [0, 0, 0])
    np.testing.assert_allclose(per_level["SUM(length)"], [1, 3, 2])
    both = csa.csa_per_level(per_slice, levels=[4, 5], combine=True)
    assert both["VertLevel"].tolist() == ["4:5"] and both["N slices"].tolist() == [5]
    np.testing.assert_allclose(both["MEAN(area)"], (2 * 9 + 3 * 25) / 5)
    np.testing.assert_allclose(both["STD(area)"], np.std([9, 9, 25, 25, 25]))


# -------------------------------------------------------------------------------- shared data
@pytest.mark.shared
def test_shared_t2_levels_and_csa_at_c3(shared_dir):
    t2 = shared_dir / "data" / "spine" / "t2"
    seg = nib.load(t2 / "t2_seg-manual.nii.gz")  # PSR
    labels = nib.load(t2 / "labels.nii.gz")
    centre = nib.load(t2 / "t2_labeled_center_manual.nii.gz")
    lev_pts = csa.vertebral_levels(np.asarray(labels.dataobj), labels.affine, kind="points")
    lev_cl = csa.vertebral_levels(np.asarray(centre.dataobj), centre.affine)
    # labels: C3 body at S-I index 44, C5 at 9; the labelled centreline also has C4 at 26
    assert lev_pts[44] == 3 and lev_pts[9] == 5 and lev_pts[27] == 4
    assert lev_cl[44] == 3 and lev_cl[26] == 4 and lev_cl[9] == 5
    df = csa.csa_per_slice(np.asarray(seg.dataobj), seg.affine, levels=lev_pts)
    assert df["Slice (I->S)"].is_monotonic_increasing
    per_level = csa.csa_per_level(df).set_index("VertLevel")
    c3 = per_level.loc[3, "MEAN(area)"]
    assert 50.0 < c3 < 100.0, c3
    assert per_level.loc[3, "N slices"] >= 10
    # the cord is nearly aligned with the slice normal: correction changes CSA by a few % only
    raw = csa.csa_per_level(csa.csa_per_slice(np.asarray(seg.dataobj), seg.affine, False, levels=lev_pts))
    assert 1.0 <= raw.set_index("VertLevel").loc[3, "MEAN(area)"] / c3 < 1.1


# ------------------------------------------------------------------------------ mask cleaning
def _tube_with_blobs():
    p = np.zeros((40, 40, 30), np.float32)
    p[18:23, 18:23, :] = 0.9  # the cord: a straight tube
    p[3:7, 3:7, 10:13] = 0.8  # a false positive far from it on 3 slices
    p[30:33, 30:33, 20] = 0.7  # another one on one slice
    p[18:23, 18:23, 25] = 0.0  # a missed cord slice, whose false positive must go too
    p[2:6, 30:34, 25] = 0.9
    return p


def test_largest_component_drops_small_blobs():
    p = _tube_with_blobs()
    out = csa.largest_component(p)
    assert out[5, 5, 11] == 0 and out[31, 31, 20] == 0
    assert out[20, 20, 5] == pytest.approx(0.9)
    assert csa.largest_component(np.zeros((4, 4, 4))).sum() == 0


def test_tube_filter_keeps_blobs_on_the_centreline_only():
    p = _tube_with_blobs()
    out = csa.tube_filter(p, np.eye(4), max_dist_mm=5.0)
    assert out[5, 5, 11] == 0 and out[31, 31, 20] == 0 and out[4, 32, 25] == 0
    np.testing.assert_array_equal(out[18:23, 18:23, :25], p[18:23, 18:23, :25])
    # works in any storage orientation (S-I axis found from the affine)
    aff = np.array([[0, 0, 1, 0], [-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1.0]])  # PSR
    q = np.transpose(p, (0, 2, 1))  # (P, S, R)-like layout: slices along axis 1
    out_q = csa.tube_filter(q, aff)
    assert out_q[5, 11, 5] == 0 and out_q[20, 5, 20] == pytest.approx(0.9)
