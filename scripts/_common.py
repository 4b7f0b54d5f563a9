"""Shared by the rule scripts, which the rules' shell commands run (`rules/common.smk`: STEP): the
command line, the job's config file, logging into the rule's log file (and stderr), and an error
that ends in the log, not only on stderr."""
import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the package, also when not pip-installed


def job_args(doc: str, *positional: str, nargs: dict | None = None) -> argparse.Namespace:
    """--config (the run's config, JSON), --threads, --log and the rule's files (`positional`:
    argparse names, "--x" for an option; `nargs` by name); logging set up and args.config loaded."""
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--config", required=True, help="the run's validated config (work/config/<sha1>.json)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log", default="")
    for name in positional:
        ap.add_argument(name, nargs=(nargs or {}).get(name))
    args = ap.parse_args()
    handlers = [logging.StreamHandler(sys.stderr)]
    if args.log:
        handlers.append(logging.FileHandler(args.log, mode="w"))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.config = json.loads(Path(args.config).read_text())
    return args


def run(main) -> None:
    """main(), with an uncaught error written to the rule's log too (then exit 1)."""
    try:
        main()
    except Exception:
        logging.getLogger("cohortseg.job").exception("job failed")
        sys.exit(1)
