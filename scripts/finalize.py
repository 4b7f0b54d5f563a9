"""Rule `finalize`: thin adapter from the snakemake object to cohortseg.workflow.steps."""
import sys; sys.path[:0] = [snakemake.scriptdir, snakemake.scriptdir + "/.."]  # noqa: E702,F821
from _common import setup_logging  # noqa: E402

from cohortseg.workflow.steps import finalize_shard  # noqa: E402

setup_logging(snakemake)  # noqa: F821
finalize_shard(snakemake.input.prep, snakemake.config, snakemake.output[0], workers=snakemake.threads)  # noqa: F821
