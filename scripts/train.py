"""Rule `train`: thin adapter from the snakemake object to cohortseg.training.train_bundle."""
import sys; sys.path[:0] = [snakemake.scriptdir, snakemake.scriptdir + "/.."]  # noqa: E702,F821
import logging  # noqa: E402

from _common import setup_logging  # noqa: E402

from cohortseg.training import load_config, train_bundle  # noqa: E402

setup_logging(snakemake)  # noqa: F821
cfg = load_config(snakemake.input.config)  # noqa: F821
for key, value in (snakemake.params.overrides or {}).items():  # noqa: F821
    node = cfg  # dotted keys, as `python -m cohortseg.training --set key.sub=value`
    *parents, last = str(key).split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
cfg.setdefault("threads", snakemake.threads)  # noqa: F821 - the recipe's own value wins (determinism)
log = logging.getLogger("cohortseg.training")
train_bundle(cfg, snakemake.output[0], progress=log.info)  # noqa: F821
