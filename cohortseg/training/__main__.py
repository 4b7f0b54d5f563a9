"""CLI: ``python -m cohortseg.training --config config/train/sc_csa.yaml --out models/sc_csa``."""
from __future__ import annotations

import argparse
import sys

import yaml


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cohortseg.training",
                                 description="Train k-fold 2D U-Nets or fine-tune a 3D MeshNet (kind: meshnet_3d) and write a model bundle.")
    ap.add_argument("--config", required=True, help="training config YAML (see docs/TRAINING.md)")
    ap.add_argument("--out", required=True, help="bundle folder to write (replaced if it exists)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, dotted, value parsed as YAML (e.g. train.epochs=5)")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)

    from cohortseg.training import load_config, train_bundle
    from cohortseg.errors import CohortsegError

    try:
        cfg = load_config(a.config, {key: yaml.safe_load(val) for key, _, val in (kv.partition("=") for kv in a.set)})
        out = train_bundle(cfg, a.out, progress=None if a.quiet else (lambda m: print(m, flush=True)))
    except CohortsegError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
