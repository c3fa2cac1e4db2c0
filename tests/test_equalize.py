import flax.linen as nn
import jax
import numpy as np
import pytest

from ucpjax import equalize, quantize
from ucpjax.model import Model
from ucpjax.pooling import GlobalAveragePool, max_pool

SHAPE = (12, 12, 3)


class _ConvDepthwise(nn.Module):
    """Conv + BatchNorm + activation (+ max pool), then a depthwise conv."""

    activation: str = "relu"
    multiplier: int = 1
    pool: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x) if self.activation == "relu" else nn.relu6(x)
        if self.pool:
            x = max_pool(x, 2)
        x = nn.Conv(8 * self.multiplier, (3, 3), feature_group_count=8, use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        return nn.Dense(10)(GlobalAveragePool()(x))


def _folded(module):
    """The module folded, the channels between its convs spread over 100x, half of
    each of the first conv's zero."""
    variables = module.init(jax.random.key(0), np.zeros((1, *SHAPE), np.float32))
    params = jax.tree.map(np.array, variables["params"])
    spread = np.geomspace(0.1, 10, 8, dtype=np.float32)
    kernel = params["Conv_0"]["kernel"] * spread
    # The depthwise conv undoes the spread, as training would: small channels matter.
    params["Conv_1"]["kernel"] = params["Conv_1"]["kernel"] / np.repeat(
        spread, module.multiplier)
    kernel[np.abs(kernel) < np.median(np.abs(kernel), axis=(0, 1, 2))] = 0
    params["Conv_0"]["kernel"] = kernel
    # Mean 0: every channel passes the ReLU on some images.
    stats = jax.tree.map(np.zeros_like, variables["batch_stats"])
    for bn in stats.values():
        bn["var"] = np.full_like(bn["var"], 0.8)
    model = Model(module, {"params": params, "batch_stats": stats}).folded(SHAPE)
    return model.apply_fn(), model.params


def _images(n=64):
    return np.random.default_rng(0).uniform(0, 1, (n, *SHAPE)).astype(np.float32)


@pytest.mark.parametrize("multiplier,pool", [(1, False), (2, True)])
def test_equalizing_keeps_the_function_zeros_and_shared_values(multiplier, pool):
    apply_fn, params = _folded(_ConvDepthwise(multiplier=multiplier, pool=pool))
    x = _images()
    new, report = equalize.equalize(apply_fn, params, x)
    assert report["equalize/layers"] == 1
    assert report["equalize/Conv_1/spread_before"] > 5
    assert report["equalize/Conv_1/spread_after"] == pytest.approx(1.0, abs=1e-3)
    before, after = apply_fn(params, x), apply_fn(new, x)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * np.abs(before).max())
    for layer in ("Conv_0", "Conv_1"):
        old, now = np.asarray(params[layer]["kernel"]), np.asarray(new[layer]["kernel"])
        np.testing.assert_array_equal(now == 0, old == 0)
        for c in range(old.shape[-1]):  # each output channel scaled as a whole
            assert len(np.unique(now[..., c])) == len(np.unique(old[..., c]))
    maxima = equalize.input_maxima(apply_fn, new, x, [("Conv_1",)])[("Conv_1",)]
    assert maxima.min() > 0
    np.testing.assert_allclose(maxima, maxima.max(), rtol=1e-4)


def test_equalizing_makes_the_int8_model_closer_to_the_float_one():
    apply_fn, params = _folded(_ConvDepthwise())
    x = _images(256)

    def int8_error(params):
        ranges = quantize.calibrate(apply_fn, params, x)
        int8 = quantize.quantized_apply(apply_fn, ranges)(params, x)
        return float(np.abs(int8 - apply_fn(params, x)).mean())

    new, _ = equalize.equalize(apply_fn, params, x)
    assert int8_error(new) < 0.7 * int8_error(params)


def test_a_clipping_activation_in_between_is_left_alone():
    apply_fn, params = _folded(_ConvDepthwise(activation="relu6"))
    assert equalize.find_pairs(apply_fn, params, SHAPE)  # a candidate ...
    new, report = equalize.equalize(apply_fn, params, _images())
    assert report["equalize/layers"] == 0  # ... that the check turns down
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_model_without_depthwise_convs_is_unchanged():
    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            return nn.Dense(10)(nn.relu(nn.Conv(4, (3, 3))(x)).reshape((x.shape[0], -1)))

    module = Plain()
    params = module.init(jax.random.key(0), np.zeros((1, *SHAPE), np.float32))["params"]
    apply_fn = lambda p, x: module.apply({"params": p}, x)
    new, report = equalize.equalize(apply_fn, params, _images(8))
    assert new is params and report == {"equalize/layers": 0}
