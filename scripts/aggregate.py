"""Rule `aggregate`: thin adapter from the rule's command line to cohortseg.workflow.aggregate."""
from pathlib import Path

from _common import job_args, run

from cohortseg.workflow.aggregate import aggregate


def main():
    a = job_args(__doc__, "summary", "finalize_records", "--ratings", nargs={"finalize_records": "+", "--ratings": "*"})
    aggregate(a.finalize_records, Path(a.summary).parent, a.config, ratings=a.ratings[0] if a.ratings else None)


run(main)
