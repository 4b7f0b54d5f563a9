"""deep-T1-WMH: the PyTorch weights reader, the Keras builds of the four networks, the cards/store, and
the ``wmh`` plugin's deep-T1-WMH path against the upstream program's own outputs.

The accuracy tests run the plugin (prepare -> predict -> finalize, as the workflow does) with the real
head, affine and region nets of ../shared and a stand-in WMH net (the real one is not redistributable
here), on deep-T1-WMH's example T1, and compare with the reference outputs beside it (made by the
upstream program with a WMH net that outputs zeros). The stand-in is a 1x1x1 "darker than air"
detector: p = sigmoid(8 (-2 - x)) on the box z-scores; nothing in the example T1 is below its
background (-1.22 in the box) and the planted blobs (whole-image z-score -3, -3.6 in the box) are.
Found on a real T1: the region net takes such black blobs for CSF - it labels a blob in deep white
matter periventricular, a thin infracortical site mostly unlabelled - so the blob test checks that the
blobs come back, that every one lies in a region and that the regional volumes add up to the total;
the regional formulas themselves are checked on synthetic boxes.

The PyTorch comparison (tests/torch_deepwmh.py, random weights saved by torch in both file formats)
needs the optional ``torch`` extra and is skipped without it.
"""
from __future__ import annotations

import importlib.util
import json
import io
import os
import pickle
import subprocess
import sys
import zipfile

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from cohortseg.errors import InputError, ModelError
from cohortseg.models.cards import ModelCard, find_card
from cohortseg.models.torchfile import load_state_dict

HAVE_TORCH = importlib.util.find_spec("torch") is not None
PARAMS = {"head": "params_head_00075_00000.pt", "affine": "paramsaffineta_00079_00000.pt",
          "rois": "paramsLRoiNo184_t1fs7_00105_train3800.pt"}
REF_SIZES = {"head": 65, "affine": 18, "rois": 46}


def _dice(a, b) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


# ----------------------------------------------------------------------------------------------
# reader
# ----------------------------------------------------------------------------------------------
@pytest.mark.shared
@pytest.mark.parametrize("net", sorted(PARAMS))
def test_reads_upstream_files_both_formats(shared_dir, net):
    path = shared_dir / "models/deep-T1-WMH/torchparams" / PARAMS[net]
    assert zipfile.is_zipfile(path) == (net == "rois")  # the ROI net is a zip file, the others legacy
    sd = load_state_dict(path)
    assert len(sd) == REF_SIZES[net]
    first = {"head": ("conv0a.weight", (8, 1, 3, 3, 3)), "affine": ("bnaff2.weight", (32, 32, 32)),
             "rois": ("blockUp0_b2.0.weight", (8, 12, 3, 3, 3))}[net]
    assert sd[first[0]].shape == first[1] and sd[first[0]].dtype == np.float32
    assert np.isfinite(sd[first[0]]).all() and sd[first[0]].std() > 0


class _Evil:
    def __reduce__(self):
        return (subprocess.call, (["true"],))


def _legacy_bytes(obj) -> bytes:
    f = io.BytesIO()
    for part in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}, obj, []):
        pickle.dump(part, f, protocol=4)
    return f.getvalue()


def test_reader_refuses_other_globals(tmp_path):
    legacy = tmp_path / "evil_legacy.pt"
    legacy.write_bytes(_legacy_bytes({"w": _Evil()}))
    with pytest.raises(ModelError, match="refusing to unpickle global 'subprocess.call'"):
        load_state_dict(legacy)
    zf = tmp_path / "evil_zip.pt"
    with zipfile.ZipFile(zf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": _Evil()}, protocol=4))
    with pytest.raises(ModelError, match="refusing to unpickle global"):
        load_state_dict(zf)


def test_reader_refuses_non_state_dicts(tmp_path):
    p = tmp_path / "list.pt"
    p.write_bytes(_legacy_bytes([1, 2, 3]))
    with pytest.raises(ModelError, match="not a state_dict"):
        load_state_dict(p)
    p.write_bytes(b"\x80\x02K\x05.")  # a pickle of 5: bad magic number
    with pytest.raises(ModelError, match="magic"):
        load_state_dict(p)
    with pytest.raises(ModelError, match="does not exist"):
        load_state_dict(tmp_path / "missing.pt")


@pytest.mark.shared
def test_reader_refuses_truncated_files(shared_dir, tmp_path):
    for net in ("head", "rois"):
        raw = (shared_dir / "models/deep-T1-WMH/torchparams" / PARAMS[net]).read_bytes()
        p = tmp_path / f"{net}.pt"
        p.write_bytes(raw[: len(raw) - 1000])
        with pytest.raises(ModelError):
            load_state_dict(p)


# ----------------------------------------------------------------------------------------------
# nets: layer mapping
# ----------------------------------------------------------------------------------------------
@pytest.mark.shared
def test_mapping_refuses_wrong_shapes_and_extra_keys(shared_dir):
    from cohortseg.models.nets.deepwmh_torch import build_head, load_torch_weights

    sd = load_state_dict(shared_dir / "models/deep-T1-WMH/torchparams" / PARAMS["head"])
    model = build_head((16, 16, 16))
    load_torch_weights(model, sd)  # fully convolutional: any size divisible by 8
    k = next(layer for layer in model.layers if getattr(layer, "torch_prefix", "") == "conv0b")
    np.testing.assert_array_equal(k.get_weights()[0], sd["conv0b.weight"].transpose(2, 3, 4, 1, 0))
    bn = next(layer for layer in model.layers if getattr(layer, "torch_prefix", "") == "bn0a")
    assert bn.epsilon == 1e-5
    np.testing.assert_array_equal(bn.get_weights()[3], sd["bn0a.running_var"])
    bad = dict(sd, **{"conv1a.weight": sd["conv1a.weight"][:, :4]})
    with pytest.raises(ModelError, match=r"conv1a.weight.*\(16, 4, 3, 3, 3\)"):
        load_torch_weights(model, bad)
    with pytest.raises(ModelError, match="does not have"):
        load_torch_weights(model, dict(sd, extra_layer_weight=np.zeros(3, np.float32)))
    with pytest.raises(ModelError, match="missing"):
        load_torch_weights(model, {k: v for k, v in sd.items() if k != "conv1x.bias"})


@pytest.mark.skipif(not HAVE_TORCH, reason="optional extra: pip install torch (CPU wheel) for the PyTorch reference test")
@pytest.mark.parametrize("net,shape,new_zip", [("head", (16, 16, 24), False), ("affine", (64, 64, 64), False),
                                               ("wmh", (68, 70, 10), True), ("rois", (68, 70, 20), True)])
def test_keras_build_matches_pytorch(tmp_path, net, shape, new_zip):
    """Random weights with the upstream names and shapes, saved by torch (legacy or zip format), read by
    the torch-free reader: the Keras forward equals the PyTorch forward. The input has a block of
    zeros so that max-pool windows tie (the first maximum wins in both)."""
    import torch

    from cohortseg.models.nets.deepwmh_torch import BUILDERS, load_net

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    import torch_deepwmh

    torch.set_num_threads(2)
    ref = torch_deepwmh.randomised(net, seed=3)
    path = tmp_path / f"{net}.pt"
    torch.save(ref.state_dict(), path, _use_new_zipfile_serialization=new_zip)
    assert zipfile.is_zipfile(path) == new_zip
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, *shape, 2 if net == "affine" else 1)).astype(np.float32)
    x[:, :6, :6, :4] = 0
    with torch.no_grad():
        y_ref = ref(torch.from_numpy(np.moveaxis(x, -1, 1).copy())).numpy()
    if y_ref.ndim == 5:
        y_ref = np.moveaxis(y_ref, 1, -1)
    assert net in BUILDERS
    y = np.asarray(load_net(net, path, shape=shape if net != "affine" else None)(x))
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(y, y_ref, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------
# cards and store
# ----------------------------------------------------------------------------------------------
def test_git_blob_checksum_and_refusal(tmp_path):
    from cohortseg.io import git_blob_sha1
    from cohortseg.models.store import ModelStore

    f = tmp_path / "blob.bin"
    f.write_bytes(b"deep-T1-WMH\x00" * 1000)
    got = subprocess.run(["git", "hash-object", str(f)], capture_output=True, text=True, check=True).stdout.strip()
    assert git_blob_sha1(f) == got
    card = find_card("deepwmh_wmh")
    assert card.folds[0]["git_blob_sha1"] == "3334874d9387323611cf51663eda965a20440532"
    target = tmp_path / card.folds[0]["file"]
    target.parent.mkdir(parents=True)
    target.write_bytes(b"version https://git-lfs.github.com/spec/v1\n")  # what a clone without LFS might hold
    with pytest.raises(ModelError, match="git blob"):
        ModelStore(tmp_path).resolve(card)
    target.unlink()
    with pytest.raises(ModelError, match="missing"):
        ModelStore(tmp_path).resolve(card)


@pytest.mark.shared
def test_cards_verify_against_shared(shared_dir):
    from cohortseg.models.store import ModelStore

    store = ModelStore(shared_dir / "models")
    for name in ("deepwmh_head", "deepwmh_affine", "deepwmh_rois"):
        card = find_card(name)
        assert card.pipeline == "wmh" and card["licence"] == "MIT"
        assert "bthyreau/deep-T1-WMH" in card.folds[0]["url"]
        assert len(store.resolve(card)) == 1


def test_planning_imports_no_tensorflow():
    code = ("import sys; import cohortseg.pipelines.wmh, cohortseg.science.deepwmh, cohortseg.models.nets.deepwmh_torch, "
            "cohortseg.models.torchfile; from cohortseg.pipelines import get_pipeline; get_pipeline('wmh'); "
            "print('tensorflow' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_net_cards_errors():
    from cohortseg.models.lesion_cards import net_cards

    cards = [find_card(n) for n in ("deepwmh_head", "deepwmh_affine", "deepwmh_rois")]
    with pytest.raises(ModelError, match="missing: wmh"):
        net_cards(cards)
    with pytest.raises(ModelError, match="cannot be mixed"):
        net_cards(cards + [find_card("deepwmh_wmh"), find_card("shiva_wmh")])
    from cohortseg.models.lesion_cards import split_cards, uses_deepwmh

    assert uses_deepwmh(cards + [find_card("deepwmh_wmh")])
    head_then_shiva = [find_card("deepwmh_head"), find_card("shiva_wmh")]
    assert not uses_deepwmh(head_then_shiva) and split_cards(head_then_shiva) == (0, [1])


# ----------------------------------------------------------------------------------------------
# the plugin on the upstream example T1
# ----------------------------------------------------------------------------------------------
def _standin_card(tmp_path) -> ModelCard:
    """A Keras 1x1x1 'very dark' detector in the WMH net's place (same box, 2 sigmoid channels)."""
    import keras

    from cohortseg.science.deepwmh import BOX_SHAPE

    inp = keras.Input(BOX_SHAPE + (1,))
    conv = keras.layers.Conv3D(2, 1, activation="sigmoid")
    model = keras.Model(inp, conv(inp))
    conv.set_weights([np.full((1, 1, 1, 1, 2), -8.0, np.float32), np.full((2,), -16.0, np.float32)])
    path = tmp_path / "standin_wmh.keras"
    model.save(path)
    data = {"name": "standin_deepwmh_wmh", "pipeline": "wmh", "contrasts": ["T1w"],
            "architecture": {"loader": "keras_full", "params": {"net": "wmh"}}, "folds": [{"file": path.name}]}
    return ModelCard(data=data, source=path, base_dir=tmp_path)


@pytest.fixture(scope="module")
def deep(shared_dir, tmp_path_factory):
    from cohortseg.models.ensemble import load_models
    from cohortseg.models.store import ModelStore

    tmp = tmp_path_factory.mktemp("deepwmh")
    cards = [find_card(n) for n in ("deepwmh_head", "deepwmh_affine", "deepwmh_rois")] + [_standin_card(tmp)]
    models = load_models(cards, ModelStore(shared_dir / "models"))
    return {"cards": cards, "models": models, "tmp": tmp, "dir": shared_dir / "data/brain/deep-T1-WMH"}


def _run(deep, t1_path, name, out_dir):
    from cohortseg.pipelines import get_pipeline
    from cohortseg.pipelines.base import Context, Item, OutputWriter, Prepared

    p = get_pipeline("wmh")
    item = Item("sub-01", "ses-01", "wmh", name, {"image": str(t1_path)})
    cfg, ctx = {}, Context(output_dir=str(out_dir))
    prep = p.prepare(item, deep["cards"], cfg, ctx)
    saved = out_dir / f"{name}.npz"
    prep.save(saved)
    prep = Prepared.load(saved)
    prob = p.predict(deep["models"], prep, deep["cards"], cfg, 1)
    out = OutputWriter(out_dir, item)
    metrics = p.finalize(item, prep, prob, deep["cards"], cfg, ctx, out)
    return prep, prob, out, metrics


@pytest.fixture(scope="module")
def example(deep):
    out = deep["tmp"] / "example"
    out.mkdir()
    return _run(deep, deep["dir"] / "t1_image.nii.gz", "sub-01_ses-01_T1w", out)


@pytest.mark.shared
def test_example_matches_upstream_reference(deep, example):
    _, prob, out, metrics = example
    ref_dir = deep["dir"] / "reference"
    ref = pd.read_csv(ref_dir / "t1_image_wmh_in_lrois.csv").iloc[0]
    row = pd.read_csv(out.files["desc-WMH_regions.tsv"], sep="\t").iloc[0]
    assert list(row.index) == ["filename", *ref.index]  # joinable with the upstream csv
    assert abs(metrics["eTIV"] - ref["eTIV"]) / ref["eTIV"] < 0.01
    for r in ("periventricular", "deepwhite", "infracortical", "innergray"):
        assert abs(metrics[f"roisize_{r}"] - ref[f"roisize_{r}"]) / ref[f"roisize_{r}"] < 0.03, r
        assert metrics[f"vol_{r}"] == 0 and row[f"wmh_vol_{r}"] == 0
    assert metrics["vol_total"] == 0 and metrics["count"] == 0

    load = lambda p: np.asarray(nib.load(str(p)).dataobj)  # noqa: E731
    assert _dice(load(out.files["desc-ICV_mask.nii.gz"]), load(ref_dir / "t1_image_brain_mask.nii.gz")) >= 0.98
    assert _dice(load(out.files["desc-cerebrum_mask.nii.gz"]), load(ref_dir / "t1_image_cerebrum_mask.nii.gz")) >= 0.98
    mine, theirs = load(out.files["desc-WMHregions_dseg.nii.gz"]), load(ref_dir / "t1_image_mask_ROIs.nii.gz")
    labelled = (mine > 0) | (theirs > 0)
    assert (mine[labelled] == theirs[labelled]).mean() >= 0.95
    assert set(np.unique(mine)) == {0, 1, 2, 3, 4}


def _itk_matrix(text: str) -> np.ndarray:
    """native -> MNI RAS matrix of an ITK affine file (LPS, MNI -> native)."""
    vals = np.array([float(v) for v in next(ln for ln in text.splitlines() if ln.startswith("Parameters:")).split()[1:]])
    mi = np.eye(4)
    mi[:3, :3], mi[:3, 3] = vals[:9].reshape(3, 3), vals[9:]
    flip = np.array([[1, 1, -1, -1], [1, 1, -1, -1], [-1, -1, 1, 1], [1, 1, 1, 1]], float)
    return np.linalg.inv(mi * flip)


@pytest.mark.shared
def test_example_mni_affine_corners_within_1mm(deep, example):
    from cohortseg.science.deepwmh import BOX_AFFINE, BOX_SHAPE

    _, prob, out, _ = example
    ref = _itk_matrix((deep["dir"] / "reference/t1_image_mni0Affine.txt").read_text())
    mine_file = _itk_matrix(open(out.files["desc-MNI_affine.txt"]).read())
    corners = np.array([[i, j, k, 1.0] for i in (0, BOX_SHAPE[0] - 1) for j in (0, BOX_SHAPE[1] - 1)
                        for k in (0, BOX_SHAPE[2] - 1)]).T
    mni = BOX_AFFINE @ corners
    for m in (np.asarray(prob["matrix"]), mine_file):
        d = np.linalg.norm((np.linalg.inv(m) @ mni - np.linalg.inv(ref) @ mni)[:3], axis=0)
        assert d.max() < 1.0, d


@pytest.mark.shared
def test_predict_is_deterministic(deep, example):
    from cohortseg.pipelines import get_pipeline

    prep, prob, _, _ = example
    again = get_pipeline("wmh").predict(deep["models"], prep, deep["cards"], {}, 1)
    for k in ("priors", "matrix", "rois_box", "wmh_box"):
        np.testing.assert_array_equal(again[k], prob[k])


@pytest.mark.shared
def test_planted_blobs_end_to_end(deep):
    """Dark blobs (z-score -3) at the deepest voxel of the upstream periventricular and deep-white
    regions: found on the native grid, each inside a region, and the regional volumes add up to the
    total (upstream measures the regions in the MNI box and the total on the native grid: 15 %)."""
    img = nib.load(str(deep["dir"] / "t1_image.nii.gz"))
    data = np.asarray(img.dataobj, np.float32)
    rmap = np.asarray(nib.load(str(deep["dir"] / "reference/t1_image_mask_ROIs.nii.gz")).dataobj)
    planted = np.zeros(data.shape, bool)
    g = np.indices(data.shape)
    for lab in (1, 2):
        edt = ndimage.distance_transform_edt(rmap == lab)
        c = np.unravel_index(np.argmax(edt), edt.shape)
        planted |= sum((gi - ci) ** 2 for gi, ci in zip(g, c)) <= 2.5 ** 2
    data[planted] = data.mean() - 3 * data.std()
    t1 = deep["tmp"] / "sub-02_ses-01_T1w.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(t1))
    out_dir = deep["tmp"] / "blobs"
    out_dir.mkdir()
    _, _, out, m = _run(deep, t1, "sub-02_ses-01_T1w", out_dir)

    mask = np.asarray(nib.load(out.files["label-WMH_mask.nii.gz"]).dataobj) > 0
    assert _dice(mask, planted) >= 0.7
    planted_mm3 = planted.sum() * abs(np.linalg.det(img.affine[:3, :3]))
    assert abs(m["vol_total"] - planted_mm3) / planted_mm3 < 0.3
    regional = sum(m[f"vol_{n}"] for n in ("periventricular", "deepwhite", "infracortical", "innergray"))
    assert abs(regional - m["vol_total"]) / m["vol_total"] < 0.15
    census = pd.read_csv(out.files["desc-WMH_census.tsv"], sep="\t")
    assert m["count"] == len(census) == 2
    assert "unassigned" not in set(census["region"])
    assert abs(census["volume_mm3"].sum() - planted_mm3) / planted_mm3 < 0.3


def test_volumes_upstream_formulas():
    """Regions in the MNI box (u8 > 128, / 255, x 1.5 mm^3 / |det M|), total on the native grid."""
    from cohortseg.science.deepwmh import BOX_SHAPE, volumes

    labels = np.zeros(BOX_SHAPE, np.uint8)
    labels[10:20, 10:20, 10:20] = 1
    labels[30:40, 30:40, 30:40] = 3
    wmh = np.zeros(BOX_SHAPE, np.float32)
    wmh[10:12, 10:20, 10:20] = 1.0      # 200 voxels in region 1 at 255
    wmh[30:31, 30:40, 30:40] = 0.6      # 100 voxels in region 3 at 153
    wmh[50:52, 50:52, 50:52] = 1.0      # outside every region: total only
    wmh[12, 10:20, 10:20] = 0.5         # 127 <= 128: not counted
    matrix = np.diag([1.1, 1.1, 1.1, 1.0])  # scaling 1.331
    native = np.zeros((20, 20, 20), np.uint8)
    native[:2, :10, :10] = 255
    native[2, :10, :10] = 96             # half of 192
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    v = volumes(native, aff, wmh, labels, matrix, etiv=1.5e6)
    assert v["wmh_vol_total"] == pytest.approx((200 + 50) * 8.0)
    assert v["wmh_vol_periventricular"] == pytest.approx(200 * 1.5 / 1.331)
    assert v["wmh_vol_infracortical"] == pytest.approx(100 * (153 / 255) * 1.5 / 1.331, rel=1e-5)
    assert v["wmh_vol_deepwhite"] == v["wmh_vol_innergray"] == 0
    assert v["roisize_periventricular"] == pytest.approx(1000 * 1.5 / 1.331)
    assert v["eTIV"] == 1.5e6


def test_prepare_refuses_bad_input(tmp_path):
    from cohortseg.pipelines import get_pipeline
    from cohortseg.pipelines.base import Context, Item

    cards = [find_card(n) for n in ("deepwmh_head", "deepwmh_affine", "deepwmh_rois", "deepwmh_wmh")]
    p = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((64, 64, 4)).astype(np.float32), np.eye(4)), str(p))
    item = Item("sub-01", "", "wmh", "sub-01_T1w", {"image": str(p)})
    with pytest.raises(InputError, match="too small"):
        get_pipeline("wmh").prepare(item, cards, {}, Context())


def test_mni_box_geometry_on_the_mni_template():
    """With the identity as native -> MNI matrix, box voxel (i, j, k) is the template at MNI
    (90 - i, -117 + j, -33 + 1.5 k), and a blob in the box comes back at the same MNI place."""
    from nilearn import datasets

    from cohortseg.science.deepwmh import BOX_AFFINE, BOX_SHAPE, box_to_native, mni_box, zscore

    tpl = datasets.load_mni152_template(resolution=1)
    data = np.asarray(tpl.get_fdata(), np.float32)
    z = zscore(data)
    box, coverage = mni_box(z, tpl.affine, np.eye(4))
    assert box.shape == BOX_SHAPE and coverage > 0.95
    assert abs(float(box.mean())) < 1e-4 and abs(float(box.std()) - 1) < 1e-4
    # even k: box voxels fall on template voxels, so the box is the template there up to the z-scoring
    rng = np.random.default_rng(0)
    ijk = np.column_stack([rng.integers(20, 160, 60), rng.integers(20, 180, 60), 2 * rng.integers(2, 34, 60)])
    vox = np.round(nib.affines.apply_affine(np.linalg.inv(tpl.affine), nib.affines.apply_affine(BOX_AFFINE, ijk)))
    got = box[tuple(ijk.T)]
    want = data[tuple(vox.astype(int).T)]
    slope, icpt = np.polyfit(want, got, 1)
    assert slope > 0 and np.abs(slope * want + icpt - got).max() < 1e-4
    np.testing.assert_allclose(nib.affines.apply_affine(BOX_AFFINE, (0, 0, 0)), [90, -117, -33])
    np.testing.assert_allclose(nib.affines.apply_affine(BOX_AFFINE, (183, 201, 71)), [-93, 84, 73.5])
    g = np.indices(BOX_SHAPE)
    prob = (sum((gi - c) ** 2 for gi, c in zip(g, (100, 120, 30))) <= 16).astype(np.float32)
    native = box_to_native(prob, tpl.affine, data.shape, np.eye(4))
    c_native = nib.affines.apply_affine(tpl.affine, np.argwhere(native > 0.5).mean(axis=0))
    c_box = nib.affines.apply_affine(BOX_AFFINE, np.argwhere(prob > 0.5).mean(axis=0))
    np.testing.assert_allclose(c_native, c_box, atol=0.6)


@pytest.mark.shared
def test_cmb_uses_the_head_net_mask_through_the_swi_to_t1_registration(deep, tmp_path):
    """cmb with [deepwmh_head, deepwmh_affine, SHIVA stand-in]: the 'SWI' is the example T1's voxels in a head moved by
    a few mm, so the mask must come through the rigid SWI -> T1 registration; on the SWI's native grid
    it matches the upstream intracranial mask of those voxels. Without the T1's head box (SWI-only
    sessions) the morphological fallback mask is used."""
    from cohortseg.models.ensemble import load_models
    from cohortseg.models.store import ModelStore
    from cohortseg.pipelines import get_pipeline
    from cohortseg.pipelines.base import Context, Item, OutputWriter, Prepared
    from standins import make_shiva_bundle

    desc, root = make_shiva_bundle(tmp_path / "models", target="CMB", modalities=("swi",), n_folds=1)
    cards = [find_card("deepwmh_head"), find_card("deepwmh_affine"), find_card(str(desc))]
    models = [deep["models"][0], deep["models"][1], load_models(cards[2:], ModelStore(root))[0]]
    t1 = deep["dir"] / "t1_image.nii.gz"
    img = nib.load(str(t1))
    moved = img.affine.copy()
    moved[:3, 3] += [6.0, -4.0, 3.0]
    swi = tmp_path / "sub-01_swi.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, np.float32), moved), str(swi))
    item = Item("sub-01", "", "cmb", "sub-01_swi", {"image": str(swi), "t1": str(t1)})
    p = get_pipeline("cmb")
    cfg, ctx = {"interpolation": "linear"}, Context(output_dir=str(tmp_path))
    prep = p.prepare(item, cards, cfg, ctx)
    assert prep.arrays["head_box"].shape == (64, 64, 64)
    prob = p.predict(models, prep, cards, cfg, 1)
    assert str(prob["mask_source"]).startswith("model:deepwmh_head (intracranial prior of the T1, through")
    out = OutputWriter(tmp_path / "out", item)
    metrics = p.finalize(item, prep, prob, cards, cfg, ctx, out)
    mask = np.asarray(nib.load(out.files["desc-brain_mask.nii.gz"]).dataobj)
    ref = np.asarray(nib.load(str(deep["dir"] / "reference/t1_image_brain_mask.nii.gz")).dataobj)
    assert _dice(mask, ref) >= 0.95
    side = json.loads(open(out.files["label-CMB_dseg.json"]).read())
    assert side["brain_mask"].startswith("model:deepwmh_head")
    # the MNI affine came from the deep-T1-WMH nets (no antspyx registration in prepare): SWI world ->
    # MNI = the upstream program's T1 affine after undoing the shift (box corners within 2 mm)
    assert prep.meta["mni"]["matrix"] is None and side["mni"]["tool"] == "deep-T1-WMH affine net"
    shift = np.eye(4)
    shift[:3, 3] = [-6.0, 4.0, -3.0]
    ref = _itk_matrix((deep["dir"] / "reference/t1_image_mni0Affine.txt").read_text()) @ shift
    from cohortseg.science.deepwmh import BOX_AFFINE

    c = BOX_AFFINE @ np.array([[i, j, k, 1.0] for i in (0, 183) for j in (0, 201) for k in (0, 71)]).T
    d = np.linalg.norm((np.linalg.inv(np.asarray(prob["mni_matrix"])) @ c - np.linalg.inv(ref) @ c)[:3], axis=0)
    assert d.max() < 2.0, d
    assert abs(metrics["etiv_ml"] - 1440.75) / 1440.75 < 0.01  # upstream eTIV of the T1, mm^3 -> mL

    swi_only = Prepared(x=prep.x, meta=prep.meta, arrays={"brain_mask": prep.arrays["brain_mask"]})
    assert str(p.predict(models, swi_only, cards, cfg, 1)["mask_source"]) == "fallback"


def test_provenance_names_the_mask_and_etiv_methods():
    from cohortseg.models.cards import pipeline_cards
    from cohortseg.pipelines import get_pipeline

    cfg = {"wmh": {"models": ["deepwmh_head", "deepwmh_affine", "deepwmh_rois", "deepwmh_wmh"]},
           "cmb": {"models": ["deepwmh_head", "deepwmh_affine", "shiva_cmb"]},
           "brain_tissue": {"models": ["brainchop_mindgrab", "brainchop_gw", "brainchop_subcortical", "deepwmh_head"]}}
    m = {p: get_pipeline(p).methods(pipeline_cards(cfg, p), cfg[p]) for p in cfg}
    assert m["wmh"]["etiv"].startswith("deep-T1-WMH head net") and m["wmh"]["mni_affine"] == "deep-T1-WMH affine net"
    assert m["cmb"]["brain_mask"].startswith("deepwmh_head: deep-T1-WMH head net") and "fallback" in m["cmb"]["brain_mask"]
    assert m["cmb"]["mni_affine"].startswith("deep-T1-WMH head + affine nets") and m["cmb"]["etiv"].startswith("deep")
    assert m["brain_tissue"]["etiv_icv"].startswith("deep-T1-WMH") and m["brain_tissue"]["etiv"].startswith("atlas")
    shiva = {"models": ["shiva_wmh"]}
    assert get_pipeline("wmh").methods(pipeline_cards({"wmh": shiva}, "wmh"), shiva)["brain_mask"].startswith("otsu")


def test_unpooling_and_instance_norm_semantics_without_torch():
    """The custom layers on small arrays, against numpy: max-pool returns the first maximum of each
    window in (kd, kh, kw) order (ties: ReLU zeros), the unpooling puts the value back there and
    zero-pads odd sizes; InstanceNorm uses the biased variance and eps 1e-5."""
    import keras

    from cohortseg.models.nets.deepwmh_torch import _layers

    inorm, _, poolarg, unpool = _layers()
    x = np.zeros((1, 5, 4, 3, 2), np.float32)
    x[0, 1, 0, 0, 0] = 3.0  # window (0, 0, 0): max at offset (1, 0, 0) -> position 4
    x[0, 2, 3, 1, 1] = 2.0  # window (1, 1, 0), channel 1: offset (0, 1, 1) -> position 3
    inp = keras.Input((5, 4, 3, 2))
    top, first = poolarg((2, 2, 2))(inp)
    back = unpool((2, 2, 2), (5, 4, 3))([top, first])
    t, f, b = (np.asarray(v) for v in keras.Model(inp, [top, first, back])(x))
    assert t.shape == (1, 2, 2, 1, 2) and b.shape == (1, 5, 4, 3, 2)
    assert f[0, 0, 0, 0, 0] == 4 and f[0, 1, 1, 0, 1] == 3 and f[0, 1, 0, 0, 0] == 0  # all-zero window: first
    expect = np.zeros_like(x)
    expect[0, 1, 0, 0, 0], expect[0, 2, 3, 1, 1] = 3.0, 2.0
    np.testing.assert_array_equal(b, expect)  # the odd 5th slice and 3rd column are zero padding
    v = np.random.default_rng(0).normal(3, 2, (1, 4, 4, 4, 3)).astype(np.float32)
    mu, var = v.mean(axis=(1, 2, 3), keepdims=True), v.var(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(np.asarray(inorm()(v)), (v - mu) / np.sqrt(var + 1e-5), atol=1e-5)


UNPOOL_THEN_CONV = """
import numpy as np, keras
from cohortseg.models.nets.deepwmh_torch import _layers
_, _, poolarg, unpool = _layers()
inp = keras.Input((5, 7, 3, 2))
top, first = poolarg((2, 2, 2))(inp)
back = unpool((2, 2, 2), (5, 7, 3))([top, first])
conv = keras.layers.Conv3D(2, 3, padding="same", use_bias=False, kernel_initializer="ones")
y = keras.layers.Add()([conv(back), inp])
x = np.zeros((1, 5, 7, 3, 2), np.float32)
x[0, 1, 0, 0, 0] = 3.0
print(repr(float(np.asarray(keras.Model(inp, y).predict_on_batch(x)).sum())))
"""


def test_unpooling_then_a_same_conv_runs_with_onednn_on():
    """The region and WMH nets unpool to odd sizes and convolve ('same') and add the skip: with
    TensorFlow's oneDNN rewrite on (default on AVX-512 CPUs), a Pad before such a Conv3D was fused
    into it and gave a wrong shape (the region net failed on the example T1) or a crash. Forced on
    here, in a child process (a crash must not take pytest down). Expected sum: the 3 at (1, 0, 0)
    spreads to its 3x3x3 neighbours inside the volume (3 x 2 x 2 = 12 voxels), in both output
    channels, plus the input itself: 3 x 12 x 2 + 3 = 75."""
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    res = subprocess.run([sys.executable, "-c", UNPOOL_THEN_CONV], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.strip().splitlines()[-1]) == 75.0


def test_align_corners_sampling_convention():
    """Normalised coordinates -1/+1 are the centres of the first/last voxels; outside the volume
    trilinear sampling treats the missing neighbours as 0 (a point half a voxel out gets half the edge)."""
    from cohortseg.science.deepwmh import normaliser, resample

    vol = np.ones((4, 5, 6), np.float32)
    n = normaliser(vol.shape)
    np.testing.assert_allclose(n @ [0, 0, 0, 1], [-1, -1, -1, 1])
    np.testing.assert_allclose(n @ [3, 4, 5, 1], [1, 1, 1, 1])
    shift = np.eye(4)
    shift[:3, 3] = [-0.5, 0, 0]  # output voxel i samples input voxel i - 0.5
    out = resample(vol, vol.shape, shift)
    np.testing.assert_allclose(out[0], 0.5)  # half a voxel outside: half the edge value
    np.testing.assert_allclose(out[1:], 1.0)
    lab = resample(np.arange(4, dtype=np.float32)[:, None, None] * np.ones((4, 5, 6), np.float32), (4, 5, 6),
                   np.eye(4), order=0)
    np.testing.assert_array_equal(lab[:, 0, 0], [0, 1, 2, 3])


@pytest.mark.shared
def test_workflow_run_gives_the_upstream_table(shared_dir, tmp_path):
    """The real Snakefile on one session (the example T1), stand-in WMH net: group/wmh_regions.csv has the
    upstream columns with the upstream values, summary.csv the wmh_* columns, summary.json the methods."""
    import yaml

    from helpers import snakemake, write_config

    bids = tmp_path / "bids"
    (bids / "sub-01/anat").mkdir(parents=True)
    (bids / "dataset_description.json").write_text('{"Name": "deepwmh", "BIDSVersion": "1.9.0"}')
    src = shared_dir / "data/brain/deep-T1-WMH"
    (bids / "sub-01/anat/sub-01_T1w.nii.gz").write_bytes((src / "t1_image.nii.gz").read_bytes())
    models = tmp_path / "models"
    (models / "deep-T1-WMH/torchparams").mkdir(parents=True)
    for f in PARAMS.values():
        (models / "deep-T1-WMH/torchparams" / f).symlink_to(shared_dir / "models/deep-T1-WMH/torchparams" / f)
    standin = _standin_card(models)
    card_file = tmp_path / "standin_wmh.yaml"
    card_file.write_text(yaml.safe_dump(dict(standin.data, folds=[{"file": "standin_wmh.keras"}])))
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", bids_dir=str(bids), output_dir=str(out), model_dir=str(models),
                       pipelines=["wmh"], wmh={"models": ["deepwmh_head", "deepwmh_affine", "deepwmh_rois", str(card_file)]})
    snakemake(tmp_path, "--cores", "2", configfile=cfg)
    ref = pd.read_csv(src / "reference/t1_image_wmh_in_lrois.csv").iloc[0]
    table = pd.read_csv(out / "group/wmh_regions.csv")
    assert list(table.columns) == ["participant_id", "session_id", "contrast", "filename", *ref.index]
    row = table.iloc[0]
    assert row["participant_id"] == "sub-01" and abs(row["eTIV"] - ref["eTIV"]) / ref["eTIV"] < 0.01
    for r in ("periventricular", "deepwhite", "infracortical", "innergray"):
        assert abs(row[f"roisize_{r}"] - ref[f"roisize_{r}"]) / ref[f"roisize_{r}"] < 0.03
    summary = pd.read_csv(out / "group/summary.csv").iloc[0]
    assert summary["wmh_status"] == "ok" and summary["wmh_vol_total"] == 0
    assert abs(summary["wmh_eTIV"] - ref["eTIV"]) / ref["eTIV"] < 0.01
    prov = json.loads((out / "group/summary.json").read_text())
    assert prov["methods"]["wmh"]["etiv"].startswith("deep-T1-WMH head net")
