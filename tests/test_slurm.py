"""SLURM, for real: the workflow submitted with `--profile profiles/slurm` to a one-node cluster.

The cluster is started by `tests/slurm/start_cluster.sh` (CI: .ci/run) on loopback: node `localhost`
with 4 CPUs, a `gpu` GRES and job accounting (slurmdbd on MariaDB; tests/test_slurm_faults.py
also runs it without). One workflow run (module-scoped, ~2.5 min on 2 cores) is checked for its
outputs, for the requests SLURM received (only `infer` asks for a GPU), for the number of sbatch
submissions per session and for the Python the jobs ran with (`check_slurm_jobs`). As root (CI),
tests/test_slurm_faults.py runs the same workflow through controller outages and makes the same
checks on it, so this clean run is skipped there: one SLURM run of ~2.5 min instead of two.

`test_profile_*` (not marked `slurm`) check that the literal `snakemake --profile slurm` resolves
from the repository root; they need no cluster.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter

import pandas as pd
import pytest

from helpers import REPO, job_counts, output_path, write_config

RUN_TIMEOUT_S = 900
START_HINT = "start it with `sudo tests/slurm/start_cluster.sh` (needs Debian slurm-wlm + munge)"


def _env():
    """The caller's environment without a user profile or an enclosing SLURM job's settings."""
    return {k: v for k, v in os.environ.items()
            if k != "SNAKEMAKE_PROFILE" and not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}


def _cmd(*args, timeout=30) -> str:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=True).stdout


def fault_tests_can_run() -> bool:
    """Whether tests/test_slurm_faults.py can stop and start the daemons: root, slurmctld and the
    start script (that module skips otherwise; this one then runs its clean run)."""
    return os.geteuid() == 0 and shutil.which("slurmctld") is not None and (REPO / "tests/slurm/start_cluster.sh").exists()


def _require_cluster():
    for tool in ("sinfo", "sbatch", "squeue", "scontrol"):
        if shutil.which(tool) is None:
            pytest.skip(f"SLURM client '{tool}' not found; {START_HINT}")
    try:
        nodes = _cmd("sinfo", "--noheader", "--Node", "-o", "%N|%T|%G")
    except subprocess.CalledProcessError as e:
        pytest.skip(f"no SLURM controller answers sinfo ({(e.stderr or '').strip()[-300:]}); {START_HINT}")
    except subprocess.TimeoutExpired:
        pytest.skip(f"sinfo did not answer within 30 s; {START_HINT}")
    rows = [line.split("|") for line in nodes.splitlines() if line.strip()]
    idle = [r for r in rows if r[1] in ("idle", "mixed")]  # "idle*": not responding
    if not idle:
        pytest.skip(f"no idle SLURM node (sinfo: {nodes.strip() or 'no nodes'}); {START_HINT}")
    if not any("gpu" in r[2] for r in idle):
        pytest.skip(f"no idle SLURM node with a gpu GRES (sinfo: {nodes.strip()}); {START_HINT}")


def check_sc_gm_rows(out, shared_dir, n: int, dice_min: float = 0.84):
    """Every one of the n demo sessions (all the same real T2*w cord, in different orientations)
    has its row in summary.csv, status ok, and a GM mask that matches the manual GM segmentation
    (Dice, in the canonical orientation) and the volume its row reports."""
    import nibabel as nib
    import numpy as np

    from cohortseg.science.metrics import dice

    df = pd.read_csv(out / "group/summary.csv", dtype=str, keep_default_na=False)
    assert len(df) == n and set(df.status) == {"ok"}, df[["participant_id", "session_id", "status", "error"]]
    manual = nib.as_closest_canonical(nib.load(shared_dir / "data/spine/t2s/t2s_gmseg_manual.nii.gz")).get_fdata() > 0
    for pid, ses, vol in zip(df.participant_id, df.session_id, df.sc_gm_gm_volume_mm3):
        stem = "_".join(x for x in (pid, ses) if x) + "_T2starw"
        mask = nib.load(output_path(out, "sc_gm", stem, "label-GM_mask.nii.gz"))
        voxels = np.asarray(mask.dataobj) > 0
        assert float(vol) == pytest.approx(voxels.sum() * abs(np.linalg.det(mask.affine[:3, :3])), rel=1e-3), (pid, ses)
        d = dice(nib.as_closest_canonical(mask).get_fdata() > 0, manual)
        assert d >= dice_min, f"{pid} {ses}: GM Dice {d:.3f} against the manual mask"


def _job_info(jobid: str) -> dict:
    """`scontrol -o show job` as a dict (values without spaces are enough here)."""
    line = _cmd("scontrol", "-o", "show", "job", jobid)
    return dict(re.findall(r"(\S+?)=(\S*)", line))


def _gpus_requested(info: dict) -> int:
    """GPUs asked for, from the TRES fields (22.05: TresPerJob=gres:gpu:1; newer: gres/gpu:1)."""
    n = 0
    for key in ("TresPerJob", "TresPerNode", "TresPerTask", "TresPerSocket", "TRES", "AllocTRES"):
        m = re.search(r"gres[:/]gpu(?::[A-Za-z][\w.]*)?[:=](\d+)", info.get(key, ""))
        if m:
            n = max(n, int(m.group(1)))
    return n


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory, shared_dir):
    _require_cluster()
    if fault_tests_can_run():
        pytest.skip("as root, tests/test_slurm_faults.py::test_outages_with_accounting runs this workflow "
                    "through faults and makes these checks on it (one SLURM run instead of two)")
    from cohortseg.demo import build_demo

    tmp = tmp_path_factory.mktemp("slurm")
    bids = build_demo(shared_dir, tmp / "bids")
    out = tmp / "out"
    cfg = write_config(tmp / "cfg.yaml", bids_dir=str(bids), output_dir=str(out),
                       model_dir=str(shared_dir / "models"), pipelines=["sc_gm"],
                       inference={"shard_size": 1000})  # one shard: every session in one infer job
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp),
           "--profile", str(REPO / "profiles" / "slurm"), "--configfile", str(cfg), "--jobs", "4"]
    t0 = time.monotonic()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=_env())
    except subprocess.TimeoutExpired as e:
        text = "".join(s.decode(errors="replace") if isinstance(s, bytes) else (s or "")
                       for s in (e.stdout, e.stderr))
        m = re.search(r"SLURM run ID: (\S+)", text)
        if m:  # leave no jobs of this run behind
            subprocess.run(["scancel", "--name", m.group(1)], capture_output=True)
        pytest.fail(f"snakemake on SLURM ran past {RUN_TIMEOUT_S}s:\n{text[-5000:]}")
    elapsed = time.monotonic() - t0
    log = res.stdout + res.stderr
    if res.returncode != 0:
        slurm_logs = "".join(f"\n--- {p} ---\n{p.read_text()[-2000:]}"
                             for p in sorted((tmp / ".snakemake" / "slurm_logs").rglob("*.log")))
        pytest.fail(f"snakemake on SLURM failed ({res.returncode}):\n{log[-6000:]}{slurm_logs[-6000:]}")
    m = re.search(r"SLURM run ID: (\S+)", log)
    assert m, f"no 'SLURM run ID' in the snakemake log:\n{log[-3000:]}"
    run_id = m.group(1)
    # every job of this run: the plugin names them after the run ID (MinJobAge keeps finished ones)
    listing = _cmd("squeue", "--states=all", "--noheader", "--name", run_id, "-o", "%i|%k|%T")
    jobs = []
    for line in listing.splitlines():
        if line.strip():
            jobid, comment, state = line.strip().split("|")
            rule = re.match(r"rule_(\w+?)(?:_wildcards_|$)", comment)
            jobs.append({"id": jobid, "comment": comment, "state": state,
                         "rule": rule.group(1) if rule else comment, "info": _job_info(jobid)})
    print(f"SLURM run {run_id}: {len(jobs)} sbatch submissions, workflow took {elapsed:.0f}s")
    return {"tmp": tmp, "out": out, "log": log, "run_id": run_id, "jobs": jobs, "elapsed": elapsed}


def check_slurm_jobs(jobs: list[dict], workdir) -> None:
    """What SLURM received for the 4-session sc_gm run (one shard): one prepare, one infer, one
    finalize, all COMPLETED (aggregate, qc_page and all are local rules: never submitted); only infer
    asks for a GPU; each its CPUs, memory and time (15 + 3 min x 4 sessions); the batch script runs
    `<this python> -m snakemake ...` in the run's working directory. `jobs`: id, rule, state and
    `scontrol show job` info of each."""
    assert all(j["state"] == "COMPLETED" for j in jobs), [(j["id"], j["rule"], j["state"]) for j in jobs]
    counts = Counter(j["rule"] for j in jobs)
    assert counts == {"prepare": 1, "infer": 1, "finalize": 1}, counts
    print(f"sbatch submissions per session: {len(jobs) / 4:.2f} ({dict(counts)})")
    by_rule = {j["rule"]: j["info"] for j in jobs}
    assert _gpus_requested(by_rule["infer"]) == 1, f"infer job without a GPU request: {by_rule['infer']}"
    assert by_rule["infer"].get("NumCPUs") == "4" and by_rule["infer"].get("MinMemoryNode") == "16000M", by_rule
    for rule in ("prepare", "finalize"):
        info = by_rule[rule]
        assert _gpus_requested(info) == 0, f"{rule} job asked for a GPU: {info}"
        assert info.get("NumCPUs") == "4" and info.get("MinMemoryNode") == "12000M", info
    for rule, info in by_rule.items():
        assert info.get("TimeLimit") == "00:27:00", (rule, info.get("TimeLimit"))
        assert info.get("WorkDir") == str(workdir), (rule, info.get("WorkDir"))
    j = next(j for j in jobs if j["rule"] == "prepare")
    try:
        script = _cmd("scontrol", "write", "batch_script", j["id"], "-")
    except subprocess.CalledProcessError as e:  # batch scripts are purged with the job record
        print(f"batch script of job {j['id']} not available: {e.stderr}")
    else:
        assert f"{sys.executable} -m snakemake" in script, script[:2000]


@pytest.mark.slurm
@pytest.mark.shared
@pytest.mark.slow
def test_workflow_on_slurm(slurm_run, shared_dir):
    """Outputs complete and right (Dice, volumes), and what SLURM received (check_slurm_jobs)."""
    check_sc_gm_rows(slurm_run["out"], shared_dir, n=4)
    assert (slurm_run["out"] / "qc/index.html").is_file()
    check_slurm_jobs(slurm_run["jobs"], slurm_run["tmp"])


def _resources(dryrun_stdout: str) -> dict:
    """rule -> {resource: value} from the job blocks a dry-run prints."""
    blocks = re.findall(r"^(?:local)?rule (\w+):\n(.*?)(?=^\S|\Z)", dryrun_stdout, re.S | re.M)
    out = {}
    for name, body in blocks:
        m = re.search(r"resources: (.*)", body)
        out[name] = dict(kv.split("=", 1) for kv in m.group(1).split(", ")) if m else {}
    return out


def _attempt_1(resources: dict, rule: str, key: str) -> str:
    """A resource the profile gives as an expression of `attempt`, as the dry-run shows it for the
    first attempt. Older snakemake (9.15) defers such expressions to submission and prints '<TBD>':
    the key still reached the job, and its first-attempt value is the profile's expression at
    attempt 1 (the real SLURM test checks what sbatch receives)."""
    value = resources[rule].get(key)
    if value == "<TBD>":
        import yaml

        expr = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())["set-resources"][rule][key]
        value = str(eval(str(expr), {"__builtins__": {}}, {"attempt": 1}))  # e.g. "16000 * attempt"
    return value


def test_profile_slurm_resolves_from_repo_root(tmp_path):
    """`snakemake --profile slurm -n` from the repository root reads profiles/slurm (via ./slurm):
    snakemake's own output says so, the slurm plugin accepts the profile's options, and the job it
    would submit (`train`: plans without a dataset or models) carries the profile's resources."""
    res = subprocess.run([sys.executable, "-m", "snakemake", "--profile", "slurm", "-n", "train",
                          "--directory", str(tmp_path), "--config", f"train_dir={tmp_path / 'm'}",
                          f"output_dir={tmp_path / 'out'}", f"bids_dir={tmp_path / 'none'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=120, env=_env())
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-5000:]  # an option the installed plugin lacks fails here
    assert "Using profile slurm" in text
    assert job_counts(res.stdout) == {"train": 1}
    res_by_rule = _resources(res.stdout)
    got = res_by_rule["train"]
    # set-resources (attempt 1 of "16000 * attempt") and default-resources both reach the job
    assert {k: got.get(k) for k in ("gpu", "cpus_per_task")} == {"gpu": "1", "cpus_per_task": "4"}, got
    assert _attempt_1(res_by_rule, "train", "mem_mb") == "16000", got
    assert _attempt_1(res_by_rule, "train", "runtime") == "120", got
    # the profile submits with the slurm executor and checks status with squeue
    import yaml

    prof = yaml.safe_load((REPO / "slurm" / "config.yaml").read_text())
    assert prof["executor"] == "slurm" and prof["slurm-status-command"] == "squeue"


@pytest.mark.shared
def test_profile_slurm_dryrun_from_repo_root(tmp_path, shared_dir):
    """The literal command, as a dry-run (no cluster): the profile's per-rule requests reach the jobs."""
    from cohortseg.demo import build_demo

    bids = build_demo(shared_dir, tmp_path / "bids")
    cfg = write_config(tmp_path / "cfg.yaml", bids_dir=str(bids), output_dir=str(tmp_path / "out"),
                       model_dir=str(shared_dir / "models"), pipelines=["sc_gm"], inference={"shard_size": 1000})
    res = subprocess.run([sys.executable, "-m", "snakemake", "--profile", "slurm", "-n", "--directory", str(tmp_path),
                          "--configfile", str(cfg)], cwd=REPO, capture_output=True, text=True, timeout=300, env=_env())
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-5000:]
    assert "Using profile slurm" in text
    assert job_counts(res.stdout) == {"prepare": 1, "infer": 1, "finalize": 1, "aggregate": 1, "qc_page": 1, "all": 1}
    resources = _resources(res.stdout)
    assert resources["infer"].get("gpu") == "1" and resources["infer"].get("cpus_per_task") == "4", resources["infer"]
    assert _attempt_1(resources, "infer", "mem_mb") == "16000", resources["infer"]  # "16000 * attempt"
    for rule in ("prepare", "finalize"):
        r = resources[rule]
        assert "gpu" not in r and r.get("cpus_per_task") == "4" and _attempt_1(resources, rule, "mem_mb") == "12000", r
    # the rules' time, 15 + 3 min x the shard's 4 sessions (job_minutes), is not overridden by the profile
    assert {rule: resources[rule].get("runtime") for rule in ("prepare", "infer", "finalize")} == dict.fromkeys(
        ("prepare", "infer", "finalize"), str(15 + 3 * 4)), resources


def test_status_outage_keeps_the_jobs_then_stops_with_what_to_set(monkeypatch):
    """No cluster: the SLURM plugin's status check when every query fails (a controller restart
    where slurmdbd is absent). The plugin alone yields nothing, so snakemake forgets the jobs and
    waits for ever; guarded, the jobs stay active, and after COHORTSEG_SLURM_BLIND_MINUTES without
    an answer the run stops with an error saying what to set."""
    import asyncio
    import contextlib
    import logging
    from types import SimpleNamespace

    plugin = pytest.importorskip("snakemake_executor_plugin_slurm")
    from snakemake.exceptions import WorkflowError

    from cohortseg.workflow.slurm import guard_slurm_executor

    queries = []

    async def no_answer(command, logger):
        queries.append(command)
        return None, None

    monkeypatch.setattr(plugin, "query_job_status", no_answer)
    monkeypatch.setattr(plugin, "get_min_job_age", lambda: None)  # scontrol cannot reach slurmctld
    monkeypatch.setattr(plugin, "is_query_tool_available", lambda tool: True)
    ex = plugin.Executor.__new__(plugin.Executor)  # only what check_active_jobs reads
    ex.workflow = SimpleNamespace(executor_settings=SimpleNamespace(
        init_seconds_before_status_checks=5, status_attempts=3, status_command="squeue"))
    ex.logger, ex.run_uuid = logging.getLogger("slurm-test"), "run"
    ex.status_rate_limiter = contextlib.nullcontext()
    ex._status_query_failures = ex._status_query_calls = 0
    jobs = [SimpleNamespace(external_jobid="7", aux={}), SimpleNamespace(external_jobid="8", aux={})]

    async def check():
        return [j async for j in ex.check_active_jobs(jobs)]

    if not getattr(plugin.Executor, "_cohortseg_guarded", False):  # guarded once per process
        assert asyncio.run(check()) == []  # the plugin 2.8 alone: both jobs forgotten
        assert len(queries) == 3 and all(q.startswith("sacct") for q in queries)  # its sacct fallback
    assert guard_slurm_executor()
    assert asyncio.run(check()) == jobs  # kept for the next check
    monkeypatch.setenv("COHORTSEG_SLURM_BLIND_MINUTES", "0")
    with pytest.raises(WorkflowError, match=r"jobs 7, 8.*slurm-status-command: squeue.*MinJobAge"):
        asyncio.run(check())


def test_unknown_plugin_release_runs_unguarded_with_a_warning(monkeypatch, capsys):
    """A plugin release without the methods the guard wraps: no crash, no patch, a warning."""
    import sys
    from types import SimpleNamespace

    from cohortseg.workflow.slurm import guard_slurm_executor

    bare = type("Executor", (), {"run_job": lambda self, job: None})
    monkeypatch.setitem(sys.modules, "snakemake_executor_plugin_slurm", SimpleNamespace(Executor=bare))
    assert guard_slurm_executor() is False
    assert not hasattr(bare, "_cohortseg_guarded")
    err = capsys.readouterr().err
    assert "check_active_jobs" in err and "not guarded" in err
