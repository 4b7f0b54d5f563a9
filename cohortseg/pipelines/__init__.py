"""Pipeline registry. Modules are imported lazily so planning never imports TensorFlow."""
from __future__ import annotations

import importlib

from cohortseg.errors import ConfigError

REGISTRY = {
    "sc_gm": "cohortseg.pipelines.sc_gm:ScGm",
    "sc_csa": "cohortseg.pipelines.sc_csa:ScCsa",
    "brain_tissue": "cohortseg.pipelines.brain_tissue:BrainTissue",
    "cmb": "cohortseg.pipelines.lesion:Cmb",
    "wmh": "cohortseg.pipelines.lesion:Wmh",
}
_cache: dict = {}


def get_pipeline(name: str):
    if name not in _cache:
        if name not in REGISTRY:
            raise ConfigError(f"unknown pipeline '{name}'; known: {', '.join(REGISTRY)}")
        mod, cls = REGISTRY[name].split(":")
        _cache[name] = getattr(importlib.import_module(mod), cls)()
    return _cache[name]
