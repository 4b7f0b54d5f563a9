"""Architecture loaders: a card's `architecture.loader` -> a function building a predict callable.

Each loader takes (fold_path, card, fold_entry, extra_paths) and returns a Keras model or any object
with `predict(batch) -> np.ndarray`. TensorFlow is imported lazily: planning never pays for it.
"""
from __future__ import annotations

from pathlib import Path

from cohortseg.errors import ModelError


def _gmseg_weights(path: Path, card, fold, extra):
    from cohortseg.models.nets.gmseg import build_gmseg, load_gmseg_weights

    params = {**card["architecture"].get("params", {}), **fold.get("params", {})}
    model = build_gmseg(filters=int(params.get("filters", 32)))
    load_gmseg_weights(model, path)
    return model


def _tfjs_layers(path: Path, card, fold, extra):
    from cohortseg.models.nets.tfjs import load_tfjs_layers_model

    return load_tfjs_layers_model(path.parent if path.is_file() else path)


def _keras_full(path: Path, card, fold, extra):
    import keras

    try:
        return keras.models.load_model(str(path), compile=False)
    except Exception as e:  # noqa: BLE001 - any keras failure is a model problem
        raise ModelError(f"model '{card.name}': cannot load Keras model {path}: {e}") from None


def _savedmodel(path: Path, card, fold, extra):
    from cohortseg.models.shiva import load_fold

    return load_fold(path)


def _deepwmh_torch(path: Path, card, fold, extra):
    """A deep-T1-WMH network (``architecture.params.net``: head, affine, rois, wmh) from its upstream
    PyTorch state_dict, rebuilt in Keras (no PyTorch needed)."""
    from cohortseg.models.nets.deepwmh import load_net

    return load_net(card["architecture"].get("params", {}).get("net", ""), path)


LOADERS = {
    "gmseg_weights": _gmseg_weights,
    "tfjs_layers": _tfjs_layers,
    "keras_full": _keras_full,
    "savedmodel": _savedmodel,
    "deepwmh_torch": _deepwmh_torch,
}


def build(card, resolved_fold: dict):
    name = card["architecture"]["loader"]
    if name not in LOADERS:
        raise ModelError(f"model '{card.name}': unknown loader '{name}' (known: {', '.join(LOADERS)})")
    return LOADERS[name](Path(resolved_fold["path"]), card, resolved_fold["fold"], resolved_fold["extra"])
