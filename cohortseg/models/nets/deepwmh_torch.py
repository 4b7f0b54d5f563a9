"""Keras builds of the four deep-T1-WMH networks (Thyreau et al., Hum Brain Mapp 2022; JPSC-AD), loading
the upstream PyTorch ``state_dict`` files (read by :mod:`cohortseg.models.torchfile`, no PyTorch needed).

Architectures (from the upstream program ``deepwmh.py``, bthyreau/deep-T1-WMH):

``head`` (HeadModel, 64^3 box, 1 channel in, 4 sigmoid channels out: 0 intracranial, 1 cortex, 2 cerebrum, 3 -)
    3-level U-Net: per level conv3 (ELU) -> conv3 -> BatchNorm -> ELU, 2x max-pool; decoder:
    nearest 2x upsampling -> conv3 (ELU) -> concat skip -> conv3 -> BatchNorm -> ELU; 1x1 conv, sigmoid.
``affine`` (ModelAff, 2 channels in on 64^3: cortex and channel 3 priors x the intracranial prior)
    conv3 (ReLU) + pool; conv3 -> LayerNorm over the spatial dims (elementwise affine of shape D x H x W)
    -> ReLU, pool; likewise at 16^3 and 8^3; 1x1 conv (128, ReLU); 4^3 valid conv -> 12 numbers: the
    3x4 affine (row major) added to the identity, in the normalised [-1, 1] coordinates of the boxes.
``wmh`` (Cap5eModel, MNI box 184x202x72): 5 max-pools *with indices* ((2,2,2) x3, (2,2,1) x2), blocks
    conv3 -> InstanceNorm -> ReLU -> conv3 -> ReLU; decoder: max-unpooling with the saved indices to
    the skip's size -> conv3 -> InstanceNorm -> ReLU, + skip (additive), conv3 -> ReLU; 1x1 conv to 2
    sigmoid channels (0: WMH).
``rois`` (Cap6Model, same box): like ``wmh`` with 16 channels, 1x1 convs inside the blocks, the first
    pool without indices and nearest 2x upsampling at the top; 4 sigmoid channels (periventricular,
    deep white, infracortical, inner gray).

Layer-by-layer mapping (``load_torch_weights``): every torch parameter name ``<prefix>.<param>`` is a
Keras layer whose ``torch_prefix`` is ``<prefix>``; Conv3d weights (out, in, kd, kh, kw) become Keras
kernels (kd, kh, kw, in, out) (both are cross-correlations, no flip); tensors are channels-last
(N, i, j, k, C) where torch has (N, C, i, j, k). BatchNorm3d runs on its running statistics with
eps 1e-5; InstanceNorm3d (no affine, no running stats: the upstream default) normalises each
channel of each volume by its own biased mean/variance, eps 1e-5, also at inference; LayerNorm
normalises each channel over the three spatial axes (eps 1e-5). Max-pooling floors odd sizes. The
unpooling puts each value back where the window's maximum was - the *first* maximum in (kd, kh, kw)
scan order on ties, as PyTorch's CPU kernel does (ReLU outputs tie at 0 constantly) - and zero-pads to
the skip's size. Every key of the file must be used and every shape must match, else ModelError.

Running them (:func:`head_priors`, :func:`head_net_mask`, :func:`deep_mni_arrays`): fold means on
prepared arrays; the pre/post-processing is :mod:`cohortseg.science.deepwmh`.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from cohortseg.errors import ModelError

NORM_EPS = 1e-5
HEAD_SHAPE = (64, 64, 64)
BOX_SHAPE = (184, 202, 72)


@lru_cache(maxsize=1)
def _layers():
    """The custom Keras layers (defined lazily: importing this module must not import TensorFlow)."""
    import keras
    from keras import ops

    class InstanceNorm3D(keras.layers.Layer):
        """PyTorch InstanceNorm3d(affine=False, track_running_stats=False): per volume and channel."""

        def call(self, x):
            mean = ops.mean(x, axis=(1, 2, 3), keepdims=True)
            var = ops.mean(ops.square(x - mean), axis=(1, 2, 3), keepdims=True)
            return (x - mean) / ops.sqrt(var + NORM_EPS)

    class SpatialLayerNorm(keras.layers.Layer):
        """PyTorch LayerNorm([D, H, W]) on (N, C, D, H, W): per volume and channel over the spatial axes,
        then an elementwise (D, H, W) scale and shift shared by the channels."""

        def build(self, input_shape):
            shape = tuple(int(s) for s in input_shape[1:4]) + (1,)
            self.gamma = self.add_weight(shape=shape, initializer="ones", name="gamma")
            self.beta = self.add_weight(shape=shape, initializer="zeros", name="beta")

        def call(self, x):
            mean = ops.mean(x, axis=(1, 2, 3), keepdims=True)
            var = ops.mean(ops.square(x - mean), axis=(1, 2, 3), keepdims=True)
            return (x - mean) / ops.sqrt(var + NORM_EPS) * self.gamma + self.beta

    class MaxPoolWithArgmax3D(keras.layers.Layer):
        """Max-pooling (floor mode) that also returns, per output voxel and channel, the position (0 ..
        kd*kh*kw-1, scan order) of the first maximum in its window (int32)."""

        def __init__(self, pool, **kw):
            super().__init__(**kw)
            self.pool = tuple(int(p) for p in pool)

        def call(self, x):
            kd, kh, kw = self.pool
            d, h, w, c = (int(s) for s in x.shape[1:])
            od, oh, ow = d // kd, h // kh, w // kw
            x = x[:, : od * kd, : oh * kh, : ow * kw]
            win = ops.reshape(x, (-1, od, kd, oh, kh, ow, kw, c))
            win = ops.reshape(ops.transpose(win, (0, 1, 3, 5, 7, 2, 4, 6)), (-1, od, oh, ow, c, kd * kh * kw))
            top = ops.max(win, axis=-1)
            pos = ops.arange(kd * kh * kw, dtype="int32")
            first = ops.min(ops.where(win >= top[..., None], pos, kd * kh * kw), axis=-1)
            return top, first

    class MaxUnpool3D(keras.layers.Layer):
        """Inverse of :class:`MaxPoolWithArgmax3D`: each value back at its window's argmax, zeros
        elsewhere, zero-padded at the far end to `size` (the pre-pooling spatial size).

        The far-end zeros are concatenated, not padded: TensorFlow's oneDNN graph rewrite fuses a Pad
        followed by a 'same' Conv3D into one convolution, which on CPUs where oneDNN is on (AVX-512
        AMD EPYC here) gave the wrong output shape or crashed the process (TF 2.21)."""

        def __init__(self, pool, size, **kw):
            super().__init__(**kw)
            self.pool = tuple(int(p) for p in pool)
            self.size = tuple(int(s) for s in size)

        def call(self, inputs):
            y, first = inputs
            kd, kh, kw = self.pool
            od, oh, ow, c = (int(s) for s in y.shape[1:])
            hot = ops.one_hot(first, kd * kh * kw, dtype=y.dtype) * y[..., None]
            full = ops.reshape(hot, (-1, od, oh, ow, c, kd, kh, kw))
            full = ops.reshape(ops.transpose(full, (0, 1, 5, 2, 6, 3, 7, 4)), (-1, od * kd, oh * kh, ow * kw, c))
            for axis, (s, o, k) in enumerate(zip(self.size, (od, oh, ow), self.pool), start=1):
                if s > o * k:  # s - o * k < k <= o * k: a slice of `full` of that width gives the zeros
                    zeros = ops.zeros_like(full[(slice(None),) * axis + (slice(0, s - o * k),)])
                    full = ops.concatenate([full, zeros], axis=axis)
            return full

    return InstanceNorm3D, SpatialLayerNorm, MaxPoolWithArgmax3D, MaxUnpool3D


class _Net:
    """Small functional-model builder whose weighted layers carry their torch prefix."""

    def __init__(self):
        import keras

        self.k = keras
        self.L = keras.layers
        self.instnorm, self.layernorm, self.poolarg, self.unpool = _layers()
        self.n = 0

    def _name(self, prefix):
        self.n += 1
        return f"{prefix.replace('.', '_')}__{self.n}"

    def _tag(self, layer, prefix, kind):
        layer.torch_prefix = prefix
        layer.torch_kind = kind
        return layer

    def conv(self, x, prefix, filters, k=3, pad=None, act=None):
        """torch Conv3d(k, padding=pad) (+ activation); pad defaults to (k-1)//2 ('same')."""
        pad = (k - 1) // 2 if pad is None else pad
        if pad and pad != (k - 1) // 2:
            x = self.L.ZeroPadding3D(pad)(x)
            padding = "valid"
        else:
            padding = "same" if pad else "valid"
        layer = self._tag(self.L.Conv3D(filters, k, padding=padding, activation=act, name=self._name(prefix)),
                          prefix, "conv")
        return layer(x)

    def bn(self, x, prefix):
        layer = self._tag(self.L.BatchNormalization(epsilon=NORM_EPS, momentum=0.9, name=self._name(prefix)),
                          prefix, "bn")
        return layer(x, training=False)

    def ln(self, x, prefix):
        return self._tag(self.layernorm(name=self._name(prefix)), prefix, "ln")(x)

    def inorm(self, x):
        return self.instnorm()(x)

    def act(self, x, name):
        return self.L.Activation(name)(x)


def build_head(shape=HEAD_SHAPE):
    """HeadModel; input (N, *shape, 1) z-scored, output (N, *shape, 4) sigmoid priors."""
    b = _Net()
    L = b.L
    inp = b.k.Input(tuple(shape) + (1,))
    skips = []
    x = inp
    for lvl, (fa, fb) in enumerate([(8, 8), (16, 24), (24, 32), (48, 48)]):
        if lvl:
            x = L.MaxPooling3D(2)(x)
        x = b.conv(x, f"conv{lvl}a", fa, act="elu")
        x = b.act(b.bn(b.conv(x, f"conv{lvl}b", fb), f"bn{lvl}a"), "elu")
        skips.append(x)
    for lvl, (fu, fv) in zip((2, 1, 0), [(24, 24), (24, 24), (16, 8)]):
        x = L.UpSampling3D(2)(x)
        x = b.conv(x, f"conv{lvl}u", fu, act="elu")
        x = L.Concatenate(axis=-1)([x, skips[lvl]])
        x = b.act(b.bn(b.conv(x, f"conv{lvl}v", fv), f"bn{lvl}u"), "elu")
    out = b.conv(x, "conv1x", 4, k=1, act="sigmoid")
    return b.k.Model(inp, out, name="deepwmh_head")


def build_affine(shape=HEAD_SHAPE):
    """ModelAff; input (N, 64, 64, 64, 2), output (N, 12): the 3x4 affine (row major) minus identity."""
    if tuple(shape) != HEAD_SHAPE:
        raise ModelError(f"the deep-T1-WMH affine net is built for a {HEAD_SHAPE} box (its LayerNorms fix it)")
    b = _Net()
    L = b.L
    inp = b.k.Input(tuple(shape) + (2,))
    x = L.MaxPooling3D(2)(b.conv(inp, "convaff1", 16, act="relu"))
    x = L.MaxPooling3D(2)(b.act(b.ln(b.conv(x, "convaff2", 16), "bnaff2"), "relu"))
    x = L.MaxPooling3D(2)(b.act(b.ln(b.conv(x, "convaff3", 32), "bnaff3"), "relu"))
    x = b.act(b.ln(b.conv(x, "convaff4", 64), "bnaff4"), "relu")
    x = L.MaxPooling3D(2)(x)
    x = b.conv(x, "convaff5", 128, k=1, act="relu")
    x = b.conv(x, "convaff6", 12, k=4, pad=0)
    return b.k.Model(inp, L.Reshape((12,))(x), name="deepwmh_affine")


def build_wmh(shape=BOX_SHAPE):
    """Cap5eModel (the WMH net); input (N, 184, 202, 72, 1) box z-scores, output (N, ..., 2) sigmoid."""
    b = _Net()
    inp = b.k.Input(tuple(shape) + (1,))
    widths = [(24, 64), (64, 64), (64, 64), (64, 64), (64, 64), (128, 64)]
    pools = [(2, 2, 2)] * 3 + [(2, 2, 1)] * 2
    x = inp
    skips, sizes, idx = [], [], []
    for lvl, (wa, wb) in enumerate(widths):
        if lvl:
            sizes.append(tuple(int(s) for s in x.shape[1:4]))
            x, ind = b.poolarg(pools[lvl - 1])(x)
            idx.append(ind)
        x = b.act(b.inorm(b.conv(x, f"block{lvl}.0", wa)), "relu")
        x = b.conv(x, f"block{lvl}.3", wb, act="relu")
        skips.append(x)
    for lvl in (4, 3, 2, 1, 0):
        x = b.unpool(pools[lvl], sizes[lvl])([x, idx[lvl]])
        x = b.act(b.inorm(b.conv(x, f"blockUp{lvl}_a.0", 64)), "relu")
        if lvl < 4:  # Up4 has no skip
            x = b.L.Add()([x, skips[lvl]])
        if lvl:
            x = b.conv(x, f"blockUp{lvl}_b.0", 64, act="relu")
        else:
            x = b.conv(x, "blockUp0_b1.0", 64, act="relu")
            x = b.conv(x, "blockUp0_b2.0", 24, act="relu")
    out = b.conv(x, "conv1x", 2, k=1, act="sigmoid")
    return b.k.Model(inp, out, name="deepwmh_wmh")


def build_rois(shape=BOX_SHAPE):
    """Cap6Model (WM regions); input (N, 184, 202, 72, 1), output (N, ..., 4) sigmoid."""
    b = _Net()
    inp = b.k.Input(tuple(shape) + (1,))
    pools = [(2, 2, 2)] * 4 + [(2, 2, 1)]
    x = b.conv(inp, "block0.0", 12, act="relu")
    skips, sizes, idx = [x], [], []
    for lvl in range(1, 6):
        sizes.append(tuple(int(s) for s in x.shape[1:4]))
        if lvl == 1:
            x = b.L.MaxPooling3D(2)(x)
            idx.append(None)
        else:
            x, ind = b.poolarg(pools[lvl - 1])(x)
            idx.append(ind)
        x = b.conv(x, f"block{lvl}.0", 16, act="relu")
        x = b.conv(x, f"block{lvl}.2", 16, k=1)
        if lvl == 5:
            x = b.inorm(x)
        x = b.act(x, "relu")
        skips.append(x)
    for lvl in (4, 3, 2, 1):
        x = b.unpool(pools[lvl], sizes[lvl])([x, idx[lvl]])
        x = b.act(b.inorm(b.conv(x, f"blockUp{lvl}_a.0", 16)), "relu")
        x = b.conv(b.L.Add()([x, skips[lvl]]), f"blockUp{lvl}_b.0", 12 if lvl == 1 else 16, act="relu")
    x = b.L.UpSampling3D(2)(x)
    x = b.conv(x, "blockUp0_a.0", 12, act="relu")
    x = b.conv(b.L.Add()([x, skips[0]]), "blockUp0_b1.0", 12, k=1, pad=1, act="relu")
    x = b.conv(x, "blockUp0_b2.0", 8, k=3, pad=0, act="relu")
    out = b.conv(x, "conv1x", 4, k=1, act="sigmoid")
    return b.k.Model(inp, out, name="deepwmh_rois")


BUILDERS = {"head": build_head, "affine": build_affine, "wmh": build_wmh, "rois": build_rois}


def load_torch_weights(model, state_dict: dict, source="state_dict") -> None:
    """Copy a deep-T1-WMH ``state_dict`` (name -> numpy array) into a model of :data:`BUILDERS`.
    Every parameter must find its layer with the same shape; unused keys (other than BatchNorm's
    ``num_batches_tracked``) are an error: the file is not the network the card says."""
    used = set()

    def take(key, shape):
        if key not in state_dict:
            raise ModelError(f"{source}: parameter '{key}' is missing (not a {model.name} weights file?)")
        a = np.asarray(state_dict[key], np.float32)
        if tuple(a.shape) != tuple(shape):
            raise ModelError(f"{source}: parameter '{key}' has shape {tuple(a.shape)}, the {model.name} "
                             f"network needs {tuple(shape)}")
        used.add(key)
        return a

    for layer in model.layers:
        p = getattr(layer, "torch_prefix", None)
        if p is None:
            continue
        kind = layer.torch_kind
        if kind == "conv":
            kernel, bias = layer.get_weights()
            kd, kh, kw, cin, cout = kernel.shape
            w = take(f"{p}.weight", (cout, cin, kd, kh, kw)).transpose(2, 3, 4, 1, 0)
            layer.set_weights([w, take(f"{p}.bias", bias.shape)])
        elif kind == "bn":
            n = layer.get_weights()[0].shape
            layer.set_weights([take(f"{p}.weight", n), take(f"{p}.bias", n), take(f"{p}.running_mean", n),
                               take(f"{p}.running_var", n)])
            used.add(f"{p}.num_batches_tracked")
        elif kind == "ln":
            g = layer.get_weights()[0].shape
            layer.set_weights([take(f"{p}.weight", g[:3])[..., None], take(f"{p}.bias", g[:3])[..., None]])
    extra = sorted(set(state_dict) - used - {k for k in state_dict if k.endswith("num_batches_tracked")})
    if extra:
        raise ModelError(f"{source}: {len(extra)} parameter(s) the {model.name} network does not have "
                         f"({', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''}): wrong weights file")


def load_net(kind: str, path, shape=None):
    """Build the `kind` network (``head``, ``affine``, ``wmh``, ``rois``) and load upstream weights."""
    from cohortseg.models.torchfile import load_state_dict

    if kind not in BUILDERS:
        raise ModelError(f"unknown deep-T1-WMH network '{kind}' (known: {', '.join(BUILDERS)})")
    sd = load_state_dict(path)
    model = BUILDERS[kind]() if shape is None else BUILDERS[kind](tuple(shape))
    load_torch_weights(model, sd, path)
    return model


def load_card(path, card, fold, extra):
    """Loader ``deepwmh_torch`` (:mod:`cohortseg.models.loaders`): the network the card names
    (``architecture.params.net``: head, affine, rois, wmh) from its upstream PyTorch state_dict, rebuilt
    in Keras (no PyTorch needed)."""
    return load_net(card["architecture"].get("params", {}).get("net", ""), path)


# ----------------------------------------------------------------------------------------------
# running the nets on prepared arrays (the science around them: cohortseg.science.deepwmh)
# ----------------------------------------------------------------------------------------------
def run_folds(folds, x, batch_size):
    """Fold mean of one card's predictions (:func:`cohortseg.models.ensemble.fold_average`)."""
    from cohortseg.models.ensemble import fold_average

    return fold_average([f.predict for f in folds], x, batch_size)


def head_priors(folds, x: np.ndarray, batch_size: int = 1) -> np.ndarray:
    """The head net's (64, 64, 64, 4) priors for a prepared head box (fold mean)."""
    return np.asarray(run_folds(folds, x, batch_size)[0], np.float32)


def head_net_mask(folds, head_box: np.ndarray, head_t1: dict, grid_to_t1: np.ndarray, conformed_affine,
                  shape) -> tuple[np.ndarray | None, np.ndarray]:
    """The deep-T1-WMH intracranial mask (prior > 0.5) on a conformed grid (`shape`, `conformed_affine`)
    from the 64^3 head box of the session's T1 (`head_t1`: its native ``affine`` and ``shape``); the
    conformed grid is put into the T1's world by `grid_to_t1` (the rigid primary -> T1 registration;
    identity when the T1 is the primary). Returns (mask, or None when the prior is empty; the priors)."""
    from cohortseg.science.deepwmh import PRIOR_THRESHOLD, native_prior

    grid = np.asarray(grid_to_t1, float) @ np.asarray(conformed_affine, float)
    pri = head_priors(folds, np.asarray(head_box, np.float32)[None, ..., None])
    mask = native_prior(pri[..., 0], head_t1["affine"], head_t1["shape"], target=(shape, grid)) > PRIOR_THRESHOLD
    return (mask if mask.any() else None), pri


def deep_mni_arrays(folds_affine, priors: np.ndarray, head_t1: dict, primary_to_t1: np.ndarray) -> dict:
    """The deep-T1-WMH affine net on the head priors: the primary image's world -> MNI matrix (through
    the primary -> T1 registration), the T1's, and the intracranial prior (measured eTIV)."""
    from cohortseg.science.deepwmh import affine_input, mni_matrix

    params = np.asarray(run_folds(folds_affine, affine_input(priors)[None], 1)[0], float).ravel()
    m_t1 = mni_matrix(params, head_t1["affine"], head_t1["shape"])
    return {"mni_matrix": m_t1 @ np.asarray(primary_to_t1, float), "mni_matrix_t1": m_t1,
            "icv_prior": priors[..., 0].astype(np.float32)}


__all__ = ["BUILDERS", "HEAD_SHAPE", "BOX_SHAPE", "build_head", "build_affine", "build_wmh", "build_rois",
           "load_torch_weights", "load_net", "load_card", "run_folds", "head_priors",
           "head_net_mask", "deep_mni_arrays"]
