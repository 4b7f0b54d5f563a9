"""The `cmb` and `wmh` pipelines (cohortseg.pipelines.cmb / .wmh, shared SHIVA steps in cohortseg.pipelines.cmb.ShivaLesions).

Stand-in SHIVA fold bundles (tests/standins.py: real tensor shapes, a 1x1x1 "dark detector" per fold)
are written to tmp_path with a model_info json whose md5s are computed like SHIVA's; synthetic lesions
(dark balls, what the stand-ins detect) are planted at known places in a real brain (brainchop's
t1_crop). The SWI and FLAIR stand-ins are that T1 on other grids (oblique, anisotropic, other
orientation) in a moved head, so the rigid registrations and the way back to the native grid do real
work. One real workflow run (module scope) is checked from several angles; the plugin methods are
also tested directly where that is cheaper.

Where the lesions are: T1 voxel coordinates picked on t1_crop (checked by eye) whose MNI152
coordinates are pons (0, -25, -32), right cerebellum (22, -62, -32), left frontal white matter
(-24, 30, 28), right parietal (30, -50, 40), left thalamus (-12, -18, 6) for the CMBs and right
periventricular (20, -10, 24) and left deep white matter (-19, -13, 0; >= 6 mm inside the template's
deep-white region) for the WMHs.

Lesion intensity: the stand-in folds fire where the normalised input is ~0 (below 5 % of the brain's
99th percentile), far below the half-way level a trained network puts a lesion's edge at, so a 0-valued
ball comes back ~1 mm thinner after the resamplings. The balls are therefore planted at minus the
surrounding tissue's mean: the interpolated edge then crosses 0 where it crosses the half-way level,
and the detected volume is the planted one.
"""
from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from cohortseg.models.cards import ModelCard, find_card
from cohortseg.errors import InputError, ModelError
from cohortseg.pipelines import get_pipeline
from cohortseg.pipelines.base import Context, Item, OutputWriter, Predicted, Prepared
from cohortseg.models.lesion_cards import card_channels, split_cards
from cohortseg.models.lesion_nets import meshnet_brain_mask
from cohortseg.science.conform import conform_ras
from cohortseg.science.lesion_input import fallback_brain_mask, full_volume, unpack_mask
from helpers import assert_bids_valid, output_path, snakemake, write_config
from standins import crude_brain_mask, make_shiva_bundle, reference_prediction

pytestmark = [pytest.mark.shared]

# T1 (t1_crop, LIA) voxel -> (expected CMB location class, MNI152 mm)
CMB_SITES = {(127, 163, 110): ("infratentorial", (0, -25, -32)), (108, 167, 74): ("infratentorial", (22, -62, -32)),
             (149, 109, 160): ("lobar", (-24, 30, 28)), (101, 108, 81): ("lobar", (30, -50, 40)),
             (138, 132, 115): ("deep", (-12, -18, 6))}
CMB_RADIUS_MM = 3.0
# T1 voxel -> (radius mm, expected WMH region)
WMH_SITES = {(110, 116, 121): (4.0, "periventricular"), (145, 136, 120): (3.5, "deep_white")}
FLOOR = 40.0  # brain voxels are floored so that only the planted balls are black (what the stand-ins detect)


# ----------------------------------------------------------------------------------------------
# synthetic data
# ----------------------------------------------------------------------------------------------
def _rigid(deg_x=0.0, deg_z=0.0, shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    ax, az = np.deg2rad(deg_x), np.deg2rad(deg_z)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = rz @ rx
    m[:3, 3] = shift
    return m


def _grid(zooms, shape, codes, deg_x, centre_mm) -> np.ndarray:
    """An (oblique) grid of `shape` voxels of `zooms` mm in orientation `codes`, centred on `centre_mm`."""
    ornt = nib.orientations.axcodes2ornt(codes)
    a = np.zeros((4, 4))
    a[3, 3] = 1
    for i, (ax, fl) in enumerate(ornt):
        a[int(ax), i] = fl * zooms[i]
    a = _rigid(deg_x=deg_x) @ a
    a[:3, 3] = np.asarray(centre_mm) - a[:3, :3] @ (np.asarray(shape) / 2.0)
    return a


def _resample_world(data, src_aff, shape, dst_aff, head_motion, order=1):
    """Image of the head moved by `head_motion` (world -> world), on the grid (shape, dst_aff)."""
    vox = np.linalg.inv(src_aff) @ np.linalg.inv(head_motion) @ dst_aff
    return ndimage.affine_transform(data, vox[:3, :3], offset=vox[:3, 3], output_shape=shape, order=order,
                                    mode="constant", cval=0.0)


def _ball_world(shape, aff, centre_mm, radius_mm) -> np.ndarray:
    """Voxels of the grid (shape, aff) whose centres lie within `radius_mm` of the world point `centre_mm`."""
    c = (np.linalg.inv(aff) @ np.r_[centre_mm, 1])[:3]
    h = np.ceil(radius_mm / np.sqrt((aff[:3, :3] ** 2).sum(0))).astype(int) + 2
    lo = np.maximum(np.floor(c).astype(int) - h, 0)
    hi = np.minimum(np.floor(c).astype(int) + h + 1, shape)
    ijk = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1).reshape(-1, 3)
    xyz = ijk @ aff[:3, :3].T + aff[:3, 3]
    out = np.zeros(shape, bool)
    sel = ijk[np.linalg.norm(xyz - centre_mm, axis=1) <= radius_mm]
    out[tuple(sel.T)] = True
    return out


@pytest.fixture(scope="module")
def t1_base(shared_dir):
    img = nib.load(shared_dir / "data" / "brain" / "t1_crop.nii.gz")
    data = np.asarray(img.dataobj, np.float32)
    # brain voxels are floored (only the planted balls are black): a generous region around both masks
    floor_region = ndimage.binary_dilation(crude_brain_mask(data) | fallback_brain_mask(data, img.affine), iterations=5)
    data = np.where(floor_region, np.maximum(data, FLOOR), data)
    return data, img.affine


def _plant(vol, ball):
    """A lesion at minus the mean of the 2-voxel shell around it (see the module docstring)."""
    shell = ndimage.binary_dilation(ball, iterations=2) & ~ball
    vol[ball] = -float(vol[shell].mean())


def make_cohort(root, t1_base, with_sub02=False, spine_t1=None):
    """BIDS dataset: sub-01 SWI (5 CMBs) + T1w and FLAIR (2 WMHs); optionally sub-02 with a SWI only,
    sub-03 with sub-01's T1w only (no FLAIR) and sub-04 with the cervical-cord T1w `spine_t1`."""
    t1, aff = t1_base
    bids = root / "bids"
    anat = bids / "sub-01" / "anat"
    anat.mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "lesions", "BIDSVersion": "1.9.0"}))
    truth = {"cmb": [], "wmh": []}
    t1w = t1.copy()
    for v, (r, region) in WMH_SITES.items():
        c = nib.affines.apply_affine(aff, v)
        ball = _ball_world(t1.shape, aff, c, r)
        _plant(t1w, ball)
        truth["wmh"].append({"world": c, "volume": float(ball.sum()), "region": region})
    nib.save(nib.Nifti1Image(np.rint(t1w).astype(np.int16), aff), anat / "sub-01_T1w.nii.gz")
    # FLAIR: head moved by 3 deg / few mm, 1.1 x 1.1 x 1.5 mm LPS grid
    fl_motion = _rigid(deg_x=3.0, deg_z=-2.0, shift=(2.0, -3.0, 1.5))
    centre = nib.affines.apply_affine(aff, np.array(t1.shape) / 2)
    f_shape = (200, 210, 130)
    f_aff = _grid((1.1, 1.1, 1.5), f_shape, ("L", "P", "S"), 0.0, centre)
    flair = _resample_world(t1w, aff, f_shape, f_aff, fl_motion)
    nib.save(nib.Nifti1Image(flair.astype(np.int16), f_aff), anat / "sub-01_FLAIR.nii.gz")
    # SWI: the lesion-free T1 moved by 4 deg, oblique axial slab, 0.9 x 0.9 x 1.6 mm, RAS-ish
    sw_motion = _rigid(deg_x=-4.0, deg_z=3.0, shift=(-3.0, 2.0, 4.0))
    s_shape = (240, 250, 110)
    s_aff = _grid((0.9, 0.9, 1.6), s_shape, ("R", "A", "S"), 8.0, centre)
    swi = _resample_world(t1, aff, s_shape, s_aff, sw_motion)
    for v, (region, mni) in CMB_SITES.items():
        c = sw_motion @ np.r_[nib.affines.apply_affine(aff, v), 1]  # where the site is in the SWI session
        ball = _ball_world(s_shape, s_aff, c[:3], CMB_RADIUS_MM)
        _plant(swi, ball)
        truth["cmb"].append({"world": c[:3], "volume": float(ball.sum() * np.prod([0.9, 0.9, 1.6])), "region": region,
                             "mni": mni})
    nib.save(nib.Nifti1Image(swi.astype(np.float32) * 7.3, s_aff), anat / "sub-01_swi.nii.gz")
    truth["swi_grid"] = (s_shape, s_aff)
    truth["t1_grid"] = (t1.shape, aff)
    truth["flair_motion"] = fl_motion
    if with_sub02:
        a2 = bids / "sub-02" / "anat"
        a2.mkdir(parents=True)
        shutil.copy(anat / "sub-01_swi.nii.gz", a2 / "sub-02_swi.nii.gz")
        a3 = bids / "sub-03" / "anat"  # a T1w without FLAIR: the T1-only WMH card takes it
        a3.mkdir(parents=True)
        shutil.copy(anat / "sub-01_T1w.nii.gz", a3 / "sub-03_T1w.nii.gz")
        a4 = bids / "sub-04" / "anat"  # a multi-protocol study: this participant had a cord scan
        a4.mkdir(parents=True)
        shutil.copy(spine_t1, a4 / "sub-04_T1w.nii.gz")
    return bids, truth


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    cmb_desc, _ = make_shiva_bundle(root, target="CMB", modalities=("swi",), n_folds=2, fmt="savedmodel")
    wmh_desc, _ = make_shiva_bundle(root, target="WMH", modalities=("t1", "flair"), n_folds=2, fmt="h5")
    t1_desc, _ = make_shiva_bundle(root, target="WMH", modalities=("t1",), n_folds=2, fmt="h5")
    return root, cmb_desc, wmh_desc, t1_desc


@pytest.fixture(scope="module")
def run(tmp_path_factory, t1_base, bundles, shared_dir):
    tmp = tmp_path_factory.mktemp("lesion_e2e")
    bids, truth = make_cohort(tmp, t1_base, with_sub02=True, spine_t1=shared_dir / "data/spine/t1/t1w.nii.gz")
    root, cmb_desc, wmh_desc, t1_desc = bundles
    out = tmp / "out"
    cfg = write_config(tmp / "cfg.yaml", bids_dir=str(bids), output_dir=str(out), model_dir=str(root),
                       pipelines=["cmb", "wmh"], inference={"shard_size": 2},
                       cmb={"models": [str(cmb_desc)], "interpolation": "linear"},
                       # T1+FLAIR where the session has a FLAIR, else the T1-only card (FLAIR optional)
                       wmh={"models": [str(wmh_desc), str(t1_desc)], "interpolation": "linear"})
    res = snakemake(tmp, "--cores", "2", configfile=cfg)
    return {"tmp": tmp, "out": out, "truth": truth, "res": res, "cmb_desc": cmb_desc, "wmh_desc": wmh_desc}


# ----------------------------------------------------------------------------------------------
# end to end (the real Snakefile)
# ----------------------------------------------------------------------------------------------
def _match(census: pd.DataFrame, truth: list[dict]):
    xyz = census[["x_mm", "y_mm", "z_mm"]].to_numpy(float)
    pairs = []
    for t in truth:
        d = np.linalg.norm(xyz - t["world"], axis=1)
        k = int(np.argmin(d))
        pairs.append((t, census.iloc[k], float(d[k])))
    return pairs


@pytest.mark.slow
def test_cmb_census_recovers_planted_microbleeds(run):
    census = pd.read_csv(output_path(run["out"], "cmb", "sub-01_swi", "desc-CMB_census.tsv"), sep="\t")
    assert len(census) == len(CMB_SITES)
    assert list(census.lesion_id) == list(range(1, len(CMB_SITES) + 1))
    for t, row, dist in _match(census, run["truth"]["cmb"]):
        assert dist < 1.5, (t, row.to_dict())
        # the SWI's 0.9 x 0.9 x 1.6 mm oblique grid -> 1 mm conformed -> back: 0.92-1.0 of the planted
        # volume measured (a voxel-volume or one-voxel dilation error is 1.8x / 2x)
        assert 0.87 * t["volume"] < row.volume_mm3 < 1.03 * t["volume"], (t, row.to_dict())
        assert row.region == t["region"], (t, row.to_dict())
        assert row.prob_max > 0.8 and row.outside_brain_frac == 0
        # MNI coordinates through SWI -> T1 (rigid) -> MNI (affine): near the site's MNI coordinates
        assert np.linalg.norm(row[["mni_x", "mni_y", "mni_z"]].to_numpy(float) - t["mni"]) < 8, (t, row.to_dict())
    regions = pd.read_csv(output_path(run["out"], "cmb", "sub-01_swi", "desc-CMB_regions.tsv"), sep="\t").set_index("region")
    assert regions.loc["infratentorial", "count"] == 2 and regions.loc["lobar", "count"] == 2
    assert regions.loc["deep", "count"] == 1 and regions.loc["unassigned", "count"] == 0


@pytest.mark.slow
def test_wmh_census_and_regions(run):
    census = pd.read_csv(output_path(run["out"], "wmh", "sub-01_T1w", "desc-WMH_census.tsv"), sep="\t")
    assert len(census) == len(WMH_SITES)
    for t, row, dist in _match(census, run["truth"]["wmh"]):
        assert dist < 1.5, (t, row.to_dict())
        # on the T1's own grid (already 1 mm RAS-conformable): 0.98-1.0 of the planted volume measured
        assert row.volume_mm3 == pytest.approx(t["volume"], rel=0.04), (t, row.to_dict())
        assert row.region == t["region"], (t, row.to_dict())
    regions = pd.read_csv(output_path(run["out"], "wmh", "sub-01_T1w", "desc-WMH_regions.tsv"), sep="\t").set_index("region")
    assert regions.volume_mm3.sum() == pytest.approx(census.volume_mm3.sum(), rel=1e-6)
    assert regions.loc["periventricular", "volume_mm3"] > 100 and regions.loc["deep_white", "volume_mm3"] > 80


@pytest.mark.slow
def test_wmh_without_flair_uses_the_t1_only_card(run):
    """FLAIR is optional: sub-03 (sub-01's T1w, no FLAIR) runs the T1-only card listed beside the
    T1+FLAIR one, finds the same planted WMHs, and says which model it used; sub-01 used T1+FLAIR."""
    census = pd.read_csv(output_path(run["out"], "wmh", "sub-03_T1w", "desc-WMH_census.tsv"), sep="\t")
    assert len(census) == len(WMH_SITES)
    for t, row, dist in _match(census, run["truth"]["wmh"]):  # same T1w grid as sub-01
        assert dist < 1.5 and row.volume_mm3 == pytest.approx(t["volume"], rel=0.04), (t, row.to_dict())
    t1_only, t1_flair = (f"shiva-{m}-wmh-standin" for m in ("t1", "t1-flair"))
    side = json.loads(output_path(run["out"], "wmh", "sub-03_T1w", "label-WMH_dseg.json").read_text())
    assert [m["name"] for m in side["models"]] == [t1_only]
    side1 = json.loads(output_path(run["out"], "wmh", "sub-01_T1w", "label-WMH_dseg.json").read_text())
    assert [m["name"] for m in side1["models"]] == [t1_flair]
    rec = json.loads((run["out"] / "work" / "records" / "sub-03.json").read_text())
    item = rec["pipelines"]["wmh"]["sub-03_T1w"]
    assert item["status"] == "ok" and any(f"models used: {t1_only}" in w for w in item["warnings"])


@pytest.mark.slow
def test_outputs_are_valid_bids_derivatives(run):
    for pipe in ("cmb", "wmh"):
        assert_bids_valid(run["out"] / pipe)


@pytest.mark.slow
def test_outputs_on_the_native_grids(run):
    truth = run["truth"]
    for pipe, stem, grid in [("cmb", "sub-01_swi", truth["swi_grid"]), ("wmh", "sub-01_T1w", truth["t1_grid"])]:
        t = pipe.upper()
        prob = nib.load(output_path(run["out"], pipe, stem, f"label-{t}_probseg.nii.gz"))
        dseg = nib.load(output_path(run["out"], pipe, stem, f"label-{t}_dseg.nii.gz"))
        mask = nib.load(output_path(run["out"], pipe, stem, "desc-brain_mask.nii.gz"))
        for img in (prob, dseg, mask):
            assert img.shape == tuple(grid[0]) and np.allclose(img.affine, grid[1], atol=1e-4)
        p = prob.get_fdata()
        lab = np.asarray(dseg.dataobj)
        assert 0 <= p.min() and p.max() <= 1 and lab.max() == len(CMB_SITES if pipe == "cmb" else WMH_SITES)
        thr = 0.5 if pipe == "cmb" else 0.2
        assert np.all(p[lab > 0] > thr)
        side = json.loads(output_path(run["out"], pipe, stem, f"label-{t}_dseg.json").read_text())
        assert side["postprocessing"]["threshold"] == thr and side["postprocessing"]["min_cluster_voxels"] == 1
        assert side["postprocessing"]["max_outside_fraction"] == 0.25 and side["brain_mask"].startswith("otsu")
        for key in (f"desc-{t}_qc.png", f"desc-{t}_lesions.png", "desc-brain_mask.png"):
            assert output_path(run["out"], pipe, stem, key, figure=True).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the WMH registration FLAIR -> T1 recovered the simulated head motion (its inverse): points of
    # the head mapped T1 -> FLAIR (motion) -> T1 (registration) land within 1 mm of where they started
    rec = json.loads((run["out"] / "work" / "records" / "sub-01.json").read_text())
    assert rec["pipelines"]["wmh"]["sub-01_T1w"]["status"] == "ok"
    prep = Prepared.load(run["out"] / "work" / "prep" / "wmh" / "sub-01" / "sub-01_T1w.npz")
    flair_to_t1 = np.asarray(prep.meta["registration"]["flair_to_t1"])
    shape, aff = truth["t1_grid"]
    centre = nib.affines.apply_affine(aff, np.array(shape) / 2)
    corners = centre + 50.0 * np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).reshape(3, -1).T  # a 10 cm cube
    back = nib.affines.apply_affine(flair_to_t1 @ truth["flair_motion"], corners)
    err = np.linalg.norm(back - corners, axis=1)
    print(f"FLAIR -> T1 rigid: corner errors {np.round(err, 2)} mm")
    assert err.max() < 1.0
    moved = np.linalg.norm(nib.affines.apply_affine(truth["flair_motion"], corners) - corners, axis=1)
    assert moved.max() > 5.0  # the motion was real


@pytest.mark.slow
def test_summary_tables_and_provenance(run):
    out = run["out"]
    df = pd.read_csv(out / "group" / "summary.csv", dtype={"session_id": str}, keep_default_na=False)
    row = df.set_index("participant_id").loc["sub-01"]
    assert row.cmb_status == "ok" and row.wmh_status == "ok"
    # (float columns: sub-03 has no SWI, so no cmb values)
    assert float(row.cmb_count) == 5 and float(row.cmb_count_infratentorial) == 2 and float(row.cmb_count_deep) == 1
    assert float(row.wmh_count) == 2  # (a float column: sub-02 has no wmh value)
    truth_wmh = sum(t["volume"] for t in run["truth"]["wmh"])
    assert float(row.wmh_volume_mm3) == pytest.approx(truth_wmh, rel=0.04)  # 0.99 measured
    assert 900 < float(row.wmh_etiv_ml) < 2000 and float(row.cmb_etiv_ml) == float(row.wmh_etiv_ml)
    assert 900 < float(row.wmh_brain_mask_ml) < 2000
    # sub-02: SWI only -> CMBs found with an SWI -> MNI registration; no T1 for wmh: no input, no error
    r2 = df.set_index("participant_id").loc["sub-02"]
    assert r2.cmb_status == "ok" and float(r2.cmb_count) == 5 and r2.wmh_status == "no_input"
    assert r2.status == "ok" and r2.error == "" and r2.cmb_etiv_ml == ""
    r3 = df.set_index("participant_id").loc["sub-03"]  # T1w only: wmh through the T1-only card, no cmb
    assert r3.wmh_status == "ok" and float(r3.wmh_count) == 2 and r3.cmb_status == "no_input" and r3.status == "ok"
    # sub-04: a cervical-cord T1w -> wmh refused in prepare (no net ran), the criterion named
    r4 = df.set_index("participant_id").loc["sub-04"]
    assert (r4.status, r4.wmh_status, r4.cmb_status) == ("refused", "refused", "no_input")
    assert r4.error.startswith("wmh/sub-04_T1w: prepare: not a brain image: field of view 42 x 76 x 77 mm")
    assert "anatomy.min_fov_mm" in r4.error and "sub-04_T1w.nii.gz" in r4.error
    census = pd.read_csv(out / "group" / "cmb_census.csv")
    assert list(census.columns[:4]) == ["participant_id", "session_id", "contrast", "lesion_id"]
    assert (census.participant_id == "sub-01").sum() == 5 and (census.participant_id == "sub-02").sum() == 5
    regions = pd.read_csv(out / "group" / "wmh_regions.csv")
    assert set(regions.region) == {"periventricular", "deep_white", "infracortical", "unassigned"}
    prov = json.loads((out / "group" / "summary.json").read_text())
    assert prov["thresholds"]["cmb"]["threshold"] == 0.5 and prov["thresholds"]["wmh"]["threshold"] == 0.2
    assert prov["thresholds"]["cmb"]["min_cluster_voxels"] == 1
    info = json.loads(run["cmb_desc"].read_text())
    card = next(m for m in prov["models"].values() if m["pipeline"] == "cmb")
    assert [f["md5"] for f in card["folds"]] == [f["md5"] for f in info["files"]]
    assert (out / "qc" / "index.html").is_file()


def test_wrong_md5_stops_the_run_before_any_job(tmp_path, bundles, t1_base):
    root, cmb_desc, *_ = bundles
    info = json.loads(cmb_desc.read_text())
    info["files"][1]["md5"] = "0" * 32
    bad = tmp_path / "model_info_swi-cmb-bad.json"
    bad.write_text(json.dumps(info))
    bids = tmp_path / "bids" / "sub-01" / "anat"
    bids.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), bids / "sub-01_swi.nii.gz")
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", bids_dir=str(tmp_path / "bids"), output_dir=str(out),
                       model_dir=str(root), pipelines=["cmb"], cmb={"models": [str(bad)]})
    res = snakemake(tmp_path, "--cores", "1", configfile=cfg, check=False)
    msg = res.stdout + res.stderr
    assert res.returncode != 0
    assert "checksum mismatch" in msg and info["files"][1]["name"].split("/")[-1] in msg and "0" * 32 in msg
    assert not (out / "work" / "prep").exists() and not (out / "cmb").exists()


# ----------------------------------------------------------------------------------------------
# plugin methods, directly
# ----------------------------------------------------------------------------------------------
class _NumpyFold:
    """What a stand-in fold computes, without TensorFlow."""

    def __init__(self, k):
        self.k = k

    def predict(self, x):
        return reference_prediction(x, self.k).astype(np.float32)


def _card(name, modalities, loader="keras_full"):
    return ModelCard(data={"name": name, "pipeline": "x", "contrasts": modalities, "modalities": modalities,
                           "architecture": {"loader": loader}, "folds": [{"file": "f", "md5": "0" * 32}]},
                     source=None)


def test_conform_ras_reindexes_exactly_or_interpolates():
    rng = np.random.default_rng(0)
    cases = [(("L", "I", "A"), (32, 32, 32)), (("P", "S", "R"), (30, 34, 28)), (("R", "A", "S"), (31, 33, 29))]
    for codes, shape in cases:
        d = rng.random(shape).astype(np.float32)
        aff = _grid((1.0, 1.0, 1.0), shape, codes, 0.0, (3.0, -5.0, 10.0))
        c = conform_ras(nib.Nifti1Image(d, aff), order=1, shape=32)
        assert nib.aff2axcodes(c.affine) == ("R", "A", "S") and c.shape == (32, 32, 32)
        # every conformed voxel holds the native value at the same world point
        ijk = np.argwhere(np.ones(c.shape, bool))[::97]
        src = nib.affines.apply_affine(np.linalg.inv(aff) @ c.affine, ijk)
        inside = np.all((src >= 0) & (src <= np.array(shape) - 1), axis=1)
        ref = ndimage.map_coordinates(d, src[inside].T, order=1)
        np.testing.assert_allclose(np.asarray(c.dataobj)[tuple(ijk[inside].T)], ref, atol=1e-5)
        # FOV centre -> conformed centre voxel
        np.testing.assert_allclose(c.affine @ [16, 16, 16, 1], aff @ np.r_[np.array(shape) / 2, 1], atol=1e-6)


def test_census_in_the_suprathreshold_box_equals_the_full_census():
    from cohortseg.science.lesions import WMH_REGIONS, census_in_box, lesion_census

    rng = np.random.default_rng(5)
    prob = ndimage.gaussian_filter(rng.random((60, 70, 50)).astype(np.float32), 1.5)
    prob = (prob - prob.min()) / (prob.max() - prob.min())
    mask = np.zeros(prob.shape, bool)
    mask[5:55, 8:60, 4:45] = True
    rmap = rng.integers(0, 4, prob.shape).astype(np.uint8)
    aff = _grid((0.9, 1.1, 1.5), prob.shape, ("L", "P", "S"), 5.0, (3.0, 4.0, 5.0))
    mni = _rigid(2.0, 3.0, (1.0, 2.0, 3.0))
    lab_full, full = lesion_census(prob, mask, aff, 0.7, 2, 0.25, regions=(rmap, WMH_REGIONS), mni_affine_fn=mni)
    lab_box, box = census_in_box(prob, mask, aff, 0.7, 2, 0.25, (rmap, WMH_REGIONS), mni)
    assert len(full) > 3 and np.array_equal(lab_full, lab_box)
    for a, b in zip(full, box):
        for k, v in a.items():
            assert b[k] == (pytest.approx(v, abs=1e-6) if isinstance(v, float) else v), k
    assert census_in_box(prob, mask, aff, 1.0, 2, 0.25, None, None)[1] == []


def test_fallback_brain_mask_on_a_real_head(t1_base):
    data, aff = t1_base
    m = fallback_brain_mask(data, aff)
    assert 1_000_000 < m.sum() < 1_700_000  # mm^3 (1 mm voxels)
    for v in list(CMB_SITES) + list(WMH_SITES):
        assert m[v]
    assert not m[0, 0, 0] and not m[:, :5].any()  # corners / top of the FOV (LIA: axis 1 = I)
    with pytest.raises(InputError):
        fallback_brain_mask(np.zeros((20, 20, 20), np.float32), np.eye(4))


def test_card_roles():
    shiva, mask = _card("s", ["swi"]), _card("mindgrab", ["T1w"], loader="tfjs_layers")
    assert split_cards([mask, shiva]) == (0, [1])
    assert split_cards([shiva]) == (None, [0])
    with pytest.raises(ModelError, match="first card"):
        split_cards([shiva, mask])
    with pytest.raises(ModelError, match="no lesion segmentation model"):
        split_cards([mask])
    with pytest.raises(ModelError, match="needs modality 'swi'"):
        card_channels([shiva], get_pipeline("wmh").modality_roles, "wmh")
    assert find_card("shiva_cmb").folds[0]["file"].startswith("SWI-CMB/")
    assert find_card("shiva_wmh").data["modalities"] == ["t1", "flair"]


def test_prepare_fails_clearly_on_bad_inputs(tmp_path):
    g = {}
    ctx = Context(output_dir=str(tmp_path), max_voxels=10**9)
    p = tmp_path / "sub-01_swi.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20), np.float32), np.eye(4)), p)
    item = Item("sub-01", "", "cmb", "sub-01_swi", {"image": str(p)})
    with pytest.raises(InputError, match="all zeros"):
        get_pipeline("cmb").prepare(item, [_card("s", ["swi"])], g, ctx)
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(InputError, match="corrupt|not a readable"):
        get_pipeline("cmb").prepare(item, [_card("s", ["swi"])], g, ctx)
    t1 = tmp_path / "sub-01_T1w.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((20, 20, 20), np.float32), np.eye(4)), t1)
    item = Item("sub-01", "", "wmh", "sub-01_T1w", {"image": str(t1)})
    with pytest.raises(InputError, match="need a FLAIR"):
        get_pipeline("wmh").prepare(item, [_card("w", ["t1", "flair"])], g, ctx)


def test_predict_and_finalize_directly(tmp_path, t1_base):
    """prepare's output built by hand (no registration): a conformed T1 with 2 dark balls; the
    numpy stand-in folds; predict -> npz round trip -> finalize on the native (LIA) grid."""
    data, aff = t1_base
    t1 = data.copy()
    sites = list(WMH_SITES)
    planted = np.zeros(t1.shape, bool)
    for v in sites:
        planted |= _ball_world(t1.shape, aff, nib.affines.apply_affine(aff, v), 3.0)
    t1[planted] = 0
    native = tmp_path / "sub-01_T1w.nii.gz"
    nib.save(nib.Nifti1Image(t1.astype(np.uint8), aff), native)
    conf = conform_ras(nib.Nifti1Image(t1, aff))
    mask = fallback_brain_mask(np.asarray(conf.dataobj), conf.affine)
    pipe = get_pipeline("wmh")
    card = _card("w", ["t1"])
    prep = pipe.finish_prepare({"t1": np.asarray(conf.dataobj)}, ["t1"], mask, conf, nib.load(native),
                                {"warnings": [], "mni": {"matrix": None, "error": "skipped"}})
    assert prep.x.ndim == 5 and prep.x.size < 0.7 * 256 ** 3 and prep.x.dtype == np.float16  # the head box
    fv, cv, scale = full_volume(prep.x, prep.meta["conformed_shape"], prep.meta["x_box"])[..., 0], np.asarray(conf.dataobj), prep.meta["scales"][0]
    sel = cv > 0.02 * scale  # everything above the background is kept (float16 precision)
    np.testing.assert_allclose(fv[sel] * scale, cv[sel], rtol=2e-3)
    prep.save(tmp_path / "prep.npz")
    prep = Prepared.load(tmp_path / "prep.npz")
    res = pipe.predict([[_NumpyFold(0), _NumpyFold(1)]], prep, [card], {}, 1)
    assert res["prob"].shape == (160, 214, 176) and res["prob"].dtype == np.float16
    assert np.array_equal(unpack_mask(res["brain_mask"], (256,) * 3), mask)
    res.save(tmp_path / "prob.npz")
    prob = Predicted.load(tmp_path / "prob.npz")
    item = Item("sub-01", "", "wmh", "sub-01_T1w", {"image": str(native)})
    out = OutputWriter(tmp_path / "out", item)
    metrics = pipe.finalize(item, prep, prob, [card], {"threshold": 0.2, "min_cluster_voxels": 1,
                                                       "max_outside_fraction": 0.25}, Context(), out)
    assert metrics["count"] == 2 and "etiv_ml" not in metrics
    expected = planted.sum() * abs(np.linalg.det(aff[:3, :3]))  # t1_crop: 1 mm voxels on the conformed grid
    assert metrics["volume_mm3"] == pytest.approx(expected, rel=0.01)  # measured: exactly the planted voxels
    assert metrics["volume_unassigned_mm3"] == pytest.approx(metrics["volume_mm3"])  # no MNI: no regions
    assert "mni_registration_failed" in out.flags
    dseg = nib.load(out.files["label-WMH_dseg.nii.gz"])
    assert dseg.shape == t1.shape and np.allclose(dseg.affine, aff)
    lab = np.asarray(dseg.dataobj)
    for v in sites:
        assert lab[v] > 0
    # a stricter minimum cluster size drops everything, and is what the sidecar records
    out2 = OutputWriter(tmp_path / "out2", item)
    m2 = pipe.finalize(item, prep, prob, [card], {"threshold": 0.2, "min_cluster_voxels": 500,
                                                  "max_outside_fraction": 0.25}, Context(), out2)
    assert m2["count"] == 0 and m2["volume_mm3"] == 0
    side = json.loads(open(out2.files["label-WMH_dseg.json"]).read())
    assert side["postprocessing"]["min_cluster_voxels"] == 500
    assert pd.read_csv(out2.files["desc-WMH_census.tsv"], sep="\t").empty


def test_meshnet_mask_path_keeps_the_orientation(t1_base):
    """A pointwise stand-in 'MeshNet' (brain = normalised intensity > 0.25): the mask that comes back
    is the thresholded RAS volume itself, so the LIA round trip and the crop are right."""
    import keras

    data, aff = t1_base
    conf = np.asarray(conform_ras(nib.Nifti1Image(data, aff)).dataobj)
    inp = keras.Input((None, None, None, 1))
    conv = keras.layers.Conv3D(2, 1)
    model = keras.Model(inp, conv(inp))
    conv.set_weights([np.array([0.0, 40.0], np.float32).reshape(1, 1, 1, 1, 2), np.array([0.0, -10.0], np.float32)])
    from cohortseg.science.brain import MeshNetSpec, largest_component

    m = meshnet_brain_mask([model], conf, MeshNetSpec("x", "brain_mask", ("bg", "brain"), crop_padding=2))
    pos = conf[conf > 0]
    u8 = np.rint(np.clip(conf, 0, None) / np.percentile(pos, 99.9) * 255).clip(0, 255)
    expected = largest_component(u8 / u8.max() > 0.25)
    assert m.shape == conf.shape and (m ^ expected).sum() < 1e-4 * m.sum()
    # the same stand-in as the first card of a pipeline: predict crops around its mask
    from types import SimpleNamespace

    vol = conf[..., None].astype(np.float32)
    prep = Prepared(x=vol[None].astype(np.float16), meta={"channels": ["swi"], "conformed_shape": [256] * 3},
                    arrays={"brain_mask": np.packbits(np.zeros(conf.shape, bool))})  # fallback unused
    res = get_pipeline("cmb").predict([[SimpleNamespace(model=model)], [_NumpyFold(0)]], prep,
                                      [_card("mindgrab", ["T1w"], loader="tfjs_layers"), _card("s", ["swi"])], {}, 1)
    assert str(res["mask_source"]) == "model:mindgrab"
    assert (unpack_mask(res["brain_mask"], conf.shape) ^ m).sum() < 1e-4 * m.sum()
    assert res["prob"].shape == (160, 214, 176)


def test_two_prepare_runs_of_a_session_give_identical_transforms_and_tables(tmp_path, t1_base):
    """Reproducibility for a given input and antspyx version: prepare the same CMB session (rigid
    SWI -> T1 and affine T1 -> MNI) twice from scratch, then predict and finalize each with the
    numpy stand-in folds: transforms bit-identical, census and region tables byte-identical."""

    bids, _ = make_cohort(tmp_path, t1_base)
    anat = bids / "sub-01" / "anat"
    item = Item("sub-01", "", "cmb", "sub-01_swi", {"image": str(anat / "sub-01_swi.nii.gz"),
                                                     "t1": str(anat / "sub-01_T1w.nii.gz")})
    card = _card("s", ["swi"])
    cfg = {"interpolation": "linear"}
    pipe = get_pipeline("cmb")
    runs = []
    for k in range(2):
        ctx = Context(output_dir=str(tmp_path), max_voxels=10**9)  # a new session memo: the T1's MNI
        prep = pipe.prepare(item, [card], cfg, ctx)  # registration is recomputed too
        prob = pipe.predict([[_NumpyFold(0), _NumpyFold(1)]], prep, [card], {}, 1)
        out = OutputWriter(tmp_path / f"out{k}", item)
        metrics = pipe.finalize(item, prep, prob, [card], {"threshold": 0.5, "min_cluster_voxels": 1,
                                                           "max_outside_fraction": 0.25}, ctx, out)
        runs.append((prep.meta, metrics, out.files))
    (m0, met0, f0), (m1, met1, f1) = runs
    assert m0["mni"]["matrix"] is not None and m0["registration"]["swi_to_t1"]
    assert m0["registration"] == m1["registration"]  # nested lists of floats: exact equality
    assert m0["mni"] == m1["mni"]
    assert met0 == met1 and met0["count"] >= 1
    for name in ("desc-CMB_census.tsv", "desc-CMB_regions.tsv"):
        assert open(f0[name], "rb").read() == open(f1[name], "rb").read(), name
