"""3D fine-tuning of a brainchop MeshNet to a new label protocol from a few label maps (CEREBRUM-7T's
recipe): ``kind: meshnet_3d`` in a training config (``python -m cohortseg.training``).

Recipe (Svanera et al. 2021, fine-tuning experiment; defaults in ``DEFAULTS``):

* **data**: label maps only (``data.items``: {labels, subject[, reference]}); each is resampled onto
  the pretrained net's grid (FreeSurfer conform, 1 mm LIA, ``cohortseg.science.conform``: each
  label's indicator trilinear, then argmax) and cut to its brain box plus ``data.margin_vox``;
  ``reference`` is another method's prediction of the same subject (CEREBRUM-7T's), whose Dice
  against the labels, in the native grid, is reported next to ours;
* **protocol**: target classes {index: {name, data: [dataset labels], from: [source classes]}}:
  several dataset labels or source classes in one class merge them, a dataset label no class lists
  is dropped (becomes background), a class with ``from: []`` is added (its output channel starts
  as a copy of the background's, biased down, plus a little noise). The source classes are the
  ``init_from`` card's ``labels`` (the recipe's brainchop_subcortical: 18 FreeSurfer aseg names);
* **images**: synthesised from the label maps (``cohortseg.training.synthetic.render_labels``:
  a mean per class (:func:`contrast_means`: ``synth.means`` moved by up to ``synth.mean_jitter``,
  MP2RAGE-like; null: any contrast), within-class noise, random blur = resolution, bias field,
  noise; SynthSeg), background 0: the input is brain-masked, as in the card's ``normalisation.brain_masked``;
* **augmentation**: each training volume has ``augment.copies`` fixed random deformations
  (``augment.draw_warp3d``: translation, rotation, elastic morphing; upstream: 30 per volume), drawn
  from (seed, fold, subject, copy); every training step cuts a patch from one of them and gives it a
  fresh random contrast, so an epoch (one patch of each augmented volume) sees every deformation;
* **patches**: ``train.patch`` voxels cubed (64; 96 on a GPU), the loss (cross-entropy + mean soft Dice over the
  classes present, inside the brain mask) on the patch minus ``train.loss_margin`` voxels per side, where the net's
  receptive field (93 voxels for the 9 dilated layers) sees real neighbours: the whole recipe peaks
  at 4.6 GB on a CPU (30 channels, the whole-brain evaluation included), far below 24 GB;
* **schedule**: ``train.probe_epochs`` with the pretrained layers frozen (the new classifier alone,
  at ``train.probe_learning_rate``), then ``train.epochs`` of every layer at ``train.learning_rate``
  (LP-FT); ``train.class_balance`` of the patches centred on a class drawn uniformly;
* **folds**: leave-one-subject-out; fold k's model is the bundle's ``fold_k`` (TF.js layers-model,
  the format ``brain_tissue`` loads with the ``tfjs_layers`` loader), the folds averaged at inference.

Evaluation of fold k on its held-out subject (``cv_report.json``), per class: Dice of the fine-tuned
net on ``eval.contrasts`` synthesised images of the held-out labels (one with ``synth.means``
exactly, the others drawn as the training images are), computed as ``brain_tissue`` runs it
(:func:`cohortseg.science.brain.run_meshnet_crop` on the brain-masked volume, argmax, masked); the
same for the pretrained net, its classes mapped to the protocol where classes allow
(:func:`baseline_map`); and the reference method's Dice (real images upstream!).
"""
from __future__ import annotations

import copy
import datetime
import logging
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import nibabel as nib
import numpy as np

from cohortseg.errors import ConfigError, InputError
from cohortseg.io import sha256sum
from cohortseg.training import augment as aug
from cohortseg.training import bundle as bnd
from cohortseg.training.datasets import expand_path
from cohortseg.training.synthetic import render_labels

log = logging.getLogger("cohortseg.training")

DEFAULTS: dict = {
    "kind": "meshnet_3d",
    "name": "model",
    "pipeline": "brain_tissue",
    "task": "aseg",
    "seed": 42,
    "threads": 2,
    "init_from": {"card": "brainchop_subcortical", "model_dir": "{shared}/models"},
    "data": {"root": None, "margin_vox": 8, "partial_volume": True, "items": None},
    "protocol": None,
    "augment": {"copies": 30, "translate_vox": 8.0, "rotate_deg": 10.0, "elastic_vox": 3.0,
                "control_points": 6},
    "synth": {"means": None, "mean_jitter": 0.0, "sd_max": 0.06, "blur_max": 1.0, "bias_sd": 0.15,
              "noise_max": 0.04, "gain": [0.8, 1.2]},
    "train": {"probe_epochs": 2, "probe_learning_rate": 1e-2, "epochs": 8, "patch": 64, "loss_margin": 12,
              "batch_size": 1, "learning_rate": 1e-4, "head_noise": 0.01, "class_balance": 0.8},
    "eval": {"contrasts": 3, "box": None},
    "crop_padding": 18,
}
# read by build_card only (the card's text; defaults from the source card)
CARD_KEYS = ("description", "reference", "licence", "contrasts")


def merge_config(cfg: dict) -> dict:
    """Defaults deep-merged with ``cfg`` (one level), checked: an unknown key (a typo) is refused."""
    out = copy.deepcopy(DEFAULTS)
    unknown = sorted(set(cfg or {}) - set(DEFAULTS) - set(CARD_KEYS))
    unknown += [f"{k}.{s}" for k, v in (cfg or {}).items() if isinstance(v, dict) and isinstance(DEFAULTS.get(k), dict)
                for s in sorted(set(v) - set(DEFAULTS[k]))]
    if unknown:
        raise ConfigError(f"meshnet_3d training config: unknown keys {unknown} (known: docs/TRAINING.md, "
                          "cohortseg.training.brain3d.DEFAULTS)")
    for k, v in (cfg or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = copy.deepcopy(v)
    if not (out.get("data") or {}).get("items"):
        raise ConfigError("meshnet_3d training config needs data.items (label maps)")
    if len(out["data"]["items"]) < 2:
        raise ConfigError("meshnet_3d: leave-one-subject-out needs at least 2 label maps")
    if not isinstance(out.get("protocol"), dict) or not out["protocol"]:
        raise ConfigError("meshnet_3d training config needs a 'protocol' {index: {name, data, from}}")
    t = out["train"]
    if int(t["patch"]) <= 2 * int(t["loss_margin"]):
        raise ConfigError(f"train.patch {t['patch']} must exceed 2 x train.loss_margin {t['loss_margin']}")
    return out


# ------------------------------------------------------------------------------------------ data
@dataclass
class Subject:
    """One label map on the net's grid: ``labels`` (protocol indices, int8) and its ``affine``."""

    name: str
    path: str
    labels: np.ndarray
    affine: np.ndarray
    reference: str = ""

    @cached_property
    def voxels_by_class(self) -> dict[int, np.ndarray]:
        """{class: flat indices of its voxels} (one stable argsort of the label map, computed once)."""
        flat = self.labels.ravel()
        order = np.argsort(flat, kind="stable").astype(np.int32)
        counts = np.bincount(flat[order].astype(np.int64))
        starts = np.concatenate([[0], np.cumsum(counts)])
        return {c: order[starts[c]:starts[c + 1]] for c in range(1, counts.size) if counts[c]}

    def voxel_of(self, rng: np.random.Generator) -> tuple[int, ...]:
        """A random voxel of a class drawn uniformly among the subject's classes (class-balanced
        patch centres: a 3 mL vessel class is as likely a centre as the 340 mL cortex)."""
        where = self.voxels_by_class
        idx = where[list(where)[int(rng.integers(len(where)))]]
        return tuple(int(v) for v in np.unravel_index(int(idx[int(rng.integers(idx.size))]), self.labels.shape))


def dataset_to_protocol(protocol: dict) -> dict[int, int]:
    """{dataset label: protocol index}; labels no class lists are dropped (-> 0)."""
    out: dict[int, int] = {}
    for idx, cls in protocol.items():
        for lab in cls.get("data") or []:
            if int(lab) in out:
                raise ConfigError(f"protocol: dataset label {lab} is in two classes")
            out[int(lab)] = int(idx)
    return out


def load_subject(item: dict, root, protocol: dict, margin: int = 8, voxel_mm: float = 1.0,
                 orientation: str = "LIA", partial_volume: bool = True) -> Subject:
    """A label map resampled onto the conformed grid (``voxel_mm``, ``orientation``), relabelled to
    the protocol, cut to its non-zero box plus ``margin`` voxels. ``partial_volume``: every label's
    indicator is resampled trilinearly and the largest fraction wins (one pass per label, ~3 s
    each here); False: nearest neighbour, one pass."""
    from scipy import ndimage

    from cohortseg.science.conform import conformed_affine

    path = expand_path(item["labels"], root)
    try:
        img = nib.load(path)
        lab = np.asarray(img.dataobj)
    except (OSError, nib.filebasedimages.ImageFileError) as e:
        raise InputError(f"cannot read label map: {e}", path) from None
    subject = str(item.get("subject") or Path(path).name.split("_")[0])
    if lab.ndim != 3 or not np.issubdtype(lab.dtype, np.integer):
        raise InputError(f"subject {subject}: label map must be a 3D integer image, got {lab.shape} {lab.dtype}", path)
    if not (lab > 0).any():
        raise InputError(f"subject {subject}: label map is empty", path)
    caff = conformed_affine(img.affine, img.shape, 256, voxel_mm, orientation)
    nz = np.array(np.nonzero(lab > 0))
    corners = np.array(np.meshgrid(*[(nz[a].min(), nz[a].max()) for a in range(3)], indexing="ij")).reshape(3, -1).T
    cvox = nib.affines.apply_affine(np.linalg.inv(caff) @ img.affine, corners)
    lo = np.floor(cvox.min(axis=0)).astype(int) - margin
    shape = tuple(int(v) for v in np.ceil(cvox.max(axis=0)).astype(int) + margin + 1 - lo)
    sub_aff = caff.copy()
    sub_aff[:3, 3] = caff[:3, :3] @ lo + caff[:3, 3]
    m = np.linalg.inv(img.affine) @ sub_aff  # output voxel -> input voxel
    to_proto = dataset_to_protocol(protocol)
    if not partial_volume:  # nearest neighbour: one pass (the CI recipe; thin classes suffer)
        near = ndimage.affine_transform(lab, m[:3, :3], m[:3, 3], output_shape=shape, order=0, mode="constant", cval=0)
        lut = np.zeros(int(lab.max()) + 1, np.int8)
        for k, v in to_proto.items():
            if k < lut.size:
                lut[k] = v
        return Subject(subject, path, lut[np.clip(near, 0, None)], sub_aff,
                       expand_path(item["reference"], root) if item.get("reference") else "")
    best = np.full(shape, -1.0, np.float32)
    out = np.zeros(shape, np.int8)
    for v in (int(v) for v in np.unique(lab)):  # partial volume: the largest trilinear fraction wins
        f = ndimage.affine_transform((lab == v).astype(np.float32), m[:3, :3], m[:3, 3], output_shape=shape,
                                     order=1, mode="constant", cval=1.0 if v == 0 else 0.0)
        win = f > best
        best[win] = f[win]
        out[win] = to_proto.get(v, 0)
    return Subject(subject, path, out, sub_aff, expand_path(item["reference"], root) if item.get("reference") else "")


def reference_dice(labels_path: str, reference_path: str, protocol: dict) -> dict[str, float]:
    """Dice per protocol class of a reference prediction vs the manual labels, in their native grid
    (both relabelled to the protocol)."""
    from cohortseg.science.metrics import dice

    try:
        a = np.asarray(nib.load(labels_path).dataobj)
        b = np.asarray(nib.load(reference_path).dataobj)
    except (OSError, nib.filebasedimages.ImageFileError) as e:
        raise InputError(f"cannot read reference prediction: {e}", reference_path) from None
    if a.shape != b.shape:
        raise InputError(f"reference prediction shape {b.shape} differs from the labels' {a.shape}", reference_path)
    to_proto = dataset_to_protocol(protocol)
    lut = np.zeros(max(int(a.max()), int(b.max()), max(to_proto, default=0)) + 1, np.int16)
    for k, v in to_proto.items():
        lut[k] = v
    a, b = lut[a], lut[b]
    return {str(c): round(dice(a == int(c), b == int(c)), 4) for c in sorted(protocol, key=int)}


# ----------------------------------------------------------------------------------------- model
def source_net(init: dict, tmp_cache: str | None = None):
    """(card, resolved fold path, Keras model) of the pretrained ``init_from.card`` (a TF.js MeshNet
    card; its files checked against the card's sha256 by the model store)."""
    from cohortseg.models.cards import find_card
    from cohortseg.models.loaders import build
    from cohortseg.models.store import ModelStore

    card = find_card(str(init["card"]))
    if card["architecture"].get("loader") != "tfjs_layers":
        raise ConfigError(f"init_from card {card.name}: meshnet_3d fine-tunes TF.js MeshNets (loader tfjs_layers), "
                          f"not {card['architecture'].get('loader')!r}")
    store = ModelStore(expand_path(init.get("model_dir", "{shared}/models")), cache_file=tmp_cache)
    fold = store.resolve(card)[0]
    return card, fold, build(card, fold)


def head_init(kernel: np.ndarray, bias: np.ndarray, source_labels: dict, protocol: dict,
              rng: np.random.Generator, noise: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Weights of the new 1x1x1 classifier from the source one (``kernel`` (1,1,1,C,S), ``bias`` (S,)):
    background <- the source's class 0; a class ``from`` one source class copies it; ``from`` several
    merges them (mean weights, bias + log of their number: the summed probability, roughly); ``from: []``
    adds a class (a copy of the background's, bias - log(number of added classes + 1), plus
    ``noise`` x the kernel's std, so the added classes split the background's probability)."""
    by_name = {str(v).lower(): int(k) for k, v in source_labels.items()}
    n = 1 + max(int(k) for k in protocol)
    w = np.zeros(kernel.shape[:-1] + (n,), np.float32)
    b = np.zeros(n, np.float32)
    w[..., 0], b[0] = kernel[..., 0], bias[0]
    added = [int(k) for k, c in protocol.items() if not c.get("from")]
    std = float(kernel.std()) or 1.0
    for k, cls in protocol.items():
        src = []
        for name in cls.get("from") or []:
            if str(name).lower() not in by_name:
                raise ConfigError(f"protocol class {k} ({cls.get('name')}): source class {name!r} is not in the "
                                  f"pretrained card's labels {sorted(source_labels.values())}")
            src.append(by_name[str(name).lower()])
        k = int(k)
        if src:
            w[..., k] = kernel[..., src].mean(axis=-1)
            b[k] = bias[src].mean() + np.log(len(src))
        else:
            w[..., k] = kernel[..., 0] + noise * std * rng.standard_normal(kernel.shape[:-1])
            b[k] = bias[0] - np.log(len(added) + 1)
    return w, b


def build_finetune_net(source_model, source_labels: dict, protocol: dict, rng, noise: float = 0.01):
    """A copy of the source MeshNet with its classifier replaced by the protocol's (same layer names:
    the TF.js export reuses the source's topology), every layer trainable. A copy: the source net is
    reused by every fold and for the pretrained figures, so training one fold must not change it."""
    import keras

    weights = source_model.get_weights()
    source_model = keras.models.clone_model(source_model)
    source_model.set_weights(weights)
    last = source_model.layers[-1]
    kernel, bias = (np.asarray(v) for v in last.get_weights())
    w, b = head_init(kernel, bias, source_labels, protocol, rng, noise)
    cfg = last.get_config()
    cfg["filters"] = int(w.shape[-1])
    head = type(last).from_config(cfg)
    out = head(last.input)
    model = keras.Model(source_model.inputs, out, name=source_model.name)
    head.set_weights([w, b])
    for lay in model.layers:  # brainchop ships some nets frozen (model30chan18cls: trainable false)
        lay.trainable = True
    return model


def patch_loss(margin: int, n_classes: int):
    """Cross-entropy + (1 - mean soft Dice over the classes present) on the patch minus ``margin``
    voxels per side, inside the brain mask only (the input is masked and brain_tissue masks the
    output: outside voxels teach nothing). ``y_true``: one-hot, all zero outside the mask (see
    :func:`one_hot`); ``y_pred``: logits."""
    from keras import ops

    def loss(y_true, y_pred):
        sl = (slice(None),) + (slice(margin, -margin or None),) * 3
        t, logits = y_true[sl], y_pred[sl]
        inside = ops.sum(t, axis=-1, keepdims=True)
        p = ops.softmax(logits, axis=-1) * inside
        ce = -ops.sum(t * ops.log_softmax(logits, axis=-1)) / ops.maximum(ops.sum(inside), 1.0)
        axes = (1, 2, 3)
        inter = ops.sum(t * p, axis=axes)
        den = ops.sum(t, axis=axes) + ops.sum(p, axis=axes)
        present = ops.cast(ops.sum(t, axis=axes) > 0, "float32")
        dsc = (2.0 * inter + 1e-3) / (den + 1e-3)
        mean_dice = ops.sum(dsc * present) / ops.maximum(ops.sum(present), 1.0)
        return ce + 1.0 - mean_dice

    loss.__name__ = "ce_dice_loss"
    return loss


def one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """One-hot float32 (..., n_classes) of a label patch, all zero outside the brain (label 0)."""
    out = np.eye(n_classes, dtype=np.float32)[labels]
    out[..., 0] = 0.0
    return out


# -------------------------------------------------------------------------------- synthesis
def contrast_means(scfg: dict, n_classes: int, rng: np.random.Generator, exact: bool = False) -> dict | None:
    """The class means of one synthesised image: ``synth.means`` (a T1-like contrast) each moved by
    a uniform draw in +-``synth.mean_jitter`` (exact: unmoved), clipped to [0.02, 1]; None when
    ``synth.means`` is null (every class uniform in [0.05, 1]: SynthSeg's any-contrast images)."""
    means = scfg.get("means")
    if not means:
        return None
    j = 0.0 if exact else float(scfg.get("mean_jitter") or 0.0)
    return {int(c): float(np.clip(float(m) + (rng.uniform(-j, j) if j else 0.0), 0.02, 1.0))
            for c, m in sorted(means.items(), key=lambda kv: int(kv[0])) if int(c) < n_classes}


def synth_image(labels: np.ndarray, n_classes: int, rng: np.random.Generator, scfg: dict, exact: bool = False) -> np.ndarray:
    """A brain-masked synthesised image of ``labels`` (class means from :func:`contrast_means`)
    scaled as ``minmax`` scales a whole volume (max 1), times a random gain in ``synth.gain``."""
    img = render_labels(labels, n_classes, rng, means=contrast_means(scfg, n_classes, rng, exact),
                        sd_max=float(scfg["sd_max"]), blur_max=float(scfg["blur_max"]),
                        bias_sd=float(scfg["bias_sd"]), noise_max=float(scfg["noise_max"]))
    top = float(np.percentile(img[labels > 0], 99.9)) if (labels > 0).any() else 1.0
    lo, hi = (float(g) for g in scfg.get("gain") or (1.0, 1.0))
    return np.clip(img / max(top, 1e-6), 0.0, 1.5) * np.float32(rng.uniform(lo, hi))


def training_patch(subj: Subject, warp: aug.Warp3D, rng: np.random.Generator, patch: int, n_classes: int,
                   scfg: dict, class_balance: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """One (image, labels) patch of ``patch``^3 from an augmented volume: a random box of the
    deformed volume, its labels warped, a fresh random contrast. With probability ``class_balance``
    the box is centred on a voxel of a class drawn uniformly (:meth:`Subject.voxel_of`; in the
    undeformed volume, so within the deformation's few voxels), else it lies anywhere."""
    shape = np.array(subj.labels.shape)
    if class_balance and rng.random() < class_balance:
        lo = [int(np.clip(v - patch // 2, min(0, s - patch), max(s - patch, 0))) for v, s in zip(subj.voxel_of(rng), shape)]
    else:
        lo = [int(rng.integers(min(0, s - patch), max(s - patch, 0) + 1)) for s in shape]
    lab = aug.warp_labels(subj.labels, warp.coords(lo, (patch,) * 3))
    return synth_image(lab, n_classes, rng, scfg), lab


# ------------------------------------------------------------------------------------ training
def compile_phase(model, body: bool, rate: float, margin: int, n_classes: int) -> None:
    """Compile ``model`` for a training phase: the classifier alone (``body`` False: the probe
    epochs) or every layer, Adam at ``rate``, :func:`patch_loss`."""
    import keras

    for lay in model.layers[:-1]:
        lay.trainable = body
    model.compile(optimizer=keras.optimizers.Adam(rate), loss=patch_loss(margin, n_classes))


def train_fold(cfg: dict, k: int, subjects, train_idx, source, progress=None):
    """Fine-tune fold ``k`` on ``subjects[train_idx]``; returns (model, history)."""
    import keras

    say = progress or log.info
    seed, t = int(cfg["seed"]), cfg["train"]
    n = 1 + max(int(c) for c in cfg["protocol"])
    keras.utils.set_random_seed(seed + k)
    src_card, _, src_model = source
    model = build_finetune_net(src_model, src_card["labels"], cfg["protocol"], np.random.default_rng([seed, k, 7]),
                               float(t["head_noise"]))
    a = cfg["augment"]
    warps = [(i, c, aug.draw_warp3d(subjects[i].labels.shape, np.random.default_rng([seed, k, i, c, 11]),
                                    float(a["translate_vox"]), float(a["rotate_deg"]), float(a["elastic_vox"]),
                                    int(a["control_points"])))
             for i in train_idx for c in range(int(a["copies"]))]
    hist = {"loss": [], "val_loss": [], "val_dice": [], "epochs_run": 0, "best_epoch": None,
            "probe_epochs": int(t["probe_epochs"])}
    bs, patch = int(t["batch_size"]), int(t["patch"])
    # linear probe, then fine-tune (LP-FT): the new classifier learns on the frozen pretrained features
    # first, so the body's first updates are not driven by a random head (which unlearns the source's
    # classes: measured in docs/TRAINING.md)
    phases = [(False, float(t["probe_learning_rate"]))] * int(t["probe_epochs"]) + \
             [(True, float(t["learning_rate"]))] * int(t["epochs"])
    compiled = None
    for ep, (body, rate) in enumerate(phases):
        if compiled != (body, rate):
            compile_phase(model, body, rate, int(t["loss_margin"]), n)
            compiled = (body, rate)
        rng = np.random.default_rng([seed, k, ep, 13])
        order = rng.permutation(len(warps))
        losses = []
        for s0 in range(0, len(order), bs):
            xs, ys = [], []
            for j in order[s0:s0 + bs]:
                i, _, w = warps[j]
                x, y = training_patch(subjects[i], w, rng, patch, n, cfg["synth"], float(t["class_balance"]))
                xs.append(x[..., None])
                ys.append(one_hot(y, n))
            losses.append(float(model.train_on_batch(np.stack(xs), np.stack(ys))))
        hist["loss"].append(round(float(np.mean(losses)), 5))
        hist["epochs_run"] = ep + 1
        say(f"fold {k} epoch {ep + 1}/{len(phases)} ({'fine-tune' if body else 'probe'}): loss "
            f"{hist['loss'][-1]:.4f} ({len(losses)} steps)")
    hist["best_epoch"] = hist["epochs_run"]  # fixed schedule (upstream): the last epoch ships
    return model, hist


# ---------------------------------------------------------------------------------- evaluation
def _eval_box(labels: np.ndarray, box) -> np.ndarray:
    """The held-out labels, or their central ``box`` (CI: a smaller evaluation volume)."""
    if not box:
        return labels
    size = [min(int(b), s) for b, s in zip(box if isinstance(box, (list, tuple)) else [box] * 3, labels.shape)]
    nz = np.array(np.nonzero(labels > 0)).mean(axis=1).round().astype(int)
    lo = [int(np.clip(c - n // 2, 0, s - n)) for c, n, s in zip(nz, size, labels.shape)]
    return labels[tuple(slice(a, a + n) for a, n in zip(lo, size))]


def predict_labels(model, image: np.ndarray, mask: np.ndarray, padding: int) -> np.ndarray:
    """Argmax of the net on the brain-masked image, as brain_tissue runs a MeshNet
    (:func:`cohortseg.science.brain.run_meshnet_crop`: min-max, mask box + ``padding``), masked."""
    from cohortseg.science.brain import argmax, run_meshnet_crop

    box, p = run_meshnet_crop(model, image * mask, norm="minmax", padding=padding, mask=mask)
    out = np.zeros(image.shape, np.uint8)
    out[box] = argmax(p)
    out[~mask] = 0
    return out


def baseline_map(source_labels: dict, protocol: dict) -> dict[int, int]:
    """{source class: protocol class} for the pretrained net's figures "where classes allow": a
    source class goes to the first protocol class started from it alone, else to the one protocol
    class that lists it (a merge, e.g. four ventricle classes -> Ventricles); a source class several
    merges share, and added classes, get none."""
    by_name = {str(v).lower(): int(k) for k, v in source_labels.items()}
    lists: dict[int, list[tuple[int, int]]] = {}  # source class -> [(protocol class, its number of sources)]
    for k, cls in sorted(protocol.items(), key=lambda kv: int(kv[0])):
        src = [by_name[str(nm).lower()] for nm in cls.get("from") or []]
        for s_cls in src:
            lists.setdefault(s_cls, []).append((int(k), len(src)))
    out: dict[int, int] = {}
    for s_cls, classes in lists.items():
        alone = [k for k, n in classes if n == 1]
        if alone or len(classes) == 1:
            out[s_cls] = alone[0] if alone else classes[0][0]
    return out


def evaluate_fold(cfg: dict, k: int, model, source, subj: Subject) -> dict:
    """Per-class Dice of the fine-tuned and the pretrained nets on synthesised images of the held-out
    subject (``eval.contrasts``: the first with ``synth.means`` exactly when they are set, the rest
    drawn as the training images are)."""
    from cohortseg.science.metrics import dice

    seed, e = int(cfg["seed"]), cfg["eval"]
    n = 1 + max(int(c) for c in cfg["protocol"])
    classes = sorted(int(c) for c in cfg["protocol"])
    lab = _eval_box(subj.labels, e.get("box"))
    mask = lab > 0
    present = set(int(v) for v in np.unique(lab))  # a class absent from the evaluated labels: no figure
    src_card, _, src_model = source
    bmap = baseline_map(src_card["labels"], cfg["protocol"])
    rows = []
    for j in range(int(e["contrasts"])):
        rng = np.random.default_rng([seed, k, j, 17])
        t1 = j == 0 and bool(cfg["synth"].get("means"))
        img = synth_image(lab, n, rng, {**cfg["synth"], "gain": [1.0, 1.0]}, exact=t1)
        pred = predict_labels(model, img, mask, int(cfg["crop_padding"]))
        src = predict_labels(src_model, img, mask, int(cfg["crop_padding"]))
        lut = np.zeros(256, np.uint8)
        for s_cls, t_cls in bmap.items():
            lut[s_cls] = t_cls
        src = lut[src]
        rows.append({"contrast": "t1_like" if t1 else f"random_{j}",
                     "dice": {str(c): (round(dice(lab == c, pred == c), 4) if c in present else None)
                              for c in classes},
                     "pretrained_dice": {str(c): (round(dice(lab == c, src == c), 4)
                                                  if c in bmap.values() and c in present else None) for c in classes}})

    def mean(key):
        return {str(c): (round(float(np.mean([r[key][str(c)] for r in rows])), 4)
                         if rows[0][key][str(c)] is not None else None) for c in classes}

    res = {"held_out": subj.name, "eval_shape": list(lab.shape), "contrasts": rows,
           "dice": mean("dice"), "pretrained_dice": mean("pretrained_dice")}
    if subj.reference:
        res["reference_dice"] = reference_dice(subj.path, subj.reference, cfg["protocol"])
    return res


# -------------------------------------------------------------------------------------- bundle
def write_tfjs(model, source_dir: Path, out_dir: Path) -> list[Path]:
    """Save ``model`` as a TF.js layers-model (``model.json`` + ``weights.bin``) with the source
    model's topology (same layer names; the classifier's ``filters`` set to the new class count),
    so the ``tfjs_layers`` loader reads it as it reads brainchop's. Returns the two files."""
    import json

    from cohortseg.io import write_text_atomic
    from cohortseg.models.nets.tfjs import read_model_json

    spec = copy.deepcopy(read_model_json(source_dir))
    mc = spec["modelTopology"].get("model_config", spec["modelTopology"])
    layers = mc["config"]["layers"]
    last = model.layers[-1]
    layer_cfg = next(lay for lay in layers if (lay["config"].get("name") or lay.get("name")) == last.name)
    layer_cfg["config"]["filters"] = int(last.get_config()["filters"])
    entries, chunks = [], []
    for lay in model.layers:
        if lay.name.endswith("_instnorm"):
            continue
        for v in lay.weights:
            arr = np.ascontiguousarray(np.asarray(v), dtype="<f4")
            entries.append({"name": f"{lay.name}/{v.name.split('/')[-1].split(':')[0]}",
                            "shape": list(arr.shape), "dtype": "float32"})
            chunks.append(arr.tobytes())
    spec["weightsManifest"] = [{"paths": ["weights.bin"], "weights": entries}]
    spec["convertedBy"] = "cohortseg.training.brain3d.write_tfjs"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "weights.bin").write_bytes(b"".join(chunks))
    write_text_atomic(out_dir / "model.json", json.dumps(spec))
    return [out_dir / "model.json", out_dir / "weights.bin"]


def _summary(folds: list[dict], key: str) -> dict:
    classes = folds[0][key].keys() if folds and key in folds[0] else []
    out = {}
    for c in classes:
        vals = [f[key][c] for f in folds if f.get(key, {}).get(c) is not None]
        out[c] = round(float(np.mean(vals)), 4) if vals else None
    return out


def build_card(cfg: dict, src_card, fold_entries: list, training: dict) -> dict:
    """The bundle's card: a MeshNet ``brain_tissue`` runs as the card's ``task`` (aseg: one volume per
    class in the tables), its labels the protocol's, its input brain-masked."""
    labels = {0: "background", **{int(k): str(c["name"]) for k, c in sorted(cfg["protocol"].items(), key=lambda kv: int(kv[0]))}}
    return {
        "name": cfg["name"], "pipeline": cfg["pipeline"], "task": cfg["task"],
        "description": cfg.get("description", f"MeshNet fine-tuned from {src_card.name} by cohortseg.training (3D)"),
        "reference": cfg.get("reference", src_card.get("reference", "")),
        "licence": cfg.get("licence", src_card.get("licence", "")),
        "contrasts": list(cfg.get("contrasts") or src_card["contrasts"]),
        "grid": copy.deepcopy(src_card["grid"]),
        "normalisation": {"method": "minmax", "brain_masked": True},
        "architecture": {"loader": "tfjs_layers", "params": {"crop_padding": int(cfg["crop_padding"])}},
        "folds": fold_entries,
        "labels": labels,
        "outputs": ["desc-aseg_dseg"],
        "training": training,
    }


def train_bundle(config: dict, out_dir, progress=None) -> Path:
    """Train one fine-tuned MeshNet per leave-one-subject-out fold and write the bundle (module doc)."""
    import tempfile

    from cohortseg.training.train import jsonable, setup_tf, software_versions

    t_start = time.perf_counter()
    cfg = merge_config(config)
    say = progress or log.info
    setup_tf(int(cfg["threads"]))
    data = cfg["data"]
    root = expand_path(data["root"]) if data.get("root") else None
    with tempfile.TemporaryDirectory(prefix="cohortseg-train3d-") as tmpd:
        source = source_net(cfg["init_from"], tmp_cache=str(Path(tmpd) / "verified.json"))
        src_card, src_fold, _ = source
        grid = src_card.get("grid") or {}
        t0 = time.perf_counter()
        subjects = [load_subject(it, root, cfg["protocol"], int(data["margin_vox"]), float(grid.get("voxel_mm", 1.0)),
                                 str(grid.get("orientation", "LIA")), bool(data.get("partial_volume", True)))
                    for it in data["items"]]
        say(f"{len(subjects)} label maps on the {grid.get('voxel_mm', 1.0)} mm grid "
            f"({', '.join(f'{s.name} {s.labels.shape}' for s in subjects)}), {time.perf_counter() - t0:.0f}s")
        names = [s.name for s in subjects]
        if len(set(names)) != len(names):
            raise ConfigError(f"meshnet_3d: subjects must differ, got {names}")
        fold_entries, fold_files, histories, report = [], {}, [], []
        for k, held in enumerate(subjects):
            train_idx = [i for i in range(len(subjects)) if i != k]
            t0 = time.perf_counter()
            say(f"fold {k}: train {[subjects[i].name for i in train_idx]} -> test {held.name} "
                f"({len(train_idx) * int(cfg['augment']['copies'])} augmented volumes)")
            model, hist = train_fold(cfg, k, subjects, train_idx, source, progress=say)
            hist["title"] = f"fold {k} (test: {held.name})"
            histories.append(hist)
            t_train = time.perf_counter() - t0
            res = evaluate_fold(cfg, k, model, source, held)
            folder = f"fold_{k}"
            files = write_tfjs(model, Path(src_fold["path"]).parent, Path(tmpd) / folder)
            for f in files:
                fold_files[f"{folder}/{f.name}"] = f
            fold_entries.append({"file": f"{folder}/model.json", "sha256": sha256sum(files[0]),
                                 "extra_files": [{"file": f"{folder}/{files[1].name}", "sha256": sha256sum(files[1])}],
                                 "params": {"test_groups": [held.name]}})
            report.append({"fold": k, "train_groups": [subjects[i].name for i in train_idx], "test_groups": [held.name],
                           **res, "steps": int(hist["epochs_run"]) * len(train_idx) * int(cfg["augment"]["copies"])
                           // int(cfg["train"]["batch_size"]),
                           "seconds_train": round(t_train, 1), "seconds": round(time.perf_counter() - t0, 1)})
            say(f"fold {k}: held-out {held.name} Dice " + ", ".join(f"{c} {v:.3f}" for c, v in res["dice"].items())
                + f" ({time.perf_counter() - t0:.0f}s)")
            del model
        classes = {str(k): str(c["name"]) for k, c in sorted(cfg["protocol"].items(), key=lambda kv: int(kv[0]))}
        cv = {
            "name": cfg["name"], "kind": "meshnet_3d", "split": {"by": "subject", "k": len(subjects)},
            "classes": classes,
            "metric": ("Dice per class on synthesised images of the held-out subject's label map (1 mm grid; "
                       "several random contrasts, the first T1-like), the net run as brain_tissue runs it; "
                       "pretrained_dice: the source net before fine-tuning, its classes mapped to the protocol "
                       "where one source class makes one class (null elsewhere); reference_dice: the reference "
                       "method (CEREBRUM-7T) vs the manual labels in the native grid, from REAL images"),
            "folds": report,
            "summary": {"dice": _summary(report, "dice"), "pretrained_dice": _summary(report, "pretrained_dice"),
                        "reference_dice": _summary(report, "reference_dice")},
            "seconds_total": round(time.perf_counter() - t_start, 1),
        }
        training = {
            "seed": int(cfg["seed"]), "kind": "meshnet_3d",
            "init_from": {"card": src_card.name, "file": src_fold["fold"]["file"], "sha256": src_fold["sha256"]},
            "data": [{"labels": s.path, "subject": s.name, "labels_sha256": sha256sum(s.path),
                      **({"reference": s.reference, "reference_sha256": sha256sum(s.reference)} if s.reference else {})}
                     for s in subjects],
            "epochs": [h["epochs_run"] for h in histories],
            "cv_dice": cv["summary"]["dice"],
            "config": jsonable(cfg), "software": software_versions(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        card = build_card(cfg, src_card, fold_entries, training)
        out = bnd.write_bundle(out_dir, card, fold_files, cv, histories)
    say(f"bundle written to {out} ({time.perf_counter() - t_start:.0f}s)")
    return out
