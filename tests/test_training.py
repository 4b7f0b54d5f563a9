"""Training package: augmentation, splits, losses, and a CI-sized k-fold run into a model bundle."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from cohortseg.training import augment as aug
from cohortseg.training import datasets as ds

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "config" / "train" / "sc_csa.yaml"

# The CI-sized variant of config/train/sc_csa.yaml (the same overrides are documented in
# docs/TRAINING.md as --set options of `python -m cohortseg.training`).
CI_OVERRIDES = {
    "net": {"base_filters": 4, "depth": 2},
    "train": {"epochs": 3, "slices_per_epoch": 48, "batch_size": 16, "patience": 2, "min_epochs": 1},
}


#: a floor for the CI-sized models on the held-out contrast (measured 0.107 / 0.126 on 3 Dec 2026):
#: the cord is ~1.7 % of the 64 x 64 mm crop (70 mm^2), so an empty prediction scores 0 and an
#: all-cord (untrained, constant) one 2 x 0.017 / 1.017 = 0.034
CI_MIN_DICE = 0.06


def _slice_pair(seed=0, soft=False):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(48, 48)).astype(np.float32)
    ii, jj = np.mgrid[:48, :48]
    d = np.sqrt((ii - 24.0) ** 2 + (jj - 20.0) ** 2)
    lab = np.clip(6.5 - d, 0, 1) if soft else (d <= 6).astype(np.float32)
    img[d <= 6] += 3.0
    return img, lab.astype(np.float32)


# ------------------------------------------------------------------------------- augmentation
def test_augmentation_deterministic_and_label_preserving():
    img, lab = _slice_pair()
    cfg = aug.AugmentConfig(p_spatial=1.0, p_elastic=1.0, p_flip_lr=0.5, p_gamma=1.0, p_intensity=1.0,
                            p_invert=0.5, p_lut=0.5, p_noise=1.0, p_fov=0.5)
    a = aug.augment_batch(np.stack([img] * 4), np.stack([lab] * 4), np.random.default_rng(7), cfg)
    b = aug.augment_batch(np.stack([img] * 4), np.stack([lab] * 4), np.random.default_rng(7), cfg)
    c = aug.augment_batch(np.stack([img] * 4), np.stack([lab] * 4), np.random.default_rng(8), cfg)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (4, 48, 48) and a[1].shape == (4, 48, 48)
    assert a[0].dtype == np.float32 and a[1].dtype == np.float32
    # a binary label stays binary (nearest interpolation) and keeps roughly its area
    assert set(np.unique(a[1])) <= {0.0, 1.0}
    for y in a[1]:
        assert 0.6 * lab.sum() < y.sum() < 1.6 * lab.sum()
    # soft labels stay in [0, 1]
    simg, slab = _slice_pair(soft=True)
    x, y = aug.augment_pair(simg, slab, np.random.default_rng(3), cfg)
    assert 0.0 <= y.min() and y.max() <= 1.0 and not set(np.unique(y)) <= {0.0, 1.0}


def test_augmentation_identity_and_lr_flip_only():
    img, lab = _slice_pair()
    x, y = aug.augment_pair(img, lab, np.random.default_rng(0), aug.AugmentConfig.none())
    np.testing.assert_allclose(x, img, atol=1e-6)
    np.testing.assert_array_equal(y, lab)
    flip = aug.AugmentConfig(**{**aug.AugmentConfig.none().__dict__, "p_flip_lr": 1.0})
    x, y = aug.augment_pair(img, lab, np.random.default_rng(0), flip)
    # axis 0 is left-right in the model grid: the only flip anatomy allows
    np.testing.assert_allclose(x, img[::-1, :], atol=1e-5)
    np.testing.assert_array_equal(y, lab[::-1, :])


def test_augment_config_rejects_unknown_keys():
    from cohortseg.errors import ConfigError

    with pytest.raises(ConfigError):
        aug.AugmentConfig.from_dict({"p_flip_ap": 0.5})


# ------------------------------------------------------------------------------------- splits
def _pairs():
    return [ds.Pair(f"/x/{s}_{c}.nii.gz", f"/x/{s}_{c}_seg.nii.gz", s, c)
            for s in ("sub-01", "sub-02", "sub-03", "sub-04", "sub-05") for c in ("T1w", "T2w")]


def test_kfold_by_subject_never_splits_a_subject():
    pairs = _pairs()
    folds = ds.kfold_splits(pairs, k=3, by="subject", seed=1)
    assert len(folds) == 3
    tested = []
    for train, test in folds:
        assert not set(train) & set(test)
        assert not {pairs[i].subject for i in train} & {pairs[i].subject for i in test}
        tested += test
    assert sorted(tested) == list(range(len(pairs)))
    assert folds == ds.kfold_splits(pairs, k=3, by="subject", seed=1)  # seeded


def test_kfold_by_contrast_is_leave_one_contrast_out():
    pairs = _pairs()
    folds = ds.kfold_splits(pairs, by="contrast")
    assert len(folds) == 2
    for train, test in folds:
        assert len({pairs[i].contrast for i in test}) == 1
        assert {pairs[i].contrast for i in train}.isdisjoint({pairs[i].contrast for i in test})


def test_tsv_pairs(tmp_path):
    (tmp_path / "pairs.tsv").write_text("image\tmask\tsubject\tcontrast\n"
                                        "a/sub-1_T2w.nii.gz\ta/sub-1_T2w_seg.nii.gz\tsub-1\tT2w\n"
                                        "a/sub-2_T1w.nii.gz\ta/sub-2_T1w_seg.nii.gz\t\t\n")
    pairs = ds.read_pairs_tsv(tmp_path / "pairs.tsv")
    assert pairs[0] == ds.Pair(str(tmp_path / "a/sub-1_T2w.nii.gz"), str(tmp_path / "a/sub-1_T2w_seg.nii.gz"),
                               "sub-1", "T2w")
    assert pairs[1].subject == "sub-2" and pairs[1].contrast == "T1w"  # guessed from the BIDS name


def test_bids_pairs(tmp_path):
    for sub, suf in [("sub-01", "T2w"), ("sub-02", "T1w"), ("sub-03", "T2w")]:
        (tmp_path / sub / "anat").mkdir(parents=True)
        (tmp_path / sub / "anat" / f"{sub}_{suf}.nii.gz").write_bytes(b"")
        if sub != "sub-03":  # no mask -> not a pair
            d = tmp_path / "derivatives" / "labels" / sub / "anat"
            d.mkdir(parents=True)
            (d / f"{sub}_{suf}_seg-manual.nii.gz").write_bytes(b"")
    pairs = ds.pairs_from_bids(tmp_path)
    assert [(p.subject, p.contrast) for p in pairs] == [("sub-01", "T2w"), ("sub-02", "T1w")]
    assert ds.pairs_from_bids(tmp_path, suffixes=["T1w"])[0].subject == "sub-02"


# ------------------------------------------------------------------------------------- losses
def test_losses_zero_at_target_and_positive_elsewhere():
    from cohortseg.training.losses import LOSSES, dice_score

    y = np.zeros((2, 8, 8, 1), np.float32)
    y[:, 2:6, 2:6] = 1.0
    y[:, 2, 2:6] = 0.5  # a soft edge
    from cohortseg.training.train import _np

    for name, fn in LOSSES.items():
        same = float(np.mean(_np(fn(y, y))))
        other = float(np.mean(_np(fn(y, np.full_like(y, 0.3)))))
        assert other > same, name
        if name in ("mse", "adaptive_wing"):
            assert same == pytest.approx(0.0, abs=1e-6), name
    assert dice_score(y, y) == 1.0 and dice_score(y, 1 - y) == 0.0


# ------------------------------------------------------------------------- preprocessing (shared)
@pytest.mark.shared
def test_preprocessing_grid_and_soft_labels(shared_dir):
    spine = shared_dir / "data" / "spine"
    pair = ds.Pair(str(spine / "t2" / "t2.nii.gz"), str(spine / "t2" / "t2_seg-manual.nii.gz"), "s", "T2w")
    vol = ds.load_volume(pair, inplane_mm=1.0, crop=(64, 64), label="soft", soft_sigma_mm=0.5)
    assert vol.x.shape == (55, 64, 64) and vol.y.shape == vol.x.shape  # 55 slices along S-I (PSR axis 1)
    assert abs(float(vol.x[vol.x != vol.x.min()].mean())) < 1.0  # z-scored
    assert 0.0 <= vol.y.min() and vol.y.max() <= 1.0
    soft_vals = vol.y[(vol.y > 0.05) & (vol.y < 0.95)]
    assert soft_vals.size > 100  # partial-volume edge
    # blur + linear resampling preserve the area: the soft label's sum (1 mm grid, 1 mm pixels)
    # equals the native mask's voxel count
    import nibabel as nib

    native = np.asarray(nib.load(pair.mask).dataobj) > 0.5
    assert vol.y.sum() == pytest.approx(native.sum(), rel=0.01)
    assert vol.y_bin.sum() == pytest.approx(native.sum(), rel=0.2)


def _cylinder(path, affine, shape, centre_xy, radius_mm):
    """Binary cylinder along world z on any grid (evaluated at every voxel's world position)."""
    import nibabel as nib

    ijk = np.indices(shape).reshape(3, -1)
    xyz = affine[:3, :3] @ ijk + affine[:3, 3:4]
    inside = np.hypot(xyz[0] - centre_xy[0], xyz[1] - centre_xy[1]) <= radius_mm
    nib.save(nib.Nifti1Image(inside.reshape(shape).astype(np.uint8), affine), str(path))
    return str(path)


def test_consensus_masks_coregister_then_average(tmp_path):
    """Two contrasts of one subject on different grids (RAS and PSR), the second rater's cord 1.5 mm
    to the right and 1 mm back and wider: align_mask finds the shift, and the consensus label of each
    image is the average of its own mask and the other one aligned onto it."""
    import nibabel as nib

    ras = np.eye(4)
    psr = np.array([[0, 0, 1, 0], [-1, 0, 0, 45], [0, 1, 0, 0], [0, 0, 0, 1]], float)  # i->P, j->S, k->R
    a = _cylinder(tmp_path / "a.nii.gz", ras, (40, 40, 30), (20, 20), 4.0)
    b = _cylinder(tmp_path / "b.nii.gz", psr, (46, 30, 40), (21.5, 19.0), 5.0)
    aligned, shift = ds.align_mask(nib.load(b), nib.load(a))
    assert shift[:2] == pytest.approx([-1.5, 1.0], abs=0.15) and shift[2] == pytest.approx(0.0, abs=1e-6)
    own = nib.load(a).get_fdata()
    cy, cx = np.array(np.nonzero(aligned[..., 15] > 0.5)).mean(axis=1)
    assert (cy, cx) == pytest.approx((20.0, 20.0), abs=0.2)  # the wider cord, now concentric
    pairs = [ds.Pair("a_img", a, "s1", "T1w"), ds.Pair("b_img", b, "s1", "T2w"), ds.Pair("c", a, "s2", "T1w")]
    cons = ds.consensus_masks(pairs)
    assert set(cons) == {0, 1}  # subject s2 has a single image: no consensus
    per_slice = cons[0][..., 15].sum()  # 1 mm voxels: mm^2
    assert per_slice == pytest.approx((own[..., 15].sum() + aligned[..., 15].sum()) / 2, rel=1e-6)
    assert per_slice == pytest.approx(np.pi * (16 + 25) / 2, rel=0.06)
    assert 0.0 <= cons[1].min() and cons[1].max() <= 1.0


# ------------------------------------------------------------------------ synthetic (template)
def _fake_template(root, names=("cord", "csf", "levels", "gm", "wm")):
    """A 0.5 mm template stored PSR (not LAS) with FOV centred on world (0, 0): a cord of radius 3 mm
    centred 3 mm to the Left and 2 mm Anterior, a CSF ring out to 4.5 mm, GM the inner 1.5 mm, levels
    7 (inferior half) and 1 (superior half)."""
    import nibabel as nib

    root.mkdir(parents=True, exist_ok=True)
    shape = (40, 30, 40)  # i -> P, j -> S, k -> R
    aff = np.array([[0, 0, 0.5, -9.75], [-0.5, 0, 0, 9.75], [0, 0.5, 0, -7.25], [0, 0, 0, 1]], float)
    xyz = (aff[:3, :3] @ np.indices(shape).reshape(3, -1) + aff[:3, 3:4]).reshape((3,) + shape)
    d = np.hypot(xyz[0] + 3.0, xyz[1] - 2.0)  # Left = -x, Anterior = +y
    maps = {"cord": d <= 3.0, "csf": (d > 3.0) & (d <= 4.5), "gm": d <= 1.5, "wm": (d > 1.5) & (d <= 3.0),
            "levels": np.where(xyz[2] < 0, 7, 1)}
    for n in names:
        nib.save(nib.Nifti1Image(maps[n].astype(np.float32), aff), str(root / f"PAM50_{n}.nii.gz"))
    return root


def test_synthetic_slices_from_template_label_maps(tmp_path):
    from cohortseg.training.synthetic import load_template

    t = load_template({"template": str(_fake_template(tmp_path / "t")), "levels": [1, 7]}, 1.0)
    assert t.cord.shape == t.csf.shape == t.gm.shape == (15, 20, 20)  # 30 x 0.5 mm slices -> 15 at 1 mm
    area = t.cord.sum(axis=(1, 2))  # 1 mm pixels: mm^2
    assert area == pytest.approx(np.full(15, np.pi * 9.0), rel=0.05)  # block averages keep the area
    ci, cj = np.mean([np.array(np.nonzero(s > 0)).T.mean(axis=0) for s in t.cord > 0.5], axis=0)
    assert (ci, cj) == pytest.approx((9.5 + 3.0, 9.5 + 2.0), abs=0.3)  # axis 0 Left, axis 1 Anterior
    rng = np.random.default_rng(3)
    x, y = t.sample(rng, 60, (32, 32))
    assert x.shape == y.shape == (60, 32, 32) and x.dtype == np.float32
    assert 0.0 <= y.min() and y.max() <= 1.0
    assert y.sum(axis=(1, 2)) == pytest.approx(np.full(60, np.pi * 9.0), rel=0.05)  # whole cord in crop
    assert np.abs(x.mean(axis=(1, 2))).max() < 1e-4 and x.std(axis=(1, 2)) == pytest.approx(1.0, abs=1e-3)
    # random contrast: the cord is brighter than the CSF in some slices and darker in others
    brighter = [float(xi[yi > 0.9].mean() > xi[t_ring].mean())
                for xi, yi, t_ring in zip(x, y, _rings(y))]
    assert 0.2 < np.mean(brighter) < 0.8
    x2, y2 = t.sample(np.random.default_rng(3), 60, (32, 32))
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    # levels select the slices: level 1 only = the superior half (+ above_mm, clipped to the FOV)
    top = load_template({"template": str(tmp_path / "t"), "levels": [1, 1], "above_mm": 0}, 1.0)
    assert top.n == 7  # the 15 template slices above world z = 0 -> 7 whole 1 mm blocks
    assert len(t.files) == 5


def _rings(y):
    """Per slice, a ring 1-2 px outside the cord label (where the fake template's CSF is)."""
    from scipy import ndimage

    out = []
    for yi in y:
        m = yi > 0.5
        out.append(ndimage.binary_dilation(m, iterations=2) & ~ndimage.binary_dilation(m, iterations=1))
    return out


def test_synthetic_template_errors(tmp_path):
    from cohortseg.errors import ConfigError
    from cohortseg.training.synthetic import load_template

    part = _fake_template(tmp_path / "part", names=("cord", "levels"))
    with pytest.raises(ConfigError, match="PAM50_csf"):
        load_template({"template": str(part)}, 1.0)
    full = _fake_template(tmp_path / "full")
    with pytest.raises(ConfigError, match="whole multiple"):
        load_template({"template": str(full)}, 0.75)
    with pytest.raises(ConfigError, match="fraction"):
        load_template({"template": str(full), "fraction": 1.0}, 1.0)
    with pytest.raises(ConfigError, match="levels 9-12"):
        load_template({"template": str(full), "levels": [9, 12]}, 1.0)
    from cohortseg.training.train import merge_config

    with pytest.raises(ConfigError, match="fracton"):
        merge_config({"data": {"items": []}, "synthetic": {"template": str(full), "fracton": 0.3}})
    with pytest.raises(ConfigError, match="template"):
        merge_config({"data": {"items": []}, "synthetic": {"fraction": 0.3}})
    # GM/WM are optional: without them the cord is one class
    nogm = _fake_template(tmp_path / "nogm", names=("cord", "csf", "levels"))
    t = load_template({"template": str(nogm)}, 1.0)
    assert t.gm is None and t.sample(np.random.default_rng(0), 2, (24, 24))[0].shape == (2, 24, 24)


# ------------------------------------------------------------------------- CI-sized training run
def _ci_config() -> dict:
    cfg = yaml.safe_load(RECIPE.read_text())
    for key, val in CI_OVERRIDES.items():
        cfg[key] = {**cfg.get(key, {}), **val}
    return cfg


@pytest.fixture(scope="module")
def ci_bundle(shared_dir, tmp_path_factory):
    from cohortseg.training import train_bundle

    out = tmp_path_factory.mktemp("bundle") / "sc_csa_ci"
    return train_bundle(_ci_config(), out, progress=lambda m: None)


@pytest.mark.shared
@pytest.mark.slow
def test_ci_training_writes_valid_bundle(ci_bundle):
    from cohortseg.io import sha256sum
    from cohortseg.training.bundle import verify_bundle

    path = ci_bundle
    card = yaml.safe_load((path / "card.yaml").read_text())
    assert card["pipeline"] == "sc_csa" and card["architecture"]["loader"] == "keras_full"
    assert card["normalisation"]["method"] == "zscore_volume"
    assert card["grid"]["inplane_mm"] == 1.0 and card["grid"]["crop"] == [64, 64]
    assert card["thresholds"]["mask"] == 0.5 and card["labels"] == {1: "SC"}
    assert set(card["contrasts"]) == {"T1w", "T2w"}
    assert card["training"]["seed"] == _ci_config()["seed"]
    assert len(card["folds"]) == 2
    for f in card["folds"]:
        assert sha256sum(path / f["file"]) == f["sha256"]
    verify_bundle(path)  # schema + checksums
    rep = json.loads((path / "cv_report.json").read_text())
    assert len(rep["folds"]) == 2
    for f in rep["folds"]:
        # the fold's figure is its held-out volume's, and a trained cord model's: an empty or a
        # random prediction (Dice ~0, cord ~1 % of the crop) or a constant one fails the bound
        assert f["held_out"] and all("dice" in h and "contrast" in h for h in f["held_out"])
        assert f["dice"] == pytest.approx(np.mean([h["dice"] for h in f["held_out"]]), abs=1e-4)
        assert f["dice"] > CI_MIN_DICE, rep["summary"]
    assert set(rep["leave_one_contrast_out"]) == {"T1w", "T2w"}
    # each fold trains and evaluates the ensemble that ships (final.models = 2 models, averaged)
    assert all(f["models"] == 2 and len(f["members"]) == 2 for f in rep["folds"])
    # every member has its own held-out Dice (single CI models can sit at the floor: only the
    # ensemble, what ships, is bounded above)
    assert all(len(m["dice"]) == 1 and m["best_epoch"] >= 1 for f in rep["folds"] for m in f["members"])
    # synthetic PAM50 slices were mixed in, with the template files' checksums as provenance
    assert rep["synthetic"]["fraction"] == 0.5 and rep["synthetic"]["template_slices"] > 100
    syn = card["training"]["synthetic"]["files_sha256"]
    assert set(syn) >= {"PAM50_cord.nii.gz", "PAM50_csf.nii.gz", "PAM50_levels.nii.gz"}
    assert syn["PAM50_cord.nii.gz"] == sha256sum(Path(rep["synthetic"]["template"]) / "PAM50_cord.nii.gz")
    # the held-out slices inside the training images' S-I extent (geometry only, model-independent):
    # the T2w covers world S-I -19.3..34.7 mm, 55 of the T1w's 77 slices; the T1w covers all the T2w
    held = {h["contrast"]: h for f in rep["folds"] for h in f["held_out"]}
    assert held["T1w"]["trained_si_mm"] == [-19.3, 34.7]
    assert (held["T1w"]["n_slices_in_trained_si"], held["T1w"]["n_slices"]) == (55, 77)
    assert held["T2w"]["n_slices_in_trained_si"] == held["T2w"]["n_slices"] == 55
    # every T2w slice lies inside the T1w's extent: its Dice there is its Dice
    assert held["T2w"]["dice_in_trained_si"] == held["T2w"]["dice"]
    assert held["T1w"]["dice_in_trained_si"] > CI_MIN_DICE
    # the shipped folds are the final models (all data, consensus labels); CV models are not shipped
    finals = rep["final_models"]["models"]
    assert [m["file"] for m in finals] == [f["file"] for f in card["folds"]] == ["fold_0.keras", "fold_1.keras"]
    assert all(m["consensus_labels"] and len(m["in_sample"]) == 2 for m in finals)
    assert all(f["params"]["trained_on"] == "all" for f in card["folds"])
    assert not list(path.glob("cv_*.keras"))
    png = (path / "learning_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


@pytest.mark.shared
@pytest.mark.slow
def test_reloaded_fold_predicts_grid_shape(ci_bundle):
    import keras

    path = ci_bundle
    card = yaml.safe_load((path / "card.yaml").read_text())
    model = keras.models.load_model(str(path / card["folds"][0]["file"]), compile=False)
    h, w = card["grid"]["crop"]
    x = np.random.default_rng(0).normal(size=(3, h, w, 1)).astype(np.float32)
    p = np.asarray(model.predict(x, verbose=0))
    assert p.shape == (3, h, w, 1)
    assert 0.0 <= p.min() and p.max() <= 1.0
    # the generic loader used by the workflow reads it too
    from cohortseg.models.loaders import loader

    m2 = loader("keras_full")(path / card["folds"][1]["file"], card, card["folds"][1], [])
    assert np.asarray(m2.predict(x, verbose=0)).shape == (3, h, w, 1)


@pytest.mark.shared
@pytest.mark.slow
def test_fine_tune_from_bundle_and_determinism(ci_bundle, shared_dir, tmp_path):
    """Fine-tuning starts from the bundle's fold weights; two identical runs give identical weights."""
    import keras

    from cohortseg.training import train as tr

    path = ci_bundle
    cfg = tr.merge_config({**_ci_config(), "init_from": str(path),
                           "train": {**_ci_config()["train"], "epochs": 1, "slices_per_epoch": 16}})
    tr.setup_tf(cfg["threads"])
    pairs = ds.pairs_from_config(cfg["data"])
    vols = [ds.load_volume(p, 1.0, (64, 64), cfg["label"]["type"]) for p in pairs]
    sel = [(1, np.arange(10, 40))]
    val = [(1, np.arange(45, 55))]
    m1, h1, init = tr.train_fold(cfg, 0, vols, sel, val)
    m2, h2, _ = tr.train_fold(cfg, 0, vols, sel, val)
    assert init["sha256"] == yaml.safe_load((path / "card.yaml").read_text())["folds"][0]["sha256"]
    for a, b in zip(m1.get_weights(), m2.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert h1["loss"] == h2["loss"]
    start = keras.models.load_model(str(path / "fold_0.keras"), compile=False)
    assert [w.shape for w in start.get_weights()] == [w.shape for w in m1.get_weights()]


def test_committed_bundle_is_what_its_report_describes():
    """The shipped sc_csa bundle verifies (checksums) and its CV report (written by the recipe,
    docs/TRAINING.md) describes exactly what it ships: the CV ensemble has as many models as the
    bundle, the final models are the card's fold files, both contrasts were held out. (The shipped
    models' accuracy is measured, not read from the report: tests/test_pipeline_csa.py runs them
    through the workflow against the manual masks.)"""
    from cohortseg.training.bundle import verify_bundle

    bundle = REPO / "config" / "models" / "sc_csa"
    card = verify_bundle(bundle)
    rep = json.loads((bundle / "cv_report.json").read_text())
    loco = rep["leave_one_contrast_out"]
    assert set(loco) == {"T1w", "T2w"}
    assert all(f["models"] == len(card["folds"]) == 2 for f in rep["folds"])  # CV ensemble = shipped one
    assert rep["synthetic"]["template_slices"] > 0
    assert [m["file"] for m in rep["final_models"]["models"]] == [f["file"] for f in card["folds"]]


@pytest.mark.shared
@pytest.mark.slow
def test_without_final_models_every_cv_model_ships(shared_dir, tmp_path):
    """final.models 0 + models_per_fold 2: the bundle ships the four CV models (two per held-out
    contrast), named in the report's members; binary labels with synthetic slices (fake template)."""
    from cohortseg.training import train_bundle
    from cohortseg.training.bundle import verify_bundle

    cfg = _ci_config()
    cfg.update(final={"models": 0}, split={**cfg["split"], "models_per_fold": 2},
               label={"type": "binary"}, synthetic={"template": str(_fake_template(tmp_path / "t")), "fraction": 0.25})
    cfg["train"] = {**cfg["train"], "epochs": 1, "slices_per_epoch": 16}
    path = train_bundle(cfg, tmp_path / "b", progress=lambda m: None)
    card = verify_bundle(path)
    rep = json.loads((path / "cv_report.json").read_text())
    files = [m["file"] for f in rep["folds"] for m in f["members"]]
    assert files == [f["file"] for f in card["folds"]] == [f"fold_{i}.keras" for i in range(4)]
    assert [f["params"]["test_groups"] for f in card["folds"]] == [["T2w"], ["T2w"], ["T1w"], ["T1w"]]
    assert "final_models" not in rep and rep["synthetic"]["fraction"] == 0.25
    assert rep["synthetic"]["template_slices"] == 15
