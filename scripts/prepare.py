"""Rule `prepare`: thin adapter from the rule's command line to cohortseg.workflow.steps."""
from _common import job_args, run

from cohortseg.workflow.steps import prepare_shard


def main():
    a = job_args(__doc__, "inputs_record", "shard_record")
    prepare_shard(a.inputs_record, a.config, a.shard_record, workers=a.threads)


run(main)
