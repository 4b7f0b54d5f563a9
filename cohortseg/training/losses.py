"""Losses for sigmoid segmentation outputs (Keras 3 ops, any backend).

* ``dice``: soft Dice loss 1 - 2 sum(p y) / (sum p + sum y), per sample, smoothed (binary masks).
* ``bce``: binary cross-entropy. ``dice_bce``: their sum (the default for binary masks).
* ``mse``: mean squared error -- regression on SOFT ground truth (partial-volume maps, rater
  averages), which keeps the network's output calibrated as a partial-volume fraction.
* ``adaptive_wing``: adaptive wing loss (Wang et al., ICCV 2019) for soft ground truth, the loss of
  SCT's contrast-agnostic soft cord model; parameters alpha=2.1, omega=14, epsilon=1, theta=0.5
  (the paper's). It behaves like a log loss near the target and like L1 far from it, with an
  exponent that adapts to the target value (sharper on the background, softer at edges).

``get_loss(name, **params)`` returns a Keras-compatible ``loss(y_true, y_pred)`` function.
"""
from __future__ import annotations


def dice_loss(y_true, y_pred, smooth: float = 1.0):
    from keras import ops

    axes = tuple(range(1, len(y_pred.shape)))
    inter = ops.sum(y_true * y_pred, axis=axes)
    denom = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    return 1.0 - (2.0 * inter + smooth) / (denom + smooth)


def bce_loss(y_true, y_pred):
    from keras import ops

    eps = 1e-7
    p = ops.clip(y_pred, eps, 1.0 - eps)
    axes = tuple(range(1, len(y_pred.shape)))
    return -ops.mean(y_true * ops.log(p) + (1.0 - y_true) * ops.log(1.0 - p), axis=axes)


def mse_loss(y_true, y_pred):
    from keras import ops

    axes = tuple(range(1, len(y_pred.shape)))
    return ops.mean(ops.square(y_pred - y_true), axis=axes)


def adaptive_wing_loss(y_true, y_pred, alpha: float = 2.1, omega: float = 14.0, epsilon: float = 1.0,
                       theta: float = 0.5):
    from keras import ops

    axes = tuple(range(1, len(y_pred.shape)))
    d = ops.abs(y_true - y_pred)
    p = alpha - y_true  # exponent adapts to the target value
    small = omega * ops.log(1.0 + ops.power(d / epsilon, p))
    ratio = theta / epsilon
    a = omega * (1.0 / (1.0 + ops.power(ratio, p))) * p * ops.power(ratio, p - 1.0) / epsilon
    c = theta * a - omega * ops.log(1.0 + ops.power(ratio, p))
    large = a * d - c
    return ops.mean(ops.where(d < theta, small, large), axis=axes)


def _dice_bce(y_true, y_pred):
    return dice_loss(y_true, y_pred) + bce_loss(y_true, y_pred)


LOSSES = {
    "dice": dice_loss,
    "bce": bce_loss,
    "dice_bce": _dice_bce,
    "mse": mse_loss,
    "adaptive_wing": adaptive_wing_loss,
}

#: losses meant for soft (regression) targets
SOFT_LOSSES = {"mse", "adaptive_wing"}


def get_loss(name: str, **params):
    """Loss function by name (see module doc); ``params`` are bound keyword arguments."""
    from cohortseg.errors import ConfigError

    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r} (known: {', '.join(LOSSES)})")
    fn = LOSSES[name]
    if not params:
        return fn

    def bound(y_true, y_pred):
        return fn(y_true, y_pred, **params)

    bound.__name__ = f"{name}_loss"
    return bound


def dice_score(y_true, y_pred, threshold: float = 0.5) -> float:
    """Hard Dice (numpy) of two arrays binarised at ``threshold``; 1.0 when both are empty."""
    import numpy as np

    from cohortseg.science.metrics import dice

    return dice(np.asarray(y_true) > threshold, np.asarray(y_pred) > threshold)


__all__ = ["LOSSES", "SOFT_LOSSES", "get_loss", "dice_loss", "bce_loss", "mse_loss",
           "adaptive_wing_loss", "dice_score"]
