"""Training of the project's own models (k-fold 2D U-Nets; 3D MeshNet fine-tuning) into model bundles.

One entry point: :func:`train_bundle` (``python -m cohortseg.training --config ... --out ...``).
Submodules: ``datasets`` (pairs, preprocessing, soft labels, splits), ``augment``, ``synthetic``
(random-contrast slices from a template's label maps), ``losses``,
``train`` (the fold loop), ``brain3d`` (3D fine-tuning of a brainchop MeshNet from label maps), ``bundle`` (card.yaml + fold_<k>.keras + cv_report.json + curves).
TensorFlow is imported only when training starts.
"""
from __future__ import annotations


def train_bundle(config: dict, out_dir, progress=None):
    """Train per the config dict and write a model bundle folder; returns its Path. ``kind``:
    ``unet_2d`` (default, :mod:`cohortseg.training.train`) or ``meshnet_3d`` (3D fine-tuning of a
    brainchop MeshNet to a new label protocol, :mod:`cohortseg.training.brain3d`)."""
    kind = (config or {}).get("kind", "unet_2d")
    if kind == "meshnet_3d":
        from cohortseg.training.brain3d import train_bundle as _tb
    elif kind == "unet_2d":
        from cohortseg.training.train import train_bundle as _tb
    else:
        from cohortseg.errors import ConfigError

        raise ConfigError(f"training config: kind must be unet_2d or meshnet_3d, not {kind!r}")
    return _tb(config, out_dir, progress=progress)


def load_config(path, overrides: dict | None = None) -> dict:
    """Read a training config YAML, then set `overrides` ({dotted key: value}, e.g.
    {"train.epochs": 5}: the CLI's --set and the train rule's `train_set`)."""
    from pathlib import Path

    import yaml

    from cohortseg.errors import ConfigError

    try:
        cfg = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read training config {path}: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"training config {path} is not a mapping")
    for key, value in (overrides or {}).items():
        node = cfg
        *parents, last = str(key).split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


__all__ = ["train_bundle", "load_config"]
