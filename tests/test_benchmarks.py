"""The benchmark scripts keep working (figures are not asserted: targets live in the benchmarks)."""
import json
import subprocess
import sys

from helpers import REPO


def test_plan_cohort_benchmark_runs(tmp_path):
    out = tmp_path / "plan.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks/plan_cohort.py"), "--n", "12", "--pipelines", "sc_gm",
                    "--shard-size", "5", "--out", str(out)], check=True, capture_output=True, timeout=600)
    r = json.loads(out.read_text())
    # 12 participants, every third with 2 sessions -> 16 sessions in 4 shards of 5 sessions (and 1):
    # a prepare, an infer and a finalize per shard + aggregate + qc_page + all
    assert r["n_sessions"] == 16 and r["dryrun_cached_manifest"]["jobs"] == 4 * 3 + 3
    assert r["naive_comparison"]["naive_one_job_per_step"]["jobs"] == 16 * 9 + 2
    assert r["remote_job_overhead"]["wall_s"] > 0 and "meets_targets" in r
