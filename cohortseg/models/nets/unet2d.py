"""A small 2D U-Net (a few thousand to ~100k parameters) with a sigmoid output.

Only standard Keras layers are used, so a saved ``.keras`` file reloads with
``keras.models.load_model(path, compile=False)`` and no custom objects (the ``keras_full`` loader).

Layout: ``depth`` encoder levels of [conv3x3 -> (norm) -> ReLU] x 2 with ``base_filters * 2**level``
filters and 2x2 max-pooling, a bottleneck of the same block, and a mirrored decoder (bilinear
2x upsampling -> concat with the skip -> block), then a 1x1 conv with ``n_classes`` sigmoid outputs.
The spatial input size is free (``None``) but must be divisible by ``2**depth``.
"""
from __future__ import annotations


def build_unet2d(input_channels: int = 1, base_filters: int = 8, depth: int = 3, n_classes: int = 1,
                 norm: str = "batch", dropout: float = 0.0, input_shape=None, bn_momentum: float = 0.9,
                 name: str = "unet2d", batch_norm: bool | None = None):
    """Build (not compile) the U-Net. ``input_shape`` (H, W, C) fixes the size; default (None, None, C).

    ``norm``: "batch" (BatchNormalization, ``bn_momentum`` 0.9 so the moving statistics follow
    short trainings), "instance" (GroupNormalization with one group per channel: no train/test
    difference, robust to contrast changes) or "none". ``batch_norm`` (deprecated alias):
    True -> "batch", False -> "none".
    """
    import keras
    from keras import layers

    if batch_norm is not None:
        norm = "batch" if batch_norm else "none"
    if norm not in ("batch", "instance", "none"):
        raise ValueError(f"norm must be batch, instance or none, not {norm!r}")
    if depth < 1 or base_filters < 1:
        raise ValueError("depth and base_filters must be >= 1")
    shape = tuple(input_shape) if input_shape is not None else (None, None, int(input_channels))
    inp = keras.Input(shape=shape, name="image")

    def block(x, filters, tag):
        for i in (1, 2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=norm == "none",
                              kernel_initializer="he_normal", name=f"{tag}_conv{i}")(x)
            if norm == "batch":
                x = layers.BatchNormalization(momentum=bn_momentum, name=f"{tag}_bn{i}")(x)
            elif norm == "instance":
                x = layers.GroupNormalization(groups=filters, name=f"{tag}_in{i}")(x)
            x = layers.Activation("relu", name=f"{tag}_relu{i}")(x)
        return x

    skips = []
    x = inp
    for level in range(depth):
        x = block(x, base_filters * 2 ** level, f"enc{level}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"pool{level}")(x)
    x = block(x, base_filters * 2 ** depth, "bottleneck")
    if dropout > 0:
        x = layers.Dropout(dropout, name="bottleneck_dropout")(x)
    for level in reversed(range(depth)):
        x = layers.UpSampling2D(2, interpolation="bilinear", name=f"up{level}")(x)
        x = layers.Concatenate(name=f"concat{level}")([x, skips[level]])
        x = block(x, base_filters * 2 ** level, f"dec{level}")
    out = layers.Conv2D(n_classes, 1, activation="sigmoid", name="prob")(x)
    return keras.Model(inp, out, name=name)


def count_params(**kwargs) -> int:
    """Number of parameters of ``build_unet2d(**kwargs)``."""
    return int(build_unet2d(**kwargs).count_params())
