# cohortseg: cohort-scale MRI segmentation. This file only sets up config, validates it, and includes
# the rules; the science lives in the `cohortseg` package (see docs/ARCHITECTURE.md).
import os
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

min_version("9.0")
sys.path.insert(0, workflow.basedir)  # the package, also when not pip-installed


configfile: os.path.join(workflow.basedir, "config", "config.yaml")


from cohortseg.errors import CohortsegError
from cohortseg.workflow.overrides import validate_config
from cohortseg.workflow.slurm import guard_slurm_executor

# nested --config values arrive as strings: '3' -> 3 where the schema wants a number; then the
# schema's checks (main process) and defaults (every process)
try:
    validate_config(config, check=not workflow.remote_exec)
except CohortsegError as e:
    raise WorkflowError(f"cohortseg: {e}") from None
if not workflow.remote_exec:  # the SLURM plugin's status checks and sbatch calls (main process)
    guard_slurm_executor()


include: "rules/common.smk"
include: "rules/prepare.smk"
include: "rules/inference.smk"
include: "rules/finalize.smk"
include: "rules/aggregate.smk"
include: "rules/qc.smk"
include: "rules/train.smk"


rule all:
    default_target: True
    input:
        summary=PLAN.summary(),
        qc=PLAN.qc_page(),
