"""Tiny stand-in SHIVA fold models (the real fold weights are not redistributable).

Each fold is a Keras model with the real SHIVA tensor shapes, input (N, 160, 214, 176, C) ->
sigmoid (N, 160, 214, 176, 1): one 1x1x1 Conv3D "detector" whose weights differ per fold.

* ``polarity="dark"``: p = sigmoid(b_k - w_k * mean_c(x)); with w_k = 40 + 10k, b_k = 2 + 0.5k a
  voxel at 0 (a planted dark blob after SHIVA normalisation) gives p in [0.88, 0.97], a voxel at
  >= 0.1 gives p < 0.12.
* ``polarity="bright"``: p = sigmoid(w_k * mean_c(x) - b'_k) with b'_k = 0.9 w_k: fires at x ~ 1.

:func:`make_shiva_bundle` saves the folds like a SHIVA user's bundle (Keras full models ``.h5`` or
SavedModel folders ``.tf_inference``) plus a ``model_info_*.json`` whose md5s are computed with
SHIVA's file/folder convention, so they load through the descriptor path.

Also small helpers for synthetic lesions (:func:`ball`, :func:`gaussian_blob`) and a crude
morphological brain mask for the skull-on test T1 (:func:`crude_brain_mask`).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from cohortseg.io import tree_md5
from cohortseg.models.shiva import GRID_SHAPE


# ----------------------------------------------------------------------------------------------
# small test helpers (synthetic lesions, crude brain masks)
# ----------------------------------------------------------------------------------------------
def crude_brain_mask(data: np.ndarray) -> np.ndarray:
    """Morphological skull strip good enough for tests (Otsu, erode, largest component, dilate, fill)."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    sm = ndimage.zoom(np.asarray(data, np.float32), 0.5, order=1)
    b = sm > threshold_otsu(sm[sm > 0])
    b = ndimage.binary_erosion(b, iterations=3)
    lab, _ = ndimage.label(b)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    b = ndimage.binary_dilation(lab == sizes.argmax(), iterations=3)
    b = ndimage.binary_fill_holes(ndimage.binary_closing(ndimage.binary_fill_holes(b), iterations=3))
    full = ndimage.zoom(b.astype(np.float32), 2, order=1) > 0.5
    out = np.zeros(data.shape, bool)
    sl = tuple(slice(0, min(n_data, n_full)) for n_data, n_full in zip(data.shape, full.shape))
    out[sl] = full[sl]
    return out


def ball(shape, centre, radius) -> np.ndarray:
    """Boolean ball of `radius` voxels around voxel `centre`."""
    g = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum((gi - c) ** 2 for gi, c in zip(g, centre)) <= radius ** 2


def gaussian_blob(shape, centre, sigma) -> np.ndarray:
    """exp(-r^2 / (2 sigma^2)) around `centre` (voxels): thresholded at 0.5 it is a ball of radius
    sigma * sqrt(2 ln 2) ~ 1.177 sigma."""
    g = np.ogrid[tuple(slice(0, s) for s in shape)]
    r2 = sum((gi - c) ** 2 for gi, c in zip(g, centre))
    return np.exp(-r2 / (2.0 * sigma ** 2)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# stand-in folds
# ----------------------------------------------------------------------------------------------
def fold_weights(k: int, polarity: str = "dark") -> tuple[float, float]:
    w = 40.0 + 10.0 * k
    if polarity == "dark":
        return -w, 2.0 + 0.5 * k
    if polarity == "bright":
        return w, -0.9 * w
    raise ValueError(polarity)


def build_fold(k: int, n_channels: int = 1, polarity: str = "dark", shape=GRID_SHAPE):
    import keras

    inp = keras.Input(shape=(*shape, n_channels), name="input_image")
    conv = keras.layers.Conv3D(1, 1, activation="sigmoid", name="detector")
    model = keras.Model(inp, conv(inp), name=f"standin_fold_{k}")
    w, b = fold_weights(k, polarity)
    conv.set_weights([np.full((1, 1, 1, n_channels, 1), w / n_channels, np.float32), np.array([b], np.float32)])
    return model


def reference_prediction(x: np.ndarray, k: int, polarity: str = "dark") -> np.ndarray:
    """What fold `k` computes, in numpy (float64)."""
    w, b = fold_weights(k, polarity)
    z = w * np.asarray(x, dtype=np.float64).mean(axis=-1, keepdims=True) + b
    return 1.0 / (1.0 + np.exp(-z))


def save_fold(model, path: Path, fmt: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "h5":
        with warnings.catch_warnings():  # keras' legacy HDF5 writer trips a numpy-2 DeprecationWarning
            warnings.simplefilter("ignore", DeprecationWarning)
            model.save(str(path))  # legacy HDF5 full model, like the SHIVA v0/v1 folds
    elif fmt == "savedmodel":
        model.export(str(path), format="tf_saved_model", verbose=False)  # like SHIVA v2 .tf_inference
    else:
        raise ValueError(fmt)
    return path


def make_shiva_bundle(root, target: str = "CMB", modalities=("swi",), n_folds: int = 3, fmt: str = "h5",
                      polarity: str = "dark", subdir: str | None = None) -> tuple[Path, Path]:
    """Write stand-in folds + descriptor under `root`. Returns (descriptor path, model_dir)."""
    root = Path(root)
    subdir = subdir or f"{'-'.join(m.upper() for m in modalities)}-{target}"
    names = []
    for k in range(n_folds):
        stem = f"standin_Unet3D-{target}_fold_{k}"
        name = f"{subdir}/{stem}_model.h5" if fmt == "h5" else f"{subdir}/{stem}_bestvalloss.tf_inference"
        save_fold(build_fold(k, len(modalities), polarity), root / name, fmt)
        names.append(name)
    info = {"version": "standin", "release date": "01/01/2000", "author": "cohortseg tests",
            "url": "file://standin", "target": target, "modalities": list(modalities),
            "files": [{"name": n, "md5": tree_md5(root / n)} for n in names]}
    if fmt == "savedmodel":
        info["model_format"] = "SavedModel"
    desc = root / f"model_info_{'-'.join(modalities)}-{target.lower()}-standin.json"
    desc.write_text(json.dumps(info, indent=2))
    return desc, root
