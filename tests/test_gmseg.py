"""gmseg (Perone et al. 2017) on real data: architecture, Keras 2 weight mapping, Dice, orientation.

Needs ../shared (t2s image + manual GM mask, the challenge and large models).
"""
from __future__ import annotations

import shutil

import h5py
import nibabel as nib
import numpy as np
import pytest

from cohortseg.errors import ModelError
from cohortseg.science.metrics import dice
from helpers import run_item

pytestmark = pytest.mark.shared

DICE_MIN = 0.84


@pytest.fixture(scope="module")
def gm_paths(shared_dir):
    g = shared_dir / "models" / "gmseg"
    return {name: (g / f"{name}_model.hdf5", g / f"{name}_model.json") for name in ("challenge", "large")}


@pytest.fixture(scope="module")
def t2s(shared_dir):
    d = shared_dir / "data" / "spine" / "t2s"
    img = nib.load(d / "t2s.nii.gz")
    gt = np.asarray(nib.load(d / "t2s_gmseg_manual.nii.gz").dataobj) > 0
    return d / "t2s.nii.gz", img, gt


def _sc_gm(tmp, image, shared_dir, **settings):
    """The sc_gm plugin on one image, as the workflow runs it (tests/helpers.run_item)."""
    return run_item("sc_gm", {"image": image}, tmp, settings, model_dir=shared_dir / "models",
                    name="sub-01_T2starw")


def _mask(res):
    return np.asarray(nib.load(res["files"]["label-GM_mask.nii.gz"]).dataobj)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, t2s, shared_dir):
    """The plugin with each model alone and with the default two-model ensemble, once per module."""
    tmp = tmp_path_factory.mktemp("gm")
    out = {name: _sc_gm(tmp / name, t2s[0], shared_dir, models=models) for name, models in (
        ("challenge", ["gmseg_challenge"]), ("large", ["gmseg_large"]), ("ensemble", ["gmseg_challenge", "gmseg_large"]))}
    return out


# ----------------------------------------------------------------------------- architecture


def test_architecture_matches_upstream(gm_paths):
    from cohortseg.models.nets.gmseg import build_gmseg, read_keras2_weights

    model = build_gmseg(32)
    assert model.input_shape == (None, 200, 200, 1)
    assert model.output_shape == (None, 200, 200, 1)
    # every weight array of the upstream file has a home: same total parameter count
    file_w = read_keras2_weights(gm_paths["challenge"][0])
    assert model.count_params() == sum(a.size for w in file_w.values() for a in w.values())
    # upstream details: global pooling reads the block-1 output; the concat is 6 x filters wide
    gap = model.get_layer("global_average_pooling2d_1")
    assert gap.input is model.get_layer("dropout_2").output
    assert model.get_layer("amort").kernel.shape == (1, 1, 192, 64)
    for r in (6, 12, 18, 24):
        assert model.get_layer(f"rate{r}_1").dilation_rate == (r, r)
    assert model.get_layer("branch1x1_2").kernel_size == (1, 1)
    bn = model.get_layer("batch_normalization_7")
    assert bn.epsilon == pytest.approx(1e-3)
    # fully convolutional variant: global branch still tiles to the input size
    fc = build_gmseg(32, input_size=None)
    assert fc(np.zeros((1, 64, 48, 1), np.float32)).shape == (1, 64, 48, 1)


# ----------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("name", ["challenge", "large", "ensemble"])
def test_dice_against_the_manual_mask(runs, t2s, name):
    _, img, gt = t2s
    res = runs[name]
    prob = np.asarray(nib.load(res["files"]["label-GM_probseg.nii.gz"]).dataobj)
    mask = _mask(res)
    assert prob.shape == img.shape == mask.shape and prob.dtype == np.float32 and mask.dtype == np.uint8
    assert 0.0 <= prob.min() and prob.max() <= 1.0
    assert np.array_equal(mask, (prob > 0.5).astype(np.uint8))
    d = dice(mask, gt)
    print(f"gmseg {name} Dice = {d:.4f}")
    assert d >= DICE_MIN
    assert res["metrics"]["gm_volume_mm3"] == pytest.approx(
        mask.sum() * abs(np.linalg.det(img.affine[:3, :3])), rel=1e-3)


def test_ensemble_is_the_mean_of_its_models(runs, t2s):
    members = [runs[n]["predicted"].prob for n in ("challenge", "large")]
    ens = runs["ensemble"]["predicted"].prob
    assert ens.shape == (t2s[1].shape[2], 200, 200, 1)
    np.testing.assert_allclose(ens, 0.5 * (members[0] + members[1]), atol=1e-6)
    assert not np.allclose(members[0], members[1], atol=1e-2)  # two different nets really ran


def test_dice_volume_standardisation(tmp_path, t2s, shared_dir):
    res = _sc_gm(tmp_path, t2s[0], shared_dir, models=["gmseg_challenge"], standardise="volume")
    d = dice(_mask(res), t2s[2])
    print(f"gmseg challenge model, volume standardisation, Dice = {d:.4f}")
    assert d >= DICE_MIN


def test_flip_tta_averages_left_right_flipped_prediction(runs, t2s):
    from cohortseg.pipelines import get_pipeline

    res = runs["challenge"]
    prep, models, cards = res["prepared"], res["models"], res["cards"]
    p = get_pipeline("sc_gm")
    sub = type(prep)(x=prep.x[3:5], meta=prep.meta)
    plain = p.predict(models, sub, cards, {}, 8).prob
    flipped = p.predict(models, type(prep)(x=np.ascontiguousarray(sub.x[:, ::-1]), meta=prep.meta), cards, {}, 8).prob
    np.testing.assert_allclose(p.predict(models, sub, cards, {"flip_tta": True}, 1).prob,
                               0.5 * (plain + flipped[:, ::-1]), atol=1e-5)
    assert not np.allclose(plain, flipped[:, ::-1], atol=1e-3)


# ----------------------------------------------------------------------------- orientation


def test_same_mask_whatever_the_storage_orientation(runs, t2s, tmp_path, shared_dir):
    """Reoriented copies (data and affine changed consistently) give the same mask in the original
    grid. Slices are processed independently, so three middle slices keep the test fast; the
    reference is the challenge model's mask of the full image on those slices."""
    _, img_full, gt_full = t2s
    ks = slice(3, 6)
    img = img_full.slicer[:, :, ks]
    gt = gt_full[:, :, ks]
    ref_mask = _mask(runs["challenge"])[:, :, ks]
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
    io = nib.orientations.io_orientation
    variants = {
        # LAS -> RAS: data flipped along the first axis, affine changed consistently
        "RAS": nib.orientations.ornt_transform(io(img.affine),
                                               nib.orientations.axcodes2ornt(("R", "A", "S"))),
        # rows (second voxel axis) flipped: LPS
        "rows_flipped": np.array([[0, 1], [1, -1], [2, 1]]),
    }
    for name, ornt in variants.items():
        other = img.as_reoriented(ornt)
        assert not np.array_equal(np.asarray(other.dataobj), np.asarray(img.dataobj))
        nib.save(other, tmp_path / f"{name}.nii.gz")
        mask = _mask(_sc_gm(tmp_path / name, tmp_path / f"{name}.nii.gz", shared_dir, models=["gmseg_challenge"]))
        # back into the original voxel grid
        back = nib.Nifti1Image(mask, other.affine).as_reoriented(
            nib.orientations.ornt_transform(io(other.affine), io(img.affine)))
        assert np.allclose(back.affine, img.affine, atol=1e-4)
        back_mask = np.asarray(back.dataobj)
        d_ref = dice(back_mask, ref_mask)
        print(f"orientation {name}: Dice vs original = {d_ref:.4f}, vs manual = {dice(back_mask, gt):.4f}")
        assert d_ref >= 0.95


# ----------------------------------------------------------------------------- weight files


def test_corrupt_or_mismatched_weights_raise_model_error(gm_paths, tmp_path):
    from cohortseg.models.nets.gmseg import build_gmseg, load_gmseg_weights

    def load_gmseg(path, filters):
        load_gmseg_weights(build_gmseg(filters), path)

    garbage = tmp_path / "garbage.hdf5"
    garbage.write_bytes(b"not an hdf5 file" * 100)
    with pytest.raises(ModelError, match="HDF5"):
        load_gmseg(garbage, 32)

    truncated = tmp_path / "truncated.hdf5"
    truncated.write_bytes(gm_paths["challenge"][0].read_bytes()[:200_000])
    with pytest.raises(ModelError):
        load_gmseg(truncated, 32)

    with pytest.raises(ModelError, match="not found"):
        load_gmseg(tmp_path / "missing.hdf5", 32)

    small = build_gmseg(32)
    before = [w.numpy().copy() for w in small.weights]
    with pytest.raises(ModelError, match="shape mismatch"):
        load_gmseg_weights(small, gm_paths["large"][0])  # 64-filter weights into a 32-filter net
    # all-or-nothing: a failed load leaves the model untouched
    assert all(np.array_equal(b, w.numpy()) for b, w in zip(before, small.weights))

    # a layer missing from the file
    pruned = tmp_path / "pruned.hdf5"
    shutil.copy(gm_paths["challenge"][0], pruned)
    with h5py.File(pruned, "r+") as f:
        names = [n for n in f.attrs["layer_names"] if n != b"rate12_2"]
        f.attrs["layer_names"] = np.array(names)
        del f["rate12_2"]
    with pytest.raises(ModelError, match="rate12_2"):
        load_gmseg_weights(small, pruned)
