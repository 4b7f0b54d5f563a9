"""Spinal cord gray-matter segmentation net of Perone et al. 2017 ("gmseg", SCT deepseg_gm).

Architecture (checked against spinalcordtoolbox/deepseg_gm/model.py `create_model`):

    conv3x3 -> conv3x3                      (block 1, "conv2d_1", "conv2d_2")
    conv3x3 d2 -> conv3x3 d2                ("rate2_1", "rate2_2")
    five parallel branches on the rate-2 output:
        3x3 -> 1x1                          ("branch1x1_1", "branch1x1_2")
        3x3 d6 -> 3x3 d6                    ("rate6_1", "rate6_2")   and d12, d18, d24 likewise
    global branch: GlobalAveragePooling of the *block-1* output, tiled back to H x W (no conv, no BN)
    concat [1x1, r6, r12, r18, global, r24] -> BN -> Dropout -> 1x1 conv(64, relu) "amort"
    -> BN -> Dropout -> 1x1 conv(1, sigmoid) "predictions"

Every conv except "predictions" is Conv(relu, same padding) -> BatchNormalization(eps 1e-3) ->
Dropout(0.4). Layer names reproduce the Keras 2.0.6 auto-generated names of the upstream weight
files (batch_normalization_1..16 / dropout_1..16 in upstream creation order), so weights are mapped
by name and checked by shape (`load_gmseg_weights`).

Inference recipe (the `sc_gm` pipeline, `cohortseg.pipelines.sc_gm`): axial slices resampled to 0.25 x 0.25 mm and centre-cropped/padded to
200 x 200 (`cohortseg.science.resampling.to_axial_slices`), standardised with the model's training mean/std
(or the volume's own), predicted slice by slice, averaged over the ensemble in the 0.25 mm grid,
binarised at 0.999 there, mapped back to the native grid (linear) and thresholded at 0.5.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from cohortseg.errors import ModelError

THRESHOLD_FINE = 0.999
THRESHOLD_NATIVE = 0.5
BN_EPSILON = 1e-3


# ----------------------------------------------------------------------------- network


def _tile_layer_class():
    import keras

    @keras.saving.register_keras_serializable(package="cohortseg")
    class GlobalContextTile(keras.layers.Layer):
        """Broadcast a pooled (B, C) vector to the spatial size of a reference (B, H, W, *) tensor.

        Equivalent to upstream RepeatVector(H*W) + Reshape((H, W, C)) but also works for inputs of
        unknown spatial size (fully convolutional use).
        """

        def call(self, inputs):
            pooled, ref = inputs
            ones = keras.ops.ones_like(ref[..., :1])
            return ones * pooled[:, None, None, :]

        def compute_output_shape(self, input_shape):
            pooled, ref = input_shape
            return tuple(ref[:3]) + (pooled[-1],)

    return GlobalContextTile


_TILE = None


def build_gmseg(filters: int = 32, dropout: float = 0.4, input_size: Sequence[int] | None = (200, 200)):
    """Rebuild the gmseg dilated-convolution net (Keras 3). `input_size` None = fully convolutional."""
    global _TILE
    import keras
    from keras import layers

    if _TILE is None:
        _TILE = _tile_layer_class()
    if int(filters) < 1:
        raise ModelError(f"filters must be positive, got {filters}")
    filters = int(filters)
    h, w = (None, None) if input_size is None else (int(input_size[0]), int(input_size[1]))
    counter = {"bn": 0, "drop": 0}

    def bn_drop(x, rate=dropout):
        counter["bn"] += 1
        counter["drop"] += 1
        x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=0.1,
                                      name=f"batch_normalization_{counter['bn']}")(x)
        return layers.Dropout(rate, name=f"dropout_{counter['drop']}")(x)

    def conv(x, name, k=3, rate=1, n=filters, act="relu"):
        return layers.Conv2D(n, (k, k), dilation_rate=(rate, rate), activation=act, padding="same",
                             name=name)(x)

    inputs = keras.Input((h, w, 1), name="input_1")
    c1 = bn_drop(conv(inputs, "conv2d_1"))
    c1 = bn_drop(conv(c1, "conv2d_2"))

    c3 = bn_drop(conv(c1, "rate2_1", rate=2))
    c3 = bn_drop(conv(c3, "rate2_2", rate=2))

    b1 = bn_drop(conv(c3, "branch1x1_1"))
    b1 = bn_drop(conv(b1, "branch1x1_2", k=1))
    branches = {}
    for r in (6, 12, 18, 24):
        x = bn_drop(conv(c3, f"rate{r}_1", rate=r))
        branches[r] = bn_drop(conv(x, f"rate{r}_2", rate=r))

    pooled = layers.GlobalAveragePooling2D(name="global_average_pooling2d_1")(c1)
    glob = _TILE(name="global_context_tile")([pooled, c1])

    cat = layers.Concatenate(axis=-1, name="concatenate_1")(
        [b1, branches[6], branches[12], branches[18], glob, branches[24]])
    cat = bn_drop(cat)
    amort = bn_drop(conv(cat, "amort", k=1, n=64))
    out = conv(amort, "predictions", k=1, n=1, act="sigmoid")
    return keras.Model(inputs, out, name=f"gmseg_f{filters}")


# ----------------------------------------------------------------------------- weights


def _weight_key(name) -> str:
    name = name.decode() if isinstance(name, bytes) else str(name)
    return name.split("/")[-1].split(":")[0]


def _decode(names) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def read_keras2_weights(h5_path) -> dict[str, dict[str, np.ndarray]]:
    """Read a Keras 2 weights HDF5 (`save_weights`, or the `model_weights` group of a full model).

    Returns {layer_name: {weight_key: array}} for layers with weights, weight_key being the short
    variable name (kernel, bias, gamma, beta, moving_mean, moving_variance).
    """
    import h5py

    path = Path(h5_path)
    if not path.is_file():
        raise ModelError(f"gmseg weight file not found: {path}")
    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError) as e:
        raise ModelError(f"gmseg weight file is not a readable HDF5 file: {path} ({e})") from e
    out: dict[str, dict[str, np.ndarray]] = {}
    try:
        with f:
            root = f["model_weights"] if "model_weights" in f else f
            if "layer_names" not in root.attrs:
                raise ModelError(f"{path} has no Keras 'layer_names' attribute (not Keras 2 weights)")
            for lname in _decode(root.attrs["layer_names"]):
                if lname not in root:
                    raise ModelError(f"{path}: layer group '{lname}' listed but missing")
                grp = root[lname]
                wnames = _decode(grp.attrs.get("weight_names", []))
                if not wnames:
                    continue
                weights = {}
                for wn in wnames:
                    try:
                        weights[_weight_key(wn)] = np.asarray(grp[wn])
                    except (KeyError, OSError) as e:
                        raise ModelError(f"{path}: cannot read weight '{wn}' of layer '{lname}' ({e})") from e
                out[lname] = weights
    except ModelError:
        raise
    except Exception as e:  # truncated / corrupt datasets
        raise ModelError(f"gmseg weight file is corrupt: {path} ({type(e).__name__}: {e})") from e
    if not out:
        raise ModelError(f"{path} holds no layer weights")
    return out


def load_gmseg_weights(model, h5_path) -> None:
    """Map Keras 2.0.6 weights-only HDF5 groups onto `model`'s layers by name, checking every shape.

    All-or-nothing: nothing is assigned unless every weighted layer of the model finds its weights in
    the file with matching shapes and the file has no weighted layer the model lacks.
    """
    file_w = read_keras2_weights(h5_path)
    assignments = []
    model_layers = {layer.name: layer for layer in model.layers if layer.weights}
    missing = sorted(set(model_layers) - set(file_w))
    extra = sorted(set(file_w) - set(model_layers))
    if missing or extra:
        raise ModelError(f"{h5_path}: layers do not match the gmseg architecture "
                         f"(missing in file: {missing[:5]}, unknown in file: {extra[:5]})")
    for lname, layer in model_layers.items():
        src = file_w[lname]
        names = [_weight_key(v.name) for v in layer.weights]
        if sorted(names) != sorted(src):
            raise ModelError(f"{h5_path}: layer '{lname}' has weights {sorted(src)}, "
                             f"model expects {sorted(names)}")
        for var, key in zip(layer.weights, names):
            arr = src[key]
            if tuple(arr.shape) != tuple(var.shape):
                raise ModelError(f"{h5_path}: shape mismatch for {lname}/{key}: file {arr.shape}, "
                                 f"model {tuple(var.shape)} (wrong 'filters' for this file?)")
            if not np.all(np.isfinite(arr)):
                raise ModelError(f"{h5_path}: non-finite values in {lname}/{key}")
            assignments.append((var, arr))
    for var, arr in assignments:
        var.assign(arr.astype(var.dtype))


# ----------------------------------------------------------------------------- recipe pieces


def load_card(path: Path, card, fold, extra):
    """Loader ``gmseg_weights`` (:mod:`cohortseg.models.loaders`): the network of the card's
    ``filters`` (fold params override) with the challenge weights of `path`."""
    params = {**card["architecture"].get("params", {}), **fold.get("params", {})}
    model = build_gmseg(filters=int(params.get("filters", 32)))
    load_gmseg_weights(model, path)
    return model


def fine_to_native(prob_fine: np.ndarray, grid: dict, native_img=None,
                   threshold_fine: float | None = THRESHOLD_FINE,
                   threshold_native: float = THRESHOLD_NATIVE) -> tuple[np.ndarray, np.ndarray]:
    """Ensemble probability in the 0.25 mm slice grid -> (prob_native float32, mask_native uint8).

    Upstream placement (SCT deepseg_gm): binarise at `threshold_fine` in the fine grid, map the
    binary slices back to native with linear interpolation, threshold at `threshold_native`. The
    returned probability is that linearly resampled binary map, i.e. the fraction of each native
    voxel's fine-grid footprint that the ensemble segments with p > 0.999: a partial-volume GM map
    in [0, 1] with mask == (prob > 0.5) exactly. threshold_fine None maps the raw probabilities.
    """
    from cohortseg.science.resampling import slices_to_native

    p = np.asarray(prob_fine, dtype=np.float32)
    fine = p if threshold_fine is None else (p > threshold_fine).astype(np.float32)
    prob_native = np.clip(slices_to_native(fine, grid, native_img, order=1), 0.0, 1.0)
    mask = (prob_native > threshold_native).astype(np.uint8)
    return prob_native.astype(np.float32), mask
