"""Keep a SLURM run going through the scheduler's bad days (snakemake-executor-plugin-slurm 2.x).

A cohort run on SLURM lasts days; meanwhile the controller is restarted and sbatch is refused for a
while. Two gaps of the SLURM executor plugin (read in its 2.8.0 source: the lock's version and the
newest release) turn such a moment into a run that hangs for ever or loses a shard. The Snakefile
calls `guard_slurm_executor()` in snakemake's main process; it wraps two of the plugin's methods
and changes nothing else:

1. **Status queries that all fail.** Each status check runs the status command up to
   `slurm-status-attempts` times, back to back; when none answers, the plugin neither yields the
   active jobs nor reports them, so they drop out of snakemake's list of active jobs and the run
   waits for them for ever (plugin issue #207). That is what a controller restart does on a
   cluster without slurmdbd: `squeue` cannot reach slurmctld, `scontrol show config` fails too so
   the plugin switches to `sacct` for that check, and `sacct` answers "Slurm accounting storage is
   disabled". Here such jobs stay active and are asked about again at the next check. When no
   status query has answered for `COHORTSEG_SLURM_BLIND_MINUTES` (environment; default
   `BLIND_MINUTES`), the run stops with an error that says what to set instead of waiting.
2. **sbatch refused for a moment.** When sbatch cannot reach the controller (or is told to come
   back later), the plugin reports the job failed at once; snakemake's `retries` resubmit within
   seconds, so an outage of a minute uses up every attempt and the shard is lost for this run
   (plugin issue #313 asks for such retries). Here such a submission is retried with a growing
   pause (5 s doubling to 60 s) for up to `SUBMIT_RETRY_MINUTES`; any other sbatch error is
   reported at once, as before.
"""
from __future__ import annotations

import os
import sys
import threading
import time

# the plugin release whose source the wrappers below were written against (requirements/cpu.lock)
TESTED_PLUGIN = "2.8"
PATCHED = ("check_active_jobs", "run_job", "_report_job_error_threadsafe")
BLIND_MINUTES = 10.0
SUBMIT_RETRY_MINUTES = 10.0
# sbatch errors worth a later try: the controller is unreachable or busy, or the queue is full
TRANSIENT_SBATCH_ERRORS = (
    "Unable to contact slurm controller",
    "Socket timed out",
    "Zero Bytes were transmitted or received",
    "temporarily unable to accept",
    "Resource temporarily unavailable",
    "job submit limit",
)
STATUS_HELP = (
    "On a cluster without slurmdbd (sacct says 'Slurm accounting storage is disabled') set "
    "`slurm-status-command: squeue` in profiles/slurm/config.yaml and ask for a MinJobAge of at "
    "least a few minutes (`scontrol show config | grep MinJobAge`); with slurmdbd check that "
    "`sacct` and `squeue` answer on this machine. Jobs already submitted keep running: rerun "
    "`snakemake --profile slurm` once SLURM answers (finished sessions are reused); "
    "COHORTSEG_SLURM_BLIND_MINUTES sets how long to wait."
)

_local = threading.local()


def guard_slurm_executor() -> bool:
    """Wrap the SLURM plugin's status check and submission (see the module docstring); False
    where the plugin is not installed. Idempotent."""
    try:
        from snakemake_executor_plugin_slurm import Executor
    except ImportError:
        return False
    if getattr(Executor, "_cohortseg_guarded", False):
        return True
    missing = [n for n in PATCHED if not hasattr(Executor, n)]
    if missing:  # another plugin release: run unguarded rather than fail every run
        print(f"cohortseg: warning: snakemake-executor-plugin-slurm {_plugin_version()} has no "
              f"{', '.join(missing)}; SLURM outages are not guarded (tested with {TESTED_PLUGIN}.x)",
              file=sys.stderr)
        return False
    if not _plugin_version().startswith(TESTED_PLUGIN + "."):
        print(f"cohortseg: warning: the SLURM outage guard was tested with plugin {TESTED_PLUGIN}.x, "
              f"this is {_plugin_version()}", file=sys.stderr)
    check, run_job, report = Executor.check_active_jobs, Executor.run_job, Executor._report_job_error_threadsafe

    async def check_active_jobs(self, active_jobs):
        answered = []  # jobs the plugin yielded or reported in this check
        for name in ("report_job_success", "report_job_error"):
            setattr(self, name, _recording(getattr(type(self), name).__get__(self), answered))
        try:
            async for job in check(self, active_jobs):
                answered.append(job)
                yield job
        finally:
            del self.report_job_success, self.report_job_error
        lost = [j for j in active_jobs if not any(j is a for a in answered)]
        if not lost:
            self._cohortseg_blind_since = None
            return
        since = getattr(self, "_cohortseg_blind_since", None) or time.monotonic()
        self._cohortseg_blind_since = since
        limit = float(os.environ.get("COHORTSEG_SLURM_BLIND_MINUTES", BLIND_MINUTES))
        blind = (time.monotonic() - since) / 60
        ids = ", ".join(j.external_jobid for j in lost)
        if blind > limit:
            from snakemake.exceptions import WorkflowError

            raise WorkflowError(
                f"cohortseg: no SLURM status query has answered for {blind:.1f} min (jobs {ids}): "
                f"stopping instead of waiting for ever. {STATUS_HELP}")
        self.logger.warning(f"cohortseg: SLURM did not answer the status query (jobs {ids}); keeping "
                            f"them and asking again at the next check ({blind:.1f} min without an answer)")
        for job in lost:
            yield job

    def run_job_retrying(self, job):
        deadline = time.monotonic() + 60 * SUBMIT_RETRY_MINUTES
        pause = 5.0
        while True:
            _local.refused = None
            _local.capture = True
            try:
                run_job(self, job)
            finally:
                _local.capture = False
            refused = _local.refused
            if refused is None:
                return
            job_info, msg = refused
            if not any(s in msg for s in TRANSIENT_SBATCH_ERRORS) or time.monotonic() + pause > deadline:
                return report(self, job_info, msg)
            self.logger.warning(f"cohortseg: sbatch refused job {job.jobid} ({msg.splitlines()[0]}); "
                                f"submitting again in {pause:.0f} s")
            time.sleep(pause)
            pause = min(2 * pause, 60.0)

    def report_error(self, job_info, msg):
        if getattr(_local, "capture", False) and _local.refused is None:
            _local.refused = (job_info, msg)  # decided by run_job_retrying
        else:
            report(self, job_info, msg)

    Executor.check_active_jobs = check_active_jobs
    Executor.run_job = run_job_retrying
    Executor._report_job_error_threadsafe = report_error
    Executor._cohortseg_guarded = True
    return True


def _recording(method, answered: list):
    def call(job_info, *args, **kwargs):
        answered.append(job_info)
        return method(job_info, *args, **kwargs)
    return call


def _plugin_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("snakemake-executor-plugin-slurm")
    except PackageNotFoundError:
        return "unknown"
