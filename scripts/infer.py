"""Rule `infer`: thin adapter from the snakemake object to cohortseg.workflow.steps."""
import sys; sys.path[:0] = [snakemake.scriptdir, snakemake.scriptdir + "/.."]  # noqa: E702,F821
from _common import setup_logging  # noqa: E402

from cohortseg.workflow.steps import infer_shard  # noqa: E402

setup_logging(snakemake)  # noqa: F821
cfg = dict(snakemake.config)  # noqa: F821
cfg["inference"] = {**cfg.get("inference", {}), "threads": cfg.get("inference", {}).get("threads") or snakemake.threads}  # noqa: F821
infer_shard(cfg["pipelines"], snakemake.input[0], snakemake.output[0], cfg)  # noqa: F821
