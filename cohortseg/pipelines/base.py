"""The pipeline plugin contract (see docs/ARCHITECTURE.md).

A pipeline says which BIDS images it needs (roles with default filters) and implements `prepare`
(native image -> network grid), optionally `predict` (default: fold average), and `finalize`
(network grid -> native outputs + metrics). Discovery, sharding, model loading, the fold ensemble,
records and cohort tables are generic and live elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cohortseg.io import save_nifti_atomic, write_text_atomic


@dataclass(frozen=True)
class Role:
    """One input of a pipeline. Its default BIDS filters are the schema's (`<pipeline>.filters.<role>`)."""

    required: bool = True
    multiple: bool = False  # several matching images -> one item each (e.g. CSA per contrast)
    description: str = ""


@dataclass
class Item:
    """One unit of work: a session's image(s) for one pipeline."""

    participant_id: str  # 'sub-01'
    session_id: str  # 'ses-01' or ''
    pipeline: str
    name: str  # BIDS stem of the primary image, e.g. 'sub-01_ses-01_T2starw'
    inputs: dict  # role -> path (str)

    @property
    def session_key(self) -> str:
        return f"{self.participant_id}_{self.session_id}" if self.session_id else self.participant_id

    @property
    def contrast(self) -> str:
        return self.name.rsplit("_", 1)[-1]


@dataclass
class Context:
    """What a plugin may know of the run beyond its own settings, passed explicitly to every call
    (no hidden channels). `session` is a memo for one session's items (e.g. the conformed T1 and its
    MNI registration that `cmb` and `wmh` share); the step functions make a new Context per session."""

    output_dir: str = ""
    model_dir: str = ""
    allow_4d: bool = False
    max_voxels: int = 200_000_000
    session: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_config(cls, config: dict) -> Context:
        return cls(output_dir=str(config.get("output_dir") or ""), model_dir=str(config.get("model_dir") or ""),
                   allow_4d=bool(config.get("allow_4d", False)),
                   max_voxels=int(config.get("max_voxels") or 200_000_000))

    def load_image(self, path, need: str = "3D image"):
        """`cohortseg.io.load_image` with the run's 4D and memory settings: (image, warnings)."""
        from cohortseg.io import load_image

        return load_image(path, allow_4d=self.allow_4d, max_voxels=self.max_voxels, need=need)


@dataclass
class Prepared:
    """Network input `x` (float32, N x spatial x C) and everything needed to go back (`meta`, JSON-able)."""

    x: np.ndarray
    meta: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)  # extra arrays finalize needs (e.g. brain mask in the grid)

    def save(self, path) -> None:
        import json

        from cohortseg.io import atomic_path

        with atomic_path(path, suffix=".npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, x=self.x, meta=np.array(json.dumps(self.meta)), **self.arrays)

    @classmethod
    def load(cls, path) -> Prepared:
        import json

        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k not in ("x", "meta")}
            return cls(x=z["x"], meta=json.loads(str(z["meta"])), arrays=arrays)


@dataclass
class Predicted:
    """What `predict` returns and `finalize` receives: named arrays on the network grid. `prob` is the
    fold-averaged probability; pipelines whose cards play different parts add more (brain mask, box)."""

    arrays: dict

    @property
    def prob(self) -> np.ndarray:
        return self.arrays["prob"]

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    def __contains__(self, key: str) -> bool:
        return key in self.arrays

    def get(self, key: str, default=None):
        return self.arrays.get(key, default)

    def save(self, path) -> None:
        from cohortseg.io import atomic_path

        with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **self.arrays)

    @classmethod
    def load(cls, path) -> Predicted:
        with np.load(path, allow_pickle=False) as z:
            return cls({k: z[k] for k in z.files})


#: BIDS entities in the order file names carry them (the schema's rules.entities, short names)
ENTITY_ORDER = ("sub", "tpl", "ses", "cohort", "sample", "task", "tracksys", "acq", "nuc", "voi", "ce", "trc", "stain",
                "rec", "dir", "run", "mod", "echo", "flip", "inv", "mt", "part", "proc", "hemi", "space", "split",
                "recording", "chunk", "atlas", "seg", "scale", "res", "den", "label", "desc")
#: the derivative image suffixes BIDS defines for what the pipelines write
BIDS_SUFFIXES = ("mask", "probseg", "dseg")
#: outputs BIDS does not define (tables, transforms, figures): declared in each dataset's .bidsignore,
#: as fMRIPrep declares its figures/ and transforms
BIDSIGNORE = ("sub-*/figures", "*_perslice.tsv", "*_perlevel.tsv", "*_census.tsv", "*_regions.tsv", "*_volumes.tsv",
              "*_volumes.json", "*_affine.txt")
#: the BIDS ``Type`` of a mask (an enum: Brain, Lesion, Face, ROI), by its label-/desc- entity; ROI otherwise
MASK_TYPES = {"brain": "Brain", "ICV": "Brain", "WMH": "Lesion", "CMB": "Lesion", "PVS": "Lesion", "L": "Lesion"}
_WHAT = {"mask": "binary mask", "probseg": "probabilistic segmentation (0-1)",
         "dseg": "discrete segmentation (label names in the .tsv beside it)"}
#: where the pipelines' code lives (GeneratedBy.CodeURL)
CODE_URL = "https://github.com/cohortseg/cohortseg"


def _entities(stem: str) -> tuple[list[tuple[str, str]], str]:
    """'sub-01_ses-01_acq-brain_T1w' -> ([('sub', '01'), ('ses', '01'), ('acq', 'brain')], 'T1w'); the
    parts without '-' form the suffix."""
    ents, rest = [], []
    for part in stem.split("_"):
        k, sep, v = part.partition("-")
        if sep and not rest:
            ents.append((k, v))
        else:
            rest.append(part)
    return ents, "_".join(rest)


def bids_name(source_stem: str, key: str) -> str:
    """The file name of output `key` of the item whose source image is `source_stem` (the one naming rule).

    Keys name outputs inside cohortseg (records, cohort tables, QC): ``label-GM_mask.nii.gz``. The
    file name keeps the source's entities, adds ``space-<source suffix>`` and the key's entities,
    in the specification's entity order: ``sub-01_ses-01_acq-brain_space-T1w_desc-brain_mask.nii.gz``.
    The source suffix (T1w, T2w, T2starw) is no BIDS entity, so it becomes the space label: every
    output lies on the grid of its source image, and ``SpatialReference`` names that image (the
    way fMRIPrep names its T1w reference space ``space-T1w``); T1w, T2w and T2*w outputs of one
    session stay apart. A discrete segmentation takes no ``label-`` in BIDS: ``label-CMB_dseg`` is
    written ``seg-CMB_dseg``."""
    ents, suffix = _entities(source_stem)
    stem, dot, ext = key.partition(".")
    kents, ksuffix = _entities(stem)
    if ksuffix == "dseg":
        kents = [("seg" if k == "label" else k, v) for k, v in kents]
    have = {k for k, _ in ents}
    ents = ents + ([("space", suffix)] if "space" not in have and suffix else []) + kents
    names = [k for k, _ in ents]
    unknown = sorted(set(names) - set(ENTITY_ORDER))
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"output {key!r} of {source_stem!r}: entities {names} are unknown to BIDS or repeated")
    ents.sort(key=lambda kv: ENTITY_ORDER.index(kv[0]))
    return "_".join([f"{k}-{v}" for k, v in ents] + ([ksuffix] if ksuffix else [])) + dot + ext


def bids_uri(path) -> str:
    """``bids:raw:sub-01/anat/sub-01_T2w.nii.gz`` for a file of the raw dataset (the folder above its
    ``sub-`` folder; ``raw`` is in each dataset_description's DatasetLinks), a file URI otherwise."""
    p = Path(path).absolute()
    subs = [i for i, part in enumerate(p.parts) if part.startswith("sub-")]
    if not subs:
        return p.as_uri()
    return "bids:raw:" + "/".join(p.parts[subs[0]:])


def made_by(pipeline: str, cards, cfg: dict) -> dict:
    """What made an item's outputs, for their sidecars: the pipeline's code version, its models
    (folds by checksum) and the thresholds and cluster limits of its settings."""
    from cohortseg.pipelines import code_version

    sums = ("file", "sha256", "md5", "git_blob_sha1")
    return {"CodeVersion": code_version(pipeline),
            "Models": [{"Name": c.name, "Folds": [{k: f[k] for k in sums if k in f} for f in c.folds],
                        **({"Thresholds": c.get("thresholds")} if c.get("thresholds") else {})} for c in cards],
            "Thresholds": {k: v for k, v in (cfg or {}).items()
                           if any(w in k for w in ("threshold", "min_cluster", "max_outside"))}}


class OutputWriter:
    """Names and writes one item's BIDS-derivatives outputs under `<output_dir>/<pipeline>/`.

    `path("label-GM_probseg.nii.gz")` -> .../sub-01/ses-01/anat/sub-01_ses-01_space-T2starw_label-GM_probseg.nii.gz
    (:func:`bids_name`). Every image gets a JSON sidecar (Sources, SpatialReference, Description, Type for
    masks, and what made it: :func:`made_by`, given by the step with :meth:`describe`). Every write is
    atomic and remembered in `files` under its key (for the record, the cohort tables and the QC page:
    consumers find outputs by key, never by file name).
    """

    def __init__(self, output_dir, item: Item):
        self.item = item
        self.root = Path(output_dir) / item.pipeline  # the pipeline's derivative dataset
        sub = self.root / item.participant_id
        if item.session_id:
            sub = sub / item.session_id
        self.anat = sub / "anat"
        self.figures = self.root / item.participant_id / "figures"
        self.files: dict[str, str] = {}
        self.flags: list[str] = []  # sanity flags for QC (empty, edge, volume_low, ...)
        self.checks: dict = {}  # anatomy criteria measured on the outputs (cohortseg.science.anatomy)
        self.made_by: dict = {}

    def describe(self, cards, cfg: dict) -> None:
        """Record the cards and settings that make this item's outputs (they enter every sidecar)."""
        self.made_by = made_by(self.item.pipeline, cards, cfg)

    def path(self, suffix: str, figure: bool = False) -> Path:
        folder = self.figures if figure else self.anat
        return folder / bids_name(self.item.name, suffix)

    def nifti(self, key: str, data, affine, dtype=None, header=None) -> Path:
        p = save_nifti_atomic(data, affine, self.path(key), header=header, dtype=dtype)
        self.files[key] = str(p)
        self.sidecar(key.split(".", 1)[0] + ".json")
        return p

    def sidecar(self, key: str, extra: dict | None = None) -> Path:
        """Write the JSON sidecar `key` (``label-WMH_mask.json``): the common derivative fields, then
        the pipeline's own `extra` fields (a pipeline's Description wins over the generic one)."""
        from cohortseg.io import write_json_atomic

        stem = key.split(".", 1)[0]
        suffix = _entities(stem)[1]
        image = self.item.inputs.get("image") or next(iter(self.item.inputs.values()), "")
        side = {"Description": f"{_WHAT.get(suffix, suffix)} ({stem}) of {Path(image).name}, by cohortseg "
                               f"{self.item.pipeline}",
                "Sources": [bids_uri(image)] + [bids_uri(v) for v in self.item.inputs.values() if v and v != image]}
        if suffix in BIDS_SUFFIXES:
            side["SpatialReference"] = bids_uri(image)
        if suffix == "mask":
            label = dict(_entities(stem)[0])
            side["Type"] = MASK_TYPES.get(label.get("label") or label.get("desc"), "ROI")
        side = {**side, **self.made_by, **(extra or {})}
        p = self.path(key)
        write_json_atomic(p, side)
        self.files[key] = str(p)
        return p

    def remove_stale(self, paths) -> None:
        """Delete the outputs an earlier run of this item wrote (`paths`, from its record) that this run
        did not write again, e.g. under names of an older version: they would linger in the dataset."""
        keep = set(self.files.values())
        for f in paths:
            p = Path(f)
            if f not in keep and p.is_file() and self.root in p.parents:
                p.unlink()

    def table(self, key: str, df) -> Path:
        p = self.path(key)
        write_text_atomic(p, df.to_csv(sep="\t" if key.endswith(".tsv") else ",", index=False, na_rep="n/a"))
        self.files[key] = str(p)
        return p

    def figure_path(self, key: str) -> Path:
        p = self.path(key, figure=True)
        p.parent.mkdir(parents=True, exist_ok=True)
        self.files[key] = str(p)
        return p

    def snapshot(self, key: str, make) -> Path:
        """Write a QC PNG atomically with `make(tmp_png_path)`, plus its thumbnail for the QC page."""
        from cohortseg.io import atomic_path
        from cohortseg.qc.snapshots import thumbnail

        p = self.figure_path(key)
        with atomic_path(p) as tmp:
            make(tmp)
        thumb_key = key.replace(".png", "_thumb.png")
        t = self.figure_path(thumb_key)
        with atomic_path(t) as tmp:
            thumbnail(p, tmp)
        return p


def write_dataset_files(folder, pipeline: str, bids_dir) -> None:
    """``dataset_description.json``, ``README.md`` and ``.bidsignore`` of one pipeline's derivative
    dataset `folder`, (re)written only when their content changes (a new code version, bids_dir moved)."""
    import json
    import os

    from cohortseg import __version__
    from cohortseg.pipelines import code_version, get_pipeline

    folder = Path(folder)
    p = get_pipeline(pipeline)
    raw = Path(bids_dir).absolute() if bids_dir else None
    try:
        link = Path(os.path.relpath(raw, folder.absolute())).as_posix() if raw else ""
    except ValueError:  # another drive (Windows)
        link = raw.as_uri()
    source = {"URL": link} if link else {}
    try:
        doi = json.loads((raw / "dataset_description.json").read_text()).get("DatasetDOI") if raw else None
    except (OSError, ValueError):
        doi = None
    if doi:
        source["DOI"] = doi
    desc = {
        "Name": f"cohortseg {pipeline}", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
        "Description": p.description,
        "GeneratedBy": [{"Name": "cohortseg", "Version": __version__, "CodeVersion": code_version(pipeline),
                         "Description": f"pipeline {pipeline}: {p.description}", "CodeURL": CODE_URL}],
        "SourceDatasets": [source] if source else [],
        **({"DatasetLinks": {"raw": link}} if link else {}),
    }
    readme = (f"# cohortseg {pipeline}\n\n{p.description}.\n\n"
              "A BIDS-derivatives dataset written by cohortseg. Every image lies on the grid of its source image; "
              "its name keeps the source's entities and names the source's suffix as `space-<suffix>` "
              "(for example `sub-01_ses-01_space-T2w_label-SC_mask.nii.gz` comes from "
              "`sub-01/ses-01/anat/sub-01_ses-01_T2w.nii.gz`); its JSON sidecar names the source (`Sources`, "
              "`SpatialReference`, BIDS URIs into the raw dataset of `DatasetLinks`), the models and the thresholds "
              "(`Models`, `Thresholds`) and the pipeline's code version (`CodeVersion`).\n\n"
              "Tables (`*_perslice.tsv`, `*_census.tsv`, ...), transforms and the QC figures (`sub-*/figures/`) "
              "are no BIDS data types: `.bidsignore` declares them. Cohort tables are in `../group/`.\n")
    for name, text in (("dataset_description.json", json.dumps(desc, indent=2) + "\n"), ("README.md", readme),
                       (".bidsignore", "\n".join(BIDSIGNORE) + "\n")):
        f = folder / name
        try:
            if f.read_text() == text:
                continue
        except OSError:
            pass
        write_text_atomic(f, text)


class Pipeline:
    name: str = ""
    roles: dict[str, Role] = {}
    #: cohort tables this pipeline contributes: file name in group/ -> per-item output key to concatenate
    group_tables: dict[str, str] = {}
    #: BIDS-derivatives description of the pipeline's dataset
    description: str = ""
    #: the anatomy the pipeline measures ('brain', 'spine'): discovery routes images by the body part
    #: BIDS gives (config `body_part`); '' takes any image
    anatomy: str = ""

    def prepare(self, item: Item, cards: list, cfg: dict, ctx: Context) -> Prepared:
        raise NotImplementedError

    def predict(self, models: list, prepared: Prepared, cards: list, cfg: dict, batch_size: int) -> Predicted:
        """`models[i]` are the FoldModels of `cards[i]`. Default: the mean over every fold of every
        card (an ensemble); pipelines whose cards play different parts (mask, tissue) override this."""
        from cohortseg.models.ensemble import fold_average

        return Predicted({"prob": fold_average([f.predict for folds in models for f in folds], prepared.x, batch_size)})

    def finalize(self, item: Item, prepared: Prepared, predicted: Predicted, cards: list, cfg: dict,
                 ctx: Context, out: OutputWriter) -> dict:
        raise NotImplementedError

    def methods(self, cards: list, cfg: dict) -> dict:
        """How this configuration measures what (e.g. which brain mask, which eTIV), for provenance
        (``group/summary.json`` ``methods``). Default: nothing to say."""
        return {}

    def session_metrics(self, items: dict) -> dict:
        """Metrics across a session's items (e.g. CSA variability across contrasts), from the
        finalized item records {item name: :class:`cohortseg.workflow.records.ItemRecord`}. Columns become
        `<pipeline>_<key>` in summary.csv. Default: none."""
        return {}
