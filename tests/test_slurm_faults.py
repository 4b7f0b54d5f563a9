"""The scheduler's bad days, for real (issue #25): faults injected into a run of the literal
`snakemake --profile slurm` (from the repository root) on the one-node cluster of
`tests/slurm/start_cluster.sh`. Every case must end with every row of the cohort in summary.csv, with
the right values, without a manual step and within RUN_TIMEOUT_S.

- `test_outages_with_accounting` (CI; slurmdbd on): one run of the cheapest workflow (sc_gm, the
  4 demo sessions, one shard: prepare, infer, finalize) through three faults, one after the other:
  1a. slurmctld stopped for OUTAGE_S while `prepare` is queued (the node is drained so it queues);
  3.  slurmctld stopped as soon as `prepare` is done, so the sbatch of `infer` is refused: it must be
      submitted again once the controller is back (cohortseg.workflow.slurm);
  1b. slurmctld stopped for OUTAGE_S while `infer` runs its step.
- Opt-in, `COHORTSEG_SLURM_FAULTS=all` (longer; run by hand, figures in docs/BENCHMARKS.md):
  4+2. `test_time_limit_and_node_failure`: `infer` (16 sessions) runs out of time after its first
     sessions, is resubmitted and goes on from its finished sessions; then the node is set DOWN
     while `finalize` runs and RESUMEd: SLURM requeues the job (the profile's `slurm-requeue`),
     after the ~2 min SLURM waits before a requeued job may start again.
  5. `test_outages_without_accounting`: the cluster restarted without slurmdbd (sacct answers
     "Slurm accounting storage is disabled"), then case 1 (queued and running). The run must not
     hang: the jobs are kept across the outage and squeue answers again after it.

Needs root (it stops and starts the daemons) and the cluster; skips otherwise.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, write_config
from test_slurm import _env, _job_info, _require_cluster, check_sc_gm_rows, check_slurm_jobs, fault_tests_can_run

pytestmark = [pytest.mark.slurm, pytest.mark.shared, pytest.mark.slow]

SCRIPTS = REPO / "tests" / "slurm"
RUN_TIMEOUT_S = 1200  # the bound on a faulted run: a hang fails here
OUTAGE_S = 30
NODE_DOWN_S = 10
LONG = os.environ.get("COHORTSEG_SLURM_FAULTS", "") == "all"
needs_long = pytest.mark.skipif(not LONG, reason="long SLURM fault case: set COHORTSEG_SLURM_FAULTS=all")


def _sh(*args, **env):
    res = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=180,
                         env={**os.environ, **{k: str(v) for k, v in env.items()}})
    assert res.returncode == 0, f"{args} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def _cluster(accounting: bool):
    """The test cluster in the given mode (start_cluster.sh restarts the daemons when it changes)."""
    if not fault_tests_can_run():
        pytest.skip("the fault tests stop and start the SLURM daemons: run them as root, with slurmctld "
                    "installed (apt-get install slurm-wlm munge slurmdbd mariadb-server)")
    _sh(SCRIPTS / "start_cluster.sh", COHORTSEG_SLURM_ACCOUNTING=int(accounting))
    _require_cluster()


def _node(state: str):
    """Set the node DOWN or DRAIN, or RESUME it (a no-op where it is not drained or down:
    start_cluster.sh resumes a drained node by itself)."""
    if state == "RESUME":
        now = _sh("sinfo", "-h", "-N", "-n", "localhost", "-o", "%T").strip()
        if not now.startswith(("drain", "down")):
            return
    _sh("scontrol", "update", "NodeName=localhost", f"State={state}", *(
        ["Reason=cohortseg-fault-test"] if state in ("DOWN", "DRAIN") else []))


class FaultedRun:
    """`snakemake --profile slurm` in the background, with its log and its jobs as SLURM sees them."""

    def __init__(self, tmp: Path, cfg: Path, accounting: bool):
        self.tmp, self.accounting, self.events = tmp, accounting, []
        self.log_path = tmp / "snakemake.log"
        self._log = self.log_path.open("w")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "snakemake", "--profile", "slurm", "--directory", str(tmp),
             "--configfile", str(cfg), "--jobs", "4"],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=_env())

    def close(self):
        """Leave nothing behind (a failed test): snakemake stopped, this run's jobs cancelled."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        run_id = self.run_id()
        if run_id:
            subprocess.run(["scancel", "--name", run_id], capture_output=True)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def run_id(self) -> str | None:
        m = re.search(r"SLURM run ID: (\S+)", self.log())
        return m.group(1) if m else None

    def jobs(self) -> list[dict] | None:
        """This run's jobs (id, rule, state); None while squeue cannot answer."""
        run_id = self.run_id()
        if not run_id:
            return []
        res = subprocess.run(["squeue", "--states=all", "--noheader", "--name", run_id, "-o", "%i|%k|%T"],
                             capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            return None
        out = []
        for line in res.stdout.splitlines():
            if line.strip():
                jobid, comment, state = line.strip().split("|")
                m = re.match(r"rule_(\w+?)(?:_wildcards_|$)", comment)
                out.append({"id": jobid, "rule": m.group(1) if m else comment, "state": state})
        return out

    def wait_job(self, rule: str, states: tuple[str, ...], timeout: float = 600) -> dict:
        """The first job of `rule` in one of `states`; fails if the run ends or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"snakemake ended ({self.proc.returncode}) before a {rule} job was "
                            f"{'/'.join(states)}:\n{self.log()[-5000:]}")
            for j in self.jobs() or []:
                if j["rule"] == rule and j["state"] in states:
                    return j
            time.sleep(1)
        pytest.fail(f"no {rule} job {'/'.join(states)} within {timeout}s:\n{self.log()[-5000:]}")

    def wait_step(self, job: dict, timeout: float = 300):
        """Until the job's step (the srun of the rule's command) runs: a job that is still
        starting needs the controller for its srun, so an outage then fails it (and `retries`
        resubmit it); once the step runs the job no longer needs the controller."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            res = subprocess.run(["squeue", "-h", "-s", "-j", job["id"], "-o", "%i"],
                                 capture_output=True, text=True, timeout=60)
            if re.search(rf"^{job['id']}\.0$", res.stdout, re.M):
                return
            time.sleep(1)
        pytest.fail(f"job {job} has no running step within {timeout}s:\n{self.log()[-3000:]}")

    def wait_log(self, pattern: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if re.search(pattern, self.log()):
                return True
            time.sleep(1)
        return bool(re.search(pattern, self.log()))

    def outage(self, case: str, seconds: float = OUTAGE_S, until_log: str | None = None):
        """slurmctld stopped for `seconds` (and until `until_log` appears in the log, at most 120 s
        more), then started again with its state (queued and running jobs)."""
        t = time.monotonic()
        _sh(SCRIPTS / "stop_cluster.sh", "--controller")
        time.sleep(seconds)
        seen = self.wait_log(until_log, 120) if until_log else None
        _sh(SCRIPTS / "start_cluster.sh", COHORTSEG_SLURM_ACCOUNTING=int(self.accounting))
        self.events.append({"case": case, "down_s": round(time.monotonic() - t), "seen": seen})

    def finish(self) -> dict:
        try:
            rc = self.proc.wait(timeout=max(1, RUN_TIMEOUT_S - (time.monotonic() - self.t0)))
        except subprocess.TimeoutExpired:
            pytest.fail(f"snakemake hung: no end within {RUN_TIMEOUT_S}s; faults {self.events}\n{self.log()[-6000:]}")
        elapsed = time.monotonic() - self.t0
        log = self.log()
        jobs = self.jobs() or []
        print(f"faulted SLURM run: rc {rc}, {elapsed:.0f} s, faults {self.events}, jobs "
              f"{[(j['rule'], j['state']) for j in jobs]}")
        assert rc == 0, f"snakemake failed ({rc}); faults {self.events}\n{log[-6000:]}"
        return {"elapsed": elapsed, "log": log, "jobs": jobs}


def _setup(tmp: Path, shared_dir, n_extra: int = 0, **cfg) -> Path:
    from cohortseg.demo import build_demo

    bids = build_demo(shared_dir, tmp / "bids", n_extra=n_extra)
    return write_config(tmp / "cfg.yaml", bids_dir=str(bids), output_dir=str(tmp / "out"),
                        model_dir=str(shared_dir / "models"), pipelines=["sc_gm"],
                        inference={"shard_size": 1000}, **cfg)  # one shard: 3 jobs


@pytest.fixture
def start_run():
    """FaultedRun(...) for a test; at teardown snakemake is stopped and its jobs cancelled, and
    the node resumed, whatever the test's outcome."""
    runs = []

    def start(*args, **kwargs):
        runs.append(FaultedRun(*args, **kwargs))
        return runs[-1]
    yield start
    for run in runs:
        run.close()
    _node("RESUME")


@pytest.fixture
def accounting_cluster():
    _cluster(True)


@pytest.fixture
def cluster_without_accounting():
    _cluster(False)
    yield
    _cluster(True)  # back to the cluster every other test expects


def _outage_while_queued(run: FaultedRun, label: str):
    """Case 1a: the node is drained (by the caller) so `prepare` queues; the controller is stopped
    while it is queued, then the node resumed."""
    run.wait_job("prepare", ("PENDING",))
    run.outage(f"{label}: controller down, prepare queued")
    _node("RESUME")


def test_outages_with_accounting(tmp_path, shared_dir, accounting_cluster, start_run):
    assert "accounting storage is disabled" not in subprocess.run(
        ["sacct", "-n", "-X"], capture_output=True, text=True).stderr
    cfg = _setup(tmp_path, shared_dir)
    _node("DRAIN")  # case 1a: prepare stays queued
    run = start_run(tmp_path, cfg, accounting=True)
    _outage_while_queued(run, "1a")
    # case 3: the controller goes down as soon as prepare is done; snakemake (sacct still answers)
    # then submits infer into the outage
    run.wait_job("prepare", ("COMPLETED",))
    run.outage("3: sbatch refused", until_log=r"sbatch refused job")
    run.wait_step(run.wait_job("infer", ("RUNNING",)))
    run.outage("1b: controller down, infer running")
    res = run.finish()
    assert all(e.get("seen") is not False for e in run.events), run.events
    assert "sbatch refused job" in res["log"]  # case 3 really hit a submission
    # the job counts stay (one prepare, one infer, one finalize, none failed), with the requests,
    # the time and the Python of a clean run (test_slurm makes the same checks where this cannot run)
    check_slurm_jobs([{**j, "info": _job_info(j["id"])} for j in res["jobs"]], tmp_path)
    check_sc_gm_rows(tmp_path / "out", shared_dir, n=4)
    assert (tmp_path / "out/qc/index.html").is_file()


def _node_down_while_running(run: FaultedRun, rule: str) -> dict:
    """Case 2: the node set DOWN while a `rule` job runs its step, RESUMEd NODE_DOWN_S later.
    SLURM requeues the job (the profile's slurm-requeue); it keeps its id and waits the
    requeue delay SLURM imposes (about 2 min) before it runs again."""
    job = run.wait_job(rule, ("RUNNING",))
    run.wait_step(job)
    t = time.monotonic()
    _node("DOWN")
    time.sleep(NODE_DOWN_S)
    _node("RESUME")
    run.events.append({"case": f"2: node down, {rule} running", "down_s": round(time.monotonic() - t)})
    return job


@needs_long
def test_time_limit_and_node_failure(tmp_path, shared_dir, accounting_cluster, start_run):
    """Case 4: `infer` runs out of time: once it has finished a session of its 16, its time limit
    is lowered under it (scontrol: root may), so the case does not hang on the machine's speed.
    SLURM ends it (TIMEOUT), the profile's `retries` resubmit it with the rule's time, and the new
    attempt goes on from the sessions the first one finished (their results are not rewritten).
    Then case 2 in the same run: the node fails under `finalize`."""
    n = 16
    cfg = _setup(tmp_path, shared_dir, n_extra=n - 4)
    run = start_run(tmp_path, cfg, accounting=True)
    job = run.wait_job("infer", ("RUNNING",))
    results = tmp_path / "out" / "work" / "infer" / "sc_gm"
    deadline = time.monotonic() + 900
    while not list(results.rglob("*.npz")) and time.monotonic() < deadline and run.proc.poll() is None:
        time.sleep(1)
    _sh("scontrol", "update", f"JobId={job['id']}", "TimeLimit=00:00:01")
    t = time.monotonic()
    while _job_info(job["id"]).get("JobState") not in ("TIMEOUT", "COMPLETED", "FAILED", "CANCELLED"):
        time.sleep(1)
    run.events.append({"case": "4: infer out of time", "kill_s": round(time.monotonic() - t)})
    done = {p: p.stat().st_mtime_ns for p in results.rglob("*.npz")}
    fin = _node_down_while_running(run, "finalize")
    res = run.finish()
    infer = sorted((j for j in res["jobs"] if j["rule"] == "infer"), key=lambda j: int(j["id"]))
    assert [j["state"] for j in infer] == ["TIMEOUT", "COMPLETED"], infer
    assert 0 < len(done) < n, f"{len(done)} of {n} sessions finished before the time limit"
    assert {p: p.stat().st_mtime_ns for p in done} == done  # reused, not computed again
    assert len(list(results.rglob("*.npz"))) == n
    print(f"infer out of time after {len(done)} of {n} sessions; the resubmitted job did the rest")
    assert [j["state"] for j in res["jobs"] if j["rule"] == "finalize"] == ["COMPLETED"], res["jobs"]
    assert int(_job_info(fin["id"]).get("Restarts", 0)) >= 1  # the node failure hit finalize
    check_sc_gm_rows(tmp_path / "out", shared_dir, n=n)


@needs_long
def test_outages_without_accounting(tmp_path, shared_dir, cluster_without_accounting, start_run):
    res = subprocess.run(["sacct", "-n", "-X"], capture_output=True, text=True)
    assert "accounting storage is disabled" in res.stderr, res
    cfg = _setup(tmp_path, shared_dir)
    _node("DRAIN")
    run = start_run(tmp_path, cfg, accounting=False)
    _outage_while_queued(run, "5/1a")
    run.wait_step(run.wait_job("infer", ("RUNNING",)))
    run.outage("5/1b: controller down, infer running")
    res = run.finish()
    assert "SLURM did not answer the status query" in res["log"]  # the outage hit a status check
    assert sorted(j["rule"] for j in res["jobs"] if j["state"] == "COMPLETED") == ["finalize", "infer", "prepare"]
    check_sc_gm_rows(tmp_path / "out", shared_dir, n=4)
