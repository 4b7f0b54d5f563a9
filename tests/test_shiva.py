"""SHIVA contract: descriptors -> cards, md5 checks, fold loading/averaging, crop box, p99 normalisation."""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from cohortseg.errors import InputError, ModelError
from cohortseg.io import tree_md5
from cohortseg.models import shiva
from cohortseg.models.cards import find_card
from cohortseg.models.ensemble import fold_average, load_models
from cohortseg.models.store import ModelStore

from standins import make_shiva_bundle, reference_prediction

GRID = shiva.GRID_SHAPE


# ----------------------------------------------------------------------------------------------
# descriptors
# ----------------------------------------------------------------------------------------------
@pytest.mark.shared
def test_real_descriptors_become_cards(shared_dir):
    ddir = shared_dir / "models" / "shiva-descriptors"
    files = sorted(ddir.glob("model_info_*.json"))
    assert len(files) == 9
    cards = {f.name: shiva.card_from_model_info(f, ddir) for f in files}
    cmb2 = cards["model_info_swi-cmb-v2.json"]
    assert cmb2["pipeline"] == "cmb" and cmb2["contrasts"] == ["SWI"]
    assert cmb2["architecture"]["loader"] == "savedmodel"
    assert cmb2["folds"][0]["file"].endswith(".tf_inference") and len(cmb2["folds"]) == 3
    assert cmb2["thresholds"] == {"probability": 0.5, "min_cluster_vox": 1, "max_outside_brain_frac": 0.25}
    cmb1 = cards["model_info_swi-cmb-v1.json"]
    assert cmb1["architecture"]["loader"] == "keras_full" and cmb1["pipeline"] == "cmb"
    wmh = cards["model_info_t1-flair-wmh-v1.json"]
    assert wmh["pipeline"] == "wmh" and wmh["contrasts"] == ["T1w", "FLAIR"]
    assert wmh["thresholds"]["probability"] == 0.2 and wmh["thresholds"]["min_cluster_vox"] == 1
    assert wmh["architecture"]["input_shape"] == [160, 214, 176, 2]
    pvs2 = cards["model_info_t1-pvs-v2.json"]  # extension-less fold names are SavedModel folders
    assert pvs2["architecture"]["loader"] == "savedmodel"
    assert pvs2["thresholds"]["probability"] == 0.5 and pvs2["thresholds"]["min_cluster_vox"] == 5
    for c in cards.values():
        assert c["grid"] == {"shape": [160, 214, 176], "spacing_mm": [1.0, 1.0, 1.0], "orientation": "RAS",
                             "conform_shape": [256, 256, 256]}
        assert c["normalisation"]["method"] == "shiva_p99" and c["normalisation"]["clip"] == 1.3
        assert all(len(f["md5"]) == 32 for f in c["folds"])
    # the real weights are absent: the store names the missing file and where to get it
    card = find_card(str(ddir / "model_info_swi-cmb-v2.json"))
    with pytest.raises(ModelError, match="SWI-CMB/20250129-192041.*missing"):
        ModelStore(ddir).resolve(card)


def test_bad_descriptors(tmp_path):
    p = tmp_path / "model_info_bad.json"
    p.write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        shiva.read_model_info(p)
    p.write_text(json.dumps({"target": "XYZ", "modalities": ["t1"], "files": [{"name": "a.h5", "md5": "0" * 32}]}))
    with pytest.raises(ModelError, match="unknown target"):
        shiva.read_model_info(p)
    p.write_text(json.dumps({"target": "CMB", "modalities": ["swi"], "files": [{"name": "a.h5", "md5": "xyz"}]}))
    with pytest.raises(ModelError, match="md5"):
        shiva.read_model_info(p)
    with pytest.raises(ModelError, match="not found"):
        shiva.read_model_info(tmp_path / "absent.json")


def test_tree_md5_follows_shiva_folder_convention(tmp_path):
    d = tmp_path / "m.tf_inference"
    (d / "variables").mkdir(parents=True)
    (d / "saved_model.pb").write_bytes(b"graph")
    (d / "variables" / "variables.index").write_bytes(b"idx")
    (d / "fingerprint.pb").write_bytes(b"fp")
    files = sorted(p for p in d.rglob("*") if p.is_file())
    expected = hashlib.md5(b"".join(f.read_bytes() for f in files)).hexdigest()
    assert tree_md5(d) == expected
    assert tree_md5(d / "fingerprint.pb") == hashlib.md5(b"fp").hexdigest()


# ----------------------------------------------------------------------------------------------
# stand-in fold models through the descriptor path
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def h5_bundle(tmp_path_factory):
    return make_shiva_bundle(tmp_path_factory.mktemp("h5"), fmt="h5", n_folds=3)


@pytest.fixture(scope="module")
def sm_bundle(tmp_path_factory):
    return make_shiva_bundle(tmp_path_factory.mktemp("sm"), fmt="savedmodel", n_folds=2)


def _x(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((2, *GRID, 1), dtype=np.float32)
    x[0, 50:53, 60:63, 70:73] = 0.0  # a planted dark blob
    return x


def _folds(desc, mdir):
    """A descriptor used as a card, its folds verified by the store and loaded, as the infer step does."""
    card = find_card(str(desc))
    return card, load_models([card], ModelStore(mdir))[0]


def test_fold_average_is_the_mean_of_the_folds(h5_bundle):
    card, folds = _folds(*h5_bundle)
    assert card["architecture"]["loader"] == "keras_full" and card["pipeline"] == "cmb"
    assert len(folds) == 3 and len({f.sha256 for f in folds}) == 3
    x = _x()
    singles = [f.predict(x) for f in folds]
    for k, s in enumerate(singles):
        assert s.shape == (2, *GRID, 1) and s.dtype == np.float32
        np.testing.assert_allclose(s, reference_prediction(x, k), atol=1e-5)
    assert not np.allclose(singles[0], singles[1])  # folds really differ
    avg = fold_average([f.predict for f in folds], x, batch_size=2)
    assert avg.shape == (2, *GRID, 1) and avg.dtype == np.float32
    np.testing.assert_allclose(avg, np.mean(np.stack(singles), axis=0), rtol=0, atol=1e-6)
    # batch size does not change the result
    np.testing.assert_allclose(fold_average([f.predict for f in folds], x, batch_size=1), avg, rtol=0, atol=1e-6)
    assert avg[0, 51, 61, 71, 0] > 0.85 and avg[0, 10, 10, 10, 0] < 0.5


def test_savedmodel_folds_load_through_descriptor(sm_bundle, h5_bundle):
    card, folds = _folds(*sm_bundle)
    assert card["architecture"]["loader"] == "savedmodel"
    assert card.folds[0]["file"].endswith(".tf_inference")
    assert all(f.model.kind == "savedmodel" for f in folds)
    x = _x(1)[:1]
    avg = fold_average([f.predict for f in folds], x)
    ref = np.mean([reference_prediction(x, k) for k in range(2)], axis=0)
    np.testing.assert_allclose(avg, ref, atol=1e-5)
    # same weights as the first two Keras .h5 folds
    hfolds = _folds(*h5_bundle)[1][:2]
    np.testing.assert_allclose(fold_average([f.predict for f in hfolds], x), avg, atol=1e-6)


def test_md5_mismatch_names_the_file(tmp_path, h5_bundle):
    desc, mdir = h5_bundle
    bundle = tmp_path / "bundle"
    shutil.copytree(mdir, bundle)
    card = find_card(str(bundle / desc.name))
    ModelStore(bundle).resolve(card)  # intact copy passes
    bad = bundle / card.folds[1]["file"]
    with open(bad, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelError) as e:
        ModelStore(bundle).resolve(card)
    assert bad.name in str(e.value) and "checksum mismatch" in str(e.value)
    assert card.folds[1]["md5"] in str(e.value)
    bad.unlink()
    with pytest.raises(ModelError, match=f"{bad.name} is missing"):
        ModelStore(bundle).resolve(card)


def test_savedmodel_md5_covers_every_file(tmp_path, sm_bundle):
    desc, mdir = sm_bundle
    bundle = tmp_path / "bundle"
    shutil.copytree(mdir, bundle)
    card = find_card(str(bundle / desc.name))
    var = next((bundle / card.folds[0]["file"]).rglob("variables.data-*"))
    var.write_bytes(var.read_bytes()[:-1] + b"\x01")
    with pytest.raises(ModelError, match=card.folds[0]["file"].split("/")[-1]):
        ModelStore(bundle).resolve(card)


def test_load_fold_errors(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        shiva.load_fold(tmp_path / "nothing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(ModelError, match="junk.h5"):
        shiva.load_fold(junk)


# ----------------------------------------------------------------------------------------------
# crop box
# ----------------------------------------------------------------------------------------------
def test_crop_box_centre_of_mass_ceil():
    m = np.zeros((256, 256, 256), bool)
    m[100:141, 90:171, 80:201] = True  # centre of mass (120, 130, 140)
    box = shiva.crop_box(m)
    assert box.centre == (120, 130, 140)
    assert box.start == (120 - 80, 130 - 107, 140 - 88) and box.shape == GRID and box.shift_up == 0
    m2 = np.zeros((64, 64, 64), bool)
    m2[10:12, 10:12, 10:12] = True  # centre 10.5 -> ceil 11
    assert shiva.crop_box(m2, shape=(8, 8, 8)).centre == (11, 11, 11)


def test_crop_box_shifts_up_when_the_brain_top_would_be_cut():
    m = np.zeros((256, 256, 256), bool)
    m[100:150, 100:150, 0:40] = True  # a long "neck" pulls the centre of mass down
    m[80:170, 60:200, 40:230] = True
    top = 229
    com_z = int(np.ceil(np.nonzero(m)[2].mean()))
    naive_stop = com_z - 88 + 176
    assert naive_stop <= top  # the plain box would cut the top
    box = shiva.crop_box(m)
    assert box.shift_up == top - naive_stop + shiva.TOP_MARGIN_VOX
    assert box.stop[2] == top + shiva.TOP_MARGIN_VOX and box.start[2] > 0
    c = shiva.crop(m, box)
    assert c[..., -1].sum() == 0 and c[:, :, -shiva.TOP_MARGIN_VOX - 1].any()  # top kept, margin empty


def test_crop_zero_pads_outside_and_uncrop_round_trips():
    rng = np.random.default_rng(3)
    vol = rng.random((100, 120, 90)).astype(np.float32) + 1.0
    box = shiva.CropBox(start=(-10, 20, -5), shape=(50, 60, 40), centre=(15, 50, 15))
    c = shiva.crop(vol, box)
    assert c.shape == (50, 60, 40) and c.dtype == np.float32
    assert (c[:10] == 0).all() and (c[:, :, :5] == 0).all()  # padded parts
    np.testing.assert_array_equal(c[10:, :, 5:], vol[0:40, 20:80, 0:35])
    back = shiva.uncrop(c, box.to_dict(), vol.shape)
    np.testing.assert_array_equal(back[0:40, 20:80, 0:35], vol[0:40, 20:80, 0:35])
    assert back[40:].sum() == 0 and back[:, :20].sum() == 0
    # box sticking out at the top
    box2 = shiva.CropBox(start=(80, 100, 70), shape=(40, 40, 40), centre=(0, 0, 0))
    c2 = shiva.crop(vol, box2)
    np.testing.assert_array_equal(c2[:20, :20, :20], vol[80:, 100:, 70:])
    assert c2[20:].sum() == 0
    # multi-channel volumes keep their channel axis
    assert shiva.crop(np.stack([vol, vol], -1), box).shape == (50, 60, 40, 2)
    with pytest.raises(InputError):
        shiva.crop_box(np.zeros((10, 10, 10)))


# ----------------------------------------------------------------------------------------------
# intensities
# ----------------------------------------------------------------------------------------------
def test_normalise_p99_by_hand():
    v = np.zeros((10, 10, 10), np.float32)
    mask = np.zeros(v.shape, bool)
    mask[:, :, :5] = True  # 500 voxels
    vals = np.arange(1, 501, dtype=np.float32)  # 1..500 in the mask
    v[mask] = vals
    v[0, 0, 9] = np.nan
    v[0, 1, 9] = -7.0
    v[0, 2, 9] = 10_000.0  # outside the mask: does not move the percentile, clipped
    p99 = np.percentile(vals, 99)
    out = shiva.normalise_p99(v, mask)
    assert out.dtype == np.float32
    assert out[0, 0, 9] == 0 and out[0, 1, 9] == 0
    assert out[0, 2, 9] == pytest.approx(1.0)
    np.testing.assert_allclose(out[mask], np.minimum(vals / p99, 1.3) / 1.3, rtol=1e-6)
    assert out.max() <= 1.0 and out.min() >= 0.0
    # a voxel at exactly 1.3 * p99 lands on 1.0, one at p99 on 1/1.3
    assert np.isclose(shiva.normalise_p99(np.full((2, 2, 2), 5.0), np.ones((2, 2, 2))), 1 / 1.3).all()
    with pytest.raises(InputError, match="empty"):
        shiva.normalise_p99(v, np.zeros(v.shape))
    with pytest.raises(InputError, match="percentile"):
        shiva.normalise_p99(np.zeros((4, 4, 4)), np.ones((4, 4, 4)))


# ----------------------------------------------------------------------------------------------
# end to end on a real brain with planted dark blobs
# ----------------------------------------------------------------------------------------------
def test_signatureless_savedmodel_fold(tmp_path):
    import tensorflow as tf

    class Fold(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4, 5, 6, 1], tf.float32)], autograph=False)
        def __call__(self, x):
            return tf.sigmoid(3.0 - 30.0 * x)

    path = tmp_path / "fold_0_bestvalloss"  # extension-less, like SHIVA T1.PVS.v2
    tf.saved_model.save(Fold(), str(path), signatures={})
    fold = shiva.load_fold(path)
    x = np.linspace(0, 1, 120, dtype=np.float32).reshape(1, 4, 5, 6, 1)
    np.testing.assert_allclose(fold(x), 1 / (1 + np.exp(-(3.0 - 30.0 * x))), atol=1e-6)
