"""Rule `qc_page`: thin adapter from the rule's command line to cohortseg.workflow.report."""
from pathlib import Path

from _common import job_args, run

from cohortseg.workflow.report import write_cohort_qc_page
from cohortseg.workflow.steps import shard_sessions


def main():
    a = job_args(__doc__, "summary", "page", "finalize_records", nargs={"finalize_records": "+"})
    write_cohort_qc_page(a.summary, list(shard_sessions(a.finalize_records).values()), Path(a.page).parent)


run(main)
