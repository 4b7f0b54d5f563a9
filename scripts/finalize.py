"""Rule `finalize`: thin adapter from the snakemake object to cohortseg.steps."""
import sys; sys.path[:0] = [snakemake.scriptdir, snakemake.scriptdir + "/.."]  # noqa: E702,F821
from _common import setup_logging  # noqa: E402

from cohortseg.steps import finalize_session, session_rows, shard_map  # noqa: E402

setup_logging(snakemake)  # noqa: F821
finalize_session(session_rows(snakemake.config, snakemake.wildcards.session), snakemake.input.prep,  # noqa: F821
                 shard_map(snakemake.input.shards), snakemake.config, snakemake.output[0])  # noqa: F821
