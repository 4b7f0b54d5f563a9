"""Rule `infer`: thin adapter from the rule's command line to cohortseg.workflow.steps."""
from _common import job_args, run

from cohortseg.workflow.steps import infer_shard


def main():
    a = job_args(__doc__, "prep_shard_record", "infer_record")
    cfg = a.config
    cfg["inference"] = {**cfg.get("inference", {}), "threads": cfg.get("inference", {}).get("threads") or a.threads}
    infer_shard(cfg["pipelines"], a.prep_shard_record, a.infer_record, cfg)


run(main)
