# cohortseg: cohort-scale MRI segmentation. This file only sets up config, validates it, and includes
# the rules; the science lives in the `cohortseg` package (see docs/ARCHITECTURE.md).
import os
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

min_version("9.0")
sys.path.insert(0, workflow.basedir)  # the package, also when not pip-installed


configfile: os.path.join(workflow.basedir, "config", "config.yaml")


from cohortseg.workflow.overrides import coerce_config, load_schema, override_hint

# nested --config values arrive as strings: '3' -> 3 where the schema wants a number
coerce_config(config, load_schema(os.path.join(workflow.basedir, "config", "schemas", "config.schema.yaml")))
try:
    validate(config, "config/schemas/config.schema.yaml")
except WorkflowError as e:
    raise WorkflowError(override_hint(str(e))) from None


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
