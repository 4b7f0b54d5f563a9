# Plan once per parse: config checks, cached manifest, shards, paths. Cluster jobs (remote_exec)
# trust the cached manifest and never rescan the dataset.
from cohortseg.errors import CohortsegError
from cohortseg.workflow.plan import Plan, only_target_is

# `snakemake train` alone needs no dataset: plan no sessions then (no discovery, no model checks).
try:
    PLAN = (Plan.training_only(config) if only_target_is("train", sys.argv[1:])
            else Plan.from_config(config, check=not workflow.remote_exec))
except CohortsegError as e:
    raise WorkflowError(f"cohortseg: {e}") from None

from snakemake.logging import logger as _logger

for _msg in PLAN.messages:  # main process only: discovery reuse, automatic shard size
    _logger.info(f"cohortseg: {_msg}")

wildcard_constraints:
    shard=r"\d+",

# Every rule runs its scripts/ adapter as a shell command (STEP; not `script:`, whose check of the
# script file imports nbformat in every process, cluster jobs included); the job reads the run's
# config from PLAN.job_config. Python: the rule's conda env's, else Snakemake's own.
from pathlib import Path as _Path

from snakemake.settings.types import DeploymentMethod as _DM

JOB_PYTHON = ("python" if {_DM.CONDA, _DM.APPTAINER} & set(workflow.deployment_settings.deployment_method)
              else sys.executable)
SCRIPTS = _Path(workflow.basedir, "scripts")
STEP = "{params.python:q} {params.script:q} --config {params.config:q} --threads {threads} --log {log:q}"
