"""Rule `aggregate`: thin adapter from the snakemake object to cohortseg.workflow.aggregate."""
import sys; sys.path[:0] = [snakemake.scriptdir, snakemake.scriptdir + "/.."]  # noqa: E702,F821
from pathlib import Path  # noqa: E402

from _common import setup_logging  # noqa: E402

from cohortseg.workflow.aggregate import aggregate  # noqa: E402
from cohortseg.workflow.steps import session_records  # noqa: E402

setup_logging(snakemake)  # noqa: F821
aggregate(session_records(snakemake.input.records), Path(snakemake.output.summary).parent, snakemake.config,  # noqa: F821
          expected=[tuple(x) for x in snakemake.params.expected],  # noqa: F821
          ratings=snakemake.input.ratings[0] if snakemake.input.ratings else None)  # noqa: F821
