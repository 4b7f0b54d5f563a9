"""k-fold training of small 2D U-Nets into a model bundle: ``train_bundle(config, out_dir)``.

Config (YAML/dict; every key optional except ``data``; defaults in ``DEFAULTS``)::

    name: sc_csa                 # card name; pipeline: sc_csa; description, labels, outputs
    seed: 42                     # everything (splits, augmentation, weights) derives from it
    threads: 2                   # TF intra-op threads (CPU)
    data: {root: "{shared}/data/spine", items: [{image, mask, subject, contrast}, ...]}
          # or {tsv: pairs.tsv} or {bids: <root>, derivatives: <labels root>, suffixes: [T2w]}
    grid: {inplane_mm: 1.0, crop: [64, 64]}
    label: {type: soft|binary, soft_sigma_mm: 0.5, consensus: false}
          # consensus (soft only, final models only): train on the average of the co-registered
          # masks of all images of the same subject (datasets.consensus_masks)
    split: {by: subject|contrast, k: null (= one fold per group), val_fraction: 0.2,
            models_per_fold: null (= max(1, final.models): each fold trains the ensemble that ships,
            averaged, seeds differ; every model's own Dice is reported too)}
    final: {models: 0}           # n > 0: after cross-validation, train n models on ALL the data
          # (seeds differ); they become the bundle's folds and the CV models only give the report
    synthetic: null              # or {template: "{shared}/data/PAM50", levels: [1, 7], above_mm: 10,
          # fraction: 0.5, shift_px: 8}: that share of every epoch's slices is synthesised from the
          # template's label maps with random contrasts (cohortseg.training.synthetic)
    net: {base_filters: 8, depth: 3, norm: instance|batch|none, dropout: 0.0, bn_momentum: 0.9}
    loss: {name: dice_bce|dice|bce|mse|adaptive_wing, params: {}}
    train: {epochs: 40, batch_size: 16, learning_rate: 0.001, patience: 8, min_epochs: 3,
            monitor: val_dice, slices_per_epoch: null (= number of training slices; larger values
            repeat slices with fresh augmentations), include_empty_slices: true, jit_compile: false,
            lr_schedule: constant|cosine (decay to lr_min_factor x learning_rate at the last epoch),
            val_contrast_copies: 0 (n > 0: the validation set also holds n copies of its slices with
            fixed random contrast changes, so early stopping favours contrast-robust weights)}
    augment: {...}               # cohortseg.training.augment.AugmentConfig fields
    init_from: null              # fine-tune: a bundle folder; fold k starts from its fold k % n
    thresholds: {mask: 0.5}
    postprocess: {tube_filter: false, largest_component: false}  # card + CV evaluation (csa.py)
    tta: {flip_lr: false}        # card + CV evaluation: average with the left-right mirrored prediction

Per fold: the held-out group(s) are the test set; the fold's training groups are split again into
train/validation (``datasets.validation_split``) and training stops early when the validation
Dice has not improved for ``patience`` epochs; the best epoch's weights are kept. Test Dice is
computed on every held-out volume in native space (prediction mapped back with
``slices_to_native``, post-processed as the card says, thresholded at 0.5, against the manual
mask; ``dice_raw`` without post-processing) and in the model grid (``dice_grid``); the
mean CSA of the soft prediction and of the manual mask (``cohortseg.science.csa``) is reported too.

Determinism: ``keras.utils.set_random_seed(seed + fold)`` before each fold's model is built,
``tf.config.experimental.enable_op_determinism()``, and a numpy Generator seeded with
(seed, fold, epoch) for shuffling/augmentation: the same config on the same CPU gives the same
weights.
"""
from __future__ import annotations

import copy
import datetime
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from cohortseg.errors import ConfigError
from cohortseg.io import sha256sum
from cohortseg.training import augment as aug
from cohortseg.training import bundle as bnd
from cohortseg.training import datasets as ds
from cohortseg.training.losses import SOFT_LOSSES, dice_score, get_loss

log = logging.getLogger("cohortseg.training")

DEFAULTS: dict = {
    "name": "model",
    "pipeline": None,
    "seed": 42,
    "threads": 2,
    "grid": {"inplane_mm": 1.0, "crop": [64, 64]},
    "label": {"type": "binary", "soft_sigma_mm": 0.5, "consensus": False},
    "final": {"models": 0},
    "split": {"by": "subject", "k": None, "val_fraction": 0.2, "models_per_fold": None},
    "synthetic": None,
    "net": {"base_filters": 8, "depth": 3, "norm": "instance", "dropout": 0.0},
    "loss": {"name": "dice_bce", "params": {}},
    "train": {"epochs": 40, "batch_size": 16, "learning_rate": 1e-3, "patience": 8, "min_epochs": 3,
              "monitor": "val_dice", "slices_per_epoch": None, "include_empty_slices": True,
              "jit_compile": False, "lr_schedule": "constant", "lr_min_factor": 0.05,
              "val_contrast_copies": 0},
    "augment": {},
    "init_from": None,
    "thresholds": {"mask": 0.5},
    "postprocess": {"tube_filter": False, "largest_component": False},
    "tta": {"flip_lr": False},
    "labels": {1: "SC"},
    "outputs": ["label-SC_probseg", "label-SC_mask"],
}


def merge_config(cfg: dict) -> dict:
    """Defaults deep-merged with ``cfg`` (one level of nesting), checked."""
    out = copy.deepcopy(DEFAULTS)
    for k, v in (cfg or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("labels", "augment"):
            out[k] = {**out[k], **v}
        else:
            out[k] = copy.deepcopy(v)
    if "data" not in out:
        raise ConfigError("training config needs a 'data' section")
    if out["pipeline"] is None:
        out["pipeline"] = out["name"]
    crop = out["grid"]["crop"]
    if isinstance(crop, int):
        crop = [crop, crop]
    out["grid"]["crop"] = [int(c) for c in crop]
    mult = 2 ** int(out["net"]["depth"])
    if any(c % mult for c in out["grid"]["crop"]):
        raise ConfigError(f"grid.crop {crop} must be divisible by 2**depth = {mult}")
    if out["label"]["type"] not in ("binary", "soft"):
        raise ConfigError("label.type must be 'binary' or 'soft'")
    get_loss(out["loss"]["name"])  # raises on unknown names
    if out["train"].get("lr_schedule", "constant") not in ("constant", "cosine"):
        raise ConfigError("train.lr_schedule must be constant or cosine")
    if out["train"]["monitor"] not in ("val_dice", "val_loss"):
        raise ConfigError("train.monitor must be val_dice or val_loss")
    aug.AugmentConfig.from_dict(out["augment"])
    syn = out.get("synthetic")
    if syn is not None:
        from cohortseg.training.synthetic import KEYS

        if not isinstance(syn, dict) or "template" not in syn:
            raise ConfigError("synthetic must be null or a mapping with a 'template' folder")
        unknown = set(syn) - set(KEYS)
        if unknown:
            raise ConfigError(f"unknown synthetic keys: {sorted(unknown)} (known: {list(KEYS)})")
    return out


# ------------------------------------------------------------------------------------ TF setup
_TF_READY = False


def setup_tf(threads: int):
    global _TF_READY
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if not _TF_READY:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(int(threads))
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # runtime already initialised (e.g. several runs in one process)
            pass
        tf.config.experimental.enable_op_determinism()
        _TF_READY = True
    return tf


# --------------------------------------------------------------------------------------- model
def _build(cfg: dict, crop):
    from cohortseg.models.nets.unet2d import build_unet2d

    n = cfg["net"]
    norm = n.get("norm") or ("batch" if n.get("batch_norm") else "instance")
    return build_unet2d(input_channels=1, base_filters=int(n["base_filters"]), depth=int(n["depth"]),
                        norm=str(norm), dropout=float(n.get("dropout", 0.0)),
                        bn_momentum=float(n.get("bn_momentum", 0.9)))


def _init_model(cfg: dict, fold: int):
    """Fresh U-Net, or a fine-tuning start from ``init_from`` (verified bundle) fold ``k % n``."""
    import keras

    src = cfg.get("init_from")
    if not src:
        return _build(cfg, cfg["grid"]["crop"]), None
    src = Path(ds.expand_path(src))
    card = bnd.verify_bundle(src)
    grid = card.get("grid", {})
    if float(grid.get("inplane_mm", -1)) != float(cfg["grid"]["inplane_mm"]):
        raise ConfigError(f"init_from {src}: grid inplane_mm {grid.get('inplane_mm')} differs from "
                          f"the config's {cfg['grid']['inplane_mm']}")
    entry = card["folds"][fold % len(card["folds"])]
    model = keras.models.load_model(str(src / entry["file"]), compile=False)
    return model, {"bundle": str(src), "name": card.get("name"), "file": entry["file"],
                   "sha256": entry.get("sha256")}


def _np(t) -> np.ndarray:
    """Tensor -> numpy (``.numpy()`` where the backend has it: no numpy-2 copy warning)."""
    if hasattr(t, "numpy"):
        return np.asarray(t.numpy())
    from keras import ops

    return np.asarray(ops.convert_to_numpy(t))


def _predict(model, x: np.ndarray, batch_size: int) -> np.ndarray:
    out = []
    for i in range(0, len(x), batch_size):
        out.append(_np(model(x[i:i + batch_size], training=False)))
    return np.concatenate(out) if out else np.zeros(x.shape, np.float32)


def _loss_value(loss_fn, y: np.ndarray, p: np.ndarray) -> float:
    from keras import ops

    return float(np.mean(_np(loss_fn(ops.convert_to_tensor(y), ops.convert_to_tensor(p)))))


# ------------------------------------------------------------------------------------ training
def train_fold(cfg: dict, fold: int, volumes, tr_sel, va_sel, progress=None, synth=None, member: int = 0):
    """Train one fold; returns (model with the best weights, history dict, init provenance).

    ``synth``: a :class:`synthetic.TemplateSlices`; each epoch, its ``fraction`` of the slices are
    fresh synthetic ones (drawn from the epoch's generator, then augmented like the real ones).
    ``member``: the index of this model in the fold's ensemble (a different seed)."""
    import keras

    seed = int(cfg["seed"])
    tcfg = cfg["train"]
    keras.utils.set_random_seed(seed + fold + 1000 * member)
    model, init = _init_model(cfg, fold)
    loss_fn = get_loss(cfg["loss"]["name"], **(cfg["loss"].get("params") or {}))
    model.compile(optimizer=keras.optimizers.Adam(float(tcfg["learning_rate"])), loss=loss_fn,
                  jit_compile=bool(tcfg.get("jit_compile", False)))
    x_tr, y_tr = ds.stack(volumes, tr_sel)
    x_va, y_va = ds.stack(volumes, va_sel) if va_sel else (None, None)
    n_va_copies = int(tcfg.get("val_contrast_copies", 0))
    if x_va is not None and n_va_copies > 0:
        # model selection under contrast change: the validation slices plus fixed copies with
        # intensity-only augmentation (inversion, look-up tables, label intensity), seeded once
        full = aug.AugmentConfig.from_dict(cfg["augment"])
        icfg = aug.AugmentConfig(**{**aug.AugmentConfig.none().__dict__, "p_invert": 0.5, "p_lut": 1.0,
                                    "lut_points": full.lut_points,
                                    "p_label_intensity": full.p_label_intensity,
                                    "label_intensity": full.label_intensity})
        vrng = np.random.default_rng([seed, fold, 999_999])
        xs, ys = [x_va], [y_va]
        for _ in range(n_va_copies):
            xc, yc = aug.augment_batch(x_va, y_va, vrng, icfg, binary_label=cfg["label"]["type"] == "binary")
            xs.append(xc)
            ys.append(yc)
        x_va, y_va = np.concatenate(xs), np.concatenate(ys)
    if not tcfg.get("include_empty_slices", True):
        keep = y_tr.reshape(len(y_tr), -1).max(axis=1) > 0
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    acfg = aug.AugmentConfig.from_dict(cfg["augment"])
    binary = cfg["label"]["type"] == "binary"
    bs = int(tcfg["batch_size"])
    hist = {"loss": [], "val_loss": [], "val_dice": [], "seconds": []}
    best, best_w, best_epoch, wait = None, model.get_weights(), 0, 0
    maximise = tcfg["monitor"] == "val_dice"
    lr0 = float(tcfg["learning_rate"])
    n_epochs = int(tcfg["epochs"])
    for epoch in range(n_epochs):
        t0 = time.perf_counter()
        if tcfg.get("lr_schedule", "constant") == "cosine":
            lr_min = lr0 * float(tcfg.get("lr_min_factor", 0.05))
            lr = lr_min + 0.5 * (lr0 - lr_min) * (1 + np.cos(np.pi * epoch / max(1, n_epochs - 1)))
            model.optimizer.learning_rate.assign(lr)
        rng = np.random.default_rng([seed, fold, epoch] + ([member] if member else []))
        n_ep = int(tcfg.get("slices_per_epoch") or len(x_tr))
        n_syn = int(round(synth.fraction * n_ep)) if synth is not None else 0
        n_real = n_ep - n_syn
        reps = -(-n_real // len(x_tr))
        order = np.concatenate([rng.permutation(len(x_tr)) for _ in range(reps)])[:n_real]
        xe, ye = x_tr[order], y_tr[order]
        if n_syn:
            xs, ys = synth.sample(rng, n_syn, xe.shape[1:3])
            if binary:
                ys = (ys > 0.5).astype(np.float32)
            mix = rng.permutation(n_ep)
            xe = np.concatenate([xe, xs[..., None]])[mix]
            ye = np.concatenate([ye, ys[..., None]])[mix]
        xa, ya = aug.augment_batch(xe, ye, rng, acfg, binary_label=binary)
        losses = []
        for b0 in range(0, n_ep, bs):
            out = model.train_on_batch(xa[b0:b0 + bs], ya[b0:b0 + bs])
            losses.append((float(_np(out[0] if isinstance(out, (list, tuple)) else out)),
                           len(xa[b0:b0 + bs])))
        hist["loss"].append(float(sum(v * n for v, n in losses) / sum(n for _, n in losses)))
        hist.setdefault("lr", []).append(float(_np(model.optimizer.learning_rate)))
        if x_va is not None:
            p = _predict(model, x_va, 4 * bs)
            hist["val_loss"].append(_loss_value(loss_fn, y_va, p))
            hist["val_dice"].append(dice_score(y_va, p))
            score = hist["val_dice"][-1] if maximise else -hist["val_loss"][-1]
        else:
            score = -hist["loss"][-1]
        hist["seconds"].append(round(time.perf_counter() - t0, 3))
        if best is None or score > best + 1e-4:
            best, best_w, best_epoch, wait = score, model.get_weights(), epoch + 1, 0
        else:
            wait += 1
        if progress:
            progress(f"fold {fold} epoch {epoch + 1}: loss {hist['loss'][-1]:.4f}"
                     + (f" val_loss {hist['val_loss'][-1]:.4f} val_dice {hist['val_dice'][-1]:.3f}"
                        if hist["val_dice"] else "") + f" ({hist['seconds'][-1]:.1f}s)")
        if wait >= int(tcfg["patience"]) and epoch + 1 >= int(tcfg.get("min_epochs", 1)):
            break
    model.set_weights(best_w)
    hist["best_epoch"] = best_epoch
    hist["epochs_run"] = len(hist["loss"])
    return model, hist, init


def si_range(paths) -> tuple[float, float]:
    """Lowest and highest world S-I coordinate (mm) of the voxel centres of some images."""
    import nibabel as nib

    lo, hi = np.inf, -np.inf
    for path in paths:
        img = nib.load(path)
        corners = np.array(np.meshgrid(*[[0, n - 1] for n in img.shape[:3]], indexing="ij")).reshape(3, -1).T
        z = nib.affines.apply_affine(img.affine, corners)[:, 2]
        lo, hi = min(lo, float(z.min())), max(hi, float(z.max()))
    return lo, hi


def evaluate_volume(model, vol: ds.Volume, cfg: dict, batch_size: int = 32, trained_si=None) -> dict:
    """Held-out metrics of one volume: native/grid Dice, mean CSA of prediction vs manual.

    ``model``: one model or a list, whose predictions are averaged as inference averages folds.

    ``trained_si`` (lo, hi): the S-I extent (world mm) of the training images; the Dice is then also
    given over the held-out slices inside it (``dice_in_trained_si``), which separates a contrast
    change from anatomy no training image covered (e.g. C1-C2 above a lower-cervical scan)."""
    import nibabel as nib

    from cohortseg.science import csa
    from cohortseg.science.resampling import slices_to_native

    thr = float(cfg["thresholds"].get("mask", 0.5))
    from cohortseg.models.ensemble import fold_average

    mirror = 1 if (cfg.get("tta") or {}).get("flip_lr") else None  # axis 1 of the slice stack: Left
    models = model if isinstance(model, (list, tuple)) else [model]
    prob = fold_average([lambda b, m=m: _predict(m, b, batch_size) for m in models], vol.x[..., None],
                        batch_size, mirror)[..., 0]
    prob = np.where(vol.valid[:, None, None], prob, 0.0)
    res = {"subject": vol.pair.subject, "contrast": vol.pair.contrast,
           "image": os.path.basename(vol.pair.image),
           "dice_grid": round(dice_score(vol.y_bin, prob, thr), 4)}
    msk = nib.load(vol.pair.mask)
    manual = np.asarray(msk.dataobj, dtype=np.float64)
    if manual.ndim == 4:
        manual = manual[..., 0]
    prob_native = slices_to_native(prob.astype(np.float32), vol.grid, order=1)
    res["dice_raw"] = round(dice_score(manual > 0.5, prob_native, thr), 4)
    pp = cfg.get("postprocess") or {}
    if pp.get("tube_filter"):
        prob_native = csa.tube_filter(prob_native, msk.affine, thr)
    if pp.get("largest_component"):
        prob_native = csa.largest_component(prob_native, thr)
    res["dice"] = round(dice_score(manual > 0.5, prob_native, thr), 4)
    if trained_si is not None:
        from cohortseg.science.resampling import through_plane_axis

        t = through_plane_axis(msk.affine)
        idx = np.zeros((3, manual.shape[t]))
        idx[t] = np.arange(manual.shape[t])
        z = nib.affines.apply_affine(msk.affine, idx.T)[:, 2]
        inside = np.nonzero((z >= trained_si[0] - 0.5) & (z <= trained_si[1] + 0.5))[0]
        res["trained_si_mm"] = [round(float(v), 1) for v in trained_si]
        res["n_slices_in_trained_si"] = int(len(inside))
        res["n_slices"] = int(manual.shape[t])
        if len(inside):
            res["dice_in_trained_si"] = round(dice_score(np.take(manual, inside, axis=t) > 0.5,
                                                         np.take(prob_native, inside, axis=t), thr), 4)
    try:
        a_pred = csa.csa_per_slice(np.clip(prob_native, 0, 1), msk.affine)
        a_man = csa.csa_per_slice(manual > 0.5, msk.affine)
        both = a_pred.merge(a_man, on="Slice (I->S)", suffixes=("_pred", "_manual")).dropna(
            subset=["MEAN(area)_pred", "MEAN(area)_manual"])
        res["csa_mean_pred_mm2"] = round(float(both["MEAN(area)_pred"].mean()), 3)
        res["csa_mean_manual_mm2"] = round(float(both["MEAN(area)_manual"].mean()), 3)
        res["n_slices_compared"] = int(len(both))
        if vol.pair.levels:
            lv_img = nib.load(vol.pair.levels)
            levels = csa.vertebral_levels(np.asarray(lv_img.dataobj), lv_img.affine,
                                          kind=vol.pair.levels_kind or "auto")
            per = {}
            for tag, m in (("pred", np.clip(prob_native, 0, 1)), ("manual", manual > 0.5)):
                t = csa.csa_per_level(csa.csa_per_slice(m, msk.affine, levels=levels))
                per[tag] = {int(r["VertLevel"]): round(float(r["MEAN(area)"]), 3) for _, r in t.iterrows()}
            res["csa_per_level_mm2"] = {str(lv): {"pred": per["pred"].get(lv), "manual": per["manual"].get(lv)}
                                        for lv in sorted(set(per["pred"]) | set(per["manual"]))}
    except Exception as e:  # noqa: BLE001 - a failed CSA must not lose the Dice
        res["csa_error"] = str(e)
    return res


def software_versions() -> dict:
    import keras
    import tensorflow as tf

    from cohortseg import __version__ as cs_version

    return {"cohortseg": cs_version, "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": np.__version__, "python": platform.python_version(),
            "machine": platform.machine()}


class _Shipper:
    """Collects the bundle's fold files: each shipped model saved under the next ``fold_<k>.keras``."""

    def __init__(self, cfg: dict, tmpd):
        self.cfg, self.tmpd = cfg, Path(tmpd)
        self.entries: list[dict] = []
        self.files: dict[str, Path] = {}

    def ship(self, model, init, params: dict) -> str:
        fname = bnd.fold_filename(len(self.entries))
        path = self.tmpd / fname
        build = None if init else (lambda: _build(self.cfg, self.cfg["grid"]["crop"]))
        digest = bnd.save_fold_model(model, path, build_fn=build)
        self.files[fname] = path
        self.entries.append({"file": fname, "sha256": digest, "params": params})
        return fname


def _load_data(cfg: dict, say):
    """(pairs, preprocessed volumes, synthetic template slices or None)."""
    pairs = ds.pairs_from_config(cfg["data"])
    if cfg["label"]["type"] == "soft" and cfg["loss"]["name"] not in SOFT_LOSSES:
        say(f"note: soft labels with loss {cfg['loss']['name']} (regression losses: {sorted(SOFT_LOSSES)})")
    g = cfg["grid"]
    volumes = [ds.load_volume(p, float(g["inplane_mm"]), g["crop"], cfg["label"]["type"],
                              float(cfg["label"].get("soft_sigma_mm", 0.5))) for p in pairs]
    synth = None
    if cfg.get("synthetic"):
        from cohortseg.training.synthetic import load_template

        synth = load_template(cfg["synthetic"], float(g["inplane_mm"]))
        say(f"synthetic slices: {synth.n} template slices from {synth.source}, "
            f"{synth.fraction:.0%} of every epoch")
    return pairs, volumes, synth


def _cross_validate(cfg: dict, pairs, volumes, synth, folds, n_members: int, shipper, histories: list, say) -> list:
    """Train and evaluate every CV fold (its ensemble of ``n_members`` models); CV models ship when
    there are no final models. Returns the report's ``folds``."""
    by = cfg["split"]["by"]
    keys = ds.group_keys(pairs, by)
    ship_cv = not int((cfg.get("final") or {}).get("models") or 0)
    report = []
    for k, (tr_idx, te_idx) in enumerate(folds):
        tr_sel, va_sel = ds.validation_split(tr_idx, pairs, volumes, float(cfg["split"].get("val_fraction", 0.2)), by,
                                             seed=int(cfg["seed"]) + 1000 + k)
        test_groups = sorted({keys[i] for i in te_idx})
        say(f"fold {k}: train {sorted({keys[i] for i in tr_idx})} -> test {test_groups} "
            f"({sum(len(s) for _, s in tr_sel)} train / {sum(len(s) for _, s in va_sel)} val slices"
            f", {n_members} model(s))")
        t0 = time.perf_counter()
        trained_si = si_range([pairs[i].image for i in tr_idx])
        models, members = [], []
        for j in range(n_members):
            model, hist, init = train_fold(cfg, k, volumes, tr_sel, va_sel, progress=say, synth=synth, member=j)
            hist["title"] = f"CV fold {k}" + (f" model {j}" if n_members > 1 else "") + f" (test: {','.join(test_groups)})"
            histories.append(hist)
            models.append(model)
            members.append({"best_epoch": hist["best_epoch"], "epochs_run": hist["epochs_run"],
                            "best_val_dice": max(hist["val_dice"]) if hist["val_dice"] else None})
            if n_members > 1:
                members[-1]["dice"] = [evaluate_volume(model, volumes[i], cfg)["dice"] for i in te_idx]
            if ship_cv:  # with final models, the CV models are not shipped
                members[-1]["file"] = shipper.ship(model, init, {"test_groups": test_groups,
                                                                 "best_epoch": hist["best_epoch"]})
        held = [evaluate_volume(models, volumes[i], cfg, trained_si=trained_si) for i in te_idx]
        report.append({
            "fold": k, "models": n_members, "members": members,
            "train_groups": sorted({keys[i] for i in tr_idx}), "test_groups": test_groups,
            "n_train_slices": int(sum(len(s) for _, s in tr_sel)),
            "n_val_slices": int(sum(len(s) for _, s in va_sel)),
            "dice": round(float(np.mean([h["dice"] for h in held])), 4), "held_out": held,
            "seconds": round(time.perf_counter() - t0, 1),
            **({"init_from": init} if init else {}),
        })
        say(f"fold {k}: held-out Dice " + ", ".join(f"{h['contrast'] or h['subject']} {h['dice']:.3f}" for h in held)
            + (f" (ensemble of {n_members})" if n_members > 1 else ""))
        del models, model
    return report


def _train_final(cfg: dict, pairs, volumes, synth, n_folds: int, shipper, histories: list, say) -> list:
    """The shipped models (``final.models``): all the data, consensus labels if asked; in-sample figures."""
    g, by = cfg["grid"], cfg["split"]["by"]
    soft = cfg["label"]["type"] == "soft"
    targets = ds.consensus_masks(pairs) if cfg["label"].get("consensus") and soft else {}
    fvols = ([ds.load_volume(p, float(g["inplane_mm"]), g["crop"], "soft", float(cfg["label"].get("soft_sigma_mm", 0.5)),
                             target=targets.get(i)) for i, p in enumerate(pairs)] if targets else volumes)
    every = list(range(len(pairs)))
    out = []
    for j in range(int((cfg.get("final") or {}).get("models") or 0)):
        tr_sel, va_sel = ds.validation_split(every, pairs, fvols, float(cfg["split"].get("val_fraction", 0.2)),
                                             by, seed=int(cfg["seed"]) + 2000 + j)
        say(f"final model {j}: all data ({sum(len(s) for _, s in tr_sel)} train / "
            f"{sum(len(s) for _, s in va_sel)} val slices, consensus labels: {bool(targets)})")
        model, hist, init = train_fold(cfg, n_folds + j, fvols, tr_sel, va_sel, progress=say, synth=synth)
        fname = shipper.ship(model, init, {"trained_on": "all", "best_epoch": hist["best_epoch"]})
        hist["title"] = f"final model {j} (all data; shipped as {fname})"
        out.append({"model": j, "file": fname, "best_epoch": hist["best_epoch"], "epochs_run": hist["epochs_run"],
                    "consensus_labels": bool(targets), "in_sample": [evaluate_volume(model, fvols[i], cfg) for i in every]})
        histories.append(hist)
        del model
    return out


def _cv_report(cfg: dict, report_folds: list, final_report: list, synth) -> dict:
    """``cv_report.json`` (without ``seconds_total``)."""
    by = cfg["split"]["by"]
    all_held = [h for f in report_folds for h in f["held_out"]]
    cv = {
        "name": cfg["name"], "split": {"by": by, "k": len(report_folds)},
        "metric": "Dice of the held-out prediction (>0.5, mapped back to native space) vs the manual mask",
        "folds": report_folds,
        "summary": {
            "dice_mean": round(float(np.mean([h["dice"] for h in all_held])), 4),
            "dice_std": round(float(np.std([h["dice"] for h in all_held])), 4),
            "dice_per_fold": [f["dice"] for f in report_folds],
            "dice_by_contrast": _mean_by(all_held, "contrast"),
            "dice_by_subject": _mean_by(all_held, "subject"),
        },
    }
    if synth is not None:
        cv["synthetic"] = {"template": synth.source, "template_slices": synth.n,
                           "fraction": synth.fraction, "levels": list(cfg["synthetic"].get("levels", [1, 7])),
                           "note": "every training run (CV folds and final models) mixed these synthetic "
                                   "slices in; they come from the template, never from a held-out image"}
    if final_report:
        cv["final_models"] = {
            "note": "the bundle's folds: trained on all the data after cross-validation; their figures are "
                    "in-sample (the CV folds above are the out-of-sample estimate and are not shipped)",
            "models": final_report}
    if by == "contrast":
        cv["leave_one_contrast_out"] = {
            f["test_groups"][0] if len(f["test_groups"]) == 1 else ",".join(f["test_groups"]):
                {"trained_on": f["train_groups"], "dice": f["dice"],
                 "dice_in_trained_si": round(float(np.mean([h.get("dice_in_trained_si", np.nan)
                                                            for h in f["held_out"]])), 4)}
            for f in report_folds}
    return cv


def _provenance(cfg: dict, pairs, synth, histories: list, cv: dict) -> dict:
    """The card's ``training`` section."""
    return {
        "seed": int(cfg["seed"]),
        "data": [{"image": p.image, "mask": p.mask, "subject": p.subject, "contrast": p.contrast,
                  "image_sha256": sha256sum(p.image), "mask_sha256": sha256sum(p.mask)} for p in pairs],
        "split": cfg["split"], "label": cfg["label"], "loss": cfg["loss"],
        **({"synthetic": {"template": synth.source,
                          "files_sha256": {Path(f).name: sha256sum(f) for f in synth.files}}}
           if synth is not None else {}),
        "epochs": [h["epochs_run"] for h in histories],
        "best_epochs": [h["best_epoch"] for h in histories],
        "cv_dice_mean": cv["summary"]["dice_mean"],
        "config": jsonable(cfg),
        "software": software_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def train_bundle(config: dict, out_dir, progress=None) -> Path:
    """Train one model per fold and write a model bundle to ``out_dir``; returns its path.

    ``progress``: optional callable receiving one-line status messages (default: logging).
    Steps: load the data, cross-validate (:func:`_cross_validate`), train the final models
    (:func:`_train_final`), then the report, the provenance and the bundle.
    """
    t_start = time.perf_counter()
    cfg = merge_config(config)
    say = progress or log.info
    setup_tf(int(cfg["threads"]))
    pairs, volumes, synth = _load_data(cfg, say)
    folds = ds.kfold_splits(pairs, cfg["split"].get("k"), by=cfg["split"]["by"], seed=int(cfg["seed"]))
    # each CV fold trains the ensemble that ships (final.models models, averaged), so the CV figures
    # estimate the shipped recipe rather than one seed's luck; split.models_per_fold overrides
    n_members = int(cfg["split"].get("models_per_fold") or max(1, int((cfg.get("final") or {}).get("models") or 0)))
    histories: list = []
    with tempfile.TemporaryDirectory(prefix="cohortseg-train-") as tmpd:
        shipper = _Shipper(cfg, tmpd)
        report_folds = _cross_validate(cfg, pairs, volumes, synth, folds, n_members, shipper, histories, say)
        final_report = _train_final(cfg, pairs, volumes, synth, len(folds), shipper, histories, say)
        cv = _cv_report(cfg, report_folds, final_report, synth)
        cv["seconds_total"] = round(time.perf_counter() - t_start, 1)
        training = _provenance(cfg, pairs, synth, histories, cv)
        cfg_for_card = copy.deepcopy(cfg)
        if not cfg.get("init_from"):
            cfg_for_card["net"]["n_params"] = int(_build(cfg, cfg["grid"]["crop"]).count_params())
        card = bnd.build_card(cfg_for_card, shipper.entries, training, [p.contrast for p in pairs])
        out = bnd.write_bundle(out_dir, card, shipper.files, cv, histories)
    say(f"bundle written to {out} (CV Dice {cv['summary']['dice_mean']:.3f}, "
        f"{time.perf_counter() - t_start:.0f}s)")
    return out


def _mean_by(rows, key):
    groups = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r["dice"])
    return {k: round(float(np.mean(v)), 4) for k, v in sorted(groups.items())}


def jsonable(o):
    if isinstance(o, dict):
        return {str(k): jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    if isinstance(o, (np.generic,)):
        return o.item()
    return o
