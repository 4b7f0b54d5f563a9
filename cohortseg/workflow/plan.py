"""The workflow plan: config -> manifest -> sessions, items and inference shards, and every path.

The Snakefile builds one `Plan` at parse time. It must stay cheap: no TensorFlow, no NIfTI reads,
no dataset scan in cluster jobs (check=False reads the cached manifest).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from cohortseg.errors import ConfigError
from cohortseg.schema import defaults
from cohortseg.workflow.discovery import map_io, replace_atomic

#: the automatic shard size (inference.shard_size unset) starts here and doubles while the cohort
#: would need more than inference.max_shards shards
BASE_SHARD_SIZE = 20
MAX_SHARDS = 250
#: a stat of an input image slower than this means a slow file system (threads: map_io)
SLOW_STAT_S = 0.00003

log = logging.getLogger("cohortseg.plan")


def auto_shard_size(n_sessions: int, max_shards: int = MAX_SHARDS, base: int = BASE_SHARD_SIZE) -> int:
    """The smallest base * 2**k sessions per shard that gives at most `max_shards` shards.

    A function of the session count alone (deterministic); it changes only when the cohort crosses
    base * 2**k * max_shards sessions (20,000, 40,000, 80,000, 160,000 ... by default), and then
    doubles, so shard k of the new size holds exactly the sessions of the old shards 2k and 2k + 1."""
    size = max(1, int(base))
    while -(-n_sessions // size) > max_shards:
        size *= 2
    return size


@dataclass
class Plan:
    config: dict
    manifest: object  # discovery.Manifest (None: no sessions)
    out: Path
    shards: list = field(default_factory=list)  # [[session_key, ...], ...] in sorted order
    infer_shards: dict = field(default_factory=dict)  # pipeline -> {shard indices with an item to infer}
    shard_size: int = 0
    messages: list = field(default_factory=list)  # what the main process tells the user (Snakefile logs them)

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict, check: bool = True) -> Plan:
        from cohortseg.workflow import discovery
        from cohortseg.pipelines import get_pipeline

        validate_semantics(config)
        out = Path(config["output_dir"])
        roles, anatomy = {}, {}
        for name in config["pipelines"]:
            p = get_pipeline(name)
            filters = {**defaults(name)["filters"], **((config.get(name) or {}).get("filters") or {})}
            roles[name] = {r: (filters[r], spec.required, spec.multiple) for r, spec in p.roles.items()}
            anatomy[name] = p.anatomy
        routing = {**(config.get("body_part") or {}), "anatomy": anatomy}
        manifest = discovery.load_or_build(
            config["bids_dir"], out / "manifest.tsv", roles, config.get("participant_label", []),
            config.get("exclude_participant_label", []), rebuild=config.get("rebuild_manifest", False), check=check,
            routing=routing)
        plan = cls(config=config, manifest=manifest, out=out, messages=list(manifest.notes) if check else [])
        plan._index(announce=check)
        if check:  # main process only: a missing or corrupt model stops the run before any job
            plan.verify_models()
            plan.write_shard_inputs()
        return plan

    @classmethod
    def training_only(cls, config: dict) -> Plan:
        """The plan of a run whose only target is `train`: paths, but no sessions (bids_dir unused)."""
        return cls(config=config, manifest=None, out=Path(config["output_dir"]))

    def verify_models(self) -> dict:
        from cohortseg.models.cards import pipeline_cards
        from cohortseg.models.store import ModelStore

        store = ModelStore.from_config(self.config)
        return {p: store.verify(pipeline_cards(self.config, p)) for p in self.pipelines if p in self.infer_shards}

    def _index(self, announce: bool = False) -> None:
        """Shards are consecutive chunks of the sorted session keys, the same for every step, so a
        cohort that grows by new participant IDs only touches its last shards. Only the manifest's
        index is read (session keys, pipelines with an item per session), never its rows."""
        m = self.manifest
        keys = sorted(m.keys) if m is not None else []
        inf = self.config.get("inference") or {}
        if inf.get("shard_size"):
            size = int(inf["shard_size"])
        else:
            max_shards = int(inf.get("max_shards") or MAX_SHARDS)
            size = auto_shard_size(len(keys), max_shards)
            if announce:
                self._say(f"inference.shard_size unset: automatic shard size {size} ({len(keys):,} sessions -> "
                          f"{-(-len(keys) // size):,} shards; {BASE_SHARD_SIZE} sessions per shard, doubled while "
                          f"there would be more than inference.max_shards = {max_shards:,} shards)")
        self.shard_size = size
        self.shards = [keys[i:i + size] for i in range(0, len(keys), size)]
        todo: dict[str, set] = {}
        if m is not None:
            if keys == m.keys:
                ok = m.ok
            else:  # the file's order is not the sorted one: masks in shard order
                ok_of = dict(zip(m.keys, m.ok))
                ok = [ok_of[k] for k in keys]
            for i in range(len(self.shards)):
                mask = 0
                for o in set(ok[i * size:(i + 1) * size]):
                    mask |= o
                for p in m.ok_pipelines(mask):
                    todo.setdefault(p, set()).add(i)
        self.infer_shards = {p: todo[p] for p in self.pipelines if p in todo}

    def _say(self, msg: str) -> None:
        log.info(msg)
        self.messages.append(msg)

    def write_shard_inputs(self) -> int:
        """Per shard, the list of BIDS files its prepare job reads with their size and mtime
        (`work/shards/inputs/shard-<k>.tsv`, the job's declared input). Rewritten only when it
        changes, so Snakemake reruns a shard's prepare job when one of its input files changed, was
        added or removed -- one input per job instead of every image (Snakemake costs ~50 us per
        input file per plan). Returns how many lists were (re)written."""
        folder = self.work / "shards" / "inputs"
        digests_path = folder / "digests.json"
        try:
            old = json.loads(digests_path.read_text())
        except (OSError, ValueError):
            old = {}
        new, written = {}, 0

        def listing(i):  # in threads on a slow file system (map_io)
            stat, lines = os.stat, []
            for k in self.shards[i]:
                paths = self.manifest.inputs(k)
                if not paths:
                    lines.append(f"{k}\t\t\t\n")
                for p in paths:
                    try:
                        st = stat(p)
                        lines.append(f"{k}\t{p}\t{st.st_size}\t{st.st_mtime_ns}\n")
                    except OSError:
                        lines.append(f"{k}\t{p}\tmissing\t\n")
            text = "session\tpath\tsize\tmtime_ns\n" + "".join(lines)
            return i, text, hashlib.sha1(text.encode()).hexdigest()

        first = sum(len(self.manifest.inputs(k)) for k in (self.shards[0] if self.shards else ()))  # (loads them)
        for i, text, digest in map_io(listing, range(len(self.shards)), SLOW_STAT_S * max(first, 1)):
            label = self.label(i)
            new[label] = digest
            path = folder / f"shard-{label}.tsv"
            if old.get(label) != digest or not path.exists():
                replace_atomic(path, text.encode())
                written += 1
        if new != old:
            replace_atomic(digests_path, json.dumps(new, indent=0).encode())
        return written

    @cached_property
    def job_config(self) -> str:
        """The config of this run as the file a job's command names (`work/config/<sha1>.json`):
        content-addressed, so it is written once per distinct config and never rewritten, and every
        process that parses the same config names the same file (a cluster job writes it too when
        absent). The rules get its name through job_params, which no rerun depends on: which
        settings rerun a job is step_params' business, not the file name's."""
        text = json.dumps(self.config, sort_keys=True, default=str)
        path = self.work / "config" / f"{hashlib.sha1(text.encode()).hexdigest()}.json"
        if not path.exists():
            replace_atomic(path, text.encode())
        return str(path)

    def job_params(self, script, python: str) -> dict:
        """The parts of a rule's shell command (STEP in rules/common.smk) as params of type Path,
        which Snakemake's params trigger skips (it compares only builtin values): another
        interpreter, checkout or config file name reruns nothing; the rules' `settings` param
        (step_params) decides what reruns."""
        return {"python": Path(python), "script": Path(script), "config": Path(self.job_config)}

    def runtime(self, step: str) -> int:
        """Minutes a `step` shard job asks for (Snakemake's `runtime`; SLURM's --time):
        job_minutes.base + job_minutes.per_session[step] x the sessions of the largest shard, at
        most job_minutes.max. One constant per rule, so planning calls no function per job. A job
        out of time is resubmitted with the same time and goes on from its finished sessions."""
        jm = self.config["job_minutes"]
        largest = len(self.shards[0]) if self.shards else 0  # shards are full but the last
        return min(int(jm["max"]), math.ceil(jm["base"] + largest * jm["per_session"][step]))

    # -- paths (one place) --------------------------------------------------------------------
    @property
    def work(self) -> Path:
        return self.out / "work"

    @staticmethod
    def label(shard) -> str:
        return f"{shard:05d}" if isinstance(shard, int) else shard  # "{shard}" in rule outputs

    def shard_inputs_record(self, shard) -> str:
        """The declared input of a prepare job: its BIDS files with size and mtime (write_shard_inputs)."""
        return str(self.work / "shards" / "inputs" / f"shard-{self.label(shard)}.tsv")

    def shard_record(self, step: str, shard) -> str:
        """The declared output of a prepare/finalize job: which sessions it covered, where their
        per-session records are."""
        return str(self.work / "shards" / step / f"shard-{self.label(shard)}.json")

    def infer_record(self, shard) -> str:
        return str(self.work / "shards" / "infer" / f"shard-{self.label(shard)}.json")

    def summary(self) -> str:
        return self.group("summary.csv")

    def group(self, name: str) -> str:
        return str(self.out / "group" / name)

    def group_tables(self) -> list[str]:
        """Every pipeline's cohort tables: CSV and its Parquet copy."""
        from cohortseg.pipelines import get_pipeline

        return [self.group(t[: -len(".csv")] + ext) for p in self.pipelines for t in get_pipeline(p).group_tables
                for ext in (".csv", ".parquet")]

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

    def all_finalize_records(self) -> list[str]:
        return [self.shard_record("finalize", i) for i in range(len(self.shards))]

    def shard_infer_inputs_wc(self, wc) -> list[str]:
        """The shard's infer record, when one of its sessions has an item to infer."""
        shard = int(wc.shard)
        return [self.infer_record(shard)] if any(shard in s for s in self.infer_shards.values()) else []

    @cached_property
    def step_params(self) -> str:
        """The config and code that change results, as one string param of every shard rule
        (changes rerun the jobs); built once per parse."""
        from cohortseg.pipelines import code_version

        ps = self.config["pipelines"]
        keep = {p: self.config.get(p, {}) for p in ps}
        keep["pipelines"] = list(ps)
        keep["allow_4d"] = self.config.get("allow_4d", False)
        keep["max_voxels"] = self.config.get("max_voxels")
        keep["code"] = {p: code_version(p) for p in ps}  # new code reruns the steps; stamps pick the items
        return json.dumps(keep, sort_keys=True)


def shard_input_sessions(inputs_record) -> list[str]:
    """The session keys of a shard, in order, from its inputs record (Plan.write_shard_inputs)."""
    keys = {}
    with open(inputs_record) as f:
        next(f)  # header
        for line in f:
            keys[line.split("\t", 1)[0]] = None
    return list(keys)


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
    from cohortseg.pipelines import REGISTRY

    unknown = [p for p in config["pipelines"] if p not in REGISTRY]
    if unknown:
        raise ConfigError(f"config key 'pipelines': unknown pipeline(s) {unknown}; known: {list(REGISTRY)}")
