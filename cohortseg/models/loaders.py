"""Architecture loaders: a card's `architecture.loader` -> a function building a predict callable.

Each loader takes (fold_path, card, fold_entry, extra_paths) and returns a Keras model or any object
with `predict(batch) -> np.ndarray`. The table names each loader by its dotted ``module:function``
and the module is imported only when a card names it: loading a gmseg card never imports the
deep-T1-WMH or SHIVA code, and :func:`cohortseg.pipelines.code_version` counts a family's module
only for the pipelines that accept its loader (``cohortseg.pipelines.LOADERS_USED``). TensorFlow is imported lazily:
planning never pays for it.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from cohortseg.errors import ModelError

LOADERS = {
    "gmseg_weights": "cohortseg.models.nets.gmseg:load_card",
    "tfjs_layers": "cohortseg.models.nets.tfjs:load_card",
    "keras_full": "cohortseg.models.loaders:load_keras",
    "savedmodel": "cohortseg.models.shiva:load_card",
    "deepwmh_torch": "cohortseg.models.nets.deepwmh_torch:load_card",
}


def load_keras(path: Path, card, fold, extra):
    """A full Keras model file (``.keras``/``.h5``): the training bundles' format."""
    import keras

    try:
        return keras.models.load_model(str(path), compile=False)
    except Exception as e:  # noqa: BLE001 - any keras failure is a model problem
        raise ModelError(f"model '{card.name}': cannot load Keras model {path}: {e}") from None


def loader(name: str, card_name: str = ""):
    """The loader function registered as `name` (its module imported now)."""
    if name not in LOADERS:
        raise ModelError(f"model '{card_name}': unknown loader '{name}' (known: {', '.join(LOADERS)})")
    module, function = LOADERS[name].split(":")
    return getattr(importlib.import_module(module), function)


def build(card, resolved_fold: dict):
    fn = loader(card["architecture"]["loader"], card.name)
    return fn(Path(resolved_fold["path"]), card, resolved_fold["fold"], resolved_fold["extra"])
