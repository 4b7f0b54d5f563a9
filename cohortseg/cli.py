"""Command line: `cohortseg make-demo` (the demo BIDS cohort) and `cohortseg verify-models` (check every model file a config names)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="cohortseg", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("make-demo", help="build the demo BIDS cohort from ../shared/data")
    d.add_argument("out", nargs="?", default="demo/bids")
    d.add_argument("--shared", default=str(Path(__file__).resolve().parents[1].parent / "shared"))
    d.add_argument("--extra", type=int, default=0, help="extra copies of the T2*w participant")
    v = sub.add_parser("verify-models", help="check every model file a config needs (checksums)")
    v.add_argument("--configfile", default="config/config.yaml")
    a = ap.parse_args(argv)
    if a.cmd == "make-demo":
        from cohortseg.demo import build_demo

        if not Path(a.shared, "data").is_dir():
            print(f"cohortseg: {a.shared}/data not found (the demo needs ../shared)", file=sys.stderr)
            return 2
        print(build_demo(a.shared, a.out, a.extra))
    elif a.cmd == "verify-models":
        import yaml

        from cohortseg.errors import CohortsegError
        from cohortseg.models.cards import pipeline_cards
        from cohortseg.models.store import ModelStore

        cfg = yaml.safe_load(Path(a.configfile).read_text())
        store = ModelStore.from_config({k: v for k, v in cfg.items() if k != "output_dir"})
        try:
            for p in cfg.get("pipelines", []):
                for name, digests in store.verify(pipeline_cards(cfg, p)).items():
                    print(f"{p}\t{name}\t" + ",".join(d[:12] for d in digests))
        except CohortsegError as e:
            print(f"cohortseg: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
