"""The derivative datasets are valid BIDS: the official validator reports no error and pybids indexes them.

The naming rule (cohortseg.pipelines.base.bids_name) is checked on its own; the validator
(bids-validator-deno, pinned in the lock's test extras, offline) runs on the suite's sc_csa run
(tests/runs.py: a session, an `acq-` entity, T1w and T2w of one session); the workflow tests of the
other pipelines (test_workflow_run, test_pipeline_brain, test_pipeline_lesion) validate their own
runs with the same `assert_bids_valid`.
"""
from __future__ import annotations

import json
import warnings

import nibabel as nib
import pytest

from cohortseg.pipelines.base import BIDSIGNORE, bids_name, bids_uri
from helpers import KEPT_WARNINGS, REPO, assert_bids_valid, output_path
from runs import CSA_SUB02


def test_names_keep_the_source_entities_and_name_the_contrast_as_the_space():
    assert bids_name("sub-02_T2starw", "label-GM_mask.nii.gz") == "sub-02_space-T2starw_label-GM_mask.nii.gz"
    assert (bids_name("sub-01_ses-01_acq-brain_run-2_T1w", "desc-brain_mask.nii.gz")
            == "sub-01_ses-01_acq-brain_run-2_space-T1w_desc-brain_mask.nii.gz")
    # the three contrasts of one session stay apart
    names = {bids_name(f"sub-01_ses-01_{c}", "label-SC_probseg.nii.gz") for c in ("T1w", "T2w", "T2starw")}
    assert len(names) == 3
    # entity order of the specification, whatever the key's order; no label- on a dseg (BIDS: seg-)
    assert bids_name("sub-01_swi", "label-CMB_dseg.nii.gz") == "sub-01_space-swi_seg-CMB_dseg.nii.gz"
    assert bids_name("sub-01_T1w", "desc-x_label-GM_probseg.json") == "sub-01_space-T1w_label-GM_desc-x_probseg.json"
    assert bids_name("sub-01_T1w", "dseg.tsv") == "sub-01_space-T1w_dseg.tsv"
    # a source already in a named space keeps it
    mni = "sub-01_space-MNI152NLin2009cAsym"
    assert bids_name(f"{mni}_T1w", "dseg.nii.gz") == f"{mni}_dseg.nii.gz"
    with pytest.raises(ValueError, match="unknown to BIDS or repeated"):
        bids_name("sub-01_T1w", "foo-1_mask.nii.gz")
    with pytest.raises(ValueError, match="unknown to BIDS or repeated"):
        bids_name("sub-01_space-orig_T1w", "space-x_mask.nii.gz")


def test_sources_are_bids_uris_into_the_raw_dataset(tmp_path):
    assert bids_uri(tmp_path / "bids" / "sub-01" / "ses-01" / "anat" / "sub-01_ses-01_T2w.nii.gz") == \
        "bids:raw:sub-01/ses-01/anat/sub-01_ses-01_T2w.nii.gz"
    assert bids_uri(tmp_path / "levels.nii.gz").startswith("file:///")


def test_readme_lists_every_kept_warning_and_the_bidsignore():
    readme = (REPO / "README.md").read_text()
    start = readme.index("## BIDS validity")
    section = readme[start:readme.index("\n## ", start)]
    for code in KEPT_WARNINGS:
        assert f"`{code}`" in section, code
    for pattern in BIDSIGNORE:
        assert f"`{pattern}`" in section, pattern


@pytest.mark.shared
@pytest.mark.slow
def test_the_csa_run_passes_the_bids_validator(csa_run):
    """Sessions, an acq- entity, T1w and T2w of one session, a refused item's kept outputs: no error."""
    dataset = csa_run["out"] / "sc_csa"
    issues = assert_bids_valid(dataset)
    print(f"{dataset}: {len(issues)} warnings kept: {sorted({i['code'] for i in issues})}")
    assert (dataset / "README.md").is_file() and (dataset / ".bidsignore").is_file()


@pytest.mark.shared
@pytest.mark.slow
def test_every_image_has_units_and_a_sidecar_with_its_provenance(csa_run):
    out = csa_run["out"]
    summary = json.loads((out / "group/summary.json").read_text())
    desc = json.loads((out / "sc_csa/dataset_description.json").read_text())
    made = desc["GeneratedBy"][0]
    assert made["Name"] == "cohortseg" and made["CodeURL"].startswith("https://")
    assert made["CodeVersion"] == summary["code_versions"]["sc_csa"]
    raw = (out / "sc_csa" / desc["DatasetLinks"]["raw"]).resolve()
    assert raw == csa_run["bids"].resolve() and desc["SourceDatasets"][0]["URL"] == desc["DatasetLinks"]["raw"]
    images = sorted((out / "sc_csa").rglob("*.nii.gz"))
    assert len(images) == 2 * 4  # probseg + mask of 4 items (the refused brain T1w's kept for QC)
    for img in images:
        assert nib.load(img).header.get_xyzt_units() == ("mm", "sec"), img
        side = json.loads(img.with_name(img.name.replace(".nii.gz", ".json")).read_text())
        source = side["SpatialReference"]
        assert source.startswith("bids:raw:") and (raw / source[len("bids:raw:"):]).is_file(), img
        assert side["Sources"][0] == source and side["CodeVersion"] == made["CodeVersion"]
        assert [m["Name"] for m in side["Models"]] == ["sc_csa"] and side["Models"][0]["Folds"][0]["sha256"]
        assert side["Thresholds"]["threshold"] == summary["thresholds"]["sc_csa"]["threshold"]
        if img.name.endswith("_mask.nii.gz"):
            assert side["Type"] == "ROI"


@pytest.mark.shared
@pytest.mark.slow
def test_pybids_indexes_the_derivatives_and_finds_the_masks_by_entities(csa_run):
    import bids

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layout = bids.BIDSLayout(csa_run["bids"], validate=False, derivatives=csa_run["out"] / "sc_csa")
    masks = layout.get(scope="cohortseg", suffix="mask", label="SC", extension=".nii.gz", return_type="filename")
    assert len(masks) == 4
    one = layout.get(scope="cohortseg", subject="02", session="01", acquisition="axial", space="T2starw",
                     label="SC", suffix="mask", extension=".nii.gz", return_type="filename")
    assert one == [str(output_path(csa_run["out"], "sc_csa", CSA_SUB02, "label-SC_mask.nii.gz"))]
    # T1w and T2w of the one session: told apart by the space entity, each with its source
    for contrast in ("T1w", "T2w"):
        f = layout.get(scope="cohortseg", subject="01", space=contrast, suffix="mask", extension=".nii.gz")
        assert len(f) == 1
        assert f[0].get_metadata()["SpatialReference"] == f"bids:raw:sub-01/anat/sub-01_{contrast}.nii.gz"


def test_a_rerun_removes_the_outputs_an_older_version_named_otherwise(tmp_path):
    """After an upgrade that renames outputs, the recomputed item's old files would linger (and make
    the dataset invalid): the writer removes those of its previous record, and nothing outside the
    pipeline's dataset."""
    import numpy as np

    from cohortseg.pipelines.base import Item, OutputWriter

    item = Item("sub-01", "ses-01", "sc_gm", "sub-01_ses-01_T2starw", {})
    writer = OutputWriter(tmp_path / "out", item)
    old = writer.anat / "sub-01_ses-01_T2starw_label-GM_mask.nii.gz"  # the name before #26
    old.parent.mkdir(parents=True)
    old.write_bytes(b"")
    elsewhere = tmp_path / "notes.txt"
    elsewhere.write_text("mine")
    new = writer.nifti("label-GM_mask.nii.gz", np.zeros((2, 2, 2), np.uint8), np.eye(4))
    writer.remove_stale([str(old), str(elsewhere), str(new)])
    assert not old.exists() and elsewhere.exists() and new.is_file()
    assert new.with_name(new.name.replace(".nii.gz", ".json")).is_file()
