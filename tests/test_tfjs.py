"""TF.js layers-model loader: every brainchop model loads, matches its labels, fails loudly when
corrupt, and survives the .keras conversion cache unchanged."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.shared

keras = pytest.importorskip("keras")

from cohortseg.science.brain import MESHNETS  # noqa: E402
from cohortseg.errors import ModelError  # noqa: E402
from cohortseg.models.nets.tfjs import (  # noqa: E402
    load_tfjs_layers_model,
    read_model_json,
    read_tfjs_weights,
)

MODEL_NAMES = ["mindgrab", "model11_gw_ae", "model20chan3cls", "model21_104class", "model30chan18cls",
               "model5_gw_ae"]


@pytest.fixture(scope="module")
def brainchop_dir(shared_dir):
    d = shared_dir / "models" / "brainchop"
    if not d.is_dir():
        pytest.skip(f"{d} absent")
    return d


@pytest.fixture(scope="module")
def models(brainchop_dir):
    """Each model built once for the module."""
    return {name: load_tfjs_layers_model(brainchop_dir / name) for name in MODEL_NAMES}


def test_every_model_dir_is_covered(brainchop_dir):
    found = sorted(p.name for p in brainchop_dir.iterdir() if (p / "model.json").is_file())
    assert found == sorted(MODEL_NAMES)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_loads_and_classes_match_labels(models, brainchop_dir, name):
    model = models[name]
    assert tuple(model.input_shape) == (None, None, None, None, 1)  # flexible spatial input
    x = np.random.default_rng(0).random((1, 13, 16, 11, 1), dtype=np.float32)  # odd, non-cubic crop
    y = np.asarray(model(x, training=False))
    assert y.shape[:4] == (1, 13, 16, 11)
    assert np.all(np.isfinite(y))
    n_cls = y.shape[-1]
    if name in MESHNETS:  # the registry names every class the net outputs
        assert len(MESHNETS[name].labels) == n_cls


def test_expected_class_counts(models):
    n = {k: m.output_shape[-1] for k, m in models.items()}
    assert n == {"mindgrab": 2, "model11_gw_ae": 3, "model20chan3cls": 3, "model21_104class": 104,
                 "model30chan18cls": 18, "model5_gw_ae": 3}


def test_mindgrab_gets_its_name_encoded_instance_norms(models):
    gn = [lay for lay in models["mindgrab"].layers if isinstance(lay, keras.layers.GroupNormalization)]
    assert len(gn) == 25  # one after each of the 25 hidden convs (``conv3d_<i>_gn``)
    assert not any(isinstance(lay, keras.layers.GroupNormalization) for lay in models["model5_gw_ae"].layers)


# ------------------------------------------------------------------ independent numpy forward pass
def _np_conv_same(x, kernel, bias, dilation):
    """'same' 3D convolution, channels-last, explicit over the kernel taps (reference)."""
    k = kernel.shape[0]
    r = (k - 1) // 2 * dilation
    xp = np.pad(x, [(r, r)] * 3 + [(0, 0)])
    out = np.zeros(x.shape[:3] + (kernel.shape[-1],), dtype=np.float64)
    for a in range(k):
        for b in range(k):
            for c in range(k):
                sl = xp[a * dilation:a * dilation + x.shape[0], b * dilation:b * dilation + x.shape[1],
                        c * dilation:c * dilation + x.shape[2]]
                out += sl @ kernel[a, b, c]
    return out + (0 if bias is None else bias)


def _np_forward(spec, weights, x, gn):
    from scipy.special import erf

    w = dict(weights)
    acts = {"relu": lambda v: np.maximum(v, 0), "elu": lambda v: np.where(v > 0, v, np.expm1(v)),
            "gelu": lambda v: 0.5 * v * (1 + erf(v / np.sqrt(2))), "linear": lambda v: v}
    for layer in spec["modelTopology"]["model_config"]["config"]["layers"][1:]:
        c = layer["config"]
        if layer["class_name"] == "Conv3D":
            x = _np_conv_same(x, w[f"{c['name']}/kernel"], w.get(f"{c['name']}/bias"), c["dilation_rate"][0])
            if gn and c["name"].endswith("_gn"):
                x = (x - x.mean(axis=(0, 1, 2))) / np.sqrt(x.var(axis=(0, 1, 2)) + 1e-5)
        elif layer["class_name"] == "Activation":
            x = acts[c["activation"]](x)
    return x


@pytest.mark.parametrize("name", ["model5_gw_ae", "mindgrab"])
def test_keras_matches_independent_numpy_forward(models, brainchop_dir, name):
    spec = read_model_json(brainchop_dir / name)
    weights = read_tfjs_weights(brainchop_dir / name, spec)
    x = np.random.default_rng(1).random((10, 12, 9, 1)).astype(np.float32)
    ref = _np_forward(spec, weights, x.astype(np.float64), gn=(name == "mindgrab"))
    got = np.asarray(models[name](x[None], training=False))[0]
    np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())


# ------------------------------------------------------------------ corrupt / inconsistent files
@pytest.fixture()
def model5_copy(brainchop_dir, tmp_path):
    dst = tmp_path / "model5_gw_ae"
    shutil.copytree(brainchop_dir / "model5_gw_ae", dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def test_truncated_bin_raises_model_error(model5_copy):
    b = model5_copy / "group1-shard1of1.bin"
    b.write_bytes(b.read_bytes()[:-100])
    with pytest.raises(ModelError, match="too short"):
        load_tfjs_layers_model(model5_copy)


def test_missing_bin_raises_model_error(model5_copy):
    (model5_copy / "group1-shard1of1.bin").unlink()
    with pytest.raises(ModelError, match="missing"):
        load_tfjs_layers_model(model5_copy)


def test_trailing_bytes_raise_model_error(model5_copy):
    b = model5_copy / "group1-shard1of1.bin"
    b.write_bytes(b.read_bytes() + b"\0" * 8)
    with pytest.raises(ModelError, match="trailing"):
        load_tfjs_layers_model(model5_copy)


def test_nan_weights_raise_model_error(model5_copy):
    b = model5_copy / "group1-shard1of1.bin"
    raw = bytearray(b.read_bytes())
    raw[0:4] = np.array([np.nan], dtype="<f4").tobytes()
    b.write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="NaN"):
        load_tfjs_layers_model(model5_copy)


def test_shape_mismatch_raises_model_error(model5_copy):
    j = model5_copy / "model.json"
    spec = json.loads(j.read_text())
    layers = spec["modelTopology"]["model_config"]["config"]["layers"]
    layers[1]["config"]["filters"] = 4  # the conv now disagrees with its manifest kernel [3,3,3,1,5]
    j.write_text(json.dumps(spec))
    with pytest.raises(ModelError, match="shape mismatch"):
        load_tfjs_layers_model(model5_copy)


def test_missing_model_json_raises_model_error(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_tfjs_layers_model(tmp_path)
