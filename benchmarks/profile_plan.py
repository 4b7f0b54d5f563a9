#!/usr/bin/env python
"""Where does a dry-run's time go? cProfile of `snakemake -n` on a fake cohort, summed by stage.

    python benchmarks/profile_plan.py --n 100000 --trees /tmp/trees --out benchmarks/results/profile_100000.json
    python benchmarks/profile_plan.py --n 10000 --replan        # the cached re-plan instead of the first plan

Stages (cumulative time of their entry points; they nest, so they do not add up to the total):
our code -- discovery (`load_or_build`), listing folders (`scan_subject`), rows (`SessionRows.rows`),
the shard input lists (`write_shard_inputs`), the whole Plan (`Plan.from_config`), input functions;
snakemake -- DAG building (`DAG.init`), per-input-file work (`collect_potential_dependencies`,
`expand_input`), the mtime inventory, dry-run printing (`log_info`), the scheduler. cProfile slows
everything ~2-3x; read the shares, not the seconds.
"""
from __future__ import annotations

import argparse
import json
import pstats
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import REPO, emit  # noqa: E402  (puts the repository on sys.path)
from plan_cohort import ALL, fake_tree, standin_cards  # noqa: E402

STAGES = [  # (label, file suffix, function name)
    ("cohortseg: Plan.from_config (all of ours at parse)", "workflow/plan.py", "from_config"),
    ("cohortseg: discovery load_or_build", "workflow/discovery.py", "load_or_build"),
    ("cohortseg: listing subject folders (scandir)", "workflow/scan.py", "scan_subject"),
    ("cohortseg: stat of cached folders", "workflow/scan.py", "subject_unchanged"),
    ("cohortseg: manifest rows", "workflow/rows.py", "rows"),
    ("cohortseg: listing process (list_subjects)", "workflow/scan.py", "list_subjects"),
    ("cohortseg: writing manifest + caches", "workflow/manifest.py", "write_all"),
    ("cohortseg: shard input lists (stat per image)", "workflow/plan.py", "write_shard_inputs"),
    ("cohortseg: model checksums", "workflow/plan.py", "verify_models"),
    ("snakemake: Snakefile parse (incl. our Plan)", "snakemake/workflow.py", "include"),
    ("snakemake: DAG init", "snakemake/dag.py", "init"),
    ("snakemake: per input file (collect_potential_dependencies)", "snakemake/dag.py", "collect_potential_dependencies"),
    ("snakemake: job input expansion (expand_input)", "snakemake/rules.py", "expand_input"),
    ("snakemake: mtime inventory", "snakemake/io/__init__.py", "mtime_inventory"),
    ("snakemake: needrun", "snakemake/dag.py", "update_needrun"),
    ("snakemake: dry-run job printing (log_info)", "snakemake/jobs.py", "log_info"),
    ("snakemake: iocache save", "snakemake/persistence/__init__.py", "save_iocache"),
]


def summarise(prof: Path) -> dict:
    st = pstats.Stats(str(prof))
    total = max(v[3] for v in st.stats.values())
    out = {"total_s": round(total, 2), "stages": {}}
    for label, file_suffix, func in STAGES:
        cum = sum(v[3] for (f, _, name), v in st.stats.items() if f.endswith(file_suffix) and name == func)
        calls = sum(v[1] for (f, _, name), v in st.stats.items() if f.endswith(file_suffix) and name == func)
        if calls:
            out["stages"][label] = {"cum_s": round(cum, 2), "share": round(cum / total, 3), "calls": calls}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--pipelines", default=",".join(ALL))
    ap.add_argument("--shard-size", type=int, default=None)
    ap.add_argument("--replan", action="store_true", help="profile the cached re-plan (plans once first)")
    ap.add_argument("--trees", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    pipelines = a.pipelines.split(",")
    with tempfile.TemporaryDirectory(prefix="cohortseg-prof-") as tmp:
        tmp = Path(tmp)
        bids, _ = fake_tree(Path(a.trees) if a.trees else None, tmp, a.n)
        models, pcfg = standin_cards(tmp, pipelines)
        cfg = {"bids_dir": str(bids), "output_dir": str(tmp / "out"), "model_dir": str(models),
               "model_cards_dir": str(tmp / "cards"), "pipelines": pipelines,
               "inference": {"shard_size": a.shard_size} if a.shard_size else {}, **pcfg}
        (tmp / "cfg.yaml").write_text(json.dumps(cfg))
        sm = ["-m", "snakemake", "-s", str(REPO / "Snakefile"), "--configfile", str(tmp / "cfg.yaml"), "--cores", "1",
              "-n", "--quiet", "rules", "reason", "host"]
        if a.replan:
            subprocess.run([sys.executable, *sm], cwd=tmp, check=True, capture_output=True)
        prof = tmp / "plan.prof"
        subprocess.run([sys.executable, "-m", "cProfile", "-o", str(prof), *sm], cwd=tmp, check=True,
                       capture_output=True)
        result = {"n_participants": a.n, "pipelines": pipelines, "replan": a.replan, **summarise(prof)}
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(prof, Path(a.out).with_suffix(".prof"))
    return emit(result, a.out)


if __name__ == "__main__":
    main()
