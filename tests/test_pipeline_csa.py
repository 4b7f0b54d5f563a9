"""sc_csa end to end through the real Snakefile with the committed bundle (config/models/sc_csa).

Cohort (tests/runs.py, `csa_run`): sub-01 has the shared T1w and T2w of one session plus the
vertebral labels drawn on the T2w, carried to the T1w through scanner coordinates; sub-02 has only
the T2*w (session ses-01, acq-axial) and no labels (VertLevel n/a, whole-cord row); sub-03 a brain
T1w (refused: no cord).
One run (~1 min on 2 cores) is checked from several angles; the pure helpers
(levels carried across grids, session_metrics) are tested without TensorFlow.
"""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from cohortseg.science import csa
from helpers import output_path, snakemake
from runs import CSA_SUB02

SCT_PERSLICE = list(csa.PER_SLICE_COLUMNS)
SCT_PERLEVEL = ["Slice (I->S)", "VertLevel", "N slices", "MEAN(area)", "STD(area)", "SUM(length)"]
IDS = ["participant_id", "session_id", "contrast"]


# ------------------------------------------------------------------------------ pure helpers
def _item(status, **metrics):
    from cohortseg.workflow.records import ItemRecord

    return ItemRecord(status, metrics=metrics)


def test_session_metrics_sd_and_cv_across_contrasts():
    from cohortseg.pipelines import get_pipeline

    p = get_pipeline("sc_csa")
    items = {"sub-01_T1w": _item("ok", csa_mean_mm2=60.0, csa_C3_mm2=60.0, csa_C4_mm2=66.0, n_slices=70),
             "sub-01_T2w": _item("ok", csa_mean_mm2=70.0, csa_C3_mm2=70.0, csa_C5_mm2=75.0),
             "sub-01_T2starw": _item("failed")}
    m = p.session_metrics(items)
    assert m["n_contrasts"] == 2
    assert m["csa_C3_sd_mm2"] == pytest.approx(np.std([60, 70], ddof=1), abs=1e-3)
    assert m["csa_C3_cv_pct"] == pytest.approx(100 * np.std([60, 70], ddof=1) / 65, abs=1e-2)
    assert "csa_mean_sd_mm2" in m and "csa_mean_cv_pct" in m
    assert "csa_C4_sd_mm2" not in m and "csa_C5_sd_mm2" not in m  # one contrast only
    assert p.session_metrics({"sub-02_T2w": _item("ok", csa_mean_mm2=70.0)}) == {"n_contrasts": 1}
    assert p.session_metrics({"-": _item("failed")}) == {"n_contrasts": 0}


@pytest.mark.shared
def test_levels_carried_across_grids_by_world_position(shared_dir):
    from cohortseg.pipelines.sc_csa import level_name, levels_on_image

    t2 = nib.load(shared_dir / "data/spine/t2/t2.nii.gz")
    t1 = nib.load(shared_dir / "data/spine/t1/t1w.nii.gz")
    lab = nib.load(shared_dir / "data/spine/t2/labels.nii.gz")
    same = levels_on_image(lab, t2.shape, t2.affine)
    ref = csa.vertebral_levels(np.asarray(lab.dataobj), lab.affine, kind="points")
    np.testing.assert_array_equal(same, ref)
    carried = levels_on_image(lab, t1.shape, t1.affine)
    assert carried.shape == (t1.shape[csa.si_axis(t1.affine)],)
    # C3's body centre (label 3) sits at the same world height in both grids
    vox3 = np.argwhere(np.asarray(lab.dataobj) == 3)[0]
    in_t1 = np.linalg.solve(t1.affine, lab.affine @ np.r_[vox3, 1.0])  # t1 voxel of the C3 label
    assert carried[int(round(in_t1[csa.si_axis(t1.affine)]))] == 3
    assert set(np.unique(carried[np.isfinite(carried)]).astype(int)) == {3, 4, 5}
    assert [level_name(x) for x in (1, 7, 8, 19, 20, 25)] == ["C1", "C7", "T1", "T12", "L1", "S1"]


# ------------------------------------------------------------------------------ the workflow
@pytest.fixture(scope="module")
def run(csa_run):
    """The sc_csa run of tests/runs.py (shared with test_bids_validator)."""
    return csa_run


def _anat(run, sub, stem, key):
    return output_path(run["out"], "sc_csa", stem, key)


@pytest.mark.shared
@pytest.mark.slow
def test_outputs_on_native_grid_and_soft_binary_consistency(run):
    for sub, stem in [("sub-01", "sub-01_T1w"), ("sub-01", "sub-01_T2w"), ("sub-02/ses-01", CSA_SUB02)]:
        native = nib.load(run["bids"] / sub / "anat" / f"{stem}.nii.gz")
        prob_img = nib.load(_anat(run, sub, stem, "label-SC_probseg.nii.gz"))
        mask_img = nib.load(_anat(run, sub, stem, "label-SC_mask.nii.gz"))
        for im in (prob_img, mask_img):
            assert im.shape == native.shape and np.allclose(im.affine, native.affine, atol=1e-5)
        prob, mask = prob_img.get_fdata(), mask_img.get_fdata()
        assert prob.min() >= 0 and prob.max() <= 1 and mask.any()
        assert ((prob > 0) & (prob < 1)).sum() > 0.2 * mask.sum(), "probseg should be soft"
        assert np.array_equal(prob > 0.5, mask > 0), stem  # the mask is exactly probseg > threshold
        # the per-slice table is the soft map's CSA, computed by hand from the written file: the sum of
        # the slice's probabilities x the pixel area, x cos of the cord's tilt (SCT: tan^2 = tan^2 AP + tan^2 RL)
        tsv = pd.read_csv(_anat(run, sub, stem, "desc-csa_perslice.tsv"), sep="\t").dropna(subset=["MEAN(area)"])
        lin = prob_img.affine[:3, :3]
        k = int(np.argmax(np.abs(lin[2])))  # the voxel axis that runs S-I
        ia, ib = [a for a in range(3) if a != k]
        pix = float(np.linalg.norm(np.cross(lin[:, ia], lin[:, ib])))
        idx = tsv["Slice (I->S)"].to_numpy(int)
        idx = idx if lin[2, k] > 0 else prob.shape[k] - 1 - idx
        mass = np.moveaxis(np.clip(prob, 0, 1), k, -1).sum(axis=(0, 1))[idx]
        tan2 = np.tan(np.radians(tsv["MEAN(angle_AP)"].to_numpy(float))) ** 2 + np.tan(np.radians(tsv["MEAN(angle_RL)"].to_numpy(float))) ** 2
        np.testing.assert_allclose(tsv["MEAN(area)"].to_numpy(float), mass * pix / np.sqrt(1 + tan2), rtol=1e-3)
        assert 40 < np.median(tsv["MEAN(area)"]) < 120, stem  # adult cervical cord: 50-100 mm2 (SCT's norms)
        # ... and agrees with the binary mask's CSA within a few percent
        binary = csa.csa_per_slice(mask > 0, mask_img.affine, angle_correction=True)
        soft_mean, bin_mean = np.nanmean(tsv["MEAN(area)"]), np.nanmean(binary["MEAN(area)"])
        print(f"{stem}: mean CSA soft {soft_mean:.1f} mm2, binary {bin_mean:.1f} mm2")
        assert abs(soft_mean - bin_mean) / bin_mean < 0.08, (stem, soft_mean, bin_mean)
        png = output_path(run["out"], "sc_csa", stem, "desc-SC_qc.png", figure=True)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.shared
@pytest.mark.slow
def test_csa_at_c3_t1w_vs_t2w(run):
    df = pd.read_csv(run["out"] / "group/summary.csv").set_index("participant_id")
    t1, t2 = float(df.loc["sub-01", "sc_csa_T1w_csa_C3_mm2"]), float(df.loc["sub-01", "sc_csa_T2w_csa_C3_mm2"])
    gap = abs(t1 - t2) / ((t1 + t2) / 2)
    print(f"CSA at C3: T1w {t1:.1f} mm2, T2w {t2:.1f} mm2, gap {100 * gap:.1f} % of their mean "
          f"(manual masks: T1w 68.2, T2w 77.5, gap 12.8 %)")
    for v in (t1, t2):
        assert 40.0 <= v <= 110.0  # plausible adult cervical cord CSA
    # the committed bundle's models learnt one cord from the consensus of both contrasts' masks
    # (in-sample for this subject: it is the only labelled one; docs/TRAINING.md)
    assert gap <= 0.10, f"T1w and T2w CSA at C3 differ by {100 * gap:.1f} %"


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.parametrize("stem,manual", [("sub-01_T1w", "t1/t1w_seg-manual.nii.gz"), ("sub-01_T2w", "t2/t2_seg-manual.nii.gz")])
def test_cord_and_csa_against_the_manual_masks(run, shared_dir, stem, manual):
    """The workflow's cord mask against each contrast's manual mask (Dice), and its CSA per slice
    against the manual mask's CSA measured the same way (csa.csa_per_slice), over the slices both
    cover. In-sample: the shipped models were trained on this subject's masks (docs/TRAINING.md)."""
    from cohortseg.science.metrics import dice

    gt_img = nib.load(shared_dir / "data" / "spine" / manual)
    gt = np.asarray(gt_img.dataobj) > 0.5
    mask_img = nib.load(_anat(run, "sub-01", stem, "label-SC_mask.nii.gz"))
    assert mask_img.shape == gt_img.shape and np.allclose(mask_img.affine, gt_img.affine, atol=1e-4)
    d = dice(np.asarray(mask_img.dataobj) > 0, gt)
    ours = pd.read_csv(_anat(run, "sub-01", stem, "desc-csa_perslice.tsv"), sep="\t").set_index("Slice (I->S)")
    ref = csa.csa_per_slice(gt, gt_img.affine, angle_correction=True).set_index("Slice (I->S)")
    both = ours.index.intersection(ref.index)
    a, b = ours.loc[both, "MEAN(area)"].to_numpy(float), ref.loc[both, "MEAN(area)"].to_numpy(float)
    rel = (a.mean() - b.mean()) / b.mean()
    print(f"{stem}: Dice {d:.3f} vs manual; mean CSA over {len(both)} slices {a.mean():.1f} mm2 vs manual "
          f"{b.mean():.1f} mm2 ({100 * rel:+.1f} %), per-slice r {np.corrcoef(a, b)[0, 1]:.2f}")
    assert len(both) >= 0.8 * len(ref)
    assert d >= 0.90
    assert abs(rel) <= 0.12


@pytest.mark.shared
@pytest.mark.slow
def test_group_tables_have_ids_and_sct_columns(run):
    per_level = pd.read_csv(run["out"] / "group/csa_perlevel.csv")
    per_slice = pd.read_csv(run["out"] / "group/csa_perslice.csv")
    assert per_level.columns[:3].tolist() == IDS and per_slice.columns[:3].tolist() == IDS
    assert set(SCT_PERLEVEL) <= set(per_level.columns) and set(SCT_PERSLICE) <= set(per_slice.columns)
    assert "Filename" in per_slice.columns
    sub1 = per_level[per_level.participant_id == "sub-01"]
    assert sorted(sub1.contrast.unique()) == ["T1w", "T2w"]
    for c in ("T1w", "T2w"):
        assert sorted(sub1[sub1.contrast == c].VertLevel.astype(int)) == [3, 4, 5], c
    # no levels for sub-02: one whole-cord row, VertLevel empty; per-slice VertLevel empty too
    sub2 = per_level[per_level.participant_id == "sub-02"]
    assert len(sub2) == 1 and sub2.VertLevel.isna().all() and sub2.contrast.tolist() == ["T2starw"]
    assert per_slice[per_slice.participant_id == "sub-02"].VertLevel.isna().all()
    assert per_slice[per_slice.participant_id == "sub-01"].VertLevel.notna().any()
    assert (per_slice.session_id.fillna("") == per_slice.participant_id.map({"sub-01": "", "sub-02": "ses-01"})).all()
    # the per-item TSV (SCT layout) writes unknown levels as n/a
    tsv = _anat(run, "sub-02", CSA_SUB02, "desc-csa_perlevel.tsv").read_text()
    assert "\tn/a\t" in tsv.splitlines()[1]


@pytest.mark.shared
@pytest.mark.slow
def test_summary_csa_columns_and_cross_contrast_variability(run):
    df = pd.read_csv(run["out"] / "group/summary.csv").set_index("participant_id")
    assert df.loc["sub-01", "status"] == "ok" and df.loc["sub-02", "status"] == "ok"
    for col in ("sc_csa_T1w_csa_mean_mm2", "sc_csa_T2w_csa_mean_mm2", "sc_csa_T2starw_csa_mean_mm2",
                "sc_csa_T1w_csa_C3_mm2", "sc_csa_T2w_csa_C4_mm2", "sc_csa_T2w_csa_C5_mm2",
                "sc_csa_csa_C3_sd_mm2", "sc_csa_csa_C3_cv_pct", "sc_csa_csa_mean_sd_mm2",
                "sc_csa_csa_mean_cv_pct", "sc_csa_n_contrasts"):
        assert col in df.columns, col
    r = df.loc["sub-01"]
    assert r["sc_csa_n_contrasts"] == 2 and df.loc["sub-02", "sc_csa_n_contrasts"] == 1
    for lvl in ("C3", "C4", "C5", "mean"):
        v = [r[f"sc_csa_T1w_csa_{lvl}_mm2"], r[f"sc_csa_T2w_csa_{lvl}_mm2"]]
        sd = np.std(v, ddof=1)
        assert r[f"sc_csa_csa_{lvl}_sd_mm2"] == pytest.approx(sd, abs=2e-3)
        assert r[f"sc_csa_csa_{lvl}_cv_pct"] == pytest.approx(100 * sd / np.mean(v), abs=2e-2)
        print(f"{lvl}: T1w {v[0]:.1f}, T2w {v[1]:.1f} mm2 -> SD {sd:.2f} mm2, CV {100 * sd / np.mean(v):.1f} %")
    assert pd.isna(df.loc["sub-02", "sc_csa_csa_C3_sd_mm2"])  # one contrast: no variability
    assert not [c for c in df.columns if c.startswith("sc_csa_T2starw_csa_C")]  # no levels for sub-02
    prov = json.loads((run["out"] / "group/summary.json").read_text())
    assert prov["models"]["sc_csa"]["source"].endswith("config/models/sc_csa/card.yaml")
    assert prov["thresholds"]["sc_csa"]["threshold"] == 0.5


@pytest.mark.shared
@pytest.mark.slow
def test_a_brain_t1w_is_refused_not_measured(run):
    """A brain T1w in a multi-protocol cohort reaches sc_csa: refused, with the reason, outputs
    (mask, QC figure) kept, no CSA in the tables."""
    df = pd.read_csv(run["out"] / "group/summary.csv", keep_default_na=False).set_index("participant_id")
    r = df.loc["sub-03"]
    assert r["status"] == "refused" and r["sc_csa_status"] == "refused" and r["sc_csa_n_contrasts"] == 0
    assert r["error"].startswith("sc_csa/sub-03_T1w: finalize: no spinal cord in the field of view: ")
    assert "anatomy.min_continuity" in r["error"] and "sub-03_T1w.nii.gz" in r["error"]
    assert r["sc_csa_T1w_csa_mean_mm2"] == ""
    assert output_path(run["out"], "sc_csa", "sub-03_T1w", "desc-SC_qc.png", figure=True).is_file()
    assert "sub-03" not in set(pd.read_csv(run["out"] / "group/csa_perlevel.csv").participant_id)
    rec = json.loads((run["out"] / "work/records/sub-03.json").read_text())["pipelines"]["sc_csa"]["sub-03_T1w"]
    assert rec["status"] == "refused" and rec["checks"]["cord"]["continuity"] < 0.5
    assert "label-SC_mask.nii.gz" in rec["files"]
    prov = json.loads((run["out"] / "group/summary.json").read_text())
    assert prov["anatomy"]["sc_csa"]["min_continuity"] == 0.8 and prov["body_part"]["route"] is True


@pytest.mark.shared
@pytest.mark.slow
def test_rerun_is_a_noop_and_train_is_not_in_the_default_target(run):
    res = snakemake(run["tmp"], "-n", "--cores", "1", configfile=run["cfg"])
    assert "Nothing to be done" in res.stdout + res.stderr
    assert "rule train" not in res.stdout + res.stderr


def test_flip_tta_averages_the_mirrored_prediction():
    """A card with tta.flip_lr averages f(x) with the left-right mirror of f(mirrored x); without it,
    the plain fold average. The stand-in 'model' weights pixels by a left-right ramp (not symmetric)."""
    from types import SimpleNamespace

    from cohortseg.pipelines import get_pipeline
    from cohortseg.pipelines.base import Prepared

    ramp = np.linspace(0.0, 1.0, 8)[None, :, None, None]
    fold = SimpleNamespace(predict=lambda x: x * ramp)
    x = np.random.default_rng(0).random((3, 8, 6, 1)).astype(np.float32)
    prep = Prepared(x=x, meta={})
    p = get_pipeline("sc_csa")
    plain = p.predict([[fold]], prep, [{"tta": {"flip_lr": False}}], {}, 2)
    np.testing.assert_allclose(plain.prob, x * ramp, rtol=1e-6)
    tta = p.predict([[fold]], prep, [{"tta": {"flip_lr": True}}], {}, 2)
    np.testing.assert_allclose(tta.prob, 0.5 * (x * ramp + (x[:, ::-1] * ramp)[:, ::-1]), rtol=1e-6)
