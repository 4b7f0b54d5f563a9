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
    out.describe(cards, config[pipeline])
    metrics = p.finalize(item, prepared, predicted, cards, config[pipeline], ctx, out)
    return {"prepared": prepared, "predicted": predicted, "metrics": metrics, "files": out.files, "flags": out.flags,
            "cards": cards, "models": models}


def output_path(out_dir, pipeline: str, stem: str, key: str, figure: bool = False) -> Path:
    """Where the workflow writes output `key` of the item whose source image is `stem` (the one naming
    rule, cohortseg.pipelines.base.bids_name), e.g. ('sc_gm', 'sub-03_ses-01_T2starw', 'label-GM_mask.nii.gz')."""
    from cohortseg.pipelines.base import Item, OutputWriter

    ents = dict(p.split("-", 1) for p in stem.split("_") if "-" in p)
    item = Item(f"sub-{ents['sub']}", f"ses-{ents['ses']}" if "ses" in ents else "", pipeline, stem, {})
    return OutputWriter(out_dir, item).path(key, figure=figure)


#: validator warnings the derivative datasets keep, with the reason (README "BIDS validity" lists them)
KEPT_WARNINGS = {
    "TOO_FEW_AUTHORS": "the authors of a derivative dataset are the people who ran it: cohortseg cannot know them",
}


def bids_validator(folder) -> list[dict]:
    """The issues bids-validator-deno (pinned in the lock's test extras; runs offline) reports on `folder`."""
    import json
    import shutil

    exe = Path(sys.executable).parent / "bids-validator-deno"
    exe = str(exe) if exe.is_file() else shutil.which("bids-validator-deno")
    assert exe, "bids-validator-deno is not installed: install the lock's test extras (README 'Tests')"
    res = subprocess.run([exe, "--format", "json", str(folder)], capture_output=True, text=True, timeout=600)
    assert res.stdout.strip(), f"bids-validator-deno gave no report ({res.returncode}): {res.stderr[-2000:]}"
    return json.loads(res.stdout)["issues"]["issues"]


def assert_bids_valid(folder) -> list[dict]:
    """No validator error on the derivative dataset `folder`, and no warning beyond KEPT_WARNINGS."""
    issues = bids_validator(folder)
    bad = [i for i in issues if i["severity"] == "error" or i["code"] not in KEPT_WARNINGS]
    assert not bad, f"{folder}: " + "\n".join(
        f"{i['severity']} {i['code']} {i.get('subCode', '')} {i.get('location', '')}" for i in bad[:40])
    return issues
