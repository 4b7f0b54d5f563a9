"""Rule `train`: thin adapter from the rule's command line to cohortseg.training.train_bundle."""
import logging

from _common import job_args, run

from cohortseg.training import load_config, train_bundle


def main():
    a = job_args(__doc__, "train_config", "bundle")
    cfg = load_config(a.train_config, a.config.get("train_set"))  # dotted keys, as the CLI's --set
    cfg.setdefault("threads", a.threads)  # the recipe's own value wins (determinism)
    train_bundle(cfg, a.bundle, progress=logging.getLogger("cohortseg.training").info)


run(main)
