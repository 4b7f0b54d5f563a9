"""brain_tissue science: FreeSurfer-style conform, MeshNet inference, tissue volumes, eTIV.

Real-model checks (``shared``) use brainchop's model5_gw_ae (fast enough for 2 CPU cores): GM/WM
Dice against the MNI152 2009 tissue maps, a plausible brain volume on brainchop's t1_crop, and the
same volumes when the T1 is first moved to a 1.2 mm RAS grid.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from cohortseg.science.brain import (
    ASEG18_DSEG,
    MESHNETS,
    TISSUE_DSEG,
    crop_box,
    dice,
    dseg_table,
    keep_largest_per_class,
    largest_component,
    normalize,
    prob_volumes,
    segment_tissue,
    tissue_dseg,
    tissue_volumes,
)
from cohortseg.science.conform import conform, conformed_affine, orientation_matrix, to_native
from cohortseg.errors import InputError


# ----------------------------------------------------------------------------- synthetic helpers
def _sphere_img(shape=(100, 120, 90), zooms=(1.2, 1.2, 1.2), radius_mm=30.0, oblique_deg=0.0,
                centre_shift_mm=(5.0, -8.0, 3.0), dtype=np.int16):
    """A bright ball (value 1000, radius_mm) on a dimmer box, RAS, optionally rotated about z."""
    th = np.deg2rad(oblique_deg)
    rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(zooms)
    aff[:3, 3] = -(aff[:3, :3] @ (np.array(shape) / 2.0)) + np.array(centre_shift_mm)
    ijk = np.indices(shape).reshape(3, -1).T
    xyz = ijk @ aff[:3, :3].T + aff[:3, 3]
    ball = (np.linalg.norm(xyz - np.array(centre_shift_mm), axis=1) <= radius_mm).reshape(shape)
    data = np.where(ball, 1000, 200).astype(dtype)
    data[:3] = 0  # some true background
    return nib.Nifti1Image(data, aff), ball


# ----------------------------------------------------------------------------- conform
def test_orientation_matrix_lia():
    m = orientation_matrix("LIA")
    assert "".join(nib.aff2axcodes(np.block([[m, np.zeros((3, 1))], [np.zeros((1, 3)), 1]]))) == "LIA"


@pytest.mark.parametrize("oblique", [0.0, 17.0])
def test_conform_geometry_and_intensity(oblique):
    img, _ = _sphere_img(oblique_deg=oblique)
    out, info = conform(img)
    assert out.shape == (256, 256, 256) and out.get_data_dtype() == np.uint8
    assert "".join(nib.aff2axcodes(out.affine)) == "LIA"
    assert np.allclose(np.sqrt((out.affine[:3, :3] ** 2).sum(0)), 1.0)
    # centre of the FOV preserved: native voxel dims/2 and conformed voxel 128 are the same RAS point
    c_native = img.affine @ np.r_[np.array(img.shape) / 2.0, 1]
    c_conf = out.affine @ np.r_[128, 128, 128, 1]
    assert np.allclose(c_native, c_conf, atol=1e-6)
    d = np.asarray(out.dataobj)
    assert d.max() == 255 and d.min() == 0
    assert info["intensity_rescaled"] and info["native_orientation"] == "RAS"
    assert np.allclose(info["conformed_affine"], out.affine)


def test_conform_keeps_conformed_uint8_untouched(shared_dir):
    img = nib.load(shared_dir / "data" / "brain" / "t1_crop.nii.gz")
    out, info = conform(img)
    assert info["identity_resampling"] and not info["intensity_rescaled"]
    assert np.array_equal(np.asarray(out.dataobj), np.asarray(img.dataobj))
    assert np.allclose(out.affine, img.affine, atol=1e-4)


@pytest.mark.parametrize("oblique", [0.0, 17.0])
def test_labels_round_trip_to_native(oblique):
    img, ball = _sphere_img(oblique_deg=oblique)
    out, info = conform(img)
    conf_ball = np.asarray(out.dataobj) > 160  # ball ~255, box ~51 after scaling
    back = to_native(conf_ball.astype(np.uint8), out.affine, img, order=0)
    assert back.dtype == np.uint8
    assert dice(back > 0, ball) > 0.97
    # same physical position (centre of mass in mm)
    com = lambda m, a: a[:3, :3] @ np.array(ndimage.center_of_mass(m)) + a[:3, 3]  # noqa: E731
    assert np.linalg.norm(com(back > 0, img.affine) - com(ball, img.affine)) < 0.3
    # probabilities (order 1) come back as float in [0, 1]
    p = to_native(np.stack([1 - conf_ball, conf_ball], -1).astype(np.float32), out.affine, img, order=1)
    assert p.shape == img.shape + (2,) and p.dtype == np.float32 and p.max() <= 1.0 + 1e-6


def test_conform_rejects_bad_inputs():
    """Empty image, several volumes, unreadable file -> InputError (a per-subject failure)."""
    with pytest.raises(InputError):
        conform(nib.Nifti1Image(np.zeros((20, 20, 20), np.float32), np.eye(4)))
    with pytest.raises(InputError):
        conform(nib.Nifti1Image(np.random.rand(20, 20, 20, 2).astype(np.float32), np.eye(4)))
    with pytest.raises(InputError):
        conform("/nonexistent/t1.nii.gz")


def test_conformed_affine_any_orientation():
    aff = conformed_affine(np.diag([0.9, 0.9, 1.3, 1]), (200, 200, 100), 256, 1.0, "RAS")
    assert np.allclose(aff[:3, :3], np.eye(3))
    assert np.allclose(aff @ [128, 128, 128, 1], [90, 90, 65, 1])


# ----------------------------------------------------------------------------- measures (no models)
def test_tissue_volumes_hand_computed():
    dseg = np.zeros((10, 12, 8), np.uint8)
    dseg[0:4, 0:5, 0:2] = 1  # 40 voxels
    dseg[5:10, 0:12, 3:4] = 2  # 60 voxels
    dseg[9, 11, 7] = 3  # 1 voxel
    aff = np.diag([1.5, 2.0, 0.8, 1.0])  # 2.4 mm^3 per voxel
    aff[:3, 3] = [10, -20, 5]
    vols = tissue_volumes(dseg, {0: "background", 1: "GM", 2: "WM", 3: "CSF"}, aff)
    assert vols == pytest.approx({"GM": 40 * 2.4 / 1000, "WM": 60 * 2.4 / 1000, "CSF": 2.4 / 1000})
    # list form, absent labels give 0, background optional
    v2 = tissue_volumes(dseg, ["bg", "a", "b", "c", "d"], aff, skip_background=False)
    assert v2["bg"] == pytest.approx((960 - 101) * 2.4 / 1000) and v2["d"] == 0.0
    # oblique affine: determinant, not the diagonal
    th = np.deg2rad(30)
    rot = np.array([[np.cos(th), -np.sin(th), 0, 0], [np.sin(th), np.cos(th), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    assert tissue_volumes(dseg, {1: "GM"}, rot @ aff)["GM"] == pytest.approx(40 * 2.4 / 1000)
    # probabilities: partial volumes
    prob = np.zeros(dseg.shape + (2,), np.float32)
    prob[..., 1] = 0.25
    assert prob_volumes(prob, ["bg", "x"], aff)["x"] == pytest.approx(960 * 0.25 * 2.4 / 1000, rel=1e-6)


def test_tissue_dseg_and_tables():
    gw = np.array([[[0, 1, 2, 2, 0]]], np.uint8)  # brainchop channels: 0 bg, 1 WM, 2 GM
    mask = np.array([[[1, 1, 1, 0, 1]]], bool)
    assert tissue_dseg(gw, mask).tolist() == [[[3, 2, 1, 0, 3]]]
    assert tissue_dseg(gw).tolist() == [[[0, 2, 1, 1, 0]]]
    df = dseg_table(TISSUE_DSEG)
    assert list(df.columns) == ["index", "name", "abbreviation"]
    assert df["index"].tolist() == [0, 1, 2, 3] and df["name"].tolist() == ["background", "GM", "WM", "CSF"]
    a = dseg_table(ASEG18_DSEG, colors=["#000000"] * 18)
    assert len(a) == 18 and "Lateral-Ventricle" in a["name"].tolist() and "color" in a.columns
    assert a.loc[a["name"] == "Lateral-Ventricle", "index"].item() == 3


def test_normalize_crop_and_cleanup():
    v = np.zeros((40, 40, 40), np.uint8)
    v[10:20, 12:30, 5:25] = 100
    v[12, 14, 7] = 250
    assert normalize(v, "minmax").max() == pytest.approx(1.0)
    q = normalize(v, "quantile")
    assert q.min() == pytest.approx(0.0)  # 5th percentile is background
    box = crop_box(normalize(v), padding=3, multiple=8)
    assert [(s.start, s.stop) for s in box] == [(7, 23), (9, 33), (0, 31)]  # last one clipped at 0
    assert all((s.stop - s.start) % 8 == 0 for s in box[:2])
    m = np.zeros((20, 20, 20), bool)
    m[2:8, 2:8, 2:8] = True
    m[5, 5, 5] = False  # hole
    m[15:17, 15:17, 15:17] = True  # island
    lc = largest_component(m)
    assert lc.sum() == 216 and not lc[15, 15, 15]
    d = np.zeros((20, 20, 20), np.uint8)
    d[m] = 2
    d[15, 15, 15] = 1
    assert (keep_largest_per_class(d) == 2).sum() == 215
    with pytest.raises(InputError):
        crop_box(np.zeros((5, 5, 5)))


# ----------------------------------------------------------------------------- real models
@pytest.fixture(scope="module")
def gw_model(shared_dir):
    from cohortseg.models.nets.tfjs import load_tfjs_layers_model

    return load_tfjs_layers_model(shared_dir / "models" / "brainchop" / "model5_gw_ae")


@pytest.fixture(scope="module")
def t1_crop(shared_dir):
    return nib.load(shared_dir / "data" / "brain" / "t1_crop.nii.gz")


def _head_mask_model():
    """Stand-in for mindgrab (too slow for CI on 2 cores): 'brain' = normalised intensity > 0.1."""
    import keras

    inp = keras.Input((None, None, None, 1))
    conv = keras.layers.Conv3D(2, 1)
    model = keras.Model(inp, conv(inp))
    conv.set_weights([np.array([0.0, 40.0], np.float32).reshape(1, 1, 1, 1, 2), np.array([0.0, -4.0], np.float32)])
    return model


def _const_class_model(n_classes: int, cls: int):
    """Stand-in net: class ``cls`` wherever the normalised intensity > 0.1, else class 0."""
    import keras

    inp = keras.Input((None, None, None, 1))
    conv = keras.layers.Conv3D(n_classes, 1)
    model = keras.Model(inp, conv(inp))
    k = np.zeros((1, 1, 1, 1, n_classes), np.float32)
    b = np.zeros(n_classes, np.float32)
    k[..., cls], b[cls] = 40.0, -4.0
    conv.set_weights([k, b])
    return model


def test_segment_conformed_glue_with_stand_in_nets():
    """Keys, units and masking of segment_conformed (tiny synthetic volume, stand-in nets)."""
    from cohortseg.science.brain import segment_conformed

    vol = np.zeros((40, 44, 36), np.uint8)
    vol[8:30, 10:34, 6:30] = 200  # 22 * 24 * 24 = 12672 voxels
    vol[12, 12, 12] = 255
    aff = np.diag([-1.0, 1.0, 1.0, 1.0])[[0, 2, 1, 3]]
    img = nib.Nifti1Image(vol, aff)
    res = segment_conformed(img, {"brain_mask": _head_mask_model(), "aseg": _const_class_model(18, 3)},
                            wm_target=None)
    v = res.volumes
    assert v["brain_mask_ml"] == pytest.approx(12.672)
    assert v["aseg_lateral_ventricle_ml"] == pytest.approx(12.672)
    assert v["aseg_thalamus_ml"] == 0.0 and len([k for k in v if k.startswith("aseg_")]) == 17
    assert res.aseg.dtype == np.uint8 and res.aseg.shape == vol.shape
    with pytest.raises(InputError, match="empty"):
        segment_conformed(img, {"brain_mask": _const_class_model(2, 0)})


@pytest.fixture(scope="module")
def t1_crop_result(gw_model, t1_crop):
    """segment_conformed on t1_crop with the real GW net and a stand-in head mask."""
    from cohortseg.science.brain import segment_conformed

    conf, _ = conform(t1_crop)
    res = segment_conformed(conf, {"brain_mask": _head_mask_model(), "tissue": gw_model})
    return res


@pytest.mark.shared
def test_mni152_gm_wm_dice(gw_model):
    from nilearn import datasets

    mni = datasets.load_mni152_template(resolution=1)
    gm_ref = datasets.load_mni152_gm_template(resolution=1).get_fdata() > 0.5
    wm_ref = datasets.load_mni152_wm_template(resolution=1).get_fdata() > 0.5
    conf, _ = conform(mni)
    _, lab, info = segment_tissue(gw_model, conf, MESHNETS["model5_gw_ae"])
    native = to_native(tissue_dseg(lab), conf.affine, mni, order=0)  # compare in the template grid
    gm, wm = dice(native == 1, gm_ref), dice(native == 2, wm_ref)
    print(f"MNI152 model5_gw_ae: GM Dice {gm:.3f}, WM Dice {wm:.3f}, {info}")
    assert gm >= 0.80
    assert wm >= 0.86


@pytest.mark.shared
def test_t1_crop_brain_volume(t1_crop_result):
    res = t1_crop_result
    v = res.volumes
    print(f"t1_crop: {v}, {res.info}")
    assert 1000.0 <= v["brain_ml"] <= 1800.0
    assert v["brain_ml"] == pytest.approx(v["gm_ml"] + v["wm_ml"])
    assert 0.3 < v["wm_ml"] / v["brain_ml"] < 0.6
    # brainchop's sample is a FreeSurfer-conformed head: WM sits near half the range
    assert 0.4 < res.info["tissue"]["wm_level"] < 0.6
    # CSF = mask minus tissue; all in the conformed grid
    assert v["csf_ml"] + v["brain_ml"] <= v["brain_mask_ml"] + 1e-6
    assert res.tissue.shape == (256, 256, 256) and res.tissue.dtype == np.uint8
    assert set(np.unique(res.tissue)) <= {0, 1, 2, 3}
    pgm = res.probseg()["GM"]
    assert pgm.shape == (256, 256, 256) and 0.0 <= pgm.min() and pgm.max() <= 1.0
    # partial-volume GM close to the hard count
    assert pgm.sum() / 1000 == pytest.approx(v["gm_ml"], rel=0.1)


@pytest.mark.shared
def test_non_conformed_input_gives_same_volumes(gw_model, t1_crop, t1_crop_result):
    """t1_crop moved to a 1.2 mm RAS grid (float, other FOV): conform + segment -> same volumes."""
    ref_vols = {"GM": t1_crop_result.volumes["gm_ml"], "WM": t1_crop_result.volumes["wm_ml"]}
    src = np.asarray(t1_crop.dataobj, dtype=np.float32)
    zoom = 1.2
    shape = (140, 160, 150)
    aff = np.diag([zoom, zoom, zoom, 1.0])
    centre = t1_crop.affine @ np.r_[np.array(t1_crop.shape) / 2.0, 1]
    aff[:3, 3] = centre[:3] - aff[:3, :3] @ (np.array(shape) / 2.0) + [3.0, -2.0, 4.0]  # off-centre FOV
    v2v = np.linalg.inv(t1_crop.affine) @ aff
    data = ndimage.affine_transform(src, v2v[:3, :3], offset=v2v[:3, 3], output_shape=shape, order=1)
    native = nib.Nifti1Image((data * 3.7 + 12.0).astype(np.float32), aff)  # arbitrary scanner units
    assert "".join(nib.aff2axcodes(native.affine)) == "RAS"

    conf, info = conform(native)
    assert info["intensity_rescaled"] and not info["identity_resampling"]
    _, lab, _ = segment_tissue(gw_model, conf, MESHNETS["model5_gw_ae"])
    vols = tissue_volumes(tissue_dseg(lab), dict((i, n) for i, n, _ in TISSUE_DSEG), conf.affine)
    print("1.2 mm RAS:", vols, "conformed:", ref_vols)
    for k in ("GM", "WM"):
        assert vols[k] == pytest.approx(ref_vols[k], rel=0.05)
    assert vols["GM"] + vols["WM"] == pytest.approx(ref_vols["GM"] + ref_vols["WM"], rel=0.03)
    # and the labels come back onto the 1.2 mm grid with the right total volume
    back = to_native(tissue_dseg(lab), conf.affine, native, order=0)
    bv = tissue_volumes(back, {1: "GM", 2: "WM"}, native.affine)
    assert bv["GM"] + bv["WM"] == pytest.approx(vols["GM"] + vols["WM"], rel=0.03)


@pytest.mark.shared
def test_etiv_atlas_scaling_on_template():
    """eTIV of the MNI template itself is the template ICV; a copy 10 % larger in every direction
    has 1.1^3 times it (the affine determinant is what is measured)."""
    from nilearn import datasets

    from cohortseg.science.brain import estimate_etiv, template_icv_ml

    t = datasets.load_mni152_template(resolution=1)
    img = nib.Nifti1Image(np.asarray(t.get_fdata(), np.float32), t.affine)
    icv = template_icv_ml()
    assert 1700 < icv < 2100
    e1 = estimate_etiv(img)
    assert e1["etiv_ml"] == pytest.approx(icv, rel=0.03)
    big = nib.Nifti1Image(np.asarray(img.dataobj), np.diag([1.1, 1.1, 1.1, 1.0]) @ img.affine)
    e2 = estimate_etiv(big)
    assert e2["etiv_ml"] / e1["etiv_ml"] == pytest.approx(1.1 ** 3, rel=0.03)
