#!/usr/bin/env python
"""Cohort tables and QC page benchmark: N sessions through the code path the rules run.

The N sessions are cloned from template sessions: the records of a finished demo run (`--from
demo/results`, the real records of `config/demo.yaml`: sc_gm, sc_csa on three contrasts,
brain_tissue) or, without one, synthetic templates with the same tables and shapes (the real
column names, the demo images' slice counts). Each clone is a session record of its own
(`work/records/<key>.json`: its own file, ids and stamps) whose per-item tables are the
template's files (read once per clone, from the page cache: the file system's latency is not
measured). Then, each step in a process of its own (wall time, CPU time, peak RSS):

1. **shard parts**: `aggregate.write_shard_tables` for every shard, as each finalize job runs it
   (one process for all shards here; the per-shard figure is the mean);
2. **aggregate**: `aggregate.aggregate` over the shard records (the `aggregate` rule);
3. **re-aggregate**: one session of one shard reprocessed by sc_gm (a metric and a value of its
   per-slice table changed, its record rewritten), that shard's part rebuilt (`one_shard`), then
   `aggregate` again (the summary and the sc_gm table assembled again; the tables without a change
   kept);
4. **qc_page**: `report.write_cohort_qc_page` (the `qc_page` rule);
5. with `--browser` (Playwright + /usr/bin/chromium): the page opened from file:// in headless
   Chromium (navigation to ready) and a text filter typed (`qc_page_open_s`, `qc_filter_s`).

    python benchmarks/aggregate_cohort.py --sessions 10000 --from demo/results --json r.json --browser

Targets (2 cores; 100,000 sessions, sc_gm + sc_csa + brain_tissue): tables <= 60 s and <= 1.5 GB,
re-aggregate <= 15 s, QC page written <= 15 s and open <= 3 s; 10,000 sessions: tables <= 8 s.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, emit  # noqa: E402  (puts the repository on sys.path)

PIPELINES = ["sc_gm", "sc_csa", "brain_tissue"]
TARGETS = {"100000": {"wall_s": 60, "peak_rss_mb": 1536, "reaggregate_wall_s": 15, "qc_page_wall_s": 15,
                      "qc_page_open_s": 3}, "10000": {"wall_s": 8}}


# ------------------------------------------------------------------------------ the cohort
def synthetic_templates(root) -> tuple[list, dict]:
    """Template sessions shaped as the demo's: sub-01 with a cord T2*w (9 slices), T1w (77) and T2w
    (52, with vertebral levels) and a brain T1w; three T2*w-only sessions. Tables are written by the
    pipelines' own writer (OutputWriter.table), with the column names the pipelines write."""
    import numpy as np
    import pandas as pd

    from cohortseg.pipelines import get_pipeline
    from cohortseg.pipelines.base import Item, OutputWriter
    from cohortseg.workflow.records import ItemRecord, SessionRecord

    (gm_perslice,), (perslice, perlevel_key), (tissue,) = (list(get_pipeline(p).group_tables.values()) for p in PIPELINES)
    root = Path(root)
    rng = np.random.default_rng(0)

    def item(rec, pipeline, name, contrast, metrics, tables, flags=()):
        w = OutputWriter(root, Item(rec.participant_id, rec.session_id, pipeline, name, {"image": f"{name}.nii.gz"}))
        for key, df in tables.items():
            w.table(key, df)
        png = w.figure_path(f"desc-{pipeline}_qc.png")
        png.write_bytes(b"")
        Path(str(png)[:-4] + "_thumb.png").write_bytes(b"")
        rec.items(pipeline)[name] = ItemRecord("ok", contrast=contrast, metrics=metrics, files=dict(w.files),
                                               sanity_flags=list(flags), stamp="0" * 40)

    def gm(n):
        return pd.DataFrame({"slice": range(n), "gm_area_mm2": rng.normal(12, 1, n).round(4)})

    def csa(name, n, levels):
        vert = np.repeat([5, 4, 3], -(-n // 3))[:n].astype(float) if levels else np.full(n, np.nan)
        return pd.DataFrame({"Filename": f"{name}.nii.gz", "Slice (I->S)": range(n), "VertLevel": vert,
                             "MEAN(area)": rng.normal(75, 5, n),
                             "MEAN(angle_AP)": rng.normal(0, 3, n), "MEAN(angle_RL)": rng.normal(0, 3, n),
                             "MEAN(diameter_AP)": rng.normal(7, .5, n), "MEAN(diameter_RL)": rng.normal(12, .5, n),
                             "MEAN(eccentricity)": rng.uniform(.6, .8, n), "MEAN(orientation)": rng.normal(0, 5, n),
                             "MEAN(solidity)": rng.uniform(.9, 1, n), "SUM(length)": np.full(n, 1.0)})

    def perlevel(per):
        return per.groupby("VertLevel", dropna=False).mean(numeric_only=True).reset_index().assign(
            Filename=per.Filename.iloc[0])

    templates = []
    for k, (pid, sid) in enumerate([("sub-01", ""), ("sub-02", ""), ("sub-03", "ses-01"), ("sub-03", "ses-02")]):
        rec = SessionRecord(pid, sid)
        stem = f"{pid}_{sid}" if sid else pid
        contrasts = [("T2starw", 9, False)] + ([("T1w", 77, False), ("T2w", 52, True)] if k == 0 else [])
        item(rec, "sc_gm", f"{stem}_T2starw", "T2starw", {"gm_volume_mm3": round(float(rng.normal(800, 60)), 2),
                                                          "wm_volume_mm3": round(float(rng.normal(4000, 200)), 2),
                                                          "n_slices": 9}, {gm_perslice: gm(9)})
        for c, n, levels in contrasts:
            per = csa(f"{stem}_{c}", n, levels)
            m = {"csa_mean_mm2": round(float(per["MEAN(area)"].mean()), 3), "csa_std_mm2": 5.0, "n_slices": n,
                 "cord_length_mm": float(n), "cord_volume_mm3": round(float(per["MEAN(area)"].sum()), 2)}
            if levels:
                m.update({"csa_C3_mm2": 74.1, "csa_C4_mm2": 75.2, "csa_C5_mm2": 76.3})
            item(rec, "sc_csa", f"{stem}_{c}", c, m, {perslice: per, perlevel_key: perlevel(per)},
                 flags=("edge",) if c == "T1w" else ())
        if k == 0:
            vols = {"etiv_ml": 1450.2, "brain_ml": 1180.4, "gm_ml": 640.1, "wm_ml": 480.7, "csf_ml": 270.3,
                    "gm_fraction": 0.4414}
            item(rec, "brain_tissue", f"{stem}_acq-brain_T1w", "T1w", vols,
                 {tissue: pd.DataFrame([vols])})
        else:
            rec.items("brain_tissue")["-"] = ItemRecord("no_input", stage="discovery")
        templates.append(rec)
    from cohortseg.workflow.overrides import validate_config

    config = validate_config({"bids_dir": str(root), "output_dir": str(root), "pipelines": list(PIPELINES)})
    return templates, config  # the schema's defaults, as a run without a config file has them


def demo_templates(results) -> tuple[list, dict]:
    """The session records of a finished demo run, and its job config."""
    from cohortseg.workflow.records import SessionRecord

    results = Path(results)
    templates = [SessionRecord.read(p) for p in sorted((results / "work" / "records").glob("*.json"))]
    configs = sorted((results / "work" / "config").glob("*.json"), key=os.path.getmtime)
    if not templates or not configs:
        raise SystemExit(f"{results}: no session records or job config (a finished `config/demo.yaml` run?)")
    return [t for t in templates if t is not None], json.loads(configs[-1].read_text())


def clone_cohort(templates, out, n: int, shard_size: int | None = None) -> list[Path]:
    """n sessions (sub-000000 ...) cloned round-robin from the templates into out/work/records, cut
    into shards of consecutive session keys (the automatic shard size unless given) with their
    finalize shard records. Returns the shard records."""
    from cohortseg.workflow.plan import auto_shard_size

    out = Path(out)
    records = out / "work" / "records"
    records.mkdir(parents=True, exist_ok=True)
    dicts = [t.to_dict() for t in templates]
    keys = []
    for i in range(n):
        d = dicts[i % len(dicts)]
        pid = f"sub-{i:06d}"
        key = f"{pid}_{d['session_id']}" if d["session_id"] else pid
        (records / f"{key}.json").write_text(json.dumps({**d, "participant_id": pid}))
        keys.append(key)
    keys.sort()
    size = shard_size or auto_shard_size(n)
    shards = []
    for k in range(0, n, size):
        path = out / "work" / "shards" / "finalize" / f"shard-{k // size:05d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"step": "finalize", "sessions": {s: str(records / f"{s}.json")
                                                                    for s in keys[k:k + size]}}))
        shards.append(path)
    return shards


# ---------------------------------------------------------------------------- the steps
def _step(name: str, out: Path, config_path: Path) -> dict:
    """One step in a process of its own: its wall, CPU and peak RSS."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, __file__, "--step", name, "--out", str(out), "--config", str(config_path)],
                         capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"step {name} failed:\n{res.stderr[-4000:]}")
    fig = json.loads(res.stdout.strip().splitlines()[-1])
    fig["process_wall_s"] = round(time.perf_counter() - t0, 3)  # with the interpreter start and imports
    return fig


def change_session_gm(sessions: dict, folder: Path) -> str:
    """The first session with an sc_gm table gets other sc_gm results: a metric and one value of its
    per-slice table (a copy of the template's) change, and its record is rewritten. Every cohort
    table with sc_gm rows and the summary must then be rebuilt. Returns the session key."""
    import pandas as pd

    from cohortseg.pipelines import get_pipeline

    (key,) = get_pipeline("sc_gm").group_tables.values()
    for skey, p in sessions.items():
        d = json.loads(Path(p).read_text())
        for name, it in d["pipelines"].get("sc_gm", {}).items():
            src = it.get("files", {}).get(key)
            if it.get("status") != "ok" or not src:
                continue
            sep = "\t" if src.endswith(".tsv") else ","
            t = pd.read_csv(src, sep=sep)
            col = t.select_dtypes("number").columns[-1]
            t.loc[0, col] = t.loc[0, col] + 1
            folder.mkdir(parents=True, exist_ok=True)
            it["files"][key] = str(folder / Path(src).name)
            t.to_csv(it["files"][key], sep=sep, index=False)
            it["metrics"] = {k: v + 1 if isinstance(v, float) else v for k, v in it["metrics"].items()}
            d["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            Path(p).write_text(json.dumps(d))
            return skey
    raise SystemExit("no session with an sc_gm table in the shard")


def run_step(name: str, out: Path, config: dict) -> dict:
    from cohortseg.workflow import aggregate as agg
    from cohortseg.workflow.report import write_cohort_qc_page

    shards = sorted((out / "work" / "shards" / "finalize").glob("shard-*.json"))
    t0, c0 = time.perf_counter(), time.process_time()
    extra = {}
    if name == "shards":
        for s in shards:
            agg.write_shard_tables(json.loads(s.read_text())["sessions"], config, agg.shard_tables_dir(s))
        extra = {"shards": len(shards)}
    elif name == "one_shard":  # a session of the middle shard reprocessed by sc_gm, then its finalize rerun
        s = shards[len(shards) // 2]
        sessions = json.loads(s.read_text())["sessions"]
        extra = {"changed": change_session_gm(sessions, out / "work" / "changed")}
        agg.write_shard_tables(sessions, config, agg.shard_tables_dir(s))
    elif name == "aggregate":
        agg.aggregate(shards, out / "group", config)
    elif name == "qc_page":
        write_cohort_qc_page(out / "group" / "summary.csv", shards, out / "qc", config)
    return {"wall_s": round(time.perf_counter() - t0, 3), "cpu_s": round(time.process_time() - c0, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), **extra}


def browser_figures(page: Path) -> dict:
    """Open the QC page (and its largest sub-page) from file:// in headless Chromium: navigation to
    ready, then a filter typed into the search box (until the list shows the result)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return {"browser": "playwright missing"}
    chromium = os.environ.get("COHORTSEG_CHROMIUM", "/usr/bin/chromium")
    if not Path(chromium).is_file():
        return {"browser": f"{chromium} missing"}
    pages = [page] + sorted(page.parent.glob("page-*.html"), key=lambda p: -p.stat().st_size)[:1]
    out = {}
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        for p in pages:
            tab = b.new_page(viewport={"width": 1400, "height": 900})
            t0 = time.perf_counter()
            tab.goto(p.as_uri())  # (until the load event)
            if tab.locator("#qc-data").count():  # a QC page, not the index of pages: until its list is drawn
                tab.wait_for_selector("body[data-ready='1']", timeout=60_000)
            opened = time.perf_counter() - t0
            fig = {"open_s": round(opened, 3), "bytes": p.stat().st_size}
            if tab.locator("#q").count():
                fig["rows"] = tab.evaluate("window.cohortsegQC.rows.length")
                t0 = time.perf_counter()
                tab.fill("#q", "sub-0000")  # debounced 120 ms: the figure includes that wait
                tab.wait_for_function("window.cohortsegQC.view().length < window.cohortsegQC.rows.length")
                fig["filter_s"] = round(time.perf_counter() - t0, 3)
                fig["filter_compute_ms"] = tab.evaluate("window.cohortsegQC.lastFilterMs")
            out[p.name] = fig
            tab.close()
        b.close()
    return out


def sizes(folder: Path) -> dict:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--from", dest="source", help="a finished demo run's output_dir (default: synthetic templates)")
    ap.add_argument("--shard-size", type=int, help="default: the workflow's automatic shard size")
    ap.add_argument("--out", help="keep the outputs here (DIR/group/summary.csv ...); default: a temporary folder")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--browser", action="store_true", help="open the QC page in headless Chromium")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.step:
        print(json.dumps(run_step(a.step, Path(a.out), json.loads(Path(a.config).read_text()))))
        return
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="aggregate_cohort."))
    if out.exists() and a.out:
        shutil.rmtree(out / "work", ignore_errors=True)
        shutil.rmtree(out / "group", ignore_errors=True)
        shutil.rmtree(out / "qc", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if a.source:
        templates, config = demo_templates(a.source)
    else:
        templates, config = synthetic_templates(out / "templates")
    config = {**config, "output_dir": str(out)}
    clone_cohort(templates, out, a.sessions, a.shard_size)
    config_path = out / "bench_config.json"
    config_path.write_text(json.dumps(config))
    build_s = time.perf_counter() - t0
    steps = {name: _step(name, out, config_path) for name in ("shards", "aggregate", "one_shard")}
    steps["reaggregate"] = _step("aggregate", out, config_path)
    steps["qc_page"] = _step("qc_page", out, config_path)
    result = {
        "sessions": a.sessions, "templates": "demo records: " + str(a.source) if a.source else "synthetic",
        "pipelines": config["pipelines"], "shards": steps["shards"]["shards"],
        "wall_s": steps["aggregate"]["wall_s"], "cpu_s": steps["aggregate"]["cpu_s"],
        "peak_rss_mb": steps["aggregate"]["peak_rss_mb"],
        "reaggregate_wall_s": round(steps["one_shard"]["wall_s"] + steps["reaggregate"]["wall_s"], 3),
        "qc_page_wall_s": steps["qc_page"]["wall_s"], "qc_page_peak_rss_mb": steps["qc_page"]["peak_rss_mb"],
        "shard_parts_wall_s": steps["shards"]["wall_s"],
        "shard_part_mean_s": round(steps["shards"]["wall_s"] / max(steps["shards"]["shards"], 1), 3),
        "steps": steps, "clone_s": round(build_s, 1),
        "group_bytes": sizes(out / "group"), "qc_bytes": sizes(out / "qc"),
        "load_avg_1min": os.getloadavg()[0], "cpu_count": os.cpu_count(),
    }
    if a.browser:
        try:
            result["browser"] = browser_figures(out / "qc" / "index.html")
        except Exception as e:  # noqa: BLE001 - the other figures stand
            result["browser"] = {"error": f"{type(e).__name__}: {e}"[:500]}
        opens = [f["open_s"] for f in result["browser"].values() if isinstance(f, dict) and "open_s" in f]
        if opens:
            result["qc_page_open_s"] = max(opens)
    t = TARGETS.get(str(a.sessions), {})
    result["targets"] = t
    result["meets_targets"] = all(result.get(k) is not None and result[k] <= v for k, v in t.items())
    emit(result, a.json)
    if not a.out:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
