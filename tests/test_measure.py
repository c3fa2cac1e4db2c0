"""Tests of ucpjax.measure: multiplications counted by hand, bytes, sparsity."""

import io
import zipfile

import jax
import numpy as np
import pytest

from ucpjax import measure, models, train

MNIST = (28, 28, 1)


def _random_params(module, seed=0):
    """Params of the module's shapes, all non-zero; shapes come from an abstract init
    (compiling the real init costs seconds and the values do not matter here)."""
    x = np.zeros((1, *MNIST), np.float32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x, train=False))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.uniform(0.1, 1.0, s.shape).astype(np.float32), shapes)


@pytest.fixture(scope="module", params=["lenet300", "lenet5", "pcqat_mnist"])
def model(request):
    module = models.create(request.param)
    return request.param, train.inference_fn(module, {}), _random_params(module)


# Per layer by hand: Dense in*out; Conv kh*kw*cin*cout per output position x positions.
HAND = {
    "lenet300": {"Dense_0": 784 * 300, "Dense_1": 300 * 100, "Dense_2": 100 * 10},
    "lenet5": {
        "Conv_0": (5 * 5 * 1 * 20) * (24 * 24),  # 28 - 5 + 1 = 24, VALID
        "Conv_1": (5 * 5 * 20 * 50) * (8 * 8),  # pooled to 12, 12 - 5 + 1 = 8
        "Dense_0": (4 * 4 * 50) * 500,  # pooled to 4x4x50 = 800
        "Dense_1": 500 * 10,
    },
    "pcqat_mnist": {
        "Conv_0": (3 * 3 * 1 * 12) * (26 * 26),  # 28 - 3 + 1 = 26
        "Dense_0": (13 * 13 * 12) * 10,  # pooled to 13x13x12 = 2028
    },
}


def test_dense_macs_match_hand_counts(model):
    name, apply_fn, params = model
    result = measure.macs(apply_fn, params, MNIST)
    assert {k: v["dense"] for k, v in result["layers"].items()} == HAND[name]
    assert result["total"]["dense"] == sum(HAND[name].values())
    assert result["total"]["nonzero"] == result["total"]["dense"]


def test_lenet300_total_is_266200():
    module = models.create("lenet300")
    params = _random_params(module)
    macs = measure.macs(train.inference_fn(module, {}), params, MNIST)
    assert macs["total"]["dense"] == 784 * 300 + 300 * 100 + 100 * 10 == 266_200


def test_nonzero_macs_drop_with_zeroed_weights(model):
    name, apply_fn, params = model
    rng = np.random.default_rng(0)
    zeroed, expected = {}, 0
    positions = {"Conv_0": 24 * 24 if name == "lenet5" else 26 * 26, "Conv_1": 8 * 8}
    for layer, leaves in params.items():
        kernel = leaves["kernel"].copy()
        mask = rng.random(kernel.shape) < 0.7
        kernel[mask] = 0
        zeroed[layer] = {**leaves, "kernel": kernel}
        # Each zeroed weight saves one multiplication per position it is applied at.
        expected += int(mask.sum()) * (positions[layer] if layer.startswith("Conv") else 1)
    result = measure.macs(apply_fn, zeroed, MNIST)
    assert result["total"]["dense"] == sum(HAND[name].values())
    assert result["total"]["nonzero"] == result["total"]["dense"] - expected
    assert sum(v["nonzero"] for v in result["layers"].values()) == result["total"]["nonzero"]


def test_macs_of_a_layer_called_twice():
    import flax.linen as nn

    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            layer = nn.Dense(6)
            return layer(layer(x.reshape(x.shape[0], 6)))

    module = Twice()
    params = module.init(jax.random.key(0), np.zeros((1, 2, 3), np.float32))["params"]
    result = measure.macs(lambda p, x: module.apply({"params": p}, x), params, (2, 3))
    assert set(result["layers"]) == {"Dense_0", "Dense_0#2"}
    assert result["total"]["dense"] == 2 * 36


def test_float32_bytes_and_sparsity():
    params = _random_params(models.create("lenet300"))
    assert measure.float32_bytes(params) == 4 * (266_200 + 300 + 100 + 10)
    assert measure.sparsity(params) == 0.0
    params["Dense_1"]["kernel"][:150] = 0  # 15,000 of 266,200 kernel weights
    params["Dense_1"]["bias"][:] = 0  # biases do not count
    assert measure.sparsity(params) == pytest.approx(15_000 / 266_200)


def test_zip_bytes_is_the_size_of_a_deflated_zip():
    data = np.random.default_rng(0).integers(0, 4, 50_000, dtype=np.uint8).tobytes()
    size = measure.zip_bytes(data)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("model", data)
    assert size == len(buffer.getvalue())
    # Two bits of entropy per byte: DEFLATE gets close to 4x, zip overhead is small.
    assert len(data) / 4 < size < len(data) / 3
    assert measure.zip_bytes(bytes(100_000)) < 1_000
