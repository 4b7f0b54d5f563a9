"""Model bundles: a directory a pipeline can use as its model (``card.yaml`` + fold files).

Layout::

    <bundle>/
      card.yaml             model card (validated against config/schemas/model_card.schema.yaml):
                            name, pipeline, contrasts, grid, normalisation, architecture
                            {loader: keras_full, params}, folds [{file, sha256, params}], thresholds,
                            labels, outputs, training (provenance: seed, data + checksums, epochs,
                            config, software versions, CV summary)
      fold_<k>.keras        one full Keras model per fold (architecture + weights, no optimizer;
                            standard layers only: keras.models.load_model(path, compile=False))
      cv_report.json        cross-validation: Dice per fold and per held-out subject/contrast
      learning_curves.png   training/validation loss and validation Dice per fold

The bundle is assembled in a hidden sibling folder and renamed into place at the end, so a crash
never leaves a half-written bundle under the final name.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml

from cohortseg.errors import ModelError
from cohortseg.io import atomic_path, sha256sum, write_json_atomic, write_text_atomic

CARD = "card.yaml"
CV_REPORT = "cv_report.json"
CURVES = "learning_curves.png"


def fold_filename(k: int) -> str:
    return f"fold_{k}.keras"


def save_fold_model(model, path, build_fn=None) -> str:
    """Save a clean copy of ``model`` (uncompiled: no optimizer state, no custom loss) atomically;
    return its sha256. ``build_fn()`` rebuilds the architecture (default: ``keras.models.clone_model``)."""
    import keras

    clean = build_fn() if build_fn is not None else keras.models.clone_model(model)
    clean.set_weights(model.get_weights())
    with atomic_path(path, suffix=".keras") as tmp:
        clean.save(str(tmp))
    return sha256sum(path)


def plot_learning_curves(histories: Sequence[dict], path, title: str = "") -> None:
    """One panel per trained model: train/val loss (left axis) and validation Dice (right axis);
    a history's ``title`` names its panel (default: ``model k``), its ``probe_epochs`` are shaded;
    up to 4 panels per row."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = max(1, len(histories))
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for k, (ax, h) in enumerate(zip(axes.flat, histories)):
        ep = np.arange(1, len(h.get("loss", [])) + 1)
        ax.plot(ep, h.get("loss", []), label="train loss", color="tab:blue")
        if h.get("val_loss"):
            ax.plot(ep, h["val_loss"], label="val loss", color="tab:orange")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.set_title(h.get("title") or f"model {k}", fontsize=9)
        if h.get("best_epoch"):
            ax.axvline(h["best_epoch"], color="grey", ls="--", lw=0.8, label="best epoch")
        if h.get("probe_epochs"):  # meshnet_3d: the classifier trained alone first
            ax.axvspan(0.5, h["probe_epochs"] + 0.5, color="grey", alpha=0.15, label="probe (classifier only)")
        ax2 = ax.twinx()
        if h.get("val_dice"):
            ax2.plot(ep, h["val_dice"], label="val Dice", color="tab:green")
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("Dice")
        lines = ax.get_lines() + ax2.get_lines()
        ax.legend(lines, [ln.get_label() for ln in lines], fontsize=7, loc="center right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(str(tmp), dpi=90)
    plt.close(fig)


def build_card(cfg: dict, folds: Sequence[dict], training: dict, contrasts: Sequence[str]) -> dict:
    """Model card dict for a trained bundle (see module doc)."""
    net = dict(cfg.get("net", {}))
    grid = cfg["grid"]
    card = {
        "name": cfg.get("name", "model"),
        "pipeline": cfg.get("pipeline", cfg.get("name", "model")),
        "description": cfg.get("description", "2D U-Net trained by cohortseg.training"),
        "licence": cfg.get("licence", "MIT"),
        "contrasts": sorted(set(contrasts)),
        "grid": {"inplane_mm": float(grid["inplane_mm"]), "crop": [int(c) for c in grid["crop"]],
                 "center": "native_slice_centre",
                 "layout": "cohortseg.science.resampling.to_axial_slices (axis 0 Left, axis 1 Anterior)"},
        "normalisation": {"method": "zscore_volume",
                          "description": "mean/std of the whole native volume, before resampling"},
        "architecture": {"loader": "keras_full", "params": {"net": "unet2d", **net}},
        "folds": list(folds),
        "thresholds": {"mask": float(cfg.get("thresholds", {}).get("mask", 0.5))},
        "postprocess": {k: bool((cfg.get("postprocess") or {}).get(k, False))
                        for k in ("tube_filter", "largest_component")},
        "tta": {"flip_lr": bool((cfg.get("tta") or {}).get("flip_lr", False))},
        "labels": {int(k): str(v) for k, v in (cfg.get("labels") or {1: "SC"}).items()},
        "outputs": list(cfg.get("outputs", ["label-SC_probseg", "label-SC_mask"])),
        "training": training,
    }
    return card


def _validate(card: dict, where) -> None:
    try:
        from cohortseg.models.cards import validate_card
    except ImportError:  # pragma: no cover - cards module is part of the package
        return
    validate_card(card, where)


def write_bundle(out_dir, card: dict, fold_files: dict, cv_report: dict, histories: Sequence[dict],
                 overwrite: bool = True) -> Path:
    """Assemble a bundle: ``fold_files`` {relative name: path of a saved fold model} are moved in,
    their sha256 checked against the card, card/report/curves written, then the folder renamed
    into place. Returns the bundle path."""
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ModelError(f"bundle folder {out} exists and is not empty")
    _validate(card, out / CARD)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.part-", dir=out.parent))
    try:
        by_name = {f["file"]: f for f in card["folds"]}
        for name, src in fold_files.items():
            dst = tmp / name
            dst.parent.mkdir(parents=True, exist_ok=True)  # a TF.js fold is a folder (model.json + weights)
            shutil.copy2(src, dst)
            if name in by_name and by_name[name].get("sha256") and sha256sum(dst) != by_name[name]["sha256"]:
                raise ModelError(f"fold file {name} changed while building the bundle")
        write_text_atomic(tmp / CARD, "# cohortseg model bundle card (written by cohortseg.training)\n"
                          + yaml.safe_dump(card, sort_keys=False, default_flow_style=None, width=100))
        write_json_atomic(tmp / CV_REPORT, cv_report)
        plot_learning_curves(histories, tmp / CURVES, title=f"{card['name']}: learning curves")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp/mkstemp create private (0700/0600) entries
        for f in tmp.rglob("*"):
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def verify_bundle(bundle_dir) -> dict:
    """Parse ``card.yaml`` (schema-validated) and check every fold file's sha256. Returns the card."""
    bundle = Path(bundle_dir)
    try:
        card = yaml.safe_load((bundle / CARD).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ModelError(f"bundle {bundle}: cannot read {CARD}: {e}") from None
    _validate(card, bundle / CARD)
    for f in (e for fold in card["folds"] for e in [fold, *fold.get("extra_files", [])]):
        p = bundle / f["file"]
        if not p.is_file():
            raise ModelError(f"bundle {bundle}: missing fold file {f['file']}")
        if f.get("sha256") and sha256sum(p) != f["sha256"]:
            raise ModelError(f"bundle {bundle}: checksum mismatch for {f['file']}")
    return card
