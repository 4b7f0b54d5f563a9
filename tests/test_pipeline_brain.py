"""The `brain_tissue` pipeline (cohortseg.pipelines.brain_tissue).

* Glue with stand-in nets (1x1x1 convolutions thresholding the normalised intensity, no ../shared): a
  synthetic head of nested balls (WM, GM, CSF) on an oblique-free 1.5 mm grid goes through prepare ->
  predict -> finalize; the volumes are the balls' and the outputs compact / on the native grid.
* The cards: schema, checksums in ../shared, labels = brainchop's colormaps = cohortseg.science.brain's tables.
* End to end (``shared``, ``slow``): the real Snakefile with the three real MeshNets on brainchop's
  t1_crop (sub-01, already conformed) and the same head moved to a 1.2 mm RAS grid in scanner units
  (sub-02). The MNI152 Dice of the GM/WM net is tests/test_brain.py's job, not repeated here.
"""
from __future__ import annotations

import json
import math
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from cohortseg.models.cards import find_card
from cohortseg.errors import InputError, ModelError
from cohortseg.pipelines import get_pipeline
from cohortseg.pipelines.base import Context, Item, OutputWriter, Predicted, Prepared
from cohortseg.pipelines.brain_tissue import conformed_volume
from helpers import assert_bids_valid, output_path, snakemake, write_config

CARDS = ["brainchop_mindgrab", "brainchop_gw", "brainchop_subcortical"]


# ----------------------------------------------------------------------------------------------
# stand-ins
# ----------------------------------------------------------------------------------------------
def _linear_net(w, b):
    """A 1x1x1 conv: logits_c = w_c * x + b_c (x = the normalised intensity)."""
    import keras

    inp = keras.Input((None, None, None, 1))
    conv = keras.layers.Conv3D(len(w), 1)
    model = keras.Model(inp, conv(inp))
    conv.set_weights([np.asarray(w, np.float32).reshape(1, 1, 1, 1, -1), np.asarray(b, np.float32)])
    return model


def _stand_in_models():
    # normalised levels after conform: WM 1.0, GM 0.5, CSF 0.15, outside 0; boundaries half-way
    mask = _linear_net([0, 40], [0, -3])  # brain where x > 0.075
    gw = _linear_net([0, 80, 40], [0, -43, -13])  # channels bg, WM (x > 0.75), GM (0.325 < x < 0.75)
    k, b = np.zeros(18), np.zeros(18)
    k[3], b[3] = 40, -3  # everything in the head is "Lateral-Ventricle"
    return [[mask], [gw], [_linear_net(k, b)]]


R_WM, R_GM, R_CSF = 45.0, 60.0, 67.5  # a head-sized ball (1.29 L): passes the anatomy checks


def _ball_head(path, zoom=1.5, shape=(120, 130, 110)):
    aff = np.diag([zoom, zoom, zoom, 1.0])
    centre = np.array([4.0, -6.0, 3.0])
    aff[:3, 3] = -np.array(shape) * zoom / 2 + centre
    xyz = np.indices(shape).reshape(3, -1).T * zoom + aff[:3, 3]
    r = np.linalg.norm(xyz - centre, axis=1).reshape(shape)
    data = np.select([r <= R_WM, r <= R_GM, r <= R_CSF], [1000, 500, 150], 0).astype(np.int16)
    nib.save(nib.Nifti1Image(data, aff), str(path))
    return path


def _ball(r):
    return 4 / 3 * math.pi * r ** 3 / 1000.0


@pytest.fixture(scope="module")
def cards():
    return [find_card(n) for n in CARDS]


@pytest.fixture(scope="module")
def glue(tmp_path_factory, cards):
    tmp = tmp_path_factory.mktemp("glue")
    item = Item("sub-01", "", "brain_tissue", "sub-01_T1w", {"image": str(_ball_head(tmp / "sub-01_T1w.nii.gz"))})
    p = get_pipeline("brain_tissue")
    cfg = {"wm_target": None, "etiv": False, "brain_mask_range_ml": [700, 2200]}
    prep = p.prepare(item, cards, cfg, Context())
    prep.save(tmp / "prep.npz")
    prep = Prepared.load(tmp / "prep.npz")
    arrays = p.predict(_stand_in_models(), prep, cards, cfg, 1)
    arrays.save(tmp / "prob.npz")
    stored = Predicted.load(tmp / "prob.npz")
    out = OutputWriter(tmp / "out", item)
    metrics = p.finalize(item, prep, stored, cards, cfg, Context(), out)
    return {"item": item, "prep": prep, "arrays": arrays.arrays, "metrics": metrics, "out": out}


# ----------------------------------------------------------------------------------------------
# glue (no ../shared)
# ----------------------------------------------------------------------------------------------
def test_prepare_conforms_and_stores_a_compact_uint8_box(glue):
    prep = glue["prep"]
    assert prep.x.dtype == np.uint8 and prep.x.ndim == 5 and prep.x.nbytes < 3_000_000  # the head's box
    info = prep.meta["conform"]
    assert info["conformed_shape"] == [256] * 3 and info["native_orientation"] == "RAS"
    assert "".join(nib.aff2axcodes(np.asarray(info["conformed_affine"]))) == "LIA"
    json.dumps(prep.meta)  # JSON-able


def test_predict_returns_compact_arrays(glue):
    a = glue["arrays"]
    assert {"box", "brain_mask", "tissue", "aseg", "prob_gm", "prob_wm", "info"} <= set(a)
    for k in ("brain_mask", "tissue", "aseg"):
        assert a[k].dtype == np.uint8 and a[k].shape == a["brain_mask"].shape
    for k in ("prob_gm", "prob_wm"):
        assert a[k].dtype == np.float16 and float(a[k].max()) <= 1.0
    lo, hi = a["box"][:3], a["box"][3:]
    assert tuple(hi - lo) == a["brain_mask"].shape and a["brain_mask"].shape[0] < 150  # the brain box, not 256^3
    assert sum(v.nbytes for v in a.values()) < 7.1 * a["brain_mask"].size  # 3 uint8 + 2 float16 maps of the box
    assert json.loads(str(a["info"]))["models"]["aseg"] == "brainchop_subcortical"


def test_volumes_are_the_balls(glue):
    m = glue["metrics"]
    assert m["brain_mask_ml"] == pytest.approx(_ball(R_CSF), rel=0.02)
    assert m["wm_ml"] == pytest.approx(_ball(R_WM), rel=0.03)
    assert m["gm_ml"] == pytest.approx(_ball(R_GM) - _ball(R_WM), rel=0.03)
    assert m["csf_ml"] == pytest.approx(m["brain_mask_ml"] - m["brain_ml"], abs=0.01)
    assert m["ventricles_ml"] == pytest.approx(m["aseg_lateral_ventricle_ml"]) == pytest.approx(m["brain_mask_ml"], rel=0.01)
    assert len([k for k in m if k.startswith("aseg_")]) == 17 and "etiv_ml" not in m
    assert glue["out"].flags == []
    # the anatomy checks, before the nets (field of view, head) and after the brain mask
    head = glue["prep"].meta["checks"]["head"]
    assert head["fov_mm"] == [180.0, 195.0, 165.0] and min(head["head_mm"][:2]) >= 120
    assert glue["out"].checks["brain_mask"] == {"volume_ml": pytest.approx(_ball(R_CSF), rel=0.02), "sides_touched": ""}


def test_outputs_on_the_native_grid(glue):
    out, item = glue["out"], glue["item"]
    native = nib.load(item.inputs["image"])
    for key in ("desc-brain_mask.nii.gz", "dseg.nii.gz", "desc-aseg_dseg.nii.gz", "label-GM_probseg.nii.gz",
                "label-WM_probseg.nii.gz"):
        img = nib.load(out.files[key])
        assert img.shape == native.shape and np.allclose(img.affine, native.affine), key
    vox = 1.5 ** 3 / 1000
    dseg = np.asarray(nib.load(out.files["dseg.nii.gz"]).dataobj)
    mask = np.asarray(nib.load(out.files["desc-brain_mask.nii.gz"]).dataobj) > 0
    assert np.array_equal(dseg > 0, mask)  # GM + WM + CSF = the mask, also after resampling
    assert (dseg == 2).sum() * vox == pytest.approx(glue["metrics"]["wm_ml"], rel=0.03)
    pgm = nib.load(out.files["label-GM_probseg.nii.gz"]).get_fdata()
    assert pgm.min() >= 0 and pgm.max() <= 1 and pgm.sum() * vox == pytest.approx(glue["metrics"]["gm_ml"], rel=0.05)
    tsv = pd.read_csv(out.files["dseg.tsv"], sep="\t")
    assert tsv["name"].tolist() == ["background", "GM", "WM", "CSF"]
    aseg_tsv = pd.read_csv(out.files["desc-aseg_dseg.tsv"], sep="\t")
    assert len(aseg_tsv) == 18 and aseg_tsv.loc[3, "name"] == "Lateral-Ventricle"
    vols = pd.read_csv(out.files["desc-tissue_volumes.tsv"], sep="\t")
    assert len(vols) == 1 and vols.loc[0, "gm_ml"] == glue["metrics"]["gm_ml"]
    assert out.files["desc-tissue_qc.png"].endswith("_qc.png")
    assert [k for k in out.files if k.endswith("_thumb.png")] == ["desc-tissue_qc_thumb.png"]


def test_head_crop_and_optional_parts(glue, cards, tmp_path):
    """crop: head gives the same maps with these context-free stand-ins, except that the aseg net's
    head box (brainchop's intensity threshold 0.2) leaves out the dark CSF shell of the synthetic head;
    without the GM/WM and aseg cards only the brain mask is produced."""
    p, prep, models = get_pipeline("brain_tissue"), glue["prep"], _stand_in_models()
    cfg = {"wm_target": None, "etiv": False, "crop": "head"}
    head = p.predict(models, prep, cards, cfg, 1)
    for k in ("box", "brain_mask", "tissue", "prob_gm", "prob_wm"):
        assert np.array_equal(head[k], glue["arrays"][k]), k
    inside = head["aseg"] > 0
    assert inside.sum() > 0.5 * (glue["arrays"]["aseg"] > 0).sum()
    assert np.array_equal(head["aseg"][inside], glue["arrays"]["aseg"][inside])
    assert json.loads(str(head["info"]))["crop"] == "head"
    arrays = p.predict(models[:1], prep, cards[:1], cfg, 1)
    assert set(arrays.arrays) == {"box", "brain_mask", "info"}
    out = OutputWriter(tmp_path, glue["item"])
    m = p.finalize(glue["item"], prep, arrays, cards[:1], cfg, Context(), out)
    assert set(m) == {"brain_mask_ml"} and "dseg.nii.gz" not in out.files
    assert m["brain_mask_ml"] == glue["metrics"]["brain_mask_ml"]


@pytest.mark.shared
def test_intracranial_mask_gives_etiv_and_the_fast_crop(shared_dir, tmp_path):
    """The deep-T1-WMH head net (real weights) beside stand-in MeshNets on deep-T1-WMH's example T1
    (1.75 mm, LAS): the measured eTIV and desc-ICV_mask (native grid) are upstream's (the reference run
    of the upstream program: eTIV 1440750 mm^3, its brain_mask), and the brain-mask net runs on the
    intracranial mask's box instead of the head box (smaller)."""
    from cohortseg.models.ensemble import load_models
    from cohortseg.models.store import ModelStore
    from cohortseg.science.metrics import dice

    src = shared_dir / "data/brain/deep-T1-WMH"
    cards = [find_card(n) for n in CARDS + ["deepwmh_head"]]
    models = _stand_in_models() + load_models(cards[3:], ModelStore(shared_dir / "models"))
    p = get_pipeline("brain_tissue")
    item = Item("sub-01", "", "brain_tissue", "sub-01_T1w", {"image": str(src / "t1_image.nii.gz")})
    cfg = {"wm_target": None, "etiv": False, "anatomy": {"refuse": False}}  # the stand-in mask keeps the scalp
    prep = p.prepare(item, cards, cfg, Context())
    assert prep.arrays["head_box"].shape == (64, 64, 64)
    fast = p.predict(models, prep, cards, cfg, 1)
    fi = json.loads(str(fast["info"]))
    assert fi["brain_mask_crop"].startswith("deep-T1-WMH")
    size = lambda b: np.prod(np.subtract(b[1], b[0]))  # noqa: E731
    head = np.argwhere(conformed_volume(prep) > 0)  # an upper bound of brainchop's head box
    assert size(fi["boxes"]["brain_mask"]) < 0.8 * size([head.min(0), head.max(0) + 1])
    out = OutputWriter(tmp_path, item)
    m = p.finalize(item, prep, fast, cards, cfg, Context(), out)
    upstream = pd.read_csv(src / "reference/t1_image_wmh_in_lrois.csv").iloc[0]["eTIV"] / 1000.0  # mm^3 -> mL
    assert m["etiv_icv_ml"] == pytest.approx(upstream, rel=1e-3), (m["etiv_icv_ml"], upstream)  # 1440.9 vs 1440.75
    icv = np.asarray(nib.load(out.files["desc-ICV_mask.nii.gz"]).dataobj) > 0
    ref = np.asarray(nib.load(src / "reference/t1_image_brain_mask.nii.gz").dataobj) > 0
    assert icv.shape == ref.shape and dice(icv, ref) > 0.999
    side = json.loads(open(out.files["desc-tissue_volumes.json"]).read())
    assert side["etiv_icv"]["method"].startswith("deep-T1-WMH head net")


def test_implausible_brain_mask_is_refused_after_the_nets(glue, cards, tmp_path):
    """The check after the brain mask, in finalize: an intracranial volume outside anatomy.icv_range_ml
    (here set above the 1.29 L head) refuses the image, naming the file and the criterion, with the
    outputs kept for QC; with refuse: false it is a QC flag."""
    from cohortseg.errors import AnatomyError

    p, item = get_pipeline("brain_tissue"), glue["item"]
    cfg = {"wm_target": None, "etiv": False, "anatomy": {"icv_range_ml": [1500, 2500]}}
    out = OutputWriter(tmp_path / "out", item)
    with pytest.raises(AnatomyError) as e:
        p.finalize(item, glue["prep"], Predicted(glue["arrays"]), cards, cfg, Context(), out)
    assert e.value.reason == ("not a brain image: brain mask 1289 mL outside the plausible intracranial 1500-2500 mL "
                              "(anatomy.icv_range_ml)") and e.value.path.endswith("sub-01_T1w.nii.gz")
    assert {"desc-brain_mask.nii.gz", "dseg.nii.gz", "desc-tissue_qc.png"} <= set(out.files)
    cfg["anatomy"] = {"icv_range_ml": [1500, 2500], "refuse": False, "max_sides_touched": 0}
    out = OutputWriter(tmp_path / "out2", item)
    p.finalize(item, glue["prep"], Predicted(glue["arrays"]), cards, cfg, Context(), out)
    assert "anatomy_icv" in out.flags and "anatomy_fov_sides" not in out.flags  # the ball touches no side


def test_crop_to_native_matches_whole_grid_resampling():
    from cohortseg.science.conform import conformed_affine, labels_to_native, to_native
    from cohortseg.pipelines.brain_tissue import crop_to_native

    rng = np.random.default_rng(0)
    naff = np.diag([1.2, 0.9, 1.3, 1.0])
    naff[:3, 3] = [-70, -80, -60]
    nshape = (110, 160, 100)
    caff = conformed_affine(naff, nshape, 64, 2.5, "LIA")
    full = np.zeros((64, 64, 64), np.uint8)
    full[20:40, 18:45, 25:50] = rng.integers(1, 4, (20, 27, 25))
    lo = [20, 18, 25]
    crop = full[20:40, 18:45, 25:50]
    assert np.array_equal(crop_to_native(crop, lo, caff, (nshape, naff), "labels"),
                          labels_to_native(full, caff, (nshape, naff)))
    p = crop.astype(np.float32) / 3
    pf = np.zeros(full.shape, np.float32)
    pf[20:40, 18:45, 25:50] = p
    assert np.allclose(crop_to_native(p, lo, caff, (nshape, naff), "prob"), to_native(pf, caff, (nshape, naff), order=1),
                       atol=1e-6)


def test_bad_inputs_and_model_lists(tmp_path, cards):
    p = get_pipeline("brain_tissue")
    zero = tmp_path / "sub-01_T1w.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20), np.float32), np.eye(4)), str(zero))
    item = Item("sub-01", "", "brain_tissue", "sub-01_T1w", {"image": str(zero)})
    with pytest.raises(InputError, match="all zeros"):
        p.prepare(item, cards, {}, Context())
    with pytest.raises(ModelError, match="brain-mask model"):
        p.prepare(item, cards[1:], {}, Context())
    with pytest.raises(ModelError, match="two 'tissue'"):
        p.prepare(item, [cards[0], cards[1], cards[1]], {}, Context())


# ----------------------------------------------------------------------------------------------
# the cards
# ----------------------------------------------------------------------------------------------
@pytest.mark.shared
def test_cards_match_the_models_in_shared(cards, shared_dir):
    from cohortseg.science.brain import ASEG18_LABELS, GW_LABELS
    from cohortseg.pipelines.brain_tissue import card_roles
    from cohortseg.models.store import ModelStore

    roles = card_roles(cards)
    assert {r: cards[i].name for r, (i, _) in roles.items()} == {
        "brain_mask": "brainchop_mindgrab", "tissue": "brainchop_gw", "aseg": "brainchop_subcortical"}
    store = ModelStore(shared_dir / "models")
    for card in cards:
        (fold,) = store.resolve(card)  # sha256 of model.json and every extra file verified
        assert card["licence"] == "MIT" and card["contrasts"] == ["T1w"]
        assert card["grid"] == {"conform_shape": [256, 256, 256], "voxel_mm": 1.0, "orientation": "LIA"}
        assert fold["fold"]["url"].startswith("https://github.com/neuroneural/brainchop/raw/4c87885f/public/models/")
        cmap = next(p for p in fold["extra"] if p.name.startswith("colormap"))
        labels = json.loads(cmap.read_text())["labels"]
        assert [card["labels"][i] for i in range(len(labels))] == labels
    assert tuple(cards[1]["labels"].values()) == GW_LABELS
    assert tuple(cards[2]["labels"].values()) == ASEG18_LABELS


# ----------------------------------------------------------------------------------------------
# end to end with the real models
# ----------------------------------------------------------------------------------------------
def _moved_head(t1_crop_path, out_path, zoom=1.2, shape=(150, 200, 150)):
    """t1_crop on a 1.2 mm RAS grid covering the head, in arbitrary scanner units (float32)."""
    t1 = nib.load(str(t1_crop_path))
    aff = np.diag([zoom, zoom, zoom, 1.0])
    centre = t1.affine @ np.r_[np.array(t1.shape) / 2.0, 1]
    aff[:3, 3] = centre[:3] - aff[:3, :3] @ (np.array(shape) / 2.0) + [3.0, -2.0, 4.0]
    v2v = np.linalg.inv(t1.affine) @ aff
    data = ndimage.affine_transform(np.asarray(t1.dataobj, np.float32), v2v[:3, :3], offset=v2v[:3, 3],
                                    output_shape=shape, order=1)
    nib.save(nib.Nifti1Image((data * 3.7 + 12.0).astype(np.float32), aff), str(out_path))


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_dir):
    tmp = tmp_path_factory.mktemp("brain_e2e")
    bids = tmp / "bids"
    t1 = shared_dir / "data/brain/t1_crop.nii.gz"
    for sub in ("sub-01", "sub-02"):
        (bids / sub / "anat").mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "brain", "BIDSVersion": "1.9.0"}))
    shutil.copy(t1, bids / "sub-01/anat/sub-01_T1w.nii.gz")
    _moved_head(t1, bids / "sub-02/anat/sub-02_T1w.nii.gz")
    out = tmp / "out"
    cfg = write_config(tmp / "cfg.yaml", bids_dir=str(bids), output_dir=str(out), model_dir=str(shared_dir / "models"),
                       pipelines=["brain_tissue"])
    res = snakemake(tmp, "--cores", "2", configfile=cfg)
    return {"tmp": tmp, "bids": bids, "out": out, "res": res}


def _anat(run, sub, key, figure=False):
    return output_path(run["out"], "brain_tissue", f"{sub}_T1w", key, figure=figure)


@pytest.mark.shared
@pytest.mark.slow
def test_e2e_outputs_on_each_native_grid(run):
    for sub in ("sub-01", "sub-02"):
        src = nib.load(run["bids"] / sub / "anat" / f"{sub}_T1w.nii.gz")
        for suffix in ("desc-brain_mask", "dseg", "desc-aseg_dseg", "label-GM_probseg", "label-WM_probseg"):
            img = nib.load(_anat(run, sub, f"{suffix}.nii.gz"))
            assert img.shape == src.shape and np.allclose(img.affine, src.affine, atol=1e-5), (sub, suffix)
        dseg = np.asarray(nib.load(_anat(run, sub, "dseg.nii.gz")).dataobj)
        assert set(np.unique(dseg)) == {0, 1, 2, 3}
        aseg = np.asarray(nib.load(_anat(run, sub, "desc-aseg_dseg.nii.gz")).dataobj)
        assert {3, 7, 13, 14} <= set(np.unique(aseg))  # lateral ventricles, thalamus, brain stem, hippocampus
        tsv = pd.read_csv(_anat(run, sub, "dseg.tsv"), sep="\t")
        assert tsv.set_index("index")["name"].to_dict() == {0: "background", 1: "GM", 2: "WM", 3: "CSF"}
        atsv = pd.read_csv(_anat(run, sub, "desc-aseg_dseg.tsv"), sep="\t")
        assert len(atsv) == 18 and atsv.set_index("index").loc[3, "name"] == "Lateral-Ventricle"
        png = _anat(run, sub, "desc-tissue_qc.png", figure=True)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the conformed input is used as is: its native brain mask is the conformed one, voxel for voxel
    m1 = nib.load(_anat(run, "sub-01", "desc-brain_mask.nii.gz"))
    assert np.asarray(m1.dataobj).sum() / 1000 == pytest.approx(_summary(run).loc["sub-01", "brain_tissue_brain_mask_ml"],
                                                                 abs=0.01)


@pytest.mark.shared
@pytest.mark.slow
def test_e2e_outputs_are_valid_bids_derivatives(run):
    assert_bids_valid(run["out"] / "brain_tissue")


def _summary(run):
    return pd.read_csv(run["out"] / "group/summary.csv", keep_default_na=False,
                       dtype={"participant_id": str, "session_id": str}).set_index("participant_id")


@pytest.mark.shared
@pytest.mark.slow
def test_e2e_volumes_plausible_and_resolution_independent(run):
    df = _summary(run)
    print(df.filter(like="brain_tissue_").T.to_string())
    assert list(df.index) == ["sub-01", "sub-02"] and set(df.status) == {"ok"}
    s1, s2 = df.loc["sub-01"], df.loc["sub-02"]
    for s in (s1, s2):
        assert 1000 <= s["brain_tissue_brain_ml"] <= 1800
        assert s["brain_tissue_brain_ml"] == pytest.approx(s["brain_tissue_gm_ml"] + s["brain_tissue_wm_ml"], abs=0.01)
        assert 1300 <= s["brain_tissue_etiv_ml"] <= 1800
        assert 5 <= s["brain_tissue_ventricles_ml"] <= 60
    # same tolerances as test_brain.test_non_conformed_input_gives_same_volumes: the 1.2 mm copy is
    # blurred twice (trilinear down, cubic up), which moves the GM/WM boundary a little (WM +4 %)
    for k in ("brain_ml", "brain_mask_ml", "etiv_ml"):
        assert s2[f"brain_tissue_{k}"] == pytest.approx(s1[f"brain_tissue_{k}"], rel=0.03), k
    for k in ("gm_ml", "wm_ml"):
        assert s2[f"brain_tissue_{k}"] == pytest.approx(s1[f"brain_tissue_{k}"], rel=0.05), k
    for k in ("ventricles_ml", "aseg_thalamus_ml", "aseg_hippocampus_ml"):
        assert s2[f"brain_tissue_{k}"] == pytest.approx(s1[f"brain_tissue_{k}"], rel=0.08), k


@pytest.mark.shared
@pytest.mark.slow
def test_e2e_cohort_tables(run):
    df = _summary(run)
    want = {"gm_ml", "wm_ml", "csf_ml", "brain_ml", "brain_mask_ml", "ventricles_ml", "etiv_ml",
            "aseg_lateral_ventricle_ml", "aseg_thalamus_ml", "aseg_caudate_ml", "aseg_putamen_ml",
            "aseg_pallidum_ml", "aseg_hippocampus_ml", "aseg_amygdala_ml", "aseg_accumbens_area_ml",
            "aseg_brain_stem_ml", "aseg_ventraldc_ml", "aseg_3rd_ventricle_ml", "aseg_4th_ventricle_ml"}
    assert {f"brain_tissue_{k}" for k in want} <= set(df.columns)
    assert "brain_tissue_status" in df.columns and "qc_flags" in df.columns
    vols = pd.read_csv(run["out"] / "group/tissue_volumes.csv", keep_default_na=False,
                       dtype={"participant_id": str, "session_id": str})
    assert vols.participant_id.tolist() == ["sub-01", "sub-02"] and vols.session_id.tolist() == ["", ""]
    assert want <= set(vols.columns)
    assert vols.set_index("participant_id").loc["sub-01", "gm_ml"] == df.loc["sub-01", "brain_tissue_gm_ml"]
    prov = json.loads((run["out"] / "group/summary.json").read_text())
    assert set(prov["models"]) == set(CARDS) | {"deepwmh_head"}  # the default adds the head net
    side = json.loads((_anat(run, "sub-01", "desc-tissue_volumes.json")).read_text())
    assert side["etiv"]["det"] > 0 and side["inference"]["crop"] == "brain_mask"
    assert _anat(run, "sub-01", "desc-MNI_regcheck.png", figure=True).is_file()
    assert (run["out"] / "qc/index.html").is_file()
    # the anatomy checks on these real heads, with their margins to the thresholds
    from cohortseg.science.anatomy import limits

    lim = limits("brain_tissue", {})
    for sub in ("sub-01", "sub-02"):
        rec = json.loads((run["out"] / "work/records" / f"{sub}.json").read_text())["pipelines"]["brain_tissue"]
        checks = rec[f"{sub}_T1w"]["checks"]
        print(sub, checks, {k: lim[k] for k in ("min_fov_mm", "min_head_mm", "icv_range_ml", "max_sides_touched")})
        assert min(checks["head"]["fov_mm"][:2]) >= 1.5 * lim["min_fov_mm"]
        assert min(checks["head"]["head_mm"][:2]) >= 1.3 * lim["min_head_mm"]
        assert 1300 < checks["brain_mask"]["volume_ml"] < 2000
        assert len(checks["brain_mask"]["sides_touched"]) <= 1
