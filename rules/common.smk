# Plan once per parse: config checks, cached manifest, shards, paths. Cluster jobs (remote_exec)
# trust the cached manifest and never rescan the dataset.
from cohortseg.errors import CohortsegError
from cohortseg.plan import Plan

try:
    PLAN = Plan.from_config(config, check=not workflow.remote_exec)
except CohortsegError as e:
    raise WorkflowError(f"cohortseg: {e}") from None

wildcard_constraints:
    pipeline="|".join(PLAN.pipelines),
    shard=r"\d+",
