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


def run_item(pipeline: str, inputs: dict, out_dir, settings: dict | None = None, model_dir=None,
             participant_id: str = "sub-01", session_id: str = "", name: str | None = None, models=None):
    """One item through its plugin exactly as the steps run it: the config (with the schema's
    defaults, as the Snakefile validates it), cards and models from the config, prepare ->
    Prepared file -> predict -> Predicted file -> finalize. `models` replaces the loaded fold models
    (stand-ins). Returns {'prepared', 'predicted', 'metrics', 'files', 'flags', 'cards', 'models'}."""
    from cohortseg.models.cards import pipeline_cards
    from cohortseg.models.ensemble import load_models
    from cohortseg.models.store import ModelStore
    from cohortseg.pipelines import get_pipeline
    from cohortseg.pipelines.base import Context, Item, OutputWriter, Predicted, Prepared
    from cohortseg.workflow.overrides import validate_config

    out_dir = Path(out_dir)
    config = {"bids_dir": str(out_dir), "output_dir": str(out_dir), "pipelines": [pipeline],
              pipeline: dict(settings or {})}
    if model_dir is not None:
        config["model_dir"] = str(model_dir)
    validate_config(config)
    cards = pipeline_cards(config, pipeline)
    if models is None:
        models = load_models(cards, ModelStore.from_config(config))
    first = Path(next(iter(inputs.values()))).name.split(".")[0]
    item = Item(participant_id, session_id, pipeline, name or first, {k: str(v) for k, v in inputs.items()})
    p, ctx, work = get_pipeline(pipeline), Context.from_config(config), out_dir / "work"
    p.prepare(item, cards, config[pipeline], ctx).save(work / f"{item.name}_prep.npz")
    prepared = Prepared.load(work / f"{item.name}_prep.npz")
    batch = int(config["inference"]["batch_size"])
    p.predict(models, prepared, cards, config[pipeline], batch).save(work / f"{item.name}_prob.npz")
    predicted = Predicted.load(work / f"{item.name}_prob.npz")
    out = OutputWriter(out_dir, item)
    metrics = p.finalize(item, prepared, predicted, cards, config[pipeline], ctx, out)
    return {"prepared": prepared, "predicted": predicted, "metrics": metrics, "files": out.files, "flags": out.flags,
            "cards": cards, "models": models}
