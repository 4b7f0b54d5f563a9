"""Science of the ``brain_tissue`` pipeline: brainchop MeshNets on a FreeSurfer-conformed T1.

Steps (all in the conformed 256^3 1 mm LIA grid, see ``cohortseg.science.conform``):

1. ``normalize``: min-max to [0, 1] or 5th-95th percentile scaling (brainchop's ``enableQuantileNorm``),
   computed over the whole conformed volume, as brainchop does.
2. ``crop_box``: bounding box of the head (normalised intensity > ``threshold`` x max) or of a given
   mask, plus ``padding`` zero voxels; MeshNets are fully convolutional with no down-sampling, so
   any crop size works (``multiple`` rounds it up for nets that need it).
3. ``run_meshnet``: the net on the crop (channels-last, axes in nibabel order = brainchop's
   transposed tensor), softmax, back into the 256^3 grid (outside the crop: background). Chain
   models run layer by layer to bound memory.
4. ``argmax`` -> label maps; ``largest_component`` / ``keep_largest_foreground`` clean-up.
5. ``tissue_volumes`` (mL per label), ``estimate_etiv`` (atlas-scaling eTIV).

Which model gives what (``MESHNETS``), checked on the nilearn MNI152 2009 template (Dice against its
GM/WM maps > 0.5, in the template grid) and on brainchop's t1_crop:

* brain mask: ``mindgrab`` (min-max; brainchop's web list says quantile, but the instance norm
  after its first, bias-free conv cancels any linear intensity scaling; its convs carry a
  name-encoded instance norm, see ``cohortseg.models.nets.tfjs``): Dice 0.965 with the template's
  intracranial mask; 1643 mL on t1_crop (brain + CSF, i.e. a segmented ICV). Without the
  instance norm it returns 6 L of "brain".
* GM/WM: ``model5_gw_ae`` (min-max, then white-matter-anchored gain, ``wm_gain``):
  GM 0.81 / WM 0.88 (plain brainchop recipe, trilinear conform: 0.80 / 0.81). Alternatives, plain
  recipe: model11_gw_ae GM 0.66 / WM 0.79 (min-max; 0.65 / 0.79 quantile); model20chan3cls
  GM 0.75 / WM 0.84 (min-max), 0.74 / 0.76 with its documented 5-95 % quantile scaling, and it
  collapses (Dice ~0) when the input gain changes by 20 %, so it is not used.
* 18 subcortical/tissue labels incl. lateral ventricles: ``model30chan18cls`` (min-max, plain
  recipe; gain-insensitive): GM(all grey classes) 0.80 / WM 0.87 on MNI152. ``model21_104class``
  loads but is not part of the pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import nibabel as nib
import numpy as np
from scipy import ndimage

from cohortseg.errors import InputError, ModelError
from cohortseg.science.metrics import largest_component


# ------------------------------------------------------------------------------- model registry
@dataclass(frozen=True)
class MeshNetSpec:
    """How to run one brainchop MeshNet (facts from brainchop's model list, verified here)."""

    name: str
    role: str  # 'brain_mask' | 'tissue' | 'aseg' | 'aparc_aseg'
    labels: tuple[str, ...]
    norm: str = "minmax"  # 'minmax' | 'quantile'
    crop_padding: int = 18
    crop_threshold: float = 0.0  # brainchop autoThreshold (fraction of max of the normalised image)
    note: str = ""


#: Tissue classes of the GW models (brainchop colormap3.json order).
GW_LABELS = ("background", "White Matter", "Grey Matter")

#: model30chan18cls classes (brainchop colormap.json order).
ASEG18_LABELS = (
    "Unknown", "Cerebral-White-Matter", "Cerebral-Cortex", "Lateral-Ventricle",
    "Inferior-Lateral-Ventricle", "Cerebellum-White-Matter", "Cerebellum-Cortex", "Thalamus",
    "Caudate", "Putamen", "Pallidum", "3rd-Ventricle", "4th-Ventricle", "Brain-Stem", "Hippocampus",
    "Amygdala", "Accumbens-area", "VentralDC",
)

MESHNETS: dict[str, MeshNetSpec] = {
    "mindgrab": MeshNetSpec("mindgrab", "brain_mask", ("background", "brain"), norm="minmax",
                            crop_padding=20, crop_threshold=0.0,
                            note="skull strip; per-channel instance norm after every conv (name-encoded)"),
    "model5_gw_ae": MeshNetSpec("model5_gw_ae", "tissue", GW_LABELS, norm="minmax", crop_padding=18),
    "model11_gw_ae": MeshNetSpec("model11_gw_ae", "tissue", GW_LABELS, norm="minmax", crop_padding=18),
    "model20chan3cls": MeshNetSpec("model20chan3cls", "tissue", GW_LABELS, norm="quantile",
                                   crop_padding=18, crop_threshold=0.2),
    "model30chan18cls": MeshNetSpec("model30chan18cls", "aseg", ASEG18_LABELS, norm="minmax",
                                    crop_padding=18, crop_threshold=0.2),
}


def meshnet_spec(card):
    """The :class:`MeshNetSpec` of a card: ``architecture.params.meshnet`` names one of
    :data:`MESHNETS` (params ``norm``, ``crop_padding``, ``crop_threshold`` override it);
    an unknown MeshNet gets a spec from the card itself (task, labels, normalisation.method)."""
    params = dict(card["architecture"].get("params") or {})
    name = params.pop("meshnet", None)
    if name is None:
        files = " ".join(f["file"] for f in card.folds)
        name = next((k for k in MESHNETS if f"/{k}/" in files or k == card.name), None)
    over = {k: params[k] for k in ("norm", "crop_padding", "crop_threshold") if k in params}
    if name in MESHNETS:
        return replace(MESHNETS[name], **over)
    labels = card.get("labels")
    if not card.get("task") or not labels:
        raise ModelError(f"model '{card.name}': unknown MeshNet {name!r} (known: {', '.join(MESHNETS)}); "
                         "give architecture.params.meshnet, or task + labels + normalisation.method")
    names = tuple(str(labels[k]) for k in sorted(labels, key=int))
    return MeshNetSpec(card.name, card["task"], names, norm=over.get("norm", card["normalisation"]["method"]),
                       crop_padding=int(over.get("crop_padding", 18)),
                       crop_threshold=float(over.get("crop_threshold", 0.0)))


# ------------------------------------------------------------------------------- preprocessing
def normalize(vol: np.ndarray, method: str = "minmax", quantiles=(0.05, 0.95)) -> np.ndarray:
    """Intensity normalisation of a whole conformed volume (float32).

    'minmax': (x - min) / (max - min) -> [0, 1].
    'quantile': (x - q_lo) / (q_hi - q_lo) with the 5th/95th percentiles of *all* voxels (brainchop's
    enableQuantileNorm; values are not clipped, so the brightest voxels exceed 1).
    """
    v = np.asarray(vol, dtype=np.float32)
    if method == "minmax":
        lo, hi = float(v.min()), float(v.max())
    elif method == "quantile":
        lo, hi = (float(x) for x in np.quantile(v, quantiles))
    else:
        raise ValueError(f"unknown normalisation {method!r}")
    if not hi > lo:
        raise InputError("image has no contrast (constant after conform)")
    return ((v - lo) / (hi - lo)).astype(np.float32)


def crop_box(vol: np.ndarray, threshold: float = 0.0, padding: int = 18, multiple: int = 1,
             mask: np.ndarray | None = None) -> tuple[slice, ...]:
    """Bounding box (tuple of slices, clipped to the volume) of ``mask`` or of ``vol > threshold *
    max(vol)``, grown by ``padding`` voxels per side and rounded up to a ``multiple`` of voxels."""
    sel = np.asarray(mask, dtype=bool) if mask is not None else vol > threshold * float(np.max(vol))
    if not sel.any():
        raise InputError("nothing to segment: the image (or mask) is empty after thresholding")
    out = []
    for ax in range(sel.ndim):
        other = tuple(a for a in range(sel.ndim) if a != ax)
        idx = np.flatnonzero(sel.any(axis=other))
        lo, hi = int(idx[0]) - padding, int(idx[-1]) + 1 + padding
        size = hi - lo
        if multiple > 1 and size % multiple:
            grow = multiple - size % multiple
            lo -= grow // 2
            hi += grow - grow // 2
        out.append(slice(max(lo, 0), min(hi, sel.shape[ax])))
    return tuple(out)


def softmax(logits: np.ndarray, axis: int = -1, inplace: bool = False) -> np.ndarray:
    """Softmax over ``axis`` (in place on a float array when ``inplace``)."""
    z = logits if inplace else np.array(logits, dtype=np.float32)
    z -= z.max(axis=axis, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=axis, keepdims=True)
    return z


def _chain_layers(model):
    """The layers of a single-input, single-output chain model in order, or None if it branches."""
    import keras

    layers = [lay for lay in model.layers if not isinstance(lay, keras.layers.InputLayer)]
    if len(model.inputs) != 1 or len(model.outputs) != 1 or not layers:
        return None
    prev = model.inputs[0]
    try:
        for lay in layers:
            if lay.input is not prev:
                return None
            prev = lay.output
    except (AttributeError, ValueError):  # layer used several times / no single input
        return None
    return layers if prev is model.outputs[0] else None


def _predict(model, x: np.ndarray) -> np.ndarray:
    """One forward pass (batch of 1), numpy in and out.

    Chain models (every MeshNet) run layer by layer so only two activations are alive at a time
    (calling a functional model keeps every intermediate until the end: ~77 x 0.5 GB for mindgrab
    on a head crop), each layer by :func:`_run_layer` (dilated convolutions direct, instance norm +
    GELU fused); anything else runs as a whole.
    """
    import tensorflow as tf

    arr = x[None, ..., None] if x.ndim == 3 else x[None]
    try:
        layers = _chain_layers(model)
        y = tf.convert_to_tensor(arr, dtype=tf.float32)
        if layers is None:
            y = model(y, training=False)
        else:
            i = 0
            while i < len(layers):
                nxt = layers[i + 1] if i + 1 < len(layers) else None
                y, used = _run_layer(layers[i], y, nxt)
                i += used
        return np.asarray(y)[0]
    except Exception as e:  # noqa: BLE001 - OOM / shape problems are model-side failures
        raise ModelError(f"MeshNet inference failed on input {arr.shape}: {e}") from e


#: whether TensorFlow's Conv3D op takes dilations on this machine (it does on a GPU and on a CPU with
#: oneDNN, ``inference.onednn``); None = not tried yet
_DIRECT_DILATED_CONV: list = [None]


def _run_layer(lay, y, nxt=None):
    """(output, layers consumed) of one layer of a chain model, the same numbers as ``lay(y)``
    (up to float rounding) but faster on a CPU:

    * a ``Conv3D`` runs as TensorFlow's ``Conv3D`` op with its dilation (oneDNN runs dilated 3D
      convolutions directly; Keras goes through space_to_batch, 1.5-2x slower); where the op refuses
      dilations (a CPU without oneDNN) the Keras layer runs;
    * a parameter-free instance norm (``GroupNormalization`` with one group per channel, mindgrab's)
      followed by a GELU ``Activation``: moments as Keras computes them, then normalisation and GELU in
      one XLA-fused pass (2 layers consumed; Keras makes ~10 passes over the activation).
    """
    import keras
    import tensorflow as tf

    if (isinstance(lay, keras.layers.Conv3D) and _DIRECT_DILATED_CONV[0] is not False
            and tuple(lay.strides) == (1, 1, 1) and getattr(lay, "groups", 1) == 1
            and lay.data_format == "channels_last" and lay.padding in ("same", "valid")):
        try:
            z = tf.raw_ops.Conv3D(input=y, filter=lay.kernel, strides=[1] * 5, padding=lay.padding.upper(),
                                  dilations=[1, *lay.dilation_rate, 1])
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError):
            _DIRECT_DILATED_CONV[0] = False
        else:
            if lay.use_bias:
                z = tf.nn.bias_add(z, lay.bias)
            return (lay.activation(z) if lay.activation is not None else z), 1
    if (isinstance(lay, keras.layers.GroupNormalization) and lay.groups == int(y.shape[-1]) and not lay.center
            and not lay.scale and isinstance(nxt, keras.layers.Activation)
            and getattr(nxt.activation, "__name__", "") == "gelu"):
        mean, var = tf.nn.moments(y, axes=list(range(1, len(y.shape) - 1)), keepdims=True)
        return _norm_gelu(y, mean, tf.math.rsqrt(var + lay.epsilon)), 2
    return lay(y, training=False), 1


def _norm_gelu(y, mean, inv):
    """GELU((y - mean) * inv) (exact, erf form), XLA-compiled: one pass over the activation."""
    import tensorflow as tf

    global _NORM_GELU
    if _NORM_GELU is None:
        @tf.function(jit_compile=True, reduce_retracing=True)
        def f(a, m, s):
            z = (a - m) * s
            return 0.5 * z * (1.0 + tf.math.erf(z * 0.7071067811865476))

        _NORM_GELU = f
    return _NORM_GELU(y, mean, inv)


_NORM_GELU = None


def run_meshnet_crop(model, conformed, norm: str = "minmax", crop: bool = True, padding: int = 18,
                     threshold: float = 0.0, mask: np.ndarray | None = None, multiple: int = 1,
                     gain: float = 1.0) -> tuple[tuple[slice, ...], np.ndarray]:
    """Like ``run_meshnet`` but returns (box, softmax of the box only): no full-grid copy."""
    vol = np.asarray(conformed.dataobj if hasattr(conformed, "dataobj") else conformed)
    if vol.ndim != 3:
        raise InputError(f"expected a 3D conformed volume, got {vol.shape}")
    x = normalize(vol, norm)
    if gain != 1.0:
        x *= np.float32(gain)
    if crop:
        box = crop_box(x, threshold=threshold, padding=0, mask=mask)
        sub = np.pad(x[box], [(padding, padding)] * 3, mode="constant", constant_values=0.0)
        del x
        if multiple > 1:
            sub = np.pad(sub, [(0, (-s) % multiple) for s in sub.shape], mode="constant")
        logits = _predict(model, sub)
        del sub
        logits = logits[tuple(slice(padding, padding + (b.stop - b.start)) for b in box)]
    else:
        box = tuple(slice(0, s) for s in x.shape)
        logits = _predict(model, x)
    return box, softmax(np.array(logits, dtype=np.float32), inplace=True)


def run_meshnet(model, conformed, norm: str = "minmax", crop: bool = True, padding: int = 18,
                threshold: float = 0.0, mask: np.ndarray | None = None, multiple: int = 1,
                gain: float = 1.0, dtype=np.float32) -> np.ndarray:
    """Run a MeshNet on a conformed volume; returns softmax probabilities (X, Y, Z, C) on the full grid.

    conformed: 3D array (or nibabel image) in the conformed grid (uint8 0-255 from ``conform``).
    norm: 'minmax' | 'quantile' (see ``normalize``) applied to the whole volume before cropping.
    crop: run on ``crop_box`` (head bounding box at ``threshold``, or of ``mask``) plus ``padding``
    zero voxels (brainchop's cropPadding); outside the crop the probabilities are background (1, 0...).
    gain: multiplies the normalised input (intensity standardisation, see ``wm_gain``).
    dtype: of the returned probabilities (float16 halves the memory of many-class nets).
    """
    shape = np.shape(conformed.dataobj if hasattr(conformed, "dataobj") else conformed)
    box, prob = run_meshnet_crop(model, conformed, norm, crop, padding, threshold, mask, multiple, gain)
    out = np.zeros(tuple(shape) + (prob.shape[-1],), dtype=dtype)
    out[..., 0] = 1
    out[box] = prob
    return out


def argmax(prob: np.ndarray) -> np.ndarray:
    """Label map (uint8 for < 256 classes) from probabilities (..., C)."""
    lab = np.argmax(prob, axis=-1)
    return lab.astype(np.uint8 if prob.shape[-1] <= 256 else np.int16)


def keep_largest_foreground(dseg: np.ndarray) -> np.ndarray:
    """Zero every labelled voxel outside the largest 26-connected component of ``dseg > 0``.

    Used instead of brainchop's per-class clean-up for tissue maps: per class, the cerebellar WM
    (not connected to the cerebral WM) would be dropped (-47 mL of WM on MNI152)."""
    fg = np.asarray(dseg) > 0
    keep = largest_component(fg, fill_holes=False)
    out = np.array(dseg, copy=True)
    out[fg & ~keep] = 0
    return out


# ------------------------------------------------------------------------------- tissue
#: whether the aseg net (model30chan18cls) gets the GW net's WM standardisation gain too: no, it is
#: gain-insensitive (MNI152 GM/WM Dice 0.797/0.872 at gain 1, 0.799/0.872 at the WM gain 0.71)
#: so it keeps brainchop's plain recipe.
ASEG_USES_WM_GAIN = False


def wm_level(x: np.ndarray, dseg: np.ndarray, wm_index: int = 1) -> float | None:
    """Median normalised intensity of the voxels labelled white matter (None if there are few)."""
    sel = dseg == wm_index
    if sel.sum() < 1000:
        return None
    return float(np.median(x[sel]))


def estimate_wm_level(model, vol: np.ndarray, norm: str = "minmax", wm_index: int = 1, block: int = 128,
                      margin: int = 24) -> float | None:
    """WM level of a conformed volume: median normalised intensity of the voxels a GW net calls WM
    in a central ``block``^3 (around the head's centre of mass; the outer ``margin`` voxels,
    which lack context, are ignored). A fifth of the cost of a full head pass."""
    x = normalize(vol, norm)
    fg = x > 0.1 * float(x.max())
    if not fg.any():
        raise InputError("nothing to segment: empty image")
    centre = np.round(ndimage.center_of_mass(fg)).astype(int)
    box = []
    for c, n in zip(centre, x.shape):
        lo = int(np.clip(c - block // 2, 0, max(n - block, 0)))
        box.append(slice(lo, min(lo + block, n)))
    sub = x[tuple(box)]
    lab = np.argmax(_predict(model, sub), axis=-1)
    inner = tuple(slice(min(margin, s // 4), s - min(margin, s // 4)) for s in sub.shape)
    return wm_level(sub[inner], lab[inner], wm_index)


def wm_gain(model, vol: np.ndarray, spec: MeshNetSpec, wm_target: float | None,
            tol: float = 0.05) -> tuple[float | None, float]:
    """(WM level, input gain) of the white-matter-anchored intensity standardisation of a GW MeshNet.

    A first, cheap pass of the net (brainchop's recipe ``spec.norm`` on a central block, see
    ``estimate_wm_level``) gives the image's WM level (median normalised intensity of the voxels
    it calls WM); the net then runs with its input scaled by ``gain = wm_target / level`` (gain 1
    when |gain - 1| < ``tol``, or ``wm_target`` is None).

    Why: on whole-head T1s (WM about 0.5 of the robust range after conform, the brightest voxels
    being fat) the GW nets are insensitive to the global gain (model5_gw_ae on t1_crop: GM/WM
    Dice >= 0.95 between gains 0.8 and 1.8, i.e. WM levels 0.4 to 0.9), but on skull-stripped or
    masked images, where WM is the brightest tissue and lands near 1.0, they lose the GM/WM
    boundary (MNI152: WM Dice 0.81 at WM level 0.91 vs 0.87 at 0.65). 0.65 is the middle of
    the range that is safe on real heads, so standardising to it changes real-head results
    little (t1_crop, gain 1.3: GM/WM Dice 0.98 with the plain recipe, volumes within 1.5 %) and
    fixes the out-of-distribution case. The gain is clamped to [1/3, 3].
    """
    if not wm_target:
        return None, 1.0
    wm_i = next(i for i, n in enumerate(spec.labels) if n.lower().startswith("white"))
    level = estimate_wm_level(model, vol, spec.norm, wm_i)
    if level is not None and level > 0 and abs(float(wm_target) / level - 1.0) >= tol:
        return level, float(np.clip(float(wm_target) / level, 1 / 3, 3.0))
    return level, 1.0


# ------------------------------------------------------------------------------- measures
def voxel_volume_ml(affine) -> float:
    return abs(float(np.linalg.det(np.asarray(affine, dtype=float)[:3, :3]))) / 1000.0


def _label_items(labels) -> list[tuple[int, str]]:
    if isinstance(labels, dict):
        return [(int(k), str(v)) for k, v in labels.items()]
    items = list(labels)
    if items and isinstance(items[0], (tuple, list)):
        return [(int(i), str(n)) for i, n in items]
    return [(i, str(n)) for i, n in enumerate(items)]


def tissue_volumes(dseg: np.ndarray, labels, affine, skip_background: bool = True) -> dict[str, float]:
    """Volume in mL of every label: {name: mL}.

    labels: {index: name}, [(index, name)], or a sequence of names indexed from 0. Index 0 is
    treated as background and skipped unless ``skip_background`` is False.
    """
    dseg = np.asarray(dseg)
    vox = voxel_volume_ml(affine)
    counts = np.bincount(dseg.ravel().astype(np.int64)) if dseg.size else np.zeros(1, int)
    out = {}
    for idx, name in _label_items(labels):
        if skip_background and idx == 0:
            continue
        n = int(counts[idx]) if 0 <= idx < counts.size else 0
        out[name] = n * vox
    return out


# ------------------------------------------------------------------------------- label tables
#: Final tissue dseg of the pipeline (BIDS dseg.tsv): CSF = brain mask minus GM/WM.
TISSUE_DSEG = ((0, "background", "BG"), (1, "GM", "GM"), (2, "WM", "WM"), (3, "CSF", "CSF"))

_ASEG18_ABBR = ("BG", "CerWM", "Ctx", "LatVent", "InfLatVent", "CblmWM", "CblmCtx", "Thal", "Caud",
                "Put", "Pall", "3rdVent", "4thVent", "BStem", "Hippo", "Amyg", "Accumb", "VentDC")
#: The 18-class subcortical dseg (model30chan18cls channels, index = channel).
ASEG18_DSEG = tuple((i, name, abbr) for i, (name, abbr) in enumerate(zip(ASEG18_LABELS, _ASEG18_ABBR)))


def dseg_table(table=TISSUE_DSEG, colors=None):
    """pandas DataFrame for a BIDS ``*_dseg.tsv`` (columns index, name, abbreviation[, color])."""
    import pandas as pd

    rows = [{"index": int(t[0]), "name": t[1], "abbreviation": t[2] if len(t) > 2 else t[1]} for t in table]
    df = pd.DataFrame(rows, columns=["index", "name", "abbreviation"])
    if colors is not None:
        df["color"] = [colors[i] if i < len(colors) else "n/a" for i in df["index"]]
    return df


def tissue_dseg(gw_dseg: np.ndarray, brain_mask: np.ndarray | None = None, gw_labels=GW_LABELS) -> np.ndarray:
    """Combine a GW-model argmax (0 bg, 1 WM, 2 GM in brainchop order) and a brain mask into the
    pipeline's TISSUE_DSEG (1 GM, 2 WM, 3 CSF = in mask but neither GM nor WM). Tissue outside the
    mask is dropped."""
    names = [n.lower() for n in gw_labels]
    wm_i = next(i for i, n in enumerate(names) if n.startswith("white"))
    gm_i = next(i for i, n in enumerate(names) if n.startswith("gr"))
    out = np.zeros(gw_dseg.shape, dtype=np.uint8)
    out[gw_dseg == gm_i] = 1
    out[gw_dseg == wm_i] = 2
    if brain_mask is not None:
        m = np.asarray(brain_mask, bool)
        out[~m] = 0
        out[m & (out == 0)] = 3
    return out


# ------------------------------------------------------------------------------- eTIV
_TEMPLATE_ICV_CACHE: dict = {}


def template_icv_ml() -> float:
    """Intracranial volume (mL) of the nilearn MNI152 2009 template: its non-zero voxels (the
    template is masked by the ICBM intracranial brain mask: brain + internal CSF) x voxel volume.
    About 1886 mL (FreeSurfer's eTIV constant for its MNI305 target is 1948 mL)."""
    if "icv" not in _TEMPLATE_ICV_CACHE:
        from nilearn import datasets

        t = datasets.load_mni152_template(resolution=1)
        _TEMPLATE_ICV_CACHE["icv"] = float((np.asarray(t.dataobj) > 0).sum()) * voxel_volume_ml(t.affine)
    return _TEMPLATE_ICV_CACHE["icv"]


def estimate_etiv(t1_img, brain_mask: np.ndarray | None = None, resolution: int = 2, **reg_kw) -> dict:
    """Estimated total intracranial volume by atlas scaling (Buckner et al. 2004; FreeSurfer eTIV).

    eTIV = ICV_template / det(A), with A the 12-dof affine subject -> MNI152 2009 template
    (``cohortseg.science.registration.affine_to_mni``: ANTs, Mattes MI, at ``resolution`` mm) and
    ICV_template = ``template_icv_ml()``; a subject identical to the template gets the template's
    ICV, a subject twice as large in every direction 8x it. ``brain_mask`` (the mindgrab mask,
    same grid as ``t1_img``) skull-strips the subject like the template: it is required for
    images with a skull (t1_crop: 1522 mL with the mask, a meaningless 2834 mL without; its
    mindgrab mask is 1643 mL); the MNI template itself gets det 1.004.

    Why this and not a segmented ICV: the affine determinant is insensitive to the exact mask
    boundary, to the CSF contrast and to atrophy (a brain mask that hugs an atrophied brain
    under-estimates ICV exactly in the patients one wants to normalise), and it is the
    definition cohort studies compare with (FreeSurfer's eTIV). The segmented volume is still
    reported separately (``brain_mask_ml``).

    Returns {'etiv_ml', 'det', 'template_icv_ml', 'matrix', 'method'}.
    """
    from cohortseg.science import registration

    mask_img = None
    if brain_mask is not None:
        m = np.asarray(brain_mask, dtype=np.uint8)
        if not m.any():
            raise InputError("eTIV: the brain mask is empty")
        mask_img = nib.Nifti1Image(m, t1_img.affine)
    tr = registration.affine_to_mni(t1_img, brain_mask=mask_img, resolution=resolution, **reg_kw)
    det = float(np.linalg.det(np.asarray(tr.matrix, dtype=float)[:3, :3]))
    if not registration.MNI_DET_RANGE[0] < det < registration.MNI_DET_RANGE[1]:
        raise InputError(f"eTIV: implausible affine scaling to MNI152 (det {det:.3f}); registration failed?")
    icv_t = template_icv_ml()
    return {"etiv_ml": icv_t / det, "det": det, "template_icv_ml": icv_t,
            "matrix": np.asarray(tr.matrix).tolist(),
            "method": "atlas scaling: ICV(MNI152 2009 nilearn) / det(affine subject->MNI152), antspyx"}


# ------------------------------------------------------------------------------- names
#: Label dict of TISSUE_DSEG (index -> name)
TISSUE_LABELS = {i: n for i, n, _ in TISSUE_DSEG}


def metric_name(label: str) -> str:
    """'Lateral-Ventricle' -> 'lateral_ventricle' (column-friendly)."""
    return "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_")
