"""Helpers for tests that drive the real Snakefile in a temporary working directory."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def write_config(path: Path, **cfg) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def snakemake(workdir, *args, configfile=None, check=True, timeout=1800):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir)]
    if configfile:
        cmd += ["--configfile", str(configfile)]
    cmd += list(args)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"snakemake failed ({res.returncode}):\n{res.stdout[-5000:]}\n{res.stderr[-5000:]}")
    return res


def job_counts(dryrun_output: str) -> dict[str, int]:
    """Parse the 'Job stats' table of a dry-run."""
    counts, inside = {}, False
    for line in dryrun_output.splitlines():
        if line.startswith("job ") and "count" in line:
            inside = True
            continue
        if inside:
            if line.strip().startswith("total"):
                break
            m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
            if m:
                counts[m.group(1)] = int(m.group(2))
    return counts
