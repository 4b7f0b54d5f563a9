"""3D fine-tuning of a brainchop MeshNet to the CEREBRUM-7T protocol (cohortseg.training.brain3d).

Unit checks (no ../shared): the classifier's merge/add initialisation, the pretrained net's class
mapping, the 3D deformations, the label renderer. Real-data checks (``shared``): CEREBRUM-7T's Dice
computed from the shared prediction files against the issue's table, the label identities from
the anatomy, and the CI-sized recipe (config/train/brain_tissue_7t_ci.yaml): 4 leave-one-subject-out
folds, a bundle that brain_tissue accepts and whose TF.js folds load with the tfjs_layers loader.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CI_RECIPE = REPO / "config" / "train" / "brain_tissue_7t_ci.yaml"
RECIPE = REPO / "config" / "train" / "brain_tissue_7t.yaml"
DATA = "data/brain/cerebrum7t-schneider19"


def _protocol():
    return yaml.safe_load(RECIPE.read_text())["protocol"]


# the protocol from brainchop_gw's classes (background, White Matter, Grey Matter): the unit tests'
# small source net (model5_gw_ae, 5 channels)
GW_PROTOCOL = {1: {"name": "Grey Matter", "data": [1], "from": ["Grey Matter"]},
               2: {"name": "CSF", "data": [2], "from": []},
               3: {"name": "White Matter", "data": [3], "from": ["White Matter"]},
               4: {"name": "Ventricles", "data": [4], "from": []},
               5: {"name": "Subcortical", "data": [5], "from": ["Grey Matter", "White Matter"]},
               6: {"name": "Vessels", "data": [6], "from": []}}


def test_head_init_copies_merges_and_adds_classes():
    from cohortseg.training.brain3d import baseline_map, head_init

    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(1, 1, 1, 5, 3)).astype(np.float32)
    bias = np.array([0.5, -0.2, 0.3], np.float32)
    src = {0: "background", 1: "White Matter", 2: "Grey Matter"}
    w, b = head_init(kernel, bias, src, GW_PROTOCOL, rng, noise=0.0)
    assert w.shape == (1, 1, 1, 5, 7) and b.shape == (7,)
    np.testing.assert_array_equal(w[..., 0], kernel[..., 0])   # background
    np.testing.assert_array_equal(w[..., 1], kernel[..., 2])   # GM <- Grey Matter
    np.testing.assert_array_equal(w[..., 3], kernel[..., 1])   # WM <- White Matter
    np.testing.assert_allclose(w[..., 5], kernel[..., 1:].mean(axis=-1))  # subcortical: merged
    assert b[5] == pytest.approx(bias[1:].mean() + np.log(2))
    for added in (2, 4, 6):  # CSF, ventricles, vessels: the background's channel, biased down (3 added)
        np.testing.assert_array_equal(w[..., added], kernel[..., 0])
        assert b[added] == pytest.approx(bias[0] - np.log(4))
    # the pretrained net's figures: GM and WM start GM and WM alone (and are merged into subcortical)
    assert baseline_map(src, GW_PROTOCOL) == {2: 1, 1: 3}
    # a merge no other class shares maps all its sources; a class merged only where shared gets none
    src18 = {0: "Unknown", 1: "Cerebral-White-Matter", 2: "Cerebral-Cortex", 3: "Lateral-Ventricle",
             11: "3rd-Ventricle", 13: "Brain-Stem"}
    p18 = {1: {"from": ["Cerebral-Cortex"]}, 3: {"from": ["Cerebral-White-Matter", "Brain-Stem"]},
           4: {"from": ["Lateral-Ventricle", "3rd-Ventricle"]}, 5: {"from": ["Brain-Stem", "Cerebral-Cortex"]},
           2: {"from": []}}
    assert baseline_map(src18, p18) == {2: 1, 1: 3, 3: 4, 11: 4}
    from cohortseg.errors import ConfigError

    with pytest.raises(ConfigError, match="not in the pretrained card's labels"):
        head_init(kernel, bias, src, {1: {"name": "x", "data": [1], "from": ["Cortex"]}}, rng)


def test_warp3d_identity_shift_and_label_values():
    from cohortseg.training.augment import draw_warp3d, warp_labels

    rng = np.random.default_rng(1)
    lab = rng.integers(0, 7, size=(20, 22, 24)).astype(np.int8)
    ident = draw_warp3d(lab.shape, rng, translate_vox=0, rotate_deg=0, elastic_vox=0)
    np.testing.assert_array_equal(warp_labels(lab, ident.coords((0, 0, 0), lab.shape)), lab)
    # a box of the identity warp is that box of the volume
    np.testing.assert_array_equal(warp_labels(lab, ident.coords((3, 4, 5), (6, 6, 6))), lab[3:9, 4:10, 5:11])
    w = draw_warp3d(lab.shape, np.random.default_rng(2), translate_vox=4, rotate_deg=10, elastic_vox=2)
    out = warp_labels(lab, w.coords((0, 0, 0), lab.shape))
    assert set(np.unique(out)) <= set(range(7)) and out.dtype == lab.dtype  # nearest: labels stay labels
    assert not np.array_equal(out, lab)
    w2 = draw_warp3d(lab.shape, np.random.default_rng(2), translate_vox=4, rotate_deg=10, elastic_vox=2)
    np.testing.assert_array_equal(w2.coords((0, 0, 0), (4, 4, 4)), w.coords((0, 0, 0), (4, 4, 4)))  # seeded


def test_class_balanced_patches_centre_rare_classes():
    """class_balance 1: every patch is centred on a voxel of a class drawn uniformly, so a class of
    8 voxels in 48^3 (0.007 %) is in about a third of the patches (3 classes); class_balance 0: the
    boxes lie anywhere and rarely meet it."""
    from cohortseg.training import brain3d as b3
    from cohortseg.training.augment import draw_warp3d

    lab = np.zeros((48, 48, 48), np.int8)
    lab[4:44, 4:44, 4:44] = 1
    lab[4:44, 4:44, 30:44] = 3
    lab[40:42, 6:8, 6:8] = 2                       # the rare class, in a corner
    subj = b3.Subject("toy", "", lab, np.eye(4))
    ident = draw_warp3d(lab.shape, np.random.default_rng(0), translate_vox=0, rotate_deg=0, elastic_vox=0)
    synth = {"sd_max": 0.0, "blur_max": 0.0, "bias_sd": 0.0, "noise_max": 0.0, "gain": [1, 1]}
    rng = np.random.default_rng(3)
    hits = [(b3.training_patch(subj, ident, rng, 12, 4, synth, class_balance=1.0)[1] == 2).any() for _ in range(300)]
    assert 0.25 < np.mean(hits) < 0.42
    rng = np.random.default_rng(3)
    hits = [(b3.training_patch(subj, ident, rng, 12, 4, synth)[1] == 2).any() for _ in range(300)]
    assert np.mean(hits) < 0.1


def test_render_labels_background_zero_and_classes_separate():
    from cohortseg.training.synthetic import render_labels

    lab = np.zeros((30, 30, 30), np.int8)
    lab[5:15], lab[15:25] = 1, 2
    img = render_labels(lab, 3, np.random.default_rng(0), means={1: 0.2, 2: 0.8}, blur_max=0.0,
                        bias_sd=0.0, noise_max=0.0, sd_max=0.0)
    assert (img[lab == 0] == 0).all()  # brain-masked
    np.testing.assert_allclose(img[lab == 1], 0.2, atol=1e-6)
    np.testing.assert_allclose(img[lab == 2], 0.8, atol=1e-6)


def test_synthesised_contrasts_jitter_around_the_t1_means():
    """synth.means + mean_jitter: every image's class means lie within +-jitter of the T1-like
    means (the evaluation's first image exactly on them); means null: any contrast."""
    from cohortseg.training import brain3d as b3

    lab = np.zeros((20, 20, 20), np.int8)
    lab[2:9], lab[9:18] = 1, 2
    scfg = {"means": {1: 0.3, 2: 0.8}, "mean_jitter": 0.1, "sd_max": 0.0, "blur_max": 0.0, "bias_sd": 0.0,
            "noise_max": 0.0, "gain": [1, 1]}
    rng = np.random.default_rng(5)
    drawn = np.array([[m[1], m[2]] for m in (b3.contrast_means(scfg, 3, rng) for _ in range(400))])
    assert (np.abs(drawn - [0.3, 0.8]) <= 0.1 + 1e-9).all() and drawn.std(axis=0).min() > 0.05
    assert b3.contrast_means(scfg, 3, rng, exact=True) == {1: 0.3, 2: 0.8}
    assert b3.contrast_means({**scfg, "means": None}, 3, rng) is None
    img = b3.synth_image(lab, 3, rng, scfg, exact=True)  # scaled so the brightest class is 1
    np.testing.assert_allclose(img[lab == 1], 0.3 / 0.8, atol=1e-5)
    assert (img[lab == 0] == 0).all()


def test_recipe_keys_are_checked():
    """A misspelt key is refused, not silently replaced by its default."""
    from cohortseg.errors import ConfigError
    from cohortseg.training import brain3d as b3

    cfg = yaml.safe_load(CI_RECIPE.read_text())
    assert b3.merge_config(cfg)["train"]["epochs"] == 2
    for bad in ({"train": {**cfg["train"], "epoch": 9}}, {"synth": {"mean_jiter": 0.1}}, {"augmentation": {}}):
        with pytest.raises(ConfigError, match="unknown keys"):
            b3.merge_config({**cfg, **bad})
    # the defaults are the full recipe's schedule and augmentation (one set of values, not two)
    full = yaml.safe_load((REPO / "config" / "train" / "brain_tissue_7t.yaml").read_text())
    for section in ("train", "augment", "init_from"):
        assert full[section] == b3.DEFAULTS[section], section


# ----------------------------------------------------------------------------- real label maps
@pytest.mark.shared
def test_cerebrum7t_dice_from_the_shared_predictions(shared_dir):
    """CEREBRUM-7T's Dice vs the manual labels, computed from the files: the issue's table."""
    from cohortseg.training.brain3d import reference_dice

    d = shared_dir / DATA
    got = reference_dice(str(d / "sub-001_manual.nii.gz"), str(d / "sub-001_CEREBRUM7T.nii.gz"), _protocol())
    assert [got[str(k)] for k in range(1, 7)] == pytest.approx([0.899, 0.873, 0.938, 0.916, 0.929, 0.528], abs=6e-4)
    got = reference_dice(str(d / "sub-019_manual.nii.gz"), str(d / "sub-019_CEREBRUM7T.nii.gz"), _protocol())
    assert got["6"] == pytest.approx(0.316, abs=6e-4) and got["2"] == pytest.approx(0.888, abs=6e-4)


@pytest.mark.shared
def test_label_identities_from_the_anatomy(shared_dir):
    """docs/TRAINING.md's identification of the dataset's labels, on sub-001: 2 (CSF) makes most of
    the brain's outer surface; 1 (GM) lies between CSF and WM; 3 (WM) touches almost only GM; 4
    (ventricles) is small and touches mostly 5 (subcortical), the thickest class and the lowest
    (brainstem, cerebellum); 6 (vessels) is the smallest, in hundreds of pieces."""
    import nibabel as nib
    from scipy import ndimage

    lab = np.asarray(nib.load(shared_dir / DATA / "sub-001_manual.nii.gz").dataobj).astype(np.int64)
    contact = np.zeros((7, 7), np.int64)
    for ax in range(3):
        a, b = np.take(lab, range(lab.shape[ax] - 1), axis=ax), np.take(lab, range(1, lab.shape[ax]), axis=ax)
        contact += np.bincount((a * 7 + b).ravel(), minlength=49).reshape(7, 7)
    contact = contact + contact.T
    np.fill_diagonal(contact, 0)
    share = contact / contact.sum(axis=1, keepdims=True)
    assert share[0].argmax() == 2                        # the outer surface is CSF
    assert share[1, 2] > 0.3 and share[1, 3] > 0.3       # GM between CSF and WM
    assert share[3, 1] > 0.9                             # WM is wrapped in GM
    assert share[4].argmax() == 5                        # ventricles beside the deep grey matter
    sizes = np.bincount(lab.ravel(), minlength=7)
    assert sizes[1:].argmin() + 1 == 6 and ndimage.label(lab == 6)[1] > 100
    z = [np.nonzero(lab == c)[2].mean() for c in range(1, 7)]
    assert int(np.argmin(z)) + 1 == 5                    # subcortical reaches down to the cerebellum


@pytest.fixture(scope="module")
def ci_bundle_3d(shared_dir, tmp_path_factory):
    from cohortseg.training import load_config, train_bundle

    out = tmp_path_factory.mktemp("bundle3d") / "brain_tissue_7t_ci"
    return train_bundle(load_config(CI_RECIPE), out, progress=lambda m: None)


@pytest.mark.shared
@pytest.mark.slow
def test_ci_recipe_four_folds_and_a_bundle_brain_tissue_runs(ci_bundle_3d, shared_dir):
    from cohortseg.models.cards import find_card
    from cohortseg.models.loaders import build
    from cohortseg.models.store import ModelStore
    from cohortseg.pipelines.brain_tissue import card_roles
    from cohortseg.training.bundle import verify_bundle

    path = ci_bundle_3d
    card = verify_bundle(path)  # schema + checksums of model.json and weights.bin
    rep = json.loads((path / "cv_report.json").read_text())
    subjects = ["sub-001", "sub-013", "sub-014", "sub-019"]
    assert [f["held_out"] for f in rep["folds"]] == subjects
    assert all(sorted(f["train_groups"] + [f["held_out"]]) == subjects for f in rep["folds"])
    classes = [str(c) for c in range(1, 7)]
    assert list(rep["classes"]) == classes
    for f in rep["folds"]:
        assert list(f["dice"]) == classes and len(f["contrasts"]) == 2
        # the pretrained net (18 aseg classes) has a figure for every class made of source classes
        assert [c for c, v in f["pretrained_dice"].items() if v is not None] == ["1", "3", "4", "5"]
    # CEREBRUM-7T's figure for the held-out subject comes from the shared files (issue's table)
    assert rep["folds"][0]["reference_dice"]["1"] == pytest.approx(0.899, abs=6e-4)
    # (whether training learns is test_fine_tuning_learns_an_added_class: 12 CI steps on random
    # contrasts leave the folds near their initialisation)
    assert all(len(h) == 2 for h in [f["contrasts"] for f in rep["folds"]])
    # the bundle as brain_tissue takes it: aseg role beside the brain-mask card, labels from the card
    mindgrab = find_card("brainchop_mindgrab")
    bundle = find_card(str(path))
    roles = card_roles([mindgrab, bundle])
    assert roles["aseg"][0] == 1 and roles["aseg"][1].labels == tuple(card["labels"][k] for k in range(7))
    assert bundle["normalisation"]["brain_masked"] is True
    fold = ModelStore(shared_dir / "models", cache_file=str(path.parent / "v.json")).resolve(bundle)[0]
    model = build(bundle, fold)
    x = np.random.default_rng(0).random((1, 24, 24, 24, 1)).astype(np.float32)
    assert np.asarray(model(x)).shape == (1, 24, 24, 24, 7)
    png = (path / "learning_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert card["training"]["init_from"]["card"] == "brainchop_subcortical" and len(card["folds"]) == 4


@pytest.mark.shared
@pytest.mark.slow
def test_fine_tuning_learns_an_added_class(shared_dir):
    """The trainer learns: toy brains (WM ball in a GM shell in a CSF shell, 40^3), CSF an added
    class. Untrained, the added class's channel (the background's, biased down) never wins inside
    the brain: CSF Dice 0. After 8 probe steps and 32 fine-tuning steps of 32^3 patches on the CI
    recipe's MP2RAGE-like contrasts the held-out toy's CSF (T1-like contrast) is found (measured 0.89)."""
    from cohortseg.training import brain3d as b3
    from cohortseg.training.train import setup_tf

    cfg = yaml.safe_load(CI_RECIPE.read_text())
    cfg["augment"]["copies"] = 4
    cfg["train"].update(probe_epochs=1, epochs=4, patch=32, loss_margin=4, learning_rate=0.001)
    cfg["eval"].update(contrasts=1, box=None)
    cfg["synth"]["gain"] = [1, 1]
    cfg = b3.merge_config(cfg)
    setup_tf(2)
    source = b3.source_net(cfg["init_from"])
    g = np.sqrt(((np.indices((40, 40, 40)) - 19.5) ** 2).sum(axis=0))

    def toy(r0, name):
        lab = np.zeros((40, 40, 40), np.int8)
        lab[g < r0 + 6], lab[g < r0 + 3], lab[g < r0] = 2, 1, 3
        return b3.Subject(name, "", lab, np.eye(4))

    subjects = [toy(8, "a"), toy(10, "b"), toy(9, "c")]
    untrained, _ = b3.train_fold({**cfg, "train": {**cfg["train"], "epochs": 0, "probe_epochs": 0}}, 0, subjects,
                                 [0, 1], source)
    assert b3.evaluate_fold(cfg, 0, untrained, source, subjects[2])["dice"]["2"] == 0.0
    model, hist = b3.train_fold(cfg, 0, subjects, [0, 1], source)
    assert hist["epochs_run"] == 5 and hist["probe_epochs"] == 1 and hist["loss"][-1] < hist["loss"][0]
    got = b3.evaluate_fold(cfg, 0, model, source, subjects[2])["dice"]["2"]
    assert got > 0.4


@pytest.mark.shared
def test_tfjs_export_round_trip(shared_dir, tmp_path):
    """The fine-tuned net written as a TF.js layers-model reads back with the project's TF.js loader
    and computes the same thing."""
    from cohortseg.models.nets.tfjs import load_tfjs_layers_model
    from cohortseg.training.brain3d import build_finetune_net, write_tfjs

    src_dir = shared_dir / "models" / "brainchop" / "model5_gw_ae"
    src = load_tfjs_layers_model(src_dir)
    for lay in src.layers:  # as brainchop ships model30chan18cls: frozen
        lay.trainable = False
    before = [np.asarray(w).copy() for w in src.get_weights()]
    model = build_finetune_net(src, {0: "background", 1: "White Matter", 2: "Grey Matter"}, GW_PROTOCOL,
                               np.random.default_rng(0))
    assert len(model.trainable_weights) == len(model.weights) == len(src.weights)
    import keras
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.train_on_batch(np.ones((1, 12, 12, 12, 1), np.float32), np.zeros((1, 12, 12, 12, 7), np.float32))
    # training the copy leaves the source net (shared by every fold and the pretrained figures) alone
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, src.get_weights()))
    assert not np.array_equal(before[0], np.asarray(model.get_weights()[0]))
    src = load_tfjs_layers_model(src_dir)
    model = build_finetune_net(src, {0: "background", 1: "White Matter", 2: "Grey Matter"}, GW_PROTOCOL,
                               np.random.default_rng(0))
    write_tfjs(model, src_dir, tmp_path / "fold_0")
    back = load_tfjs_layers_model(tmp_path / "fold_0")
    x = np.random.default_rng(1).random((1, 20, 20, 20, 1)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(back(x)), np.asarray(model(x)), atol=1e-5)
    # the classes kept from the source net keep its logits (GM = source channel 2, WM = 1)
    ref = np.asarray(src(x))
    np.testing.assert_allclose(np.asarray(model(x))[..., [0, 1, 3]], ref[..., [0, 2, 1]], atol=1e-5)
