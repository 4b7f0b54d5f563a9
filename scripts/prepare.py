"""Rule `prepare`: thin adapter from the snakemake object to cohortseg.steps."""
import sys; sys.path[:0] = [snakemake.scriptdir, snakemake.scriptdir + "/.."]  # noqa: E702,F821
from _common import setup_logging  # noqa: E402

from cohortseg.steps import prepare_session, session_rows  # noqa: E402

setup_logging(snakemake)  # noqa: F821
prepare_session(session_rows(snakemake.config, snakemake.wildcards.session), snakemake.config,  # noqa: F821
                snakemake.output[0])  # noqa: F821
