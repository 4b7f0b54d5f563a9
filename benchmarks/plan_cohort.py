#!/usr/bin/env python
"""Planning benchmark: how fast does `snakemake -n` plan an N-participant cohort, as N grows?

For every N of `--sizes` (default 1,000, 10,000 and 100,000 participants) it builds a fake BIDS
tree of empty files (T1w, T2starw, SWI per participant; every third participant has two sessions:
4 images per participant on average, 400,000 files at N = 100,000), stand-in model cards for every
pipeline (planning never loads a model, it only checks that the files exist with the right
checksum), and measures, each in a fresh process:

* **first plan**: the dry-run of the whole cohort with all pipelines, discovery included (no
  manifest yet);
* **cached re-plan**: the same dry-run again (what every re-plan after a config change costs; the
  plan's log must say that no subject folder was listed again);
* **remote job**: what every cluster job pays before its own work (interpreter + Snakefile parse +
  cached manifest index + DAG of its one target), for a prepare and a finalize job;

each with wall time, CPU time (user + sys: the less load-sensitive figure on a shared machine),
peak RSS and job count, plus the load average when it ran. `--repeat K` runs each K times and
reports the median run, with every run's wall time and the fastest beside it. Optionally (`--naive`) the same cohort
planned by a naive one-job-per-step DAG, for the ratio.

Targets (2 cores, all pipelines): N = 100,000: first plan <= 30 s and <= 1 GB, cached re-plan
<= 15 s, remote job <= 1.5 s; N = 10,000: first plan <= 5 s.

    python benchmarks/plan_cohort.py --repeat 3 --out benchmarks/results/plan_cohort.json --docs docs/BENCHMARKS.md
    python benchmarks/plan_cohort.py --sizes 10000 --shard-size 20      # a pinned shard size
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, emit  # noqa: E402  (puts the repository on sys.path)

from cohortseg.fakebids import make_fake_bids  # noqa: E402

ALL = ["sc_gm", "sc_csa", "brain_tissue", "cmb", "wmh"]
# The naive design: one rule per step per pipeline and per image.
NAIVE_STEPS = ["check", "reorient", "register", "resample", "normalise", "infer", "to_native", "metrics", "qc"]
TARGETS = {"100000": {"first_plan_s": 30, "first_plan_rss_mb": 1024, "cached_replan_s": 15, "remote_job_s": 1.5},
           "10000": {"first_plan_s": 5}}
DOC_BEGIN, DOC_END = "<!-- plan_cohort:begin -->", "<!-- plan_cohort:end -->"


def standin_cards(root: Path, pipelines) -> tuple[Path, dict]:
    models = root / "models"
    cards = root / "cards"
    models.mkdir(parents=True, exist_ok=True)
    cards.mkdir(parents=True, exist_ok=True)
    blob = models / "standin.bin"
    blob.write_bytes(b"stand-in weights for planning only")
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    cfg = {}
    for p in pipelines:
        (cards / f"bench_{p}.yaml").write_text(json.dumps({
            "name": f"bench_{p}", "pipeline": p, "contrasts": ["any"],
            "architecture": {"loader": "keras_full"},
            "folds": [{"file": "standin.bin", "sha256": digest}]}))
        cfg[p] = {"models": [f"bench_{p}"]}
    return models, cfg


def scontrol_seconds() -> float | None:
    """The SLURM executor plugin runs `scontrol show config` whenever snakemake starts (10 s timeout).
    Where slurm's tools are installed but no controller answers, every snakemake call pays that
    wait; it is a property of the machine, reported so the figures can be read."""
    if not shutil.which("scontrol"):
        return None
    t0 = time.perf_counter()
    try:
        subprocess.run(["scontrol", "show", "config"], capture_output=True, timeout=15)
    except subprocess.TimeoutExpired:
        pass
    return round(time.perf_counter() - t0, 2)


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def cpu_model() -> str | None:
    """The CPU's model name (Linux): VMs of one size can sit on different hosts, at different speeds."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


ENV = dict(os.environ)  # of the measured processes (--stub-scontrol puts a stub first on PATH)


def stub_scontrol(folder: Path) -> None:
    """A `scontrol` that answers at once (exit 1, as with no cluster): where a SLURM client is
    installed but no controller answers, the real one waits ~10 s in every snakemake start-up (the
    SLURM plugin's, not ours); the figures then measure the workflow instead of that timeout."""
    folder.mkdir(parents=True, exist_ok=True)
    stub = folder / "scontrol"
    stub.write_text("#!/bin/sh\nexit 1\n")
    stub.chmod(0o755)
    ENV["PATH"] = f"{folder}{os.pathsep}{ENV.get('PATH', '')}"


def run_timed(cmd, cwd) -> dict:
    """Wall, CPU (user + sys), peak RSS and the dry-run's job count of one fresh process."""
    load = load_average()
    t0 = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-f", "TIME %U %S %M", *cmd], cwd=cwd, capture_output=True, text=True,
                         env=ENV)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"command failed: {' '.join(map(str, cmd))}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    m = re.findall(r"^TIME ([\d.]+) ([\d.]+) (\d+)$", res.stderr, re.M)
    user, sys_, rss = m[-1] if m else (0, 0, 0)
    total = re.search(r"^total\s+(\d+)", res.stdout, re.M)
    out = res.stdout + res.stderr
    return {"wall_s": round(wall, 2), "cpu_s": round(float(user) + float(sys_), 2),
            "peak_rss_mb": round(int(rss) / 1024, 1) if rss else None,
            "jobs": int(total.group(1)) if total else None, "load_avg_1min": load,
            "log": [ln.split("cohortseg: ", 1)[1] for ln in out.splitlines() if "cohortseg: " in ln]}


def median_run(runs: list[dict]) -> dict:
    """The run of median wall time (the lower middle one of an even count), with every run's wall
    time and the fastest beside it: on a shared machine whose speed drifts, one run can be far off."""
    if len(runs) == 1:
        return runs[0]
    mid = sorted(runs, key=lambda r: r["wall_s"])[(len(runs) - 1) // 2]
    return {**mid, "wall_runs_s": [r["wall_s"] for r in runs], "wall_min_s": min(r["wall_s"] for r in runs)}


def _listed(log: list[str]) -> int | None:
    """Subject folders the plan listed (from its log line), None when it does not say."""
    for ln in log:
        m = re.search(r"subject folders, ([\d,]+) listed", ln)
        if m:
            return int(m.group(1).replace(",", ""))
    return None


def _shards(log: list[str]) -> tuple[int | None, int | None]:
    for ln in log:
        m = re.search(r"automatic shard size (\d+) \(([\d,]+) sessions -> ([\d,]+) shards", ln)
        if m:
            return int(m.group(1)), int(m.group(3).replace(",", ""))
    return None, None


def fake_tree(trees: Path | None, tmp: Path, n: int) -> tuple[Path, float]:
    """The fake BIDS tree of n participants (kept under `trees` between runs when given)."""
    root = (trees or tmp) / f"bids_{n}"
    done = root / ".complete"
    if done.exists():
        return root, 0.0
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    make_fake_bids(root, n, contrasts=("T1w", "T2starw", "swi"), session_every=3)
    # a real cohort's folders are old: age the fresh ones, or a plan right after would find them
    # modified within discovery.RACY_NS of its scan and (rightly) list them again on the re-plan
    old = time.time() - 3600
    for d, _, _ in os.walk(root):
        os.utime(d, (old, old))
    done.touch()
    return root, round(time.perf_counter() - t0, 1)


def snakemake_cmd(cfg: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--configfile", str(cfg),
            "--cores", "1", "-n", *extra]


def measure(n: int, pipelines, tmp: Path, trees: Path | None, shard_size: int | None, repeat: int = 1) -> dict:
    bids, t_tree = fake_tree(trees, tmp, n)
    work = tmp / f"n{n}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    models, pcfg = standin_cards(work, pipelines)
    cfg = {"bids_dir": str(bids), "output_dir": str(work / "out"), "model_dir": str(models),
           "model_cards_dir": str(work / "cards"), "pipelines": pipelines,
           "inference": {"shard_size": shard_size} if shard_size else {}, **pcfg}
    (work / "cfg.yaml").write_text(json.dumps(cfg))
    dry = snakemake_cmd(work / "cfg.yaml", "--quiet", "rules", "reason", "host")
    firsts, cacheds = [], []
    for _ in range(repeat):
        shutil.rmtree(work / "out", ignore_errors=True)
        firsts.append(run_timed(dry, work))  # discovery builds the manifest
        cacheds.append(run_timed(dry, work))  # manifest and discovery cache current: what a re-plan costs
    first, cached = median_run(firsts), median_run(cacheds)
    remote = {step: median_run([run_timed(snakemake_cmd(work / "cfg.yaml", "--mode", "remote", "--target-jobs",
                                                        f"{step}:shard=00000", "--quiet", "all"), work)
                                for _ in range(repeat)])
              for step in ("prepare", "finalize")}
    n_sessions = len(json.loads((work / "out" / "manifest.idx.json").read_text())["keys"])
    size, n_shards = _shards(cached["log"])
    if shard_size:
        size, n_shards = shard_size, -(-n_sessions // shard_size)
    point = {"n_participants": n, "n_images": 3 * n_sessions,  # three contrasts per session
             "n_sessions": n_sessions, "shard_size": size, "shard_size_automatic": not shard_size,
             "n_shards": n_shards, "fake_tree_s": t_tree,
             "first_plan": first, "cached_replan": cached,
             "remote_job": max(remote.values(), key=lambda r: r["wall_s"]),
             "remote_jobs": remote,
             "first_plan_listed_subjects": _listed(first["log"]),
             "cached_replan_listed_subjects": _listed(cached["log"])}
    print(json.dumps({k: v for k, v in point.items() if k != "remote_jobs"}, indent=1), flush=True)
    return point


def naive_snakefile(path: Path, pipelines) -> None:
    """Same inputs and cohort, one job per step per pipeline and session (touch only)."""
    lines = ["import csv",
             "rows = [r for r in csv.DictReader(open(config['manifest']), delimiter='\\t') if r['status'] == 'ok']",
             "keys = sorted({(r['pipeline'], r['item']) for r in rows})",
             "rule all:",
             "    input: 'naive/summary.csv'",
             "rule summary:",
             "    input: [f'naive/{p}/{i}/qc.done' for p, i in keys]",
             "    output: 'naive/summary.csv'",
             "    shell: 'touch {output}'"]
    prev = None
    for step in NAIVE_STEPS:
        lines += [f"rule {step}:",
                  f"    input: 'naive/{{p}}/{{i}}/{prev}.done'" if prev else "    input: []",
                  f"    output: 'naive/{{p}}/{{i}}/{step}.done'",
                  "    shell: 'touch {output}'"]
        prev = step
    path.write_text("\n".join(lines) + "\n")


def naive_comparison(point: dict, tmp: Path, pipelines) -> dict:
    work = tmp / f"n{point['n_participants']}"
    naive_snakefile(work / "Naive.smk", pipelines)
    naive = run_timed([sys.executable, "-m", "snakemake", "-s", str(work / "Naive.smk"), "--config",
                       f"manifest={work / 'out' / 'manifest.tsv'}", "--cores", "1", "-n", "--quiet", "rules",
                       "reason", "host"], work)
    ours = point["cached_replan"]
    return {"n_participants": point["n_participants"], "cohortseg": ours, "naive_one_job_per_step": naive,
            "naive_over_cohortseg_wall": round(naive["wall_s"] / ours["wall_s"], 2)}


def check_targets(points: list[dict]) -> dict:
    out = {}
    by_n = {str(p["n_participants"]): p for p in points}
    for n, targets in TARGETS.items():
        p = by_n.get(n)
        if p is None:
            continue
        got = {"first_plan_s": p["first_plan"]["wall_s"], "first_plan_rss_mb": p["first_plan"]["peak_rss_mb"],
               "cached_replan_s": p["cached_replan"]["wall_s"], "remote_job_s": p["remote_job"]["wall_s"]}
        out[n] = {k: {"target": t, "measured": got[k], "met": got[k] is not None and got[k] <= t}
                  for k, t in targets.items()}
    return out


def one_rule_remote_job(folder: Path, repeat: int = 1) -> dict:
    """Snakemake's own floor for a cluster job: the remote job of a one-rule Snakefile."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Snakefile").write_text('rule all:\n    input: "a.txt"\n\nrule a:\n    output: "a.txt"\n'
                                      '    shell: "touch {output}"\n')
    return median_run([run_timed([sys.executable, "-m", "snakemake", "-s", str(folder / "Snakefile"), "--cores", "1",
                                  "-n", "--mode", "remote", "--target-jobs", "a:", "--quiet", "all"], folder)
                       for _ in range(repeat)])


def _wall(fig: dict) -> str:
    runs = fig.get("wall_runs_s")
    return f"{fig['wall_s']} s" + (f" [{min(runs)}-{max(runs)}]" if runs else "")


def markdown(result: dict) -> str:
    rows = ["| participants | sessions | shard size | jobs | first plan | cached re-plan | remote job "
            "(prepare / finalize) |",
            "|---:|---:|---:|---:|---|---|---|"]
    for p in result["points"]:
        f, c, r = p["first_plan"], p["cached_replan"], p["remote_jobs"]
        rows.append(
            f"| {p['n_participants']:,} | {p['n_sessions']:,} | {p['shard_size']}{' (auto)' if p['shard_size_automatic'] else ''}"
            f" | {c['jobs']:,} | {_wall(f)} ({f['cpu_s']} s CPU), {f['peak_rss_mb']:.0f} MB"
            f" | {_wall(c)} ({c['cpu_s']} s CPU), {c['peak_rss_mb']:.0f} MB, {p['cached_replan_listed_subjects']} folders listed"
            f" | {_wall(r['prepare'])} / {_wall(r['finalize'])} ({r['prepare']['cpu_s']} / {r['finalize']['cpu_s']} s CPU) |")
    lines = [DOC_BEGIN,
             f"Measured {result['date']} on {result['machine']['cpus']} CPU cores"
             + (f" ({result['machine']['cpu_model']})" if result["machine"].get("cpu_model") else "")
             + ", load average "
             f"{result['machine']['load_avg_before']} before / {result['machine']['load_avg_after']} after "
             f"(1-minute; every figure also records the load when it ran)."
             + (f" Every figure is the median of {result['repeat']} runs, [fastest-slowest] beside it."
                if result.get("repeat", 1) > 1 else "")
             + f" Python + snakemake import alone: "
             f"{_wall(result['python_snakemake_import'])} ({result['python_snakemake_import']['cpu_s']} s CPU); "
             f"the remote job of a one-rule Snakefile (Snakemake's floor for any cluster job): "
             f"{_wall(result['one_rule_remote_job'])} ({result['one_rule_remote_job']['cpu_s']} s CPU). "
             f"Wall times include waiting for the CPU on a loaded machine; CPU time (user + sys) is the less "
             f"load-sensitive figure."
             + (f" `scontrol show config` took {result['scontrol_show_config_s']} s on this machine"
                + (" (no controller answering)" if (result["scontrol_show_config_s"] or 0) > 1 else "")
                + "; measured with `--stub-scontrol`, so the figures leave out that call of the SLURM plugin, "
                  "which every snakemake start pays." if result.get("scontrol_stubbed") else ""),
             "", *rows, ""]
    for n, checks in result["targets"].items():
        lines.append(f"Targets at {int(n):,} participants: " + ", ".join(
            f"{k} {v['measured']} (<= {v['target']}: {'met' if v['met'] else 'NOT met'})" for k, v in checks.items()))
        lines.append("")
    lines.append(DOC_END)
    return "\n".join(lines)


def write_docs(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else ""
    if DOC_BEGIN in text and DOC_END in text:
        text = text[: text.index(DOC_BEGIN)] + block + text[text.index(DOC_END) + len(DOC_END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000", help="participant counts, comma-separated")
    ap.add_argument("--n", type=int, default=None, help="one size only (same as --sizes N)")
    ap.add_argument("--pipelines", default=",".join(ALL))
    ap.add_argument("--shard-size", type=int, default=None, help="pin inference.shard_size (default: automatic)")
    ap.add_argument("--naive", action="store_true", help="also plan the smallest size as a naive one-job-per-step DAG")
    ap.add_argument("--trees", default=None, help="keep the fake BIDS trees here between runs (they take minutes at 100k)")
    ap.add_argument("--stub-scontrol", action="store_true",
                    help="measure with a `scontrol` stub first on PATH (see stub_scontrol; recorded in the JSON)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every measurement this many times and report the median run (all runs' wall times "
                         "and the fastest are kept beside it)")
    ap.add_argument("--out", default=None, help="JSON figures")
    ap.add_argument("--docs", default=None, help="markdown file whose plan_cohort block gets the table")
    a = ap.parse_args(argv)
    sizes = [a.n] if a.n else [int(s) for s in a.sizes.split(",")]
    pipelines = a.pipelines.split(",")
    trees = Path(a.trees) if a.trees else None
    if trees:
        trees.mkdir(parents=True, exist_ok=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "pipelines": pipelines,
              "machine": {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "load_avg_before": load_average()}}
    result["scontrol_show_config_s"] = scontrol_seconds()
    result["scontrol_stubbed"] = a.stub_scontrol
    with tempfile.TemporaryDirectory(prefix="cohortseg-plan-") as tmp:
        tmp = Path(tmp)
        if a.stub_scontrol:
            stub_scontrol(tmp / "stub-bin")
        result["repeat"] = a.repeat
        result["python_snakemake_import"] = median_run(
            [run_timed([sys.executable, "-c", "import snakemake.cli"], tmp) for _ in range(a.repeat)])
        result["one_rule_remote_job"] = one_rule_remote_job(tmp / "one-rule", a.repeat)
        result["points"] = [measure(n, pipelines, tmp, trees, a.shard_size, a.repeat) for n in sizes]
        if a.naive:
            result["naive_comparison"] = naive_comparison(result["points"][0], tmp, pipelines)
    result["machine"]["load_avg_after"] = load_average()
    if (result["scontrol_show_config_s"] or 0) > 1 and not a.stub_scontrol:
        print("WARNING: `scontrol show config` takes %.1f s here (no SLURM controller answering); the "
              "SLURM plugin pays it in every snakemake call, so every figure includes it"
              % result["scontrol_show_config_s"], file=sys.stderr)
    result["targets"] = check_targets(result["points"])
    result["meets_targets"] = all(v["met"] for checks in result["targets"].values() for v in checks.values())
    if a.docs:
        write_docs(Path(a.docs), markdown(result))
    return emit(result, a.out)


if __name__ == "__main__":
    main()
