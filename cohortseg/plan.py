"""The workflow plan: config -> manifest -> sessions, items and inference shards, and every path.

The Snakefile builds one `Plan` at parse time. It must stay cheap: no TensorFlow, no NIfTI reads,
no dataset scan in cluster jobs (check=False reads the cached manifest).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

PIPELINE_ORDER = ["sc_gm", "sc_csa", "brain_tissue", "cmb", "wmh"]


def session_key(participant_id: str, session_id: str) -> str:
    return f"{participant_id}_{session_id}" if session_id else participant_id


@dataclass
class Plan:
    config: dict
    rows: list[dict]
    out: Path
    sessions: dict = field(default_factory=dict)  # session_key -> (participant_id, session_id)
    shards: dict = field(default_factory=dict)  # pipeline -> [[session_key, ...], ...]
    shard_of: dict = field(default_factory=dict)  # (pipeline, session_key) -> shard index

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict, check: bool = True) -> Plan:
        from . import discovery
        from .pipelines import get_pipeline

        validate_semantics(config)
        out = Path(config["output_dir"])
        roles = {}
        for name in config["pipelines"]:
            p = get_pipeline(name)
            user = (config.get(name) or {}).get("filters", {})
            roles[name] = {r: (user.get(r, spec.filters), spec.required, spec.multiple) for r, spec in p.roles.items()}
        rows = discovery.load_or_build(
            config["bids_dir"], out / "manifest.tsv", roles, config.get("participant_label", []),
            config.get("exclude_participant_label", []), rebuild=config.get("rebuild_manifest", False), check=check)
        plan = cls(config=config, rows=rows, out=out)
        plan._index()
        if check:  # main process only: a missing or corrupt model stops the run before any job
            plan.verify_models()
        return plan

    def verify_models(self) -> dict:
        from .cards import pipeline_cards
        from .store import ModelStore

        store = ModelStore(self.config["model_dir"], allow_download=self.config.get("allow_download", False),
                           cache_file=self.work / "model_checksums.json")
        return {p: store.verify(pipeline_cards(self.config, p)) for p in self.pipelines if p in self.shards}

    def _index(self) -> None:
        size = int(self.config.get("inference", {}).get("shard_size", 20))
        ok: dict[str, list[str]] = {}
        for r in self.rows:
            key = session_key(r["participant_id"], r["session_id"])
            self.sessions.setdefault(key, (r["participant_id"], r["session_id"]))
            if r["status"] == "ok":
                lst = ok.setdefault(r["pipeline"], [])
                if not lst or lst[-1] != key:
                    lst.append(key)
        for pipeline, keys in ok.items():
            keys = sorted(set(keys))
            n = math.ceil(len(keys) / size)
            self.shards[pipeline] = [keys[i * size:(i + 1) * size] for i in range(n)]
            for i, chunk in enumerate(self.shards[pipeline]):
                for k in chunk:
                    self.shard_of[(pipeline, k)] = i

    # -- paths (one place) --------------------------------------------------------------------
    @property
    def work(self) -> Path:
        return self.out / "work"

    def prep_record(self, key: str) -> str:
        return str(self.work / "prep" / f"{key}.json")

    def shard_dir(self, pipeline: str, shard) -> str:
        label = f"{shard:05d}" if isinstance(shard, int) else shard  # "{shard}" in rule outputs
        return str(self.work / "infer" / pipeline / f"shard-{label}")

    def session_record(self, key: str) -> str:
        return str(self.work / "records" / f"{key}.json")

    def summary(self) -> str:
        return self.group("summary.csv")

    def group(self, name: str) -> str:
        return str(self.out / "group" / name)

    def group_tables(self) -> list[str]:
        from .pipelines import get_pipeline

        return [self.group(t) for p in self.pipelines for t in get_pipeline(p).group_tables]

    def qc_page(self) -> str:
        return str(self.out / "qc" / "index.html")

    def log(self, step: str, name: str) -> str:
        return str(self.out / "logs" / step / f"{name}.log")

    def ratings_input(self) -> list[str]:
        """qc_ratings.tsv exported from the QC page, when there is one: ratings then only rerun
        the aggregate rule, nothing else."""
        path = self.config.get("qc_ratings") or str(self.out / "qc" / "qc_ratings.tsv")
        return [path] if Path(path).is_file() else []

    # -- queries used by rules -----------------------------------------------------------------
    @property
    def pipelines(self) -> list[str]:
        return list(self.config["pipelines"])

    def session_keys(self) -> list[str]:
        return sorted(self.sessions)

    def all_session_records(self) -> list[str]:
        return [self.session_record(k) for k in self.session_keys()]

    def expected_sessions(self) -> list[list[str]]:
        return [list(self.sessions[k]) for k in self.session_keys()]

    def inputs_of_wc(self, wc) -> list[str]:
        return self.inputs_of(wc.session)

    def shard_inputs_wc(self, wc) -> list[str]:
        return [self.prep_record(k) for k in self.shard_sessions(wc.pipeline, int(wc.shard))]

    def session_shards_wc(self, wc) -> list[str]:
        return self.shards_of_session(wc.session)

    def inputs_of(self, key: str) -> list[str]:
        """BIDS files a session's prepare job reads (so Snakemake reruns it when one changes)."""
        paths = set()
        for r in self._rows_by_key().get(key, []):
            paths.update(json.loads(r["inputs"]).values())
        return sorted(paths)

    def shards_of_session(self, key: str) -> list[str]:
        return [self.shard_dir(p, self.shard_of[(p, key)]) for p in self.config["pipelines"]
                if (p, key) in self.shard_of]

    def shard_sessions(self, pipeline: str, shard: int) -> list[str]:
        return self.shards[pipeline][shard]

    def _rows_by_key(self) -> dict:
        if not hasattr(self, "_by_key"):
            by = {}
            for r in self.rows:
                by.setdefault(session_key(r["participant_id"], r["session_id"]), []).append(r)
            self._by_key = by
        return self._by_key

    def step_params(self, pipelines=None) -> str:
        """The config that changes results, as one string param (changes rerun the jobs)."""
        ps = pipelines or self.config["pipelines"]
        keep = {p: self.config.get(p, {}) for p in ps}
        keep["pipelines"] = list(ps)
        keep["allow_4d"] = self.config.get("allow_4d", False)
        keep["max_voxels"] = self.config.get("max_voxels")
        return json.dumps(keep, sort_keys=True)


def validate_semantics(config: dict) -> None:
    """Checks a JSON schema cannot express; one clear message naming the key."""
    if not config.get("bids_dir"):
        raise ConfigError("config key 'bids_dir' is required (the BIDS dataset to process)")
    bids = Path(config["bids_dir"])
    if not bids.is_dir():
        raise ConfigError(f"config key 'bids_dir': {bids} is not a folder")
    out = Path(config["output_dir"]).resolve()
    if out == bids.resolve() or bids.resolve() in out.parents:
        raise ConfigError(f"config key 'output_dir': {out} is inside bids_dir; inputs are read-only")
    md = Path(config.get("model_dir", ""))
    if not md.is_dir() and not config.get("allow_download"):
        raise ConfigError(f"config key 'model_dir': {md} does not exist (set allow_download: true to fetch "
                          f"models from their upstream URLs, or point model_dir at a local model store)")
    unknown = [p for p in config["pipelines"] if p not in PIPELINE_ORDER]
    if unknown:
        raise ConfigError(f"config key 'pipelines': unknown pipeline(s) {unknown}; known: {PIPELINE_ORDER}")
