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


class OutputWriter:
    """Names and writes one item's BIDS-derivatives outputs under `<output_dir>/<pipeline>/`.

    `path("label-GM_probseg.nii.gz")` -> .../sub-01/ses-01/anat/sub-01_ses-01_T2starw_label-GM_probseg.nii.gz
    Every write is atomic and remembered in `files` (for the record and the QC page).
    """

    def __init__(self, output_dir, item: Item):
        self.item = item
        sub = Path(output_dir) / item.pipeline / item.participant_id
        if item.session_id:
            sub = sub / item.session_id
        self.anat = sub / "anat"
        self.figures = Path(output_dir) / item.pipeline / item.participant_id / "figures"
        self.files: dict[str, str] = {}
        self.flags: list[str] = []  # sanity flags for QC (empty, edge, volume_low, ...)
        self.checks: dict = {}  # anatomy criteria measured on the outputs (cohortseg.science.anatomy)

    def path(self, suffix: str, figure: bool = False) -> Path:
        folder = self.figures if figure else self.anat
        return folder / f"{self.item.name}_{suffix}"

    def nifti(self, key: str, data, affine, dtype=None, header=None) -> Path:
        p = save_nifti_atomic(data, affine, self.path(key), header=header, dtype=dtype)
        self.files[key] = str(p)
        return p

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
