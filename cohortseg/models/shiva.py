"""SHIVA contract (CMB / WMH / PVS 3D U-Nets of Boutinaud et al.): descriptors, fold models, crop, intensities.

What the upstream SHIVA models expect (see ../shared/README.md, "Recipes"):

* input 160x214x176(xC) at 1 mm isotropic, RAS, after conforming to 256^3 at 1 mm;
* crop of 160x214x176 around the ceil'd centre of mass of the brain mask, shifted up (+z, superior)
  when the top of the brain would be cut, zero-padded where the box leaves the image;
* intensities: nan -> 0, negatives -> 0, divide by the 99th percentile inside the brain mask, clip at
  1.3, divide by 1.3 (so the network sees [0, 1]);
* every fold model predicts, the folds are **averaged**; then threshold + connected components
  (see :mod:`cohortseg.science.lesions`).

A SHIVA user brings a model folder plus a ``model_info_*.json`` descriptor (``files`` with ``name`` and
``md5``, ``modalities``, ``target``). Fold files are either Keras full models (``.h5``) or TF SavedModel
folders (``*.tf_inference`` and the extension-less ``*_bestvalloss`` folders). The md5 of a folder is
SHIVA's convention (:func:`cohortseg.io.tree_md5`), checked by the model store like every checksum.
Conforming, registration and the fold ensemble are the project's own (``cohortseg.pipelines.cmb``,
``cohortseg.models.ensemble``): this module holds only what is SHIVA's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cohortseg.errors import InputError, ModelError
from cohortseg.io import md5sum
from cohortseg.models.lesion_cards import MODALITY_CONTRAST

GRID_SHAPE: tuple[int, int, int] = (160, 214, 176)
CONFORM_SHAPE: tuple[int, int, int] = (256, 256, 256)
P99_CLIP = 1.3
TOP_MARGIN_VOX = 5  # SHIVA's "safety margin" added above the top brain slice when the box is shifted up

#: per-target post-processing defaults of the SHIVA contract (probability threshold, clusters of at
#: most `min_cluster_vox` voxels are dropped, clusters with more than `max_outside_brain_frac` of their
#: voxels outside the brain mask are dropped)
TARGET_THRESHOLDS: dict[str, dict] = {
    "CMB": {"probability": 0.5, "min_cluster_vox": 1, "max_outside_brain_frac": 0.25},
    "WMH": {"probability": 0.2, "min_cluster_vox": 1, "max_outside_brain_frac": 0.25},
    "PVS": {"probability": 0.5, "min_cluster_vox": 5, "max_outside_brain_frac": 0.25},
}
TARGET_PIPELINE = {"CMB": "cmb", "WMH": "wmh", "PVS": "pvs"}


# ----------------------------------------------------------------------------------------------
# descriptors and model cards
# ----------------------------------------------------------------------------------------------
def read_model_info(json_path) -> dict:
    """Read and validate a SHIVA ``model_info_*.json`` descriptor. Raises ModelError when malformed."""
    json_path = Path(json_path)
    try:
        info = json.loads(json_path.read_text())
    except FileNotFoundError as e:
        raise ModelError(f"SHIVA model descriptor not found: {json_path}") from e
    except (OSError, ValueError) as e:
        raise ModelError(f"SHIVA model descriptor {json_path} is not valid JSON: {e}") from e
    if not isinstance(info, dict):
        raise ModelError(f"SHIVA model descriptor {json_path}: top level must be an object")
    target = info.get("target")
    if not isinstance(target, str) or target.upper() not in TARGET_THRESHOLDS:
        raise ModelError(f"SHIVA model descriptor {json_path}: unknown target {target!r} "
                         f"(expected one of {sorted(TARGET_THRESHOLDS)})")
    mods = info.get("modalities")
    if not isinstance(mods, list) or not mods or not all(isinstance(m, str) for m in mods):
        raise ModelError(f"SHIVA model descriptor {json_path}: 'modalities' must be a non-empty list")
    unknown = [m for m in mods if m.lower() not in MODALITY_CONTRAST]
    if unknown:
        raise ModelError(f"SHIVA model descriptor {json_path}: unknown modalities {unknown}")
    files = info.get("files")
    if not isinstance(files, list) or not files:
        raise ModelError(f"SHIVA model descriptor {json_path}: 'files' must be a non-empty list")
    for i, f in enumerate(files):
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(f.get("md5"), str):
            raise ModelError(f"SHIVA model descriptor {json_path}: files[{i}] needs 'name' and 'md5' strings")
        if len(f["md5"]) != 32 or any(c not in "0123456789abcdefABCDEF" for c in f["md5"]):
            raise ModelError(f"SHIVA model descriptor {json_path}: files[{i}] md5 {f['md5']!r} is not an md5 hex digest")
    return info


def _fold_loader_kind(name: str, info: dict, model_dir: Path | None) -> str:
    """'keras_full' for .h5/.keras files, 'savedmodel' for SavedModel folders."""
    if model_dir is not None:
        p = Path(model_dir) / name
        if p.is_dir():
            return "savedmodel"
        if p.is_file():
            return "keras_full"
    suffix = Path(name).suffix.lower()
    if suffix in (".h5", ".hdf5", ".keras"):
        return "keras_full"
    if suffix == ".tf_inference" or str(info.get("model_format", "")).lower() == "savedmodel":
        return "savedmodel"
    return "savedmodel"  # extension-less names (e.g. T1.PVS.v2 *_bestvalloss) are SavedModel folders


def card_from_model_info(json_path, model_dir=None) -> dict:
    """Build a model-card-shaped dict from a SHIVA descriptor.

    Keys: name, pipeline (cmb/wmh/pvs by target), target, contrasts, grid, normalisation,
    architecture {loader: keras_full|savedmodel, ...}, folds [{file, md5}], thresholds, labels,
    source (descriptor provenance). Fold files are resolved relative to `model_dir` (default: the
    descriptor's folder) when the card is used (the model store checks their md5).
    """
    json_path = Path(json_path)
    info = read_model_info(json_path)
    model_dir = Path(model_dir) if model_dir is not None else json_path.parent
    target = info["target"].upper()
    mods = [m.lower() for m in info["modalities"]]
    kinds = {_fold_loader_kind(f["name"], info, model_dir) for f in info["files"]}
    if len(kinds) != 1:
        raise ModelError(f"SHIVA model descriptor {json_path}: folds mix Keras files and SavedModel folders")
    loader = kinds.pop()
    version = str(info.get("version", "v0"))
    name = f"shiva-{'-'.join(mods)}-{target.lower()}-{version}"
    return {
        "name": name,
        "pipeline": TARGET_PIPELINE[target],
        "target": target,
        "contrasts": [MODALITY_CONTRAST[m] for m in mods],
        "modalities": mods,
        "grid": {"shape": list(GRID_SHAPE), "spacing_mm": [1.0, 1.0, 1.0], "orientation": "RAS",
                 "conform_shape": list(CONFORM_SHAPE)},
        "normalisation": {"method": "shiva_p99", "percentile": 99.0, "clip": P99_CLIP,
                          "within": "brain_mask"},
        "architecture": {"loader": loader, "name": info.get("architecture"),
                         "input_shape": [*GRID_SHAPE, len(mods)], "output": "sigmoid",
                         "tensorflow_min_version": info.get("tensorflow_min_version")},
        "folds": [{"file": f["name"], "md5": f["md5"].lower()} for f in info["files"]],
        "thresholds": dict(TARGET_THRESHOLDS[target]),
        "labels": {"0": "background", "1": target},
        "source": {"format": "shiva_model_info", "descriptor": str(json_path),
                   "descriptor_md5": md5sum(json_path), "url": info.get("url"),
                   "version": version, "release_date": info.get("release date"),
                   "author": info.get("author"), "sha256_zip": info.get("sha256_zip")},
    }


# ----------------------------------------------------------------------------------------------
# fold files
# ----------------------------------------------------------------------------------------------
class FoldModel:
    """A loaded fold: ``fold(x) -> float32 array`` and ``fold.predict(x, batch_size)``."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], path: Path, kind: str, keras_model=None):
        self._fn = fn
        self.path = Path(path)
        self.kind = kind
        self.keras_model = keras_model

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._fn(np.asarray(x, dtype=np.float32)), dtype=np.float32)

    def predict(self, x: np.ndarray, batch_size: int = 1, verbose=0) -> np.ndarray:
        from cohortseg.models.ensemble import predict_batched

        return predict_batched(self, x, batch_size)

    def __repr__(self):
        return f"FoldModel({self.kind}, {self.path.name})"


def load_fold(path, custom_objects: dict | None = None) -> FoldModel:
    """Load one fold model: a Keras full model file (.h5/.hdf5/.keras) or a TF SavedModel folder.

    SavedModel folders are called through their ``serving_default`` signature (first input, first
    output by name; another signature if that one is absent); signature-less folders through their
    ``serve`` / ``__call__`` tf.function.
    Raises ModelError when the file cannot be loaded.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"fold model not found: {path}")
    import tensorflow as tf  # heavy: import lazily
    import keras

    if path.is_dir():
        try:
            loaded = tf.saved_model.load(str(path))
        except Exception as e:  # noqa: BLE001 - report any loader failure as a model problem
            raise ModelError(f"cannot load SavedModel fold {path}: {e}") from e
        sigs = dict(getattr(loaded, "signatures", {}) or {})
        if sigs:
            key = "serving_default" if "serving_default" in sigs else sorted(sigs)[0]
            infer = sigs[key]
            in_name = sorted(infer.structured_input_signature[1].keys())[0]
            out_names = sorted(infer.structured_outputs.keys())

            def fn(x, _infer=infer, _in=in_name, _out=out_names[0], _keep=loaded):
                return _infer(**{_in: tf.constant(x, dtype=tf.float32)})[_out].numpy()

            return FoldModel(fn, path, "savedmodel")
        # no signature: a tf.function-decorated `serve` / `__call__` (tf.Module exports)
        call = getattr(loaded, "serve", None) or (loaded if callable(loaded) else None)
        if call is None:
            raise ModelError(f"SavedModel fold {path} has neither a signature nor a callable entry point")

        def fn(x, _call=call, _keep=loaded):
            out = _call(tf.constant(x, dtype=tf.float32))
            if isinstance(out, dict):
                out = out[sorted(out)[0]]
            elif isinstance(out, (list, tuple)):
                out = out[0]
            return out.numpy() if hasattr(out, "numpy") else np.asarray(out)

        return FoldModel(fn, path, "savedmodel")

    try:
        model = keras.models.load_model(str(path), compile=False,
                                        custom_objects={"tf": tf, **(custom_objects or {})})
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot load Keras fold model {path}: {e}") from e

    def fn(x, _m=model):
        out = _m(tf.constant(x, dtype=tf.float32), training=False)
        if isinstance(out, (list, tuple)):
            out = out[0]
        return out.numpy() if hasattr(out, "numpy") else np.asarray(out)

    return FoldModel(fn, path, "keras_full", keras_model=model)


def load_card(path, card, fold, extra) -> FoldModel:
    """Loader ``savedmodel`` (:mod:`cohortseg.models.loaders`): :func:`load_fold` of the fold's path."""
    return load_fold(path)


# ----------------------------------------------------------------------------------------------
# crop / uncrop
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CropBox:
    """A box in (conformed RAS) voxel indices: ``start`` may be negative and ``start + shape`` may
    exceed the image; those parts are zero-padded by :func:`crop`."""

    start: tuple[int, int, int]
    shape: tuple[int, int, int]
    centre: tuple[int, int, int]
    shift_up: int = 0  # voxels the box was moved up (+z) so as not to cut the top of the brain

    @property
    def stop(self) -> tuple[int, int, int]:
        return tuple(int(s + n) for s, n in zip(self.start, self.shape))

    def to_dict(self) -> dict:
        return {"start": list(self.start), "shape": list(self.shape), "centre": list(self.centre),
                "shift_up": int(self.shift_up)}

    @classmethod
    def from_dict(cls, d) -> "CropBox":
        if isinstance(d, CropBox):
            return d
        return cls(tuple(int(v) for v in d["start"]), tuple(int(v) for v in d["shape"]),
                   tuple(int(v) for v in d.get("centre", d["start"])), int(d.get("shift_up", 0)))


def crop_box(brain_mask: np.ndarray, shape: Sequence[int] = GRID_SHAPE,
             top_margin: int = TOP_MARGIN_VOX) -> CropBox:
    """SHIVA crop box: centred on the ceil'd centre of mass of `brain_mask` (a RAS array: axis 2 =
    inferior->superior), ``start = centre - shape // 2``.

    If the box's exclusive top (``start_z + shape_z``) is at or below the top brain slice, the box
    is moved up by ``top - stop_z + top_margin`` voxels (the brain top plus a margin is kept; the
    bottom of the box, usually neck from a too-generous mask, is given up).
    """
    m = np.asarray(brain_mask) > 0
    if m.ndim != 3:
        raise InputError(f"brain mask must be 3D, got shape {m.shape}")
    if not m.any():
        raise InputError("brain mask is empty; cannot place the SHIVA crop box")
    shape = tuple(int(s) for s in shape)
    idx = np.nonzero(m)
    com = np.array([i.mean() for i in idx])
    centre = np.ceil(com).astype(int)
    start = centre - np.array(shape) // 2
    top = int(idx[2].max())
    stop_z = int(start[2] + shape[2])
    shift = 0
    if stop_z <= top:
        shift = top - stop_z + int(top_margin)
        start[2] += shift
    return CropBox(tuple(int(v) for v in start), shape, tuple(int(v) for v in centre), int(shift))


def _overlap(box: CropBox, full_shape):
    src, dst = [], []
    for s, n, full in zip(box.start, box.shape, full_shape):
        a, b = max(s, 0), min(s + n, full)
        if b <= a:
            return None
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    return tuple(src), tuple(dst)


def crop(volume: np.ndarray, box) -> np.ndarray:
    """Cut `box` out of `volume` (first three axes), zero outside the image; dtype preserved."""
    box = CropBox.from_dict(box)
    volume = np.asarray(volume)
    out = np.zeros(tuple(box.shape) + volume.shape[3:], dtype=volume.dtype)
    ov = _overlap(box, volume.shape[:3])
    if ov is not None:
        src, dst = ov
        out[dst] = volume[src]
    return out


def uncrop(cropped: np.ndarray, box, full_shape: Sequence[int]) -> np.ndarray:
    """Put a cropped array back at its place in a zero array of `full_shape` (first three axes)."""
    box = CropBox.from_dict(box)
    cropped = np.asarray(cropped)
    if tuple(cropped.shape[:3]) != tuple(box.shape):
        raise InputError(f"cropped array shape {cropped.shape[:3]} != box shape {box.shape}")
    full_shape = tuple(int(s) for s in full_shape)[:3]
    out = np.zeros(full_shape + cropped.shape[3:], dtype=cropped.dtype)
    ov = _overlap(box, full_shape)
    if ov is not None:
        src, dst = ov
        out[src] = cropped[dst]
    return out


# ----------------------------------------------------------------------------------------------
# intensities
# ----------------------------------------------------------------------------------------------
def normalise_p99(volume: np.ndarray, brain_mask: np.ndarray, percentile: float = 99.0,
                  clip: float = P99_CLIP) -> np.ndarray:
    """SHIVA intensity normalisation: nan -> 0, negatives -> 0, divide by the `percentile`-th
    percentile of the voxels inside `brain_mask`, clip at `clip`, divide by `clip` (float32 in [0, 1]).

    Raises InputError when the mask is empty or the percentile is not positive.
    """
    v = np.array(volume, dtype=np.float32, copy=True)
    v[~np.isfinite(v)] = 0.0
    v[v < 0] = 0.0
    m = np.asarray(brain_mask) > 0
    if m.shape != v.shape[:3]:
        raise InputError(f"brain mask shape {m.shape} != image shape {v.shape[:3]}")
    if not m.any():
        raise InputError("brain mask is empty; cannot normalise intensities")
    if v.ndim == 3:
        p = float(np.percentile(v[m], percentile))
        if not p > 0:
            raise InputError(f"{percentile:g}th percentile of the intensities in the brain mask is {p:g}; "
                             "image is empty or mask misplaced")
        v /= p
    else:  # per channel
        for c in range(v.shape[3]):
            ch = v[..., c]
            p = float(np.percentile(ch[m], percentile))
            if not p > 0:
                raise InputError(f"channel {c}: {percentile:g}th percentile in the brain mask is {p:g}")
            ch /= p
    np.minimum(v, clip, out=v)
    v /= clip
    return v


def to_native(prob: np.ndarray, meta: dict, order: int = 1) -> np.ndarray:
    """Map a model-grid probability map (160x214x176, extra singleton axes allowed) back to the
    native grid recorded in `meta` (uncrop into the conformed grid, then resample, linear)."""
    import nibabel as nib
    import nibabel.processing as nip

    p = np.asarray(prob, dtype=np.float32)
    while p.ndim > 3 and p.shape[0] == 1:  # batch axis
        p = p[0]
    if p.ndim == 4 and p.shape[-1] == 1:  # channel axis
        p = p[..., 0]
    box = CropBox.from_dict(meta["box"])
    full = uncrop(p, box, meta["conformed_shape"])
    src = nib.Nifti1Image(full, np.asarray(meta["conformed_affine"], dtype=float))
    out = nip.resample_from_to(src, (tuple(meta["native_shape"]), np.asarray(meta["native_affine"], dtype=float)),
                               order=order, cval=0.0)
    return np.asarray(out.dataobj, dtype=np.float32)


__all__ = [
    "GRID_SHAPE", "CONFORM_SHAPE", "TARGET_THRESHOLDS", "read_model_info", "card_from_model_info", "FoldModel",
    "load_fold", "CropBox", "crop_box", "crop", "uncrop", "normalise_p99", "to_native",
]
