"""The benchmark scripts keep working and report what they claim (figures are not asserted: speed
targets live in the benchmarks, never in timed unit tests)."""
import json
import subprocess
import sys

import pytest

from helpers import REPO

from cohortseg.workflow.plan import auto_shard_size

FIGURE = {"wall_s", "cpu_s", "peak_rss_mb", "jobs", "load_avg_1min", "log"}


def _sessions(n, every=3):
    return sum(2 if i % every == 0 else 1 for i in range(n))


@pytest.mark.slow  # several snakemake plans per size: minutes on a loaded 2-core machine
def test_plan_cohort_scaling_curve(tmp_path):
    """Two sizes, automatic shard size: the JSON schema, the job counts of the shard formula, a
    cached re-plan that lists no subject folder, one-job remote plans, and the docs table."""
    out, docs = tmp_path / "plan.json", tmp_path / "BENCH.md"
    docs.write_text("# B\n\nbefore\n\n<!-- plan_cohort:begin -->\nold table\n<!-- plan_cohort:end -->\n\nafter\n")
    subprocess.run([sys.executable, str(REPO / "benchmarks/plan_cohort.py"), "--sizes", "12,30", "--pipelines",
                    "sc_gm,brain_tissue", "--naive", "--out", str(out), "--docs", str(docs)],
                   check=True, capture_output=True, timeout=900)
    r = json.loads(out.read_text())
    assert [p["n_participants"] for p in r["points"]] == [12, 30]
    for p in r["points"]:
        n_sessions = _sessions(p["n_participants"])
        size = auto_shard_size(n_sessions)
        shards = -(-n_sessions // size)
        assert (p["n_sessions"], p["shard_size"], p["n_shards"], p["shard_size_automatic"]) == (
            n_sessions, size, shards, True)
        for fig in ("first_plan", "cached_replan", "remote_job"):
            assert FIGURE <= set(p[fig]) and p[fig]["wall_s"] > 0 and p[fig]["peak_rss_mb"] > 0
        # per shard a prepare, an infer (both pipelines in turn) and a finalize, + aggregate, qc_page, all
        assert p["first_plan"]["jobs"] == p["cached_replan"]["jobs"] == shards * 3 + 3
        assert p["first_plan_listed_subjects"] == p["n_participants"]
        assert p["cached_replan_listed_subjects"] == 0  # the re-plan stats folders, lists none
        # a remote prepare job plans itself; a finalize job (dry-run: nothing exists) also its prepare and infer
        assert {s: j["jobs"] for s, j in p["remote_jobs"].items()} == {"prepare": 1, "finalize": 1 + 1 + 1}
        assert any("automatic shard size" in ln for ln in p["cached_replan"]["log"])
    assert r["naive_comparison"]["naive_one_job_per_step"]["jobs"] == 16 * 2 * 9 + 2
    assert isinstance(r["meets_targets"], bool) and r["targets"] == {}  # no 10k/100k point here
    assert r["one_rule_remote_job"]["jobs"] == 1 and r["one_rule_remote_job"]["wall_s"] > 0  # snakemake's floor
    text = docs.read_text()
    assert "old table" not in text and text.startswith("# B\n\nbefore\n") and text.endswith("\n\nafter\n")
    assert "| 30 | 40 | 20 (auto) | 9 |" in text
    # the CPU model is named (Linux): same-size VMs sit on hosts of different speeds
    model = r["machine"]["cpu_model"]
    assert model is None or (model and f"CPU cores ({model})," in text)


@pytest.mark.slow  # three runs of each figure
def test_plan_cohort_pinned_shard_size(tmp_path):
    out = tmp_path / "plan.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks/plan_cohort.py"), "--n", "12", "--pipelines", "sc_gm",
                    "--shard-size", "5", "--stub-scontrol", "--repeat", "3", "--out", str(out)], check=True,
                   capture_output=True, timeout=600)
    r = json.loads(out.read_text())
    assert r["scontrol_stubbed"] is True and r["repeat"] == 3
    p = r["points"][0]
    for fig in (p["first_plan"], p["cached_replan"], p["remote_jobs"]["finalize"], r["one_rule_remote_job"]):
        runs = fig["wall_runs_s"]  # the median of three runs is reported, the fastest beside it
        assert len(runs) == 3 and fig["wall_s"] == sorted(runs)[1] and fig["wall_min_s"] == min(runs)
    assert p["first_plan_listed_subjects"] == 12  # every first plan started without a manifest
    # 12 participants, every third with 2 sessions -> 16 sessions in 4 shards of 5 sessions (and 1)
    assert (p["n_sessions"], p["shard_size"], p["n_shards"], p["shard_size_automatic"]) == (16, 5, 4, False)
    assert p["cached_replan"]["jobs"] == 4 * 3 + 3
    assert not any("automatic shard size" in ln for ln in p["cached_replan"]["log"])
