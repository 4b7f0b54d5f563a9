"""The Snakefile plans the expected jobs (dry-run), rejects bad config clearly, and lints clean."""
import pytest

from cohortseg.fakebids import make_fake_bids
from helpers import REPO, job_counts, snakemake, write_config


@pytest.fixture()
def fake_cohort(tmp_path, shared_dir):
    bids = make_fake_bids(tmp_path / "bids", 7, contrasts=("T2starw", "T1w"), session_every=3)
    cfg = write_config(tmp_path / "cfg.yaml", bids_dir=str(bids), output_dir=str(tmp_path / "out"),
                       model_dir=str(shared_dir / "models"), pipelines=["sc_gm"], inference={"shard_size": 2})
    return tmp_path, cfg


def test_dryrun_fake_tree_with_sessions(fake_cohort):
    tmp, cfg = fake_cohort
    res = snakemake(tmp, "-n", "--cores", "1", configfile=cfg)
    counts = job_counts(res.stdout)
    # 7 participants, every 3rd with 2 sessions -> 3*2 + 4 = 10 sessions; shards of 2 -> 5 shards,
    # each with one prepare, one infer (one pipeline) and one finalize job
    assert counts == {"prepare": 5, "infer": 5, "finalize": 5, "aggregate": 1, "qc_page": 1, "all": 1}
    man = (tmp / "out" / "manifest.tsv").read_text().splitlines()
    assert len(man) == 11 and "sub-00001\tses-02\tsc_gm\tsub-00001_ses-02_T2starw\tok" in man[2]


def test_dryrun_demo_cohort(tmp_path, shared_dir):
    from cohortseg.demo import build_demo

    bids = build_demo(shared_dir, tmp_path / "bids")
    cfg = write_config(tmp_path / "cfg.yaml", bids_dir=str(bids), output_dir=str(tmp_path / "out"),
                       model_dir=str(shared_dir / "models"), pipelines=["sc_gm"])
    counts = job_counts(snakemake(tmp_path, "-n", "--cores", "1", configfile=cfg).stdout)
    assert counts == {"prepare": 1, "infer": 1, "finalize": 1, "aggregate": 1, "qc_page": 1, "all": 1}


@pytest.mark.parametrize("override, message", [
    ({"pipelines": ["nope"]}, "pipelines"),
    ({"sc_gm": {"threshold_native": 1.5}}, "threshold_native"),
    ({"model_dir": "/nonexistent/models"}, "config key 'model_dir'"),
    ({"bids_dir": "/nonexistent/bids"}, "config key 'bids_dir'"),
    ({"inference": {"shard_size": 0}}, "shard_size"),
])
def test_config_errors_stop_before_any_job(fake_cohort, override, message):
    tmp, cfg = fake_cohort
    import yaml

    data = yaml.safe_load(cfg.read_text())
    data.update(override)
    bad = write_config(tmp / "bad.yaml", **data)
    res = snakemake(tmp, "-n", "--cores", "1", configfile=bad, check=False)
    assert res.returncode != 0
    assert message in res.stdout + res.stderr
    assert "Job stats" not in res.stdout


def test_corrupt_model_stops_before_any_job(fake_cohort, tmp_path):
    tmp, cfg = fake_cohort
    import shutil

    import yaml

    models = tmp / "models"
    shutil.copytree(REPO.parent / "shared" / "models" / "gmseg", models / "gmseg")
    p = models / "gmseg" / "large_model.hdf5"
    p.chmod(0o644)
    with open(p, "r+b") as f:
        f.seek(1000)
        f.write(b"corrupt!")
    data = yaml.safe_load(cfg.read_text())
    data["model_dir"] = str(models)
    res = snakemake(tmp, "-n", "--cores", "1", configfile=write_config(tmp / "c2.yaml", **data), check=False)
    assert res.returncode != 0
    assert "checksum mismatch" in res.stdout + res.stderr and "large_model.hdf5" in res.stdout + res.stderr


def test_lint_reports_nothing_serious(fake_cohort):
    tmp, cfg = fake_cohort
    res = snakemake(tmp, "--lint", configfile=cfg, check=False)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "Congratulations" in out or "Lints for" not in out, out


@pytest.mark.parametrize("argv, only", [
    (["--cores", "2", "train"], True),
    (["train", "--cores", "2", "--config", "train_dir=m"], True),
    (["--cores", "2"], False),  # default target
    (["--cores", "2", "train", "all"], False),
    (["--forcerun", "train", "--cores", "1"], False),  # an option's value is not a target
    (["--mode", "remote", "--target-jobs", "train:", "--cores", "2"], True),  # the cluster job of train
    (["--mode", "remote", "--target-jobs", "finalize:shard=00000"], False),
])
def test_only_target_is(argv, only):
    from cohortseg.workflow.plan import only_target_is

    assert only_target_is("train", argv) is only


def test_train_target_needs_no_dataset(tmp_path, shared_dir):
    """`snakemake train` plans without a BIDS dataset; any other target still requires one."""
    cfg = write_config(tmp_path / "cfg.yaml", bids_dir=str(tmp_path / "missing"), output_dir=str(tmp_path / "out"),
                       model_dir=str(shared_dir / "models"), pipelines=["sc_csa"])
    res = snakemake(tmp_path, "--cores", "1", "-n", "train", configfile=cfg)
    assert job_counts(res.stdout) == {"train": 1}
    res = snakemake(tmp_path, "--cores", "1", "-n", configfile=cfg, check=False)
    assert res.returncode != 0 and "config key 'bids_dir'" in res.stdout + res.stderr


def test_batches_of_shards(fake_cohort):
    """`--batch aggregate=i/n` plans a part of the shards (tables and QC page wait for the last part)."""
    tmp, cfg = fake_cohort
    counts = job_counts(snakemake(tmp, "-n", "--cores", "1", "--batch", "aggregate=1/5", configfile=cfg).stdout)
    assert counts == {"prepare": 1, "infer": 1, "finalize": 1}  # 5 shards of 2 sessions -> one per part


def test_registry_schema_and_plugins_agree():
    """Adding a pipeline = a module in the one registry + its config-schema section + a card: the
    schema's `pipelines` enum and its per-pipeline sections list exactly the registered plugins, and
    every plugin's name is its registry key."""
    import yaml

    from cohortseg.pipelines import REGISTRY, get_pipeline

    schema = yaml.safe_load((REPO / "config" / "schemas" / "config.schema.yaml").read_text())
    assert schema["properties"]["pipelines"]["items"]["enum"] == list(REGISTRY)
    sections = {k for k, v in schema["properties"].items() if isinstance(v, dict) and "models" in (v.get("properties") or {})}
    assert sections == set(REGISTRY)
    for name in REGISTRY:
        assert get_pipeline(name).name == name

@pytest.mark.parametrize("n, size", [(0, 20), (1, 20), (5_000, 20), (5_001, 40), (13_334, 80), (20_000, 80),
                                     (20_001, 160), (80_000, 320), (133_334, 640), (160_001, 1280)])
def test_auto_shard_size(n, size):
    from cohortseg.workflow.plan import MAX_SHARDS, auto_shard_size

    assert MAX_SHARDS == 250
    assert auto_shard_size(n) == size
    assert -(-n // size) <= 250 and (size == 20 or -(-n // (size // 2)) > 250)


def test_auto_shard_size_doubling_merges_neighbour_shards():
    """When a growing cohort crosses a threshold the new shard k is exactly the old shards 2k, 2k+1."""
    from cohortseg.workflow.plan import auto_shard_size

    keys = [f"sub-{i:06d}" for i in range(5_001)]
    old, new = auto_shard_size(5_000), auto_shard_size(5_001)
    assert (old, new) == (20, 40)
    old_shards = [keys[i:i + old] for i in range(0, 5_000, old)]
    new_shards = [keys[i:i + new] for i in range(0, len(keys), new)]
    for k, shard in enumerate(new_shards[:-1]):
        assert shard == old_shards[2 * k] + old_shards[2 * k + 1]


def _plan(tmp_path, shared_dir, n, **inference):
    from cohortseg.workflow.plan import Plan

    bids = make_fake_bids(tmp_path / "bids", n, contrasts=("T2starw",), session_every=3)
    return Plan.from_config({"bids_dir": str(bids), "output_dir": str(tmp_path / "out"), "pipelines": ["sc_gm"],
                             "model_dir": str(shared_dir / "models"), "inference": inference}), bids


def test_auto_shard_size_in_plan_and_its_log(tmp_path, shared_dir):
    plan, _ = _plan(tmp_path, shared_dir, 34, max_shards=1)  # 34 participants -> 46 sessions
    assert sum(map(len, plan.shards)) == 46 and plan.shard_size == 80 and len(plan.shards) == 1
    msg = [m for m in plan.messages if "shard_size unset" in m]
    assert msg == ["inference.shard_size unset: automatic shard size 80 (46 sessions -> 1 shards; 20 sessions per "
                   "shard, doubled while there would be more than inference.max_shards = 1 shards)"]
    explicit, _ = _plan(tmp_path / "x", shared_dir, 34, shard_size=7, max_shards=1)  # explicit: as given
    assert explicit.shard_size == 7 and len(explicit.shards) == 7
    assert not [m for m in explicit.messages if "shard_size" in m]


def test_shard_jobs_ask_for_time_in_proportion_to_their_shard(tmp_path, shared_dir):
    """runtime = job_minutes.base + per_session[step] x the largest shard's sessions, capped at max:
    a shard 32x bigger asks for ~32x the time instead of a fixed hour."""
    from cohortseg.workflow.overrides import validate_config
    from cohortseg.workflow.plan import Plan

    bids = make_fake_bids(tmp_path / "bids", 7, contrasts=("T2starw",), session_every=3)  # 10 sessions

    def plan(**cfg):
        return Plan.from_config(validate_config({"bids_dir": str(bids), "output_dir": str(tmp_path / "out"),
                                                 "pipelines": ["sc_gm"], "model_dir": str(shared_dir / "models"),
                                                 **cfg}))

    p = plan(inference={"shard_size": 4})  # shards of 4, 4, 2 sessions: the largest counts
    assert [len(s) for s in p.shards] == [4, 4, 2]
    assert [p.runtime(s) for s in ("prepare", "infer", "finalize")] == [15 + 4 * 3] * 3
    p = plan(inference={"shard_size": 4}, job_minutes={"base": 5, "per_session": {"infer": 0.5}})
    assert [p.runtime(s) for s in ("prepare", "infer", "finalize")] == [5 + 12, 5 + 2, 5 + 12]
    assert plan(job_minutes={"max": 20}).runtime("prepare") == 20  # 15 + 10 x 3 = 45, capped
    assert plan().runtime("prepare") == 15 + 10 * 3  # automatic size 20: one shard of all 10


def test_dryrun_says_which_shard_size_it_chose(tmp_path, shared_dir):
    bids = make_fake_bids(tmp_path / "bids", 7, contrasts=("T2starw",), session_every=3)
    cfg = write_config(tmp_path / "cfg.yaml", bids_dir=str(bids), output_dir=str(tmp_path / "out"),
                       model_dir=str(shared_dir / "models"), pipelines=["sc_gm"])
    res = snakemake(tmp_path, "-n", "--cores", "1", configfile=cfg)
    assert "cohortseg: inference.shard_size unset: automatic shard size 20 (10 sessions -> 1 shards" in res.stdout + res.stderr
    assert job_counts(res.stdout)["prepare"] == 1


def test_shard_input_lists_rewritten_only_when_their_files_change(tmp_path, shared_dir):
    import os
    import time

    from cohortseg.workflow.plan import Plan

    plan, bids = _plan(tmp_path, shared_dir, 7, shard_size=3)  # 10 sessions -> 4 shards
    lists = [plan.shard_inputs_record(i) for i in range(4)]
    text = open(lists[1]).read().splitlines()
    assert text[0] == "session\tpath\tsize\tmtime_ns" and len(text) == 1 + 3
    assert text[1].startswith(f"{plan.shards[1][0]}\t{bids}/")
    mtimes = [os.stat(p).st_mtime_ns for p in lists]
    time.sleep(0.01)
    again = Plan.from_config(plan.config)
    assert again.write_shard_inputs() == 0 and [os.stat(p).st_mtime_ns for p in lists] == mtimes
    # an input rewritten in place (same name: discovery does not see it) -> only its shard's list
    img = text[2].split("\t")[1]
    os.utime(img, ns=(time.time_ns(), time.time_ns() - 10**9))
    assert again.write_shard_inputs() == 1
    assert [os.stat(p).st_mtime_ns == m for p, m in zip(lists, mtimes)] == [True, False, True, True]


def test_a_job_that_fails_says_why_in_its_rule_log(tmp_path):
    """The rules' adapters (scripts/*.py, run by STEP) put an uncaught error in the rule's log, not
    only on stderr, and exit non-zero so Snakemake marks the job failed."""
    import json
    import subprocess
    import sys

    (tmp_path / "cfg.json").write_text(json.dumps({"output_dir": str(tmp_path / "out"), "pipelines": ["sc_gm"]}))
    log = tmp_path / "finalize.log"
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "finalize.py"), "--config", str(tmp_path / "cfg.json"),
                          "--threads", "1", "--log", str(log), str(tmp_path / "no-prepare-record.json"),
                          str(tmp_path / "shard.json")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    text = log.read_text()
    assert "job failed" in text and "FileNotFoundError" in text and "no-prepare-record.json" in text
    assert not (tmp_path / "shard.json").exists()
