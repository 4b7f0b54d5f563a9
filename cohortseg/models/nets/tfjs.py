"""TF.js layers-models (``model.json`` + ``*.bin`` weight shards) -> Keras 3 models.

A TF.js layers-model is a Keras (2.x) model config (``modelTopology``) plus a ``weightsManifest``:
groups of shard files whose concatenated bytes hold every weight, in manifest order, each with a
name (``<layer>/<variable>``), a shape and a dtype (optionally quantised). This module rebuilds the
graph with Keras 3 layers (no dependency on the ``tensorflowjs`` package), makes the spatial input
shape flexible so a MeshNet can run on a crop, and assigns the weights by name.

Brainchop specifics handled here:

* Keras 2 arguments Keras 3 rejects (``batch_input_shape``, ``input_dtype``...) are dropped.
* ``PyTorch_to_TF_JS_exporter`` models (brainchop's ``mindgrab``) encode a parameter-free
  GroupNorm with one group per channel (= instance norm, PyTorch ``GroupNorm(C, C, affine=False)``,
  eps 1e-5) in the *name* of the preceding convolution (``conv3d_0_gn``): the layer JSON has no
  norm layer and no weights for it. ``load_tfjs_layers_model`` re-inserts it (``gn_from_names``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cohortseg.errors import ModelError

#: dtypes a manifest entry may declare (after de-quantisation everything becomes float32/int32)
_DTYPES = {"float32": np.float32, "int32": np.int32, "bool": np.bool_, "float16": np.float16,
           "uint8": np.uint8, "uint16": np.uint16, "int8": np.int8, "int16": np.int16}

#: Keras 2 config keys that Keras 3 layer constructors do not accept
_DROP_KEYS = {"batch_input_shape", "batch_shape", "input_dtype", "sparse", "ragged", "input_shape",
              "build_config", "module", "registered_name"}

#: suffix of conv layer names that carry an implicit instance norm (PyTorch exporter encoding)
GN_SUFFIX = "_gn"
GN_EPSILON = 1e-5


# --------------------------------------------------------------------------------------- parsing
def read_model_json(model_dir) -> dict:
    """Parse ``model_dir/model.json`` (or a direct path to a .json); ModelError when unusable."""
    p = Path(model_dir)
    path = p if p.suffix == ".json" else p / "model.json"
    if not path.is_file():
        raise ModelError(f"TF.js model.json not found: {path}")
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot parse {path}: {e}") from e
    if not isinstance(spec, dict) or "modelTopology" not in spec or "weightsManifest" not in spec:
        raise ModelError(f"{path} is not a TF.js layers-model (modelTopology/weightsManifest missing)")
    fmt = spec.get("format", "layers-model")
    if fmt not in ("layers-model", None):
        raise ModelError(f"{path}: format {fmt!r} is not a layers-model (graph models are not supported)")
    return spec


def _model_config(spec: dict) -> dict:
    """Return {'class_name': ..., 'config': ...} of the Keras model inside a TF.js spec."""
    topo = spec["modelTopology"]
    mc = topo.get("model_config", topo) if isinstance(topo, dict) else None
    if not isinstance(mc, dict) or "class_name" not in mc:
        raise ModelError("modelTopology has no Keras model_config")
    return mc


def _layers_of(mc: dict) -> list[dict]:
    cfg = mc["config"]
    layers = cfg if isinstance(cfg, list) else cfg.get("layers")
    if not layers:
        raise ModelError("model config has no layers")
    return layers


def read_tfjs_weights(model_dir, spec: dict | None = None) -> list[tuple[str, np.ndarray]]:
    """All weights of the manifest, in manifest order, as (name, array).

    Shards of one group are concatenated in the listed order; groups follow each other.
    Raises ModelError for a missing shard, a short/long buffer or an unsupported dtype.
    """
    model_dir = Path(model_dir)
    if model_dir.suffix == ".json":
        model_dir = model_dir.parent
    spec = spec if spec is not None else read_model_json(model_dir)
    out: list[tuple[str, np.ndarray]] = []
    for gi, group in enumerate(spec["weightsManifest"]):
        paths = group.get("paths") or []
        chunks = []
        for rel in paths:
            f = model_dir / rel
            if not f.is_file():
                raise ModelError(f"weight shard missing: {f}")
            chunks.append(f.read_bytes())
        buf = b"".join(chunks)
        offset = 0
        for w in group.get("weights", []):
            name, shape = w["name"], [int(s) for s in w.get("shape", [])]
            dtype = w.get("dtype", "float32")
            q = w.get("quantization")
            stored = q["dtype"] if q else dtype
            if stored not in _DTYPES:
                raise ModelError(f"weight {name}: unsupported dtype {stored!r}")
            np_dt = np.dtype(_DTYPES[stored]).newbyteorder("<")
            count = int(np.prod(shape)) if shape else 1
            nbytes = count * np_dt.itemsize
            if offset + nbytes > len(buf):
                raise ModelError(
                    f"weight shard(s) {paths} too short: {name} needs bytes {offset}-{offset + nbytes}, "
                    f"only {len(buf)} present (truncated or corrupt download?)")
            arr = np.frombuffer(buf, dtype=np_dt, count=count, offset=offset).reshape(shape)
            offset += nbytes
            if q:
                if stored == "float16":
                    arr = arr.astype(np.float32)
                elif "scale" in q:
                    arr = arr.astype(np.float32) * np.float32(q["scale"]) + np.float32(q.get("min", 0.0))
                else:
                    raise ModelError(f"weight {name}: quantisation {q} not understood")
            target = _DTYPES.get(dtype, np.float32)
            out.append((name, np.ascontiguousarray(arr.astype(target, copy=False))))
        if offset != len(buf):
            raise ModelError(f"weight group {gi} ({paths}): {len(buf) - offset} unexpected trailing bytes; "
                             "the shards do not match model.json")
    for name, arr in out:
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise ModelError(f"weight {name} contains NaN/Inf (corrupt shard?)")
    return out


# --------------------------------------------------------------------------------------- building
def _clean_config(cfg: dict) -> dict:
    cfg = {k: v for k, v in cfg.items() if k not in _DROP_KEYS}
    dt = cfg.get("dtype")
    if isinstance(dt, dict):  # Keras 3 DTypePolicy dict or Keras 2 Policy
        cfg["dtype"] = (dt.get("config") or {}).get("name", "float32")
    for key in ("kernel_initializer", "bias_initializer", "gamma_initializer", "beta_initializer",
                "moving_mean_initializer", "moving_variance_initializer"):
        if isinstance(cfg.get(key), dict):  # weights are assigned anyway; avoid deserialising Keras 2 objects
            cfg[key] = "zeros"
    for key in ("kernel_regularizer", "bias_regularizer", "activity_regularizer", "kernel_constraint",
                "bias_constraint", "gamma_regularizer", "beta_regularizer", "gamma_constraint",
                "beta_constraint"):
        cfg.pop(key, None)
    if cfg.get("activation") == "linear":
        cfg["activation"] = None if "filters" in cfg or "units" in cfg else "linear"
    return cfg


def _make_layer(class_name: str, cfg: dict):
    import keras

    cfg = _clean_config(cfg)
    simple = {
        "Conv3D": keras.layers.Conv3D, "Conv2D": keras.layers.Conv2D, "Conv1D": keras.layers.Conv1D,
        "Conv3DTranspose": keras.layers.Conv3DTranspose, "Conv2DTranspose": keras.layers.Conv2DTranspose,
        "Activation": keras.layers.Activation, "BatchNormalization": keras.layers.BatchNormalization,
        "Dropout": keras.layers.Dropout, "SpatialDropout3D": keras.layers.SpatialDropout3D,
        "SpatialDropout2D": keras.layers.SpatialDropout2D, "ReLU": keras.layers.ReLU,
        "ELU": keras.layers.ELU, "LeakyReLU": keras.layers.LeakyReLU, "PReLU": keras.layers.PReLU,
        "Softmax": keras.layers.Softmax, "Add": keras.layers.Add, "Concatenate": keras.layers.Concatenate,
        "Multiply": keras.layers.Multiply, "MaxPooling3D": keras.layers.MaxPooling3D,
        "MaxPooling2D": keras.layers.MaxPooling2D, "AveragePooling3D": keras.layers.AveragePooling3D,
        "UpSampling3D": keras.layers.UpSampling3D, "UpSampling2D": keras.layers.UpSampling2D,
        "ZeroPadding3D": keras.layers.ZeroPadding3D, "Cropping3D": keras.layers.Cropping3D,
        "LayerNormalization": keras.layers.LayerNormalization,
        "GroupNormalization": keras.layers.GroupNormalization, "Dense": keras.layers.Dense,
    }
    if class_name == "LeakyReLU" and "alpha" in cfg:  # Keras 2 name of negative_slope
        cfg["negative_slope"] = cfg.pop("alpha")
    cls = simple.get(class_name)
    try:
        if cls is not None:
            import inspect

            params = inspect.signature(cls.__init__).parameters
            accepts_kwargs = any(p.kind == p.VAR_KEYWORD for p in params.values())
            base = {"name", "dtype", "trainable"}
            kwargs = {k: v for k, v in cfg.items() if k in params or k in base}
            if not accepts_kwargs:
                kwargs = {k: v for k, v in kwargs.items() if k in params}
            return cls(**kwargs)
        return keras.layers.deserialize({"class_name": class_name, "config": cfg})
    except Exception as e:  # noqa: BLE001 - any construction failure is a model problem
        raise ModelError(f"cannot build Keras 3 layer {class_name} {cfg.get('name')!r}: {e}") from e


def _inbound_names(layer: dict) -> list[tuple[str, int]]:
    """[(layer_name, tensor_index)] for a Keras 2 'inbound_nodes' entry (first call only)."""
    nodes = layer.get("inbound_nodes") or []
    if not nodes:
        return []
    node = nodes[0]
    out = []
    if isinstance(node, dict):  # Keras 3 style {'args': [...], 'kwargs': {}}
        def walk(obj):
            if isinstance(obj, dict) and obj.get("class_name") == "__keras_tensor__":
                h = obj["config"]["keras_history"]
                out.append((h[0], int(h[2])))
            elif isinstance(obj, (list, tuple)):
                for o in obj:
                    walk(o)
            elif isinstance(obj, dict):
                for o in obj.values():
                    walk(o)
        walk(node.get("args", []))
        return out
    for entry in node:
        out.append((entry[0], int(entry[2]) if len(entry) > 2 else 0))
    return out


def build_keras_model(spec: dict, *, flexible_input: bool = True, gn_from_names: bool | None = None):
    """Build (uninitialised) the Keras 3 model described by a TF.js spec.

    flexible_input: spatial input dims become None so any crop size runs (fully convolutional nets).
    gn_from_names: insert a parameter-free instance norm after conv layers named ``*_gn``; None =
    only for models generated by brainchop's PyTorch exporter.
    """
    import keras

    mc = _model_config(spec)
    layers = _layers_of(mc)
    if gn_from_names is None:
        gn_from_names = "pytorch" in str(spec.get("generatedBy", "")).lower()

    # input layer(s)
    tensors: dict[str, list] = {}
    inputs = []
    first = layers[0]
    body = layers
    if first["class_name"] == "InputLayer":
        body = layers[1:]
        input_specs = [first]
    else:  # Sequential without explicit InputLayer: shape from the first layer's batch_input_shape
        input_specs = [{"class_name": "InputLayer", "config": {**first["config"], "name": "input"}}]
    for ispec in input_specs:
        c = ispec["config"]
        shape = c.get("batch_input_shape") or c.get("batch_shape")
        if not shape:
            raise ModelError("model has no input shape (batch_input_shape)")
        shape = list(shape[1:])
        if flexible_input:
            shape = [None] * (len(shape) - 1) + [shape[-1]]
        x = keras.Input(shape=tuple(shape), name=c.get("name", "input"), dtype=c.get("dtype", "float32"))
        inputs.append(x)
        tensors[c.get("name", "input")] = [x]

    sequential = mc["class_name"] == "Sequential"
    prev = inputs[0]
    built = {}
    for layer in body:
        cls_name = layer["class_name"]
        cfg = dict(layer["config"])
        name = cfg.get("name") or layer.get("name")
        if cls_name == "InputLayer":
            continue
        klayer = _make_layer(cls_name, cfg)
        built[name] = klayer
        if sequential or not layer.get("inbound_nodes"):
            args = [prev]
        else:
            args = []
            for src, idx in _inbound_names(layer):
                if src not in tensors:
                    raise ModelError(f"layer {name!r} consumes unknown layer {src!r}")
                args.append(tensors[src][idx])
        y = klayer(args[0] if len(args) == 1 else args)
        if gn_from_names and name.endswith(GN_SUFFIX) and cls_name.startswith("Conv"):
            channels = int(cfg["filters"])
            norm = keras.layers.GroupNormalization(groups=channels, epsilon=GN_EPSILON, center=False,
                                                   scale=False, name=f"{name}_instnorm")
            y = norm(y)
        tensors[name] = [y]
        prev = y

    if sequential:
        outputs = [prev]
    else:
        cfg = mc["config"]
        outs = cfg.get("output_layers") or []
        if outs and isinstance(outs[0], str):  # single output written as a flat triple
            outs = [outs]
        outputs = [tensors[o[0]][int(o[2]) if len(o) > 2 else 0] for o in outs] or [prev]
    mcfg = mc["config"]
    model_name = str(mcfg.get("name") or "tfjs_model") if isinstance(mcfg, dict) else "tfjs_model"
    return keras.Model(inputs=inputs if len(inputs) > 1 else inputs[0],
                       outputs=outputs if len(outputs) > 1 else outputs[0], name=model_name)


def assign_weights(model, weights: list[tuple[str, np.ndarray]]) -> None:
    """Assign manifest weights to the model's layers by ``<layer>/<variable>`` name.

    Every manifest weight must find its variable and every layer variable must be covered;
    shapes must match exactly.
    """
    by_layer: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in weights:
        parts = name.split("/")
        if len(parts) < 2:
            raise ModelError(f"manifest weight name {name!r} is not '<layer>/<variable>'")
        var = parts[-1].split(":")[0]
        layer = parts[-2]
        # names like 'model/conv/kernel' or 'conv/conv/kernel' -> layer is the segment before the variable
        by_layer.setdefault(layer, {})[var] = arr
    used = set()
    for layer in model.layers:
        if not layer.weights:
            continue
        got = by_layer.get(layer.name)
        if got is None:
            if layer.name.endswith("_instnorm"):
                continue
            raise ModelError(f"no weights in the manifest for layer {layer.name!r}")
        values = []
        for v in layer.weights:
            vname = v.name.split("/")[-1].split(":")[0]
            if vname not in got:
                raise ModelError(f"manifest lacks {layer.name}/{vname}")
            arr = got[vname]
            if tuple(arr.shape) != tuple(v.shape):
                raise ModelError(f"shape mismatch for {layer.name}/{vname}: manifest {tuple(arr.shape)}, "
                                 f"model {tuple(v.shape)}")
            values.append(arr)
            used.add(f"{layer.name}/{vname}")
        layer.set_weights(values)
    unused = [f"{lay}/{v}" for lay, d in by_layer.items() for v in d if f"{lay}/{v}" not in used]
    if unused:
        raise ModelError(f"manifest weights not used by the model: {unused[:5]}")


def load_tfjs_layers_model(model_dir, *, flexible_input: bool = True, gn_from_names: bool | None = None):
    """Load a TF.js layers-model directory (model.json + shards) as a Keras 3 ``keras.Model``.

    The spatial input shape is (None, ..., None, C) when ``flexible_input`` (default), so a fully
    convolutional net runs on any crop. Raises ModelError on missing/short shards or shape mismatch.
    """
    spec = read_model_json(model_dir)
    weights = read_tfjs_weights(model_dir, spec)
    model = build_keras_model(spec, flexible_input=flexible_input, gn_from_names=gn_from_names)
    assign_weights(model, weights)
    return model


def load_card(path, card, fold, extra):
    """Loader ``tfjs_layers`` (:mod:`cohortseg.models.loaders`): the TF.js model of the card's fold
    (its ``model.json``, or the folder holding it)."""
    from pathlib import Path

    path = Path(path)
    return load_tfjs_layers_model(path.parent if path.is_file() else path)
