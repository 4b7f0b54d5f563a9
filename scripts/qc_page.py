"""Rule `qc_page`: thin adapter from the rule's command line to cohortseg.workflow.report."""
from pathlib import Path

from _common import job_args, run

from cohortseg.workflow.report import write_cohort_qc_page


def main():
    a = job_args(__doc__, "summary", "page", "finalize_records", nargs={"finalize_records": "+"})
    write_cohort_qc_page(a.summary, a.finalize_records, Path(a.page).parent, a.config)


run(main)
