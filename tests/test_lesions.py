"""Lesion census rules, regions (WMH distances, CMB MNI classes), planted lesions in real brains."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from cohortseg.science import lesions
from cohortseg.errors import InputError
from cohortseg.science.lesions import lesion_census, regional_volumes

from standins import crude_brain_mask, gaussian_blob

EYE = np.eye(4)


# ----------------------------------------------------------------------------------------------
# cluster rules on hand-made arrays
# ----------------------------------------------------------------------------------------------
def test_threshold_is_strict_and_connectivity_is_26():
    p = np.zeros((10, 10, 10), np.float32)
    p[2, 2, 2] = p[3, 3, 3] = 0.9  # corner neighbours -> one lesion with 26-connectivity
    p[6, 6, 6] = 0.5  # exactly at threshold: not lesion
    labels, census = lesion_census(p, None, EYE, threshold=0.5, min_size_vox=0)
    assert labels.dtype == np.int32 and len(census) == 1 and census[0]["n_voxels"] == 2
    assert labels[2, 2, 2] == labels[3, 3, 3] == 1 and labels[6, 6, 6] == 0
    _, census6 = lesion_census(p, None, EYE, threshold=0.5, min_size_vox=0, connectivity=6)
    assert len(census6) == 2
    p[2, 3, 2] = 0.9  # an edge neighbour is 18-connected too
    assert len(lesion_census(p, None, EYE, 0.5, 0, connectivity=18)[1]) == 1


def test_clusters_at_or_below_min_size_are_dropped():
    p = np.zeros((30, 10, 10), np.float32)
    p[1, 1, 1] = 0.8  # 1 voxel
    p[5:7, 1, 1] = 0.8  # 2 voxels
    p[10:15, 1, 1] = 0.8  # 5 voxels
    p[20:26, 1, 1] = 0.8  # 6 voxels
    sizes = lambda m: sorted(r["n_voxels"] for r in lesion_census(p, None, EYE, 0.5, m)[1])  # noqa: E731
    assert sizes(0) == [1, 2, 5, 6]
    assert sizes(1) == [2, 5, 6]  # CMB / WMH rule: single voxels go
    assert sizes(5) == [6]  # PVS rule: 5 voxels or fewer go


def test_clusters_mostly_outside_the_brain_are_dropped():
    p = np.zeros((20, 20, 20), np.float32)
    brain = np.zeros(p.shape, bool)
    brain[:, :10] = True
    p[2, 8:12, 2] = 0.9  # 4 voxels, 2 outside = 50 % -> dropped
    p[6, 7:11, 6] = 0.9  # 4 voxels, 1 outside = 25 % -> kept (rule is "more than 25 %")
    p[10, 6:11, 10] = 0.9  # 5 voxels, 1 outside = 20 % -> kept
    p[14, 15:18, 14] = 0.9  # entirely outside -> dropped
    labels, census = lesion_census(p, brain, EYE, 0.5, 1)
    assert [r["n_voxels"] for r in census] == [4, 5]
    assert [r["outside_brain_frac"] for r in census] == [0.25, 0.2]
    assert set(np.unique(labels)) == {0, 1, 2}  # consecutive ids
    assert labels[2, 9, 2] == 0 and labels[14, 16, 14] == 0
    # kept clusters keep their outside voxels
    assert labels[6, 10, 6] == 1
    _, strict = lesion_census(p, brain, EYE, 0.5, 1, max_outside_frac=0.0)
    assert strict == []


def test_census_fields_volumes_and_coordinates():
    aff = np.array([[0.5, 0, 0, -10.0], [0, 0.5, 0, 20.0], [0, 0, 2.0, 5.0], [0, 0, 0, 1]])
    p = np.zeros((20, 20, 10), np.float32)
    p[4:7, 4:7, 2:4] = 0.6
    p[5, 5, 3] = 0.95
    labels, census = lesion_census(p, np.ones(p.shape), aff, 0.5, 1, mni_affine_fn=np.diag([2.0, 2.0, 2.0, 1.0]))
    (r,) = census
    assert r["lesion_id"] == 1 and r["n_voxels"] == 18
    assert r["volume_mm3"] == pytest.approx(18 * 0.5 * 0.5 * 2.0)
    assert (r["centroid_i"], r["centroid_j"], r["centroid_k"]) == pytest.approx((5.0, 5.0, 2.5))
    assert (r["x_mm"], r["y_mm"], r["z_mm"]) == pytest.approx((-7.5, 22.5, 10.0))
    assert (r["mni_x"], r["mni_y"], r["mni_z"]) == pytest.approx((-15.0, 45.0, 20.0))
    assert r["prob_max"] == pytest.approx(0.95)
    assert r["prob_mean"] == pytest.approx((17 * 0.6 + 0.95) / 18, rel=1e-6)
    # callable MNI mapping
    _, c2 = lesion_census(p, None, aff, 0.5, 1, mni_affine_fn=lambda xyz: xyz + 1.0)
    assert c2[0]["mni_x"] == pytest.approx(-6.5)
    # 4D (…, 1) probability maps are accepted; shape mismatches are input errors
    assert len(lesion_census(p[..., None], None, aff, 0.5, 1)[1]) == 1
    with pytest.raises(InputError):
        lesion_census(p, np.ones((3, 3, 3)), aff, 0.5, 1)
    assert lesion_census(np.zeros((4, 4, 4)), None, EYE, 0.5, 1)[1] == []


def test_region_assignment_and_regional_volumes():
    p = np.zeros((20, 10, 10), np.float32)
    p[1:5, 2, 2] = 0.9  # 4 voxels: 3 in region 1, 1 in region 2
    p[10:13, 5, 5] = 0.9  # 3 voxels in region 0 (unlabelled)
    p[15:17, 5, 5] = 0.9  # 2 voxels in region 3
    rmap = np.zeros(p.shape, np.uint8)
    rmap[0:4] = 1
    rmap[4:6] = 2
    rmap[14:] = 3
    names = {1: "periventricular", 2: "deep_white", 3: "infracortical"}
    labels, census = lesion_census(p, None, EYE, 0.5, 1, regions=(rmap, names))
    assert [r["region"] for r in census] == ["periventricular", "unassigned", "infracortical"]
    vols = regional_volumes(labels, rmap, names, np.diag([2.0, 1.0, 1.0, 1.0]))
    assert vols == {"periventricular": 6.0, "deep_white": 2.0, "infracortical": 4.0, "unassigned": 6.0, "total": 18.0}
    assert lesions.lesion_counts_by_region(census, names.values()) == {
        "periventricular": 1, "deep_white": 0, "infracortical": 1, "unassigned": 1}
    # a callable classifies MNI centroids
    _, c2 = lesion_census(p, None, EYE, 0.5, 1, regions=lambda xyz: ["A" if x < 8 else "B" for x in xyz[:, 0]],
                          mni_affine_fn=EYE)
    assert [r["region"] for r in c2] == ["A", "B", "B"]
    with pytest.raises(ValueError):
        lesion_census(p, None, EYE, 0.5, 1, regions=lambda xyz: [])


# ----------------------------------------------------------------------------------------------
# region maps
# ----------------------------------------------------------------------------------------------
def test_wmh_region_map_distances_by_hand():
    # 1 x 1 x 2 mm voxels; ventricle slab at i = 0..1, cortex slab at i = 38..39 -> distances along i
    shape = (40, 6, 6)
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    vent = np.zeros(shape, bool)
    vent[0:2] = True
    gm = np.zeros(shape, bool)
    gm[38:] = True
    wm = np.zeros(shape, bool)
    wm[2:38] = True
    r = lesions.wmh_region_map(vent, gm, wm, aff)
    i = np.arange(40)
    d_vent, d_gm = i - 1, 38 - i
    col = r[:, 3, 3]
    assert (col[vent[:, 3, 3]] == 0).all() and (col[gm[:, 3, 3]] == 0).all()
    exp = np.where(d_vent <= 10, 1, np.where(d_gm <= 4, 3, 2))
    np.testing.assert_array_equal(col[2:38], exp[2:38])
    assert col[11] == 1 and col[12] == 2 and col[33] == 2 and col[34] == 3
    # distances are in mm: along the 2 mm axis 10 mm is 5 voxels
    vent2 = np.zeros((6, 6, 20), bool)
    vent2[:, :, 0] = True
    wm2 = ~vent2
    r2 = lesions.wmh_region_map(vent2, np.zeros_like(vent2), wm2, aff)
    assert (r2[3, 3, 1:6] == 1).all() and (r2[3, 3, 6:] == 2).all()
    # periventricular wins where both apply; the domain limits the map
    r3 = lesions.wmh_region_map(vent, gm, None, aff, periventricular_mm=40, domain=wm)
    assert (r3[2:38, 3, 3] == 1).all()


def test_cmb_location_classes_at_known_mni_points():
    pts = {
        (0, -30, -30): "infratentorial",  # pons
        (25, -65, -35): "infratentorial",  # cerebellar hemisphere
        (-8, -55, -25): "infratentorial",  # vermis
        (22, 2, 4): "deep",  # putamen
        (-12, -18, 8): "deep",  # thalamus
        (-15, 10, 12): "deep",  # caudate head
        (40, -60, 40): "lobar",  # parietal
        (-50, -20, -25): "lobar",  # temporal
        (30, 40, 30): "lobar",  # frontal
        (10, -95, 5): "lobar",  # occipital pole
        (-40, 0, 5): "lobar",  # insula
    }
    got = lesions.cmb_location_mni(np.array(list(pts), float))
    assert got == list(pts.values())


# ----------------------------------------------------------------------------------------------
# real brains
# ----------------------------------------------------------------------------------------------
def _plant(prob, centre, sigma):
    r = int(np.ceil(4 * sigma))
    sl = tuple(slice(c - r, c + r + 1) for c in centre)
    local = gaussian_blob((2 * r + 1,) * 3, (r, r, r), sigma)
    prob[sl] = np.maximum(prob[sl], local)


@pytest.mark.shared
def test_census_recovers_planted_lesions_in_real_t1(shared_dir):
    img = nib.load(shared_dir / "data" / "brain" / "t1_crop.nii.gz")
    data = np.asarray(img.dataobj, np.float32)
    mask = crude_brain_mask(data)
    rng = np.random.default_rng(11)
    prob = (rng.random(data.shape, dtype=np.float32) * 0.3).astype(np.float32)  # sub-threshold noise
    from scipy import ndimage

    core = np.argwhere(ndimage.binary_erosion(mask[::4, ::4, ::4], iterations=4)) * 4
    sigmas = [1.0, 1.5, 2.0, 3.0, 4.0, 2.5]
    centres = []
    while len(centres) < len(sigmas):
        c = core[rng.integers(len(core))]
        if all(np.linalg.norm(c - o) > 25 for o in centres):
            centres.append(c)
    for c, s in zip(centres, sigmas):
        _plant(prob, c, s)
    # outside the brain (scalp/neck region): must be dropped
    outside = np.argwhere(~ndimage.binary_dilation(mask, iterations=12) & (data > 0))[::5000][0]
    _plant(prob, outside, 2.0)
    # one-voxel speck inside the brain: dropped by the CMB/WMH rule (<= 1 voxel)
    speck = core[len(core) // 2] + 2
    assert all(np.linalg.norm(speck - c) > 12 for c in centres)
    prob[tuple(speck)] = 0.9
    # a 4-voxel cluster: kept by the CMB/WMH rule, dropped by the PVS rule (<= 5 voxels)
    small = speck + np.array([0, 8, 0])
    assert all(np.linalg.norm(small - c) > 12 for c in centres)
    prob[small[0]:small[0] + 4, small[1], small[2]] = 0.8
    labels, census = lesion_census(prob, mask, img.affine, threshold=0.5, min_size_vox=1)
    assert len(census) == len(centres) + 1
    assert sorted(r["n_voxels"] for r in census)[0] == 4
    found = np.array([[r["centroid_i"], r["centroid_j"], r["centroid_k"]] for r in census])
    for c, s in zip(centres, sigmas):
        k = int(np.argmin(np.linalg.norm(found - c, axis=1)))
        assert np.linalg.norm(found[k] - c) < 0.5
        radius = s * np.sqrt(2 * np.log(2))
        expected = 4 / 3 * np.pi * radius ** 3
        tol = 0.6 if s < 2 else 0.15  # small balls are coarse on a 1 mm grid
        assert census[k]["volume_mm3"] == pytest.approx(expected, rel=tol)
        assert census[k]["prob_max"] > 0.99
        world = nib.affines.apply_affine(img.affine, c)
        assert [census[k]["x_mm"], census[k]["y_mm"], census[k]["z_mm"]] == pytest.approx(world, abs=0.5)
    _, census_pvs = lesion_census(prob, mask, img.affine, threshold=0.5, min_size_vox=5)
    assert len(census_pvs) == len(centres) and min(r["n_voxels"] for r in census_pvs) == 7  # sigma 1: 7 voxels
    assert (labels > 0).sum() == sum(r["n_voxels"] for r in census)


def test_cmb_classes_and_wmh_regions_on_the_mni_template():  # nilearn's MNI152 ships in the wheel
    from cohortseg.science import lesions as wmh
    from nilearn import datasets

    tpl = datasets.load_mni152_template(resolution=1)
    brain = np.asarray(datasets.load_mni152_brain_mask(resolution=1).get_fdata()) > 0
    aff = tpl.affine
    inv = np.linalg.inv(aff)
    planted = {(0, -28, -32): "infratentorial", (24, 2, 2): "deep", (-14, -18, 8): "deep",
               (38, -62, 40): "lobar", (-30, 42, 28): "lobar", (20, -70, -32): "infratentorial"}
    prob = np.zeros(tpl.shape, np.float32)
    for xyz in planted:
        _plant(prob, np.round(nib.affines.apply_affine(inv, xyz)).astype(int), 1.5)
    _, c_pts = lesion_census(prob, brain, aff, 0.5, 1, regions=lesions.cmb_location_mni, mni_affine_fn=np.eye(4))
    assert len(c_pts) == len(planted)
    for r_pts in c_pts:
        xyz = min(planted, key=lambda p: np.linalg.norm(np.subtract(p, (r_pts["mni_x"], r_pts["mni_y"], r_pts["mni_z"]))))
        assert np.linalg.norm(np.subtract(xyz, (r_pts["mni_x"], r_pts["mni_y"], r_pts["mni_z"]))) < 1.5
        assert r_pts["region"] == planted[xyz]
    # template WMH regions: a lesion beside the lateral ventricle is periventricular, one under the
    # cortex infracortical, one in the centrum semiovale far from both deep white
    rimg = wmh.mni_region_map(1)
    rmap = np.asarray(rimg.dataobj)
    counts = np.bincount(rmap.ravel(), minlength=4)
    assert counts[1] > 50_000 and counts[2] > 20_000 and counts[3] > 50_000
    masks = wmh.mni_tissue_masks(1)
    assert 8_000 < masks["ventricles"].sum() < 40_000
    from scipy import ndimage

    d_vent = ndimage.distance_transform_edt(~masks["ventricles"])
    d_gm = ndimage.distance_transform_edt(~masks["gm"])
    wm = masks["wm"]
    pick = {
        "periventricular": np.argwhere(wm & (d_vent > 3) & (d_vent < 6)),
        "infracortical": np.argwhere(wm & (d_vent > 20) & (d_gm > 1.5) & (d_gm < 3)),
        "deep_white": np.argwhere(wm & (d_vent > 14) & (d_gm > 8)),
    }
    prob = np.zeros(tpl.shape, np.float32)
    expect = []
    for name, cand in pick.items():
        assert len(cand), name
        c = cand[len(cand) // 2]
        prob[c[0] - 1:c[0] + 1, c[1] - 1:c[1] + 1, c[2]:c[2] + 1] = 0.9
        expect.append((tuple(c), name))
    labels, census = lesion_census(prob, brain, aff, 0.2, 1, regions=(rmap, dict(wmh.WMH_REGIONS)))
    assert len(census) == 3
    for c, name in expect:
        (r,) = [r for r in census if r["lesion_id"] == labels[c]]
        assert r["region"] == name
    vols = regional_volumes(labels, rmap, dict(wmh.WMH_REGIONS), aff)
    assert vols["total"] == 12.0 and vols["periventricular"] + vols["deep_white"] + vols["infracortical"] + vols["unassigned"] == 12.0
