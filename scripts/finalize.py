"""Rule `finalize`: thin adapter from the rule's command line to cohortseg.workflow.steps."""
from _common import job_args, run

from cohortseg.workflow.steps import finalize_shard


def main():
    a = job_args(__doc__, "prep_shard_record", "shard_record")
    finalize_shard(a.prep_shard_record, a.config, a.shard_record, workers=a.threads)


run(main)
