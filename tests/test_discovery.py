"""Discovery: BIDS parsing, filters, ambiguity/missing reports, the cached manifest."""
import json
from pathlib import Path
import os
import time

import pytest

from cohortseg.workflow import discovery, manifest as manifest_store
from cohortseg.fakebids import make_fake_bids

ROLES = {"sc_gm": {"image": ({"suffix": "T2starw"}, True, False)}}

def _rows(bids, roles, **kw):
    """The rows of a discovery from scratch (every folder listed), as a list."""
    import uuid

    return list(discovery.load_or_build(bids, Path(str(bids) + "-out") / f"manifest-{uuid.uuid4().hex}.tsv", roles,
                                        rebuild=True, **kw))



def test_parse_name():
    assert discovery.parse_name("sub-01_ses-2_acq-ax_run-1_T2starw.nii.gz") == (
        {"sub": "01", "ses": "2", "acq": "ax", "run": "1"}, "T2starw")
    assert discovery.parse_name("sub-01_T1w.json") is None
    assert discovery.parse_name("notbids_T1w.nii.gz") is None


def test_sessions_and_rows(tmp_path):
    make_fake_bids(tmp_path, 4, contrasts=("T2starw",), session_every=2)
    rows = _rows(tmp_path, ROLES)
    keys = [(r["participant_id"], r["session_id"]) for r in rows]
    assert keys == [("sub-00001", "ses-01"), ("sub-00001", "ses-02"), ("sub-00002", ""),
                    ("sub-00003", "ses-01"), ("sub-00003", "ses-02"), ("sub-00004", "")]
    assert all(r["status"] == "ok" for r in rows)
    assert rows[0]["item"] == "sub-00001_ses-01_T2starw"
    assert json.loads(rows[0]["inputs"])["image"].endswith("sub-00001/ses-01/anat/sub-00001_ses-01_T2starw.nii.gz")


def test_missing_contrast_is_reported_not_dropped(tmp_path):
    make_fake_bids(tmp_path, 2, contrasts=("T1w",), session_every=0)
    rows = _rows(tmp_path, ROLES)
    assert [r["status"] for r in rows] == ["missing", "missing"]
    assert "no image for role 'image'" in rows[0]["error"] and "T2starw" in rows[0]["error"]


def test_ambiguity_lists_candidates_and_filter(tmp_path):
    anat = tmp_path / "sub-01" / "anat"
    anat.mkdir(parents=True)
    for n in ("sub-01_acq-a_T2starw.nii.gz", "sub-01_acq-b_T2starw.nii.gz"):
        (anat / n).touch()
    rows = _rows(tmp_path, ROLES)
    assert rows[0]["status"] == "ambiguous"
    err = rows[0]["error"]
    assert "sub-01_acq-a_T2starw.nii.gz" in err and "sub-01_acq-b_T2starw.nii.gz" in err
    assert "sc_gm.filters.image" in err and "acq" in err
    # the filter resolves it
    rows = _rows(tmp_path, {"sc_gm": {"image": ({"suffix": "T2starw", "acq": "b"}, True, False)}})
    assert rows[0]["status"] == "ok" and rows[0]["item"] == "sub-01_acq-b_T2starw"


def test_multiple_role_gives_one_item_per_image(tmp_path):
    make_fake_bids(tmp_path, 1, contrasts=("T1w", "T2w", "T2starw"), session_every=0)
    rows = _rows(tmp_path, {"sc_csa": {"image": ({"suffix": ["T1w", "T2w"]}, True, True)}})
    assert sorted(r["item"] for r in rows) == ["sub-00001_T1w", "sub-00001_T2w"]


def test_participant_selection(tmp_path):
    make_fake_bids(tmp_path, 5, contrasts=("T2starw",), session_every=0)
    rows = _rows(tmp_path, ROLES, participant_label=["00002", "sub-00003"], exclude=["00003"])
    assert [r["participant_id"] for r in rows] == ["sub-00002"]


def test_manifest_cached_and_rebuilt_on_change(tmp_path):
    bids = make_fake_bids(tmp_path / "bids", 3, contrasts=("T2starw",), session_every=0)
    man = tmp_path / "out" / "manifest.tsv"
    rows = discovery.load_or_build(bids, man, ROLES)
    assert len(rows) == 3 and man.is_file()
    stamp = man.stat().st_mtime_ns
    time.sleep(0.01)
    assert len(discovery.load_or_build(bids, man, ROLES)) == 3
    assert man.stat().st_mtime_ns == stamp  # cache hit: not rewritten
    # a new participant changes the fingerprint -> rebuilt
    (bids / "sub-00009" / "anat").mkdir(parents=True)
    (bids / "sub-00009" / "anat" / "sub-00009_T2starw.nii.gz").touch()
    assert len(discovery.load_or_build(bids, man, ROLES)) == 4
    # cluster jobs trust the cache without scanning (even if the tree changed again)
    (bids / "sub-00010" / "anat").mkdir(parents=True)
    (bids / "sub-00010" / "anat" / "sub-00010_T2starw.nii.gz").touch()
    assert len(discovery.load_or_build(bids, man, ROLES, check=False)) == 4
    # ... also when their selection differs (another mount path of bids_dir, other filters): no listing
    listed, stamp = discovery.SCAN_COUNTS["subjects_listed"], man.stat().st_mtime_ns
    other = {"sc_gm": {"image": ({"suffix": "T2starw", "acq": "x"}, True, False)}}
    m = discovery.load_or_build(bids, man, other, check=False, rebuild=True)
    assert len(m) == 4 and discovery.SCAN_COUNTS["subjects_listed"] == listed and man.stat().st_mtime_ns == stamp
    assert any("another selection" in n for n in m.notes)
    from cohortseg.errors import CohortsegError

    with pytest.raises(CohortsegError, match="main snakemake process"):
        discovery.load_or_build(bids, tmp_path / "elsewhere" / "manifest.tsv", ROLES, check=False)
    assert len(discovery.load_or_build(bids, man, ROLES, rebuild=True)) == 5


def test_scan_never_writes_into_bids(tmp_path):
    bids = make_fake_bids(tmp_path / "bids", 2, contrasts=("T2starw",))
    before = sorted(os.walk(bids))
    discovery.load_or_build(bids, tmp_path / "out" / "manifest.tsv", ROLES)
    assert sorted(os.walk(bids)) == before


# -- the per-subject-folder cache and the compact index ------------------------------------------
ROLES2 = {"sc_gm": {"image": ({"suffix": "T2starw"}, True, False)},
          "brain_tissue": {"image": ({"suffix": "T1w"}, True, False)}}


def _aged(root, seconds=3600):
    """Set every file's and folder's mtime an hour back (a fresh folder or sidecar is 'racy': listed
    again next time)."""
    t = time.time() - seconds
    for d, _, files in os.walk(root):
        for f in files:
            os.utime(os.path.join(d, f), (t, t))
        os.utime(d, (t, t))


def _cohort(tmp_path, n=5):
    bids = make_fake_bids(tmp_path / "bids", n, contrasts=("T2starw", "T1w"), session_every=2)
    _aged(bids)
    return bids, tmp_path / "out" / "manifest.tsv"


def test_cached_manifest_equals_uncached_rows(tmp_path):
    bids, man = _cohort(tmp_path)
    (bids / "sub-00002" / "anat" / "sub-00002_T1w.nii.gz").unlink()  # a 'missing' row too
    m = discovery.load_or_build(bids, man, ROLES2)
    rows = _rows(bids, ROLES2)
    assert list(m) == rows == discovery.read_manifest(man)
    assert len(m) == len(rows) and m.stats["written"]
    assert [r["status"] for r in rows if r["participant_id"] == "sub-00002"] == ["ok", "missing"]


def test_unchanged_subject_folders_are_not_listed_again(tmp_path):
    bids, man = _cohort(tmp_path)
    discovery.load_or_build(bids, man, ROLES2)
    tsv = man.read_bytes()
    before = discovery.SCAN_COUNTS["subjects_listed"]
    m = discovery.load_or_build(bids, man, ROLES2)
    assert discovery.SCAN_COUNTS["subjects_listed"] == before  # stats only, no listing
    assert m.stats["listed"] == [] and not m.stats["written"] and man.read_bytes() == tsv
    assert any("manifest current" in n for n in m.notes)
    # a new image in one subject's session folder: only that subject folder is listed and rebuilt
    (bids / "sub-00003" / "ses-01" / "anat" / "sub-00003_ses-01_acq-b_T2starw.nii.gz").touch()
    m = discovery.load_or_build(bids, man, ROLES2)
    assert m.stats["listed"] == ["sub-00003"] and m.stats["changed"] == ["sub-00003"] and m.stats["rows_rebuilt"] == 1
    assert discovery.SCAN_COUNTS["subjects_listed"] == before + 1
    by = m.rows(m.keys)
    assert by["sub-00003_ses-01"][0]["status"] == "ambiguous"
    assert by["sub-00003_ses-02"][0]["status"] == "ok"
    # the other subjects' rows are the same bytes as before
    assert _rows(bids, ROLES2) == list(m)
    old = tsv.decode().splitlines()
    assert [ln for ln in old if "sub-00003" not in ln] == [ln for ln in man.read_text().splitlines() if "sub-00003" not in ln]
    # a new subject and a removed one
    import shutil

    shutil.rmtree(bids / "sub-00001")
    (bids / "sub-00009" / "anat").mkdir(parents=True)
    (bids / "sub-00009" / "anat" / "sub-00009_T2starw.nii.gz").touch()
    m = discovery.load_or_build(bids, man, ROLES2)
    assert m.stats["listed"] == ["sub-00003", "sub-00009"]  # sub-00003's folder was modified a moment ago
    assert m.stats["changed"] == ["sub-00009"] and m.stats["rows_rebuilt"] == 1
    assert [k for k in m.keys if k.startswith(("sub-00001", "sub-00009"))] == ["sub-00009"]
    assert list(m) == _rows(bids, ROLES2)


def test_selection_change_rebuilds_rows_without_listing(tmp_path):
    bids, man = _cohort(tmp_path)
    discovery.load_or_build(bids, man, ROLES2)
    m = discovery.load_or_build(bids, man, ROLES)  # another pipeline set
    assert m.stats["listed"] == [] and m.stats["rows_rebuilt"] == 5
    assert list(m) == _rows(bids, ROLES)
    m = discovery.load_or_build(bids, man, ROLES, participant_label=["00002"])
    assert {r["participant_id"] for r in m} == {"sub-00002"} and m.stats["listed"] == []


def _cohort_with_sidecars(tmp_path, text):
    """Three subjects, a JSON sidecar `text` beside every image, all aged."""
    bids, man = _cohort(tmp_path, n=3)
    for anat in bids.glob("sub-*/**/anat"):
        for img in anat.glob("*.nii.gz"):
            (anat / img.name.replace(".nii.gz", ".json")).write_text(text)
    _aged(bids)
    return bids, man


def test_sidecars_read_only_for_listed_folders(tmp_path):
    bids, man = _cohort_with_sidecars(tmp_path, '{"BodyPartExamined": "BRAIN", "X": 1}')
    keys = ("BodyPartExamined",)
    start = discovery.SCAN_COUNTS["sidecars_read"]
    discovery.load_or_build(bids, man, ROLES2, sidecar_keys=keys)
    n_images = len(list(bids.glob("sub-*/**/*.nii.gz")))
    assert discovery.SCAN_COUNTS["sidecars_read"] - start == n_images
    discovery.load_or_build(bids, man, ROLES2, sidecar_keys=keys)
    assert discovery.SCAN_COUNTS["sidecars_read"] - start == n_images  # cached with the folder
    (bids / "sub-00002" / "anat" / "sub-00002_T2starw.json").write_text('{"BodyPartExamined": "CSPINE"}')
    os.utime(bids / "sub-00002" / "anat")  # an editor's rename: the folder changes
    discovery.load_or_build(bids, man, ROLES2, sidecar_keys=keys)
    assert discovery.SCAN_COUNTS["sidecars_read"] - start == n_images + 2  # that folder's two images only
    cache = json.loads(man.with_suffix(".scan.json").read_text())
    assert cache["subjects"]["sub-00002"]["sidecars"]["anat/sub-00002_T2starw.nii.gz"] == {"BodyPartExamined": "CSPINE"}
    files = discovery.subject_files(str(bids / "sub-00002"), cache["subjects"]["sub-00002"])
    assert {f.suffix: f.sidecar for f in files}["T1w"] == {"BodyPartExamined": "BRAIN"}


def test_a_sidecar_edited_in_place_is_seen(tmp_path):
    """Fixing a sidecar's BodyPartExamined in place (open/write: the file's mtime changes, its
    folder's does not) lists that subject again with the new field (what body-part routing reads);
    the others stay stat only."""
    bids, man = _cohort_with_sidecars(tmp_path, '{"BodyPartExamined": "BRAIN"}')
    keys = ("BodyPartExamined",)
    discovery.load_or_build(bids, man, ROLES2, sidecar_keys=keys)
    m = discovery.load_or_build(bids, man, ROLES2, sidecar_keys=keys)
    assert m.stats["listed"] == []
    anat = bids / "sub-00002" / "anat"
    folder_mtime = anat.stat().st_mtime_ns
    side = anat / "sub-00002_T2starw.json"
    with open(side, "r+") as fh:  # in place, as a script or an editor without backups does
        fh.seek(0)
        fh.write('{"BodyPartExamined": "CSPINE"}')
        fh.truncate()
    past = time.time() - 600  # older than the racy window, newer than the stamp
    os.utime(side, (past, past))
    assert anat.stat().st_mtime_ns == folder_mtime
    start = discovery.SCAN_COUNTS["sidecars_read"]
    m = discovery.load_or_build(bids, man, ROLES2, sidecar_keys=keys)
    assert m.stats["listed"] == ["sub-00002"] and m.stats["changed"] == ["sub-00002"]
    assert discovery.SCAN_COUNTS["sidecars_read"] - start == 2  # that subject's two images only
    cache = json.loads(man.with_suffix(".scan.json").read_text())
    files = discovery.subject_files(str(bids / "sub-00002"), cache["subjects"]["sub-00002"])
    assert {f.suffix: f.sidecar for f in files} == {"T2starw": {"BodyPartExamined": "CSPINE"},
                                                     "T1w": {"BodyPartExamined": "BRAIN"}}
    assert discovery.load_or_build(bids, man, ROLES2, sidecar_keys=keys).stats["listed"] == []


def test_index_agrees_with_tsv(tmp_path):
    bids, man = _cohort(tmp_path)
    m = discovery.load_or_build(bids, man, ROLES2)
    idx = json.loads(man.with_suffix(".idx.json").read_text())
    rebuilt = discovery.index_from_tsv(man)
    assert {k: idx[k] for k in rebuilt} == rebuilt
    rows = discovery.read_manifest(man)
    grouped = {}
    for r in rows:
        grouped.setdefault(discovery.session_key(r["participant_id"], r["session_id"]), []).append(r)
    assert m.rows(list(grouped)) == grouped and m.keys == list(grouped)
    assert m.rows(["sub-00002", "nope"]) == {"sub-00002": grouped["sub-00002"], "nope": []}
    oks = {k: m.ok_pipelines(o) for k, o in zip(m.keys, m.ok)}
    for k, rs in grouped.items():
        assert sorted(oks[k]) == sorted({r["pipeline"] for r in rs if r["status"] == "ok"})


def test_corrupt_or_stale_index_falls_back_to_the_tsv(tmp_path, caplog):
    bids, man = _cohort(tmp_path)
    discovery.load_or_build(bids, man, ROLES2)
    rows = discovery.read_manifest(man)
    idx_path = man.with_suffix(".idx.json")
    idx_path.write_text('{"version": 1, "keys": [')  # corrupt
    with caplog.at_level("WARNING", logger="cohortseg.plan"):
        m = discovery.open_manifest(man)
    assert "manifest index corrupt: rebuilt from manifest.tsv" in caplog.text
    assert [r for rs in m.rows(m.keys).values() for r in rs] == rows
    discovery.open_manifest(man, write_index=True)  # the main process writes the rebuilt index back
    assert json.loads(idx_path.read_text())["keys"] == m.keys
    # stale: the TSV edited by hand (an error message with a tab and a newline: quoted)
    rows[1]["error"] = 'edited\tby "hand"\nsecond line'
    rows[1]["status"] = "missing"
    import csv

    with open(man, "w", newline="") as fh:  # as a spreadsheet saves it
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(discovery.MANIFEST_COLUMNS)
        w.writerows([r[c] for c in discovery.MANIFEST_COLUMNS] for r in rows)
    caplog.clear()
    with caplog.at_level("WARNING", logger="cohortseg.plan"):
        m = discovery.open_manifest(man)
    assert "manifest index stale (the TSV changed): rebuilt from manifest.tsv" in caplog.text
    got = m.rows(m.keys)
    assert [r for rs in got.values() for r in rs] == rows
    idx = discovery.index_from_tsv(man)
    assert idx["keys"] == list(got) and idx["tsv"] == discovery.tsv_stamp(man) and idx["rows"] == len(rows)
    # the main process notices the TSV changed and lists everything again (with a note)
    m = discovery.load_or_build(bids, man, ROLES2)
    assert m.stats["listed"] == sorted(p.name for p in bids.glob("sub-*"))
    assert any("discovery cache stale or corrupt" in n for n in m.notes)
    assert list(m) == _rows(bids, ROLES2)


def test_corrupt_scan_cache_lists_again(tmp_path):
    bids, man = _cohort(tmp_path)
    discovery.load_or_build(bids, man, ROLES2)
    man.with_suffix(".scan.json").write_text("not json")
    m = discovery.load_or_build(bids, man, ROLES2)
    assert len(m.stats["listed"]) == 5 and any("discovery cache stale or corrupt" in n for n in m.notes)
    assert list(m) == _rows(bids, ROLES2)
    assert discovery.load_or_build(bids, man, ROLES2).stats["listed"] == []

@pytest.mark.shared
def test_body_part_routes_images_and_the_manifest_says_why(tmp_path, shared_dir):
    """A multi-protocol cohort: brain and cord T1w in one dataset. The sidecar's BodyPartExamined
    (dcm2niix) or an acq entity naming the body part route each image to the pipelines of its
    anatomy (default config, through the Snakefile's plan); an image without either goes to both."""
    import csv

    from helpers import snakemake, write_config

    bids = tmp_path / "bids"
    files = {"sub-01/anat/sub-01_T1w": "BRAIN", "sub-02/anat/sub-02_acq-cspine_T1w": None,
             "sub-03/anat/sub-03_T1w": "CSPINE", "sub-04/anat/sub-04_T1w": None}
    for stem, part in files.items():
        (bids / stem).parent.mkdir(parents=True, exist_ok=True)
        (bids / f"{stem}.nii.gz").touch()
        if part:
            (bids / f"{stem}.json").write_text(json.dumps({"BodyPartExamined": part, "Modality": "MR"}))
    cfg = write_config(tmp_path / "cfg.yaml", bids_dir=str(bids), output_dir=str(tmp_path / "out"),
                       model_dir=str(shared_dir / "models"), pipelines=["sc_csa", "brain_tissue"])
    snakemake(tmp_path, "-n", "--cores", "1", configfile=cfg)
    with open(tmp_path / "out" / "manifest.tsv", newline="") as fh:
        rows = {(r["participant_id"], r["pipeline"]): r for r in csv.DictReader(fh, delimiter="\t")}
    status = {k: r["status"] for k, r in rows.items()}
    assert status == {("sub-01", "sc_csa"): "missing", ("sub-01", "brain_tissue"): "ok",
                      ("sub-02", "sc_csa"): "ok", ("sub-02", "brain_tissue"): "missing",
                      ("sub-03", "sc_csa"): "ok", ("sub-03", "brain_tissue"): "missing",
                      ("sub-04", "sc_csa"): "ok", ("sub-04", "brain_tissue"): "ok"}
    assert rows[("sub-01", "sc_csa")]["body_part"] == "sub-01_T1w.nii.gz: BodyPartExamined BRAIN -> excluded (spine)"
    assert rows[("sub-01", "brain_tissue")]["body_part"] == "sub-01_T1w.nii.gz: BodyPartExamined BRAIN -> kept (brain)"
    assert rows[("sub-02", "brain_tissue")]["body_part"] == "sub-02_acq-cspine_T1w.nii.gz: acq-cspine -> excluded (brain)"
    assert rows[("sub-03", "brain_tissue")]["body_part"] == "sub-03_T1w.nii.gz: BodyPartExamined CSPINE -> excluded (brain)"
    assert rows[("sub-04", "brain_tissue")]["body_part"] == ""  # nothing said: kept by both
    # routing off: the filters alone choose
    cfg = write_config(tmp_path / "cfg2.yaml", bids_dir=str(bids), output_dir=str(tmp_path / "out2"),
                       model_dir=str(shared_dir / "models"), pipelines=["brain_tissue"], body_part={"route": False})
    snakemake(tmp_path, "-n", "--cores", "1", configfile=cfg)
    text = (tmp_path / "out2" / "manifest.tsv").read_text()
    assert text.count("\tok\t") == 4


def _varied_tree(root, seed, n=30):
    """Sessions of every kind: with and without ses, missing and duplicate contrasts (ambiguous),
    acq entities naming body parts, BodyPartExamined sidecars (odd values too), .nii and .nii.gz,
    a bids_dir whose path needs JSON escaping."""
    import random

    rng = random.Random(seed)
    for s in range(n):
        sub = f"{rng.choice(['', 'x', 'P'])}{s:03d}"
        for ses in [None] if rng.random() < .5 else [f"{k:02d}" for k in range(1, rng.randint(2, 4))]:
            d = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
            d.mkdir(parents=True, exist_ok=True)
            for suf in rng.sample(["T1w", "T2w", "T2starw", "swi", "FLAIR", "labels", "T1w", "T2starw"], rng.randint(0, 6)):
                ents = [f"sub-{sub}"] + ([f"ses-{ses}"] if ses else [])
                if rng.random() < .2:
                    ents.append(f"acq-{rng.choice(['cspine', 'brain', 'ax'])}")
                if rng.random() < .1:
                    ents.append(f"run-{rng.randint(1, 2)}")
                name = "_".join(ents + [suf]) + rng.choice([".nii.gz", ".nii"])
                (d / name).write_bytes(b"")
                if rng.random() < .3:
                    (d / (name.split(".")[0] + ".json")).write_text(json.dumps(
                        {"BodyPartExamined": rng.choice(["BRAIN", "CSPINE", "knee", " Neck ", "", 3, ["a"]])}))
    return root


ALL_ROLES = {"sc_gm": {"image": ({"suffix": "T2starw"}, True, False)},
             "sc_csa": {"image": ({"suffix": ["T1w", "T2w", "T2starw"]}, True, True),
                        "levels": ({"suffix": "labels"}, False, False)},
             "brain_tissue": {"image": ({"suffix": "T1w"}, True, False)},
             "cmb": {"image": ({"suffix": "swi"}, True, False), "t1": ({"suffix": "T1w"}, False, False)},
             "wmh": {"image": ({"suffix": "T1w"}, True, False), "flair": ({"suffix": "FLAIR"}, False, False)}}
ROUTING = {"route": True, "entities": ["acq"], "terms": {"brain": ["BRAIN", "HEAD"], "spine": ["CSPINE", "NECK"]},
           "anatomy": {"sc_gm": "spine", "sc_csa": "spine", "brain_tissue": "brain", "cmb": "brain", "wmh": "brain"}}


@pytest.mark.parametrize("seed", range(6))
def test_session_shapes_decided_once_give_the_rows_of_each_session(tmp_path, seed):
    """SessionRows decides once per session shape and fills in each session's labels and paths:
    the rows equal those decided afresh for every session, for sessions of every kind; a filter
    naming `ses` makes the session label part of the shape."""
    bids = _varied_tree(tmp_path / ('my "data" ü' if seed % 2 else "bids"), seed)
    make_fake_bids(bids, 8, contrasts=("T1w", "T2starw", "swi"), session_every=3)  # a cohort's usual shapes
    roles = dict(ALL_ROLES)
    if seed >= 4:
        roles["sc_gm"] = {"image": ({"suffix": "T2starw", "ses": ["01"]}, True, False)}
    routers = discovery.routers_for(roles, ROUTING)
    shared = discovery.SessionRows(roles, routers, routing=ROUTING)
    files = [f for name, path in discovery.subject_folders(bids)
             for f in discovery.subject_files(path, discovery.scan_subject(path, sidecar_keys=("BodyPartExamined",)))]
    sessions = discovery.sessions_of(files)
    statuses = set()
    for (pid, sid), sfiles in sessions:
        fresh = discovery.SessionRows(roles, routers, routing=ROUTING).rows(pid, sid, sfiles)
        assert shared.rows(pid, sid, sfiles) == fresh
        statuses |= {r[4] for r in fresh[0]}
        if seed >= 4 and sid not in ("", "ses-01") and any(f.suffix == "T2starw" for f in sfiles):
            assert [r[4] for r in fresh[0] if r[2] == "sc_gm"] == ["missing"]
    assert statuses == {"ok", "missing", "ambiguous"}
    assert len(shared._memo) < len(sessions)
    # and through the manifest: byte ranges, masks and inputs agree with the rows
    m = discovery.load_or_build(bids, tmp_path / "out" / "manifest.tsv", roles, routing=ROUTING)
    rows = m.rows(m.keys)
    for k in m.keys:
        assert m.inputs(k) == manifest_store._session_inputs(rows[k])


def test_map_io_gives_the_same_results_serially_and_in_threads():
    import threading

    items = list(range(50))

    def fn(i):
        return i * i, threading.current_thread().name

    serial = list(discovery.map_io(fn, items, slow_s=3600))
    threaded = list(discovery.map_io(fn, items, slow_s=0))
    assert [r for r, _ in serial] == [r for r, _ in threaded] == [i * i for i in items]
    assert {t for _, t in serial} == {threading.current_thread().name}
    assert len({t for _, t in threaded[1:]} - {threading.current_thread().name}) >= 1
    assert list(discovery.map_io(fn, [], slow_s=0)) == []


def test_listing_process_gives_the_records_of_an_in_process_listing(tmp_path, monkeypatch, caplog):
    """At cohort scale a child process lists the subject folders while this one builds their rows:
    the same records, sidecars counted; should the child fail, the rest is listed here."""
    import sys

    bids = _varied_tree(tmp_path / "bids", 3, n=40)
    paths = [p for _, p in discovery.subject_folders(bids)]
    now = time.time_ns()
    before = discovery.SCAN_COUNTS["sidecars_read"]
    here = list(discovery.list_subjects(paths, sidecar_keys=("BodyPartExamined",), now_ns=now, worker=False))
    read_here = discovery.SCAN_COUNTS["sidecars_read"] - before
    child = list(discovery.list_subjects(paths, sidecar_keys=("BodyPartExamined",), now_ns=now, worker=True))
    assert child == here and len(here) == len(paths) and read_here > 0
    assert discovery.SCAN_COUNTS["sidecars_read"] - before == 2 * read_here  # the child's reads counted too
    assert any("sidecars" in r for r in here)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    with caplog.at_level("WARNING", logger="cohortseg.plan"):
        failed = list(discovery.list_subjects(paths, sidecar_keys=("BodyPartExamined",), now_ns=now, worker=True))
    assert failed == here and "the listing process failed" in caplog.text
