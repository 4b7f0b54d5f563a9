"""The workflow plan: config -> manifest -> sessions, items and inference shards, and every path.

The Snakefile builds one `Plan` at parse time. It must stay cheap: no TensorFlow, no NIfTI reads,
no dataset scan in cluster jobs (check=False reads the cached manifest).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cohortseg.errors import ConfigError

PIPELINE_ORDER = ["sc_gm", "sc_csa", "brain_tissue", "cmb", "wmh"]


def session_key(participant_id: str, session_id: str) -> str:
    return f"{participant_id}_{session_id}" if session_id else participant_id


@dataclass
class Plan:
    config: dict
    rows: list[dict]
    out: Path
    sessions: dict = field(default_factory=dict)  # session_key -> (participant_id, session_id)
    shards: list = field(default_factory=list)  # [[session_key, ...], ...] in sorted order
    infer_shards: dict = field(default_factory=dict)  # pipeline -> {shard indices with an item to infer}

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict, check: bool = True) -> Plan:
        from cohortseg.workflow import discovery
        from cohortseg.pipelines import get_pipeline

        validate_semantics(config)
        out = Path(config["output_dir"])
        roles = {}
        for name in config["pipelines"]:
            p = get_pipeline(name)
            user = (config.get(name) or {}).get("filters", {})
            roles[name] = {r: (user.get(r, spec.filters), spec.required, spec.multiple) for r, spec in p.roles.items()}
        routing = {**(config.get("body_part") or {}),
                   "anatomy": {name: get_pipeline(name).anatomy for name in config["pipelines"]}}
        rows = discovery.load_or_build(
            config["bids_dir"], out / "manifest.tsv", roles, config.get("participant_label", []),
            config.get("exclude_participant_label", []), rebuild=config.get("rebuild_manifest", False), check=check,
            routing=routing)
        plan = cls(config=config, rows=rows, out=out)
        plan._index()
        if check:  # main process only: a missing or corrupt model stops the run before any job
            plan.verify_models()
        return plan

    @classmethod
    def training_only(cls, config: dict) -> Plan:
        """The plan of a run whose only target is `train`: paths, but no sessions (bids_dir unused)."""
        return cls(config=config, rows=[], out=Path(config["output_dir"]))

    def verify_models(self) -> dict:
        from cohortseg.models.cards import pipeline_cards
        from cohortseg.models.store import ModelStore

        store = ModelStore(self.config["model_dir"], allow_download=self.config.get("allow_download", False),
                           cache_file=self.work / "model_checksums.json")
        return {p: store.verify(pipeline_cards(self.config, p)) for p in self.pipelines if p in self.infer_shards}

    def _index(self) -> None:
        """Shards are consecutive chunks of the sorted session keys, the same for every step, so a
        cohort that grows by new participant IDs only touches its last shards."""
        size = int(self.config.get("inference", {}).get("shard_size", 20))
        for r in self.rows:
            self.sessions.setdefault(session_key(r["participant_id"], r["session_id"]), (r["participant_id"], r["session_id"]))
        keys = sorted(self.sessions)
        self.shards = [keys[i:i + size] for i in range(0, len(keys), size)]
        shard_of = {k: i // size for i, k in enumerate(keys)}
        todo: dict[str, set] = {}
        for r in self.rows:
            if r["status"] == "ok":
                todo.setdefault(r["pipeline"], set()).add(shard_of[session_key(r["participant_id"], r["session_id"])])
        self.infer_shards = {p: todo[p] for p in self.pipelines if p in todo}

    # -- paths (one place) --------------------------------------------------------------------
    @property
    def work(self) -> Path:
        return self.out / "work"

    @staticmethod
    def label(shard) -> str:
        return f"{shard:05d}" if isinstance(shard, int) else shard  # "{shard}" in rule outputs

    def shard_record(self, step: str, shard) -> str:
        """The declared output of a prepare/finalize job: which sessions it covered, where their
        per-session records are."""
        return str(self.work / "shards" / step / f"shard-{self.label(shard)}.json")

    def infer_record(self, pipeline: str, shard) -> str:
        return str(self.work / "shards" / "infer" / pipeline / f"shard-{self.label(shard)}.json")

    def summary(self) -> str:
        return self.group("summary.csv")

    def group(self, name: str) -> str:
        return str(self.out / "group" / name)

    def group_tables(self) -> list[str]:
        from cohortseg.pipelines import get_pipeline

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

    def expected_sessions(self) -> list[list[str]]:
        return [list(self.sessions[k]) for k in self.session_keys()]

    def all_finalize_records(self) -> list[str]:
        return [self.shard_record("finalize", i) for i in range(len(self.shards))]

    def shard_bids_inputs_wc(self, wc) -> list[str]:
        """BIDS files a shard's prepare job reads (so Snakemake reruns it when one changes)."""
        by_key = self._rows_by_key()
        paths = set()
        for key in self.shards[int(wc.shard)]:
            for r in by_key.get(key, []):
                paths.update(json.loads(r["inputs"]).values())
        return sorted(paths)

    def shard_infer_inputs_wc(self, wc) -> list[str]:
        shard = int(wc.shard)
        return [self.infer_record(p, shard) for p, shards in self.infer_shards.items() if shard in shards]

    def _rows_by_key(self) -> dict:
        if not hasattr(self, "_by_key"):
            by: dict = {}
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


def only_target_is(rule: str, argv) -> bool:
    """Whether a snakemake command line asks for `rule` and nothing else (as a target, or as the
    only rule of --target-jobs in a cluster job). False when unsure (e.g. the Python API)."""
    argv = list(argv)
    if not any(rule in str(a) for a in argv):  # the common case, without building snakemake's parser
        return False
    from snakemake.cli import get_argument_parser

    try:
        args, _ = get_argument_parser().parse_known_args(argv)
    except (SystemExit, Exception):  # noqa: BLE001 - unsure: plan everything
        return False
    targets = set(getattr(args, "targets", None) or ())
    jobs = {getattr(j, "rulename", None) or str(j).split(":")[0] for j in (getattr(args, "target_jobs", None) or ())}
    return (targets == {rule} and not jobs) or (jobs == {rule} and not targets)


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
