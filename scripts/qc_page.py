"""Rule `qc_page`: thin adapter from the snakemake object to cohortseg.qc."""
import sys; sys.path[:0] = [snakemake.scriptdir, snakemake.scriptdir + "/.."]  # noqa: E702,F821
from pathlib import Path  # noqa: E402

from _common import setup_logging  # noqa: E402

from cohortseg.workflow.report import write_cohort_qc_page  # noqa: E402
from cohortseg.workflow.steps import session_records  # noqa: E402

setup_logging(snakemake)  # noqa: F821
write_cohort_qc_page(snakemake.input.summary, session_records(snakemake.params.records), Path(snakemake.output[0]).parent)  # noqa: F821
