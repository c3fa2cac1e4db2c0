"""Tests of ucpjax.quantize: STE, the TFLite weight grid, QAT keeping earlier constraints."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from ucpjax import bias_grid, constraints, data, devices, int8_grid, models, quantize, train
from ucpjax.config import ConfigError

SMALL_TRAIN = train.TrainConfig(epochs=0.25, batch_size=64, learning_rate=1e-3)


@pytest.fixture(scope="module")
def lenet():
    model = models.create("lenet300")
    params = models.init(model, (28, 28, 1))["params"]
    return params, train.inference_fn(model, {})


@pytest.fixture(scope="module")
def mnist():
    return data.load("mnist").take(1024, 256)


def _random_params(seed=0, dense=(100, 10), conv=(3, 3, 4, 8), zeros=0.3):
    rng = np.random.default_rng(seed)

    def kernel(shape):
        w = rng.normal(size=shape).astype(np.float32) * np.float32(0.1)
        # Channels of very different sizes, so per-channel scales differ.
        w *= np.linspace(0.1, 2.0, shape[-1], dtype=np.float32)
        w[rng.random(shape) < zeros] = 0.0
        return jnp.asarray(w)

    return {"Dense_0": {"kernel": kernel(dense), "bias": jnp.asarray(rng.normal(size=dense[-1:]),
                                                                     jnp.float32)},
            "Conv_0": {"kernel": kernel(conv)}}


def _assert_on_grid(w, scale, qmax):
    """``w == codes * scale`` exactly, codes integers in [-qmax, qmax]."""
    w, scale = np.asarray(w), np.asarray(scale, np.float32)
    codes = np.round(w / scale)
    assert np.abs(codes).max() <= qmax
    np.testing.assert_array_equal(codes.astype(np.float32) * scale, w)


def test_ste_gradient_is_one_inside_zero_outside():
    scale, zp = 0.1, 3.0  # representable range [(-128-3)*0.1, (127-3)*0.1] = [-13.1, 12.4]
    x = jnp.array([-20.0, -13.0, -0.04, 0.0, 0.05, 12.3, 12.5, 50.0])
    grad = jax.jit(jax.grad(lambda x: quantize.fake_quant(x, scale, zp, qmin=-128, qmax=127).sum()))
    np.testing.assert_array_equal(grad(x), [0, 1, 1, 1, 1, 1, 0, 0])
    # Weights: symmetric narrow grid [-127 s, 127 s].
    wgrad = jax.jit(jax.grad(
        lambda w: quantize.fake_quant(w, 0.01, 0.0, qmin=-127, qmax=127).sum()))
    np.testing.assert_array_equal(wgrad(jnp.array([-1.3, -1.26, 0.3, 1.26, 1.3])), [0, 1, 1, 1, 0])


def test_fake_quant_is_bit_exact_on_the_grid():
    scale = np.float32(0.0123)
    codes = np.arange(-128, 128, dtype=np.float32)
    fq = jax.jit(lambda x, zp: quantize.fake_quant(x, scale, zp, qmin=-128, qmax=127))
    for zp in (0.0, -5.0, 17.0):
        on_grid = ((codes - np.float32(zp)) * scale).astype(np.float32)
        keep = (codes - zp >= -128) & (codes - zp <= 127)
        np.testing.assert_array_equal(fq(on_grid[keep], zp), on_grid[keep])
    assert float(fq(jnp.zeros(3), -128.0).max()) == 0.0 == float(fq(jnp.zeros(3), 0.0).min())


def test_quantize_weights_idempotent_keeps_zeros_per_channel_scales():
    params = _random_params()
    config = quantize.QuantizeConfig()
    assert not quantize.dense_per_tensor(params, config)
    once = quantize.quantize_weights(params, config)
    twice = quantize.quantize_weights(once, config)
    jax.tree.map(np.testing.assert_array_equal, once, twice)
    np.testing.assert_array_equal(once["Dense_0"]["bias"], params["Dense_0"]["bias"])
    for layer in ("Dense_0", "Conv_0"):
        w, q = np.asarray(params[layer]["kernel"]), np.asarray(once[layer]["kernel"])
        assert np.all(q[w == 0] == 0)
        # TFLite's per-channel scale: max |w_c| / 127 along the output axis.
        scale = np.abs(w).reshape(-1, w.shape[-1]).max(0) / np.float32(127)
        _assert_on_grid(q, scale, 127)
        np.testing.assert_array_equal(np.abs(q).reshape(-1, w.shape[-1]).max(0),
                                      np.float32(127) * scale)
        assert np.abs(q - w).max() <= scale.max() / 2 * (1 + 1e-6)


def test_per_tensor_when_per_channel_false_but_conv_stays_per_channel():
    params = _random_params(seed=1)
    config = quantize.QuantizeConfig(per_channel=False)
    assert quantize.dense_per_tensor(params, config)
    q = quantize.quantize_weights(params, config)
    w = np.asarray(params["Dense_0"]["kernel"])
    _assert_on_grid(q["Dense_0"]["kernel"], np.abs(w).max() / np.float32(127), 127)
    c = np.asarray(params["Conv_0"]["kernel"])
    _assert_on_grid(q["Conv_0"]["kernel"], np.abs(c).reshape(-1, 8).max(0) / np.float32(127), 127)


def test_4_bits_at_most_15_values_per_channel_and_idempotent():
    # A 100x10 kernel on a 4-bit per-channel grid has few distinct values and looks
    # weight-shared to constraints.codebook; it must still stay per channel.
    params = _random_params(seed=2, dense=(100, 10))
    config = quantize.QuantizeConfig(weight_bits=4)
    modes = quantize.weight_modes(params, config)
    q = jax.jit(lambda p: quantize.fake_quant_weights(p, modes, 4))(params)
    for layer in ("Dense_0", "Conv_0"):
        k = np.asarray(q[layer]["kernel"])
        per_channel = [np.unique(c).size for c in k.reshape(-1, k.shape[-1]).T]
        assert max(per_channel) <= 15
        w = np.asarray(params[layer]["kernel"])
        _assert_on_grid(k, np.abs(w).reshape(-1, w.shape[-1]).max(0) / np.float32(7), 7)
    assert constraints.codebook(q["Dense_0"]["kernel"]) is not None
    assert not quantize.dense_per_tensor(q, config)
    jax.tree.map(np.testing.assert_array_equal, q, quantize.quantize_weights(q, config))


def test_clustered_conv_keeps_k_codes_per_layer_dense_goes_per_tensor():
    rng = np.random.default_rng(3)
    centroids = np.float32([-0.3, -0.1, 0.05, 0.2])
    conv = centroids[rng.integers(0, 4, (3, 3, 4, 8))]
    conv[rng.random(conv.shape) < 0.3] = 0.0
    params = {"Conv_0": {"kernel": jnp.asarray(conv)},
              "Dense_0": {"kernel": jnp.asarray(rng.normal(size=(64, 10)), jnp.float32)},
              "Dense_1": {"kernel": jnp.asarray(centroids[rng.integers(0, 4, (64, 10))])}}
    config = quantize.QuantizeConfig()
    assert quantize.dense_per_tensor(params, config)  # Dense_1 is weight-shared
    q = quantize.quantize_weights(params, config)
    for layer in ("Dense_0", "Dense_1"):
        w = np.asarray(params[layer]["kernel"])
        _assert_on_grid(q[layer]["kernel"], np.abs(w).max() / np.float32(127), 127)
    assert np.unique(q["Dense_1"]["kernel"]).size <= 4
    k = np.asarray(q["Conv_0"]["kernel"])
    assert np.all(k[conv == 0] == 0)
    # The layer grid: one book of k codes for the layer, short per-channel scales.
    scales, codes = int8_grid.layer_grid(k)
    assert np.unique(codes[codes != 0]).size <= 4
    assert np.all((scales.view(np.uint32) & 0xFFFF) == 0)
    assert np.abs(k - conv).max() <= 0.3 / 127  # within one step of 0.3 / 127
    jax.tree.map(np.testing.assert_array_equal, quantize.quantize_weights(q, config), q)


def _cluster_and_prune(params):
    """Dense_0: 8 shared non-zero values and half zeros; Dense_1: 80% zeros."""
    w = np.asarray(params["Dense_0"]["kernel"])
    cut = np.quantile(np.abs(w), 0.5)
    edges = np.quantile(w[np.abs(w) > cut], np.linspace(0, 1, 9))
    centroids = ((edges[:-1] + edges[1:]) / 2).astype(np.float32)
    shared = centroids[np.clip(np.searchsorted(edges, w) - 1, 0, 7)]
    shared[np.abs(w) <= cut] = 0.0
    v = np.asarray(params["Dense_1"]["kernel"]).copy()
    v[np.abs(v) < np.quantile(np.abs(v), 0.8)] = 0.0
    out = jax.tree.map(lambda x: x, params)
    out["Dense_0"] = {**params["Dense_0"], "kernel": jnp.asarray(shared)}
    out["Dense_1"] = {**params["Dense_1"], "kernel": jnp.asarray(v)}
    return out


def test_qat_keeps_clusters_zeros_and_lands_on_the_grid(lenet, mnist):
    params, apply_fn = lenet
    params = _cluster_and_prune(params)
    assert constraints.codebook(params["Dense_0"]["kernel"]).centroids.size == 8
    config = quantize.QuantizeConfig(train=SMALL_TRAIN)
    q, report = quantize.quantize(params, config, apply_fn=apply_fn, data=mnist, seed=0)
    k0 = np.asarray(q["Dense_0"]["kernel"])
    assert np.unique(k0[k0 != 0]).size <= 8
    assert report["quantize/Dense_0/kernel/distinct"] <= 8
    for layer in ("Dense_0", "Dense_1"):
        assert np.all(np.asarray(q[layer]["kernel"])[np.asarray(params[layer]["kernel"]) == 0] == 0)
    # One clustered Dense kernel puts every Dense kernel on a per-tensor grid.
    assert report["quantize/dense_per_tensor"] == 1 and quantize.dense_per_tensor(q, config)
    for layer in ("Dense_0", "Dense_1", "Dense_2"):
        k = np.asarray(q[layer]["kernel"])
        _assert_on_grid(k, np.abs(k).max() / np.float32(127), 127)
        assert report[f"quantize/{layer}/kernel/per_channel"] == 0
    # Training moved the weights (the stage is not a plain rounding).
    assert not np.array_equal(q["Dense_2"]["kernel"],
                              quantize.quantize_weights(params, config)["Dense_2"]["kernel"])
    jax.tree.map(np.testing.assert_array_equal, q, quantize.quantize_weights(q, config))
    assert 0 < report["quantize/scale_min"] <= report["quantize/scale_max"]
    for key in ("quantize/val_accuracy", "quantize/val_accuracy_float_activations"):
        assert 0.0 <= report[key] <= 1.0
    assert {"quantize/act/Dense_0/scale", "quantize/act/logits/zero_point"} <= set(report)
    # After ReLU the range starts at 0: zero point at qmin.
    assert report["quantize/act/Dense_1/zero_point"] == -128


def test_bias_bits_put_every_bias_on_a_short_grid(lenet, mnist):
    params, apply_fn = lenet
    config = quantize.QuantizeConfig(bias_bits=6, train=SMALL_TRAIN)
    q, report = quantize.quantize(_cluster_and_prune(params), config, apply_fn=apply_fn,
                                  data=mnist, seed=0)
    assert report["quantize/short_bias_layers"] == 3
    for layer in ("Dense_0", "Dense_1", "Dense_2"):  # per tensor: one step per layer
        bits, _, codes = bias_grid.read_grid(np.asarray(q[layer]["bias"]))
        assert bits <= 6 and np.count_nonzero(codes) > 0


def test_ranges_contain_zero_and_train_step_does_not_recompile(lenet, mnist):
    params, apply_fn = lenet
    config = quantize.QuantizeConfig(ema_decay=0.5)
    x, y = mnist.x_train[:64], mnist.y_train[:64]
    ranges = quantize.calibrate(apply_fn, params, x)
    assert set(ranges) == {"Dense_0", "Dense_1", "Dense_2", quantize.OUTPUT}
    assert ranges["Dense_1"]["min"] == 0.0 and ranges["Dense_0"]["max"] > 0
    modes = quantize.weight_modes(params, config)
    bits = quantize.weight_bits(params, config)
    loss_fn = quantize.qat_loss(apply_fn, modes, bits, config)(lambda t: t)
    optimizer = optax.adam(1e-3)
    step = train.make_train_step(loss_fn, optimizer)
    state = train.TrainState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.copy, params), ranges,
                             optimizer.init(params))
    # As train.fit does: the state replicated over the mesh, so that the step's
    # outputs come back with the shardings of its inputs.
    mesh = devices.training_mesh(64, split=False)
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    key = jax.random.key(0)
    state, _ = step(state, x, y, key)
    state, metrics = step(state, mnist.x_train[64:128], mnist.y_train[64:128], key)
    assert step._cache_size() == 1
    assert np.isfinite(float(metrics["loss"]))
    # The EMA moved the output range halfway towards the second batch's.
    assert float(state.extra[quantize.OUTPUT]["max"]) != float(ranges[quantize.OUTPUT]["max"])
    scale, zp = quantize.activation_qparams(state.extra["Dense_0"]["min"],
                                         state.extra["Dense_0"]["max"], 8)
    assert float(zp) == round(float(zp)) and -128 <= float(zp) <= 127 and float(scale) > 0
    assert float(quantize.fake_quant_activation(jnp.zeros(()), 0.3, 2.0, 8)) == 0.0  # 0 in range


@pytest.mark.parametrize("field, value", [
    ("weight_bits", 1), ("weight_bits", 9), ("activation_bits", 16), ("activation_bits", 0),
    ("ema_decay", 1.0), ("ema_decay", 0.0), ("bias_bits", 1), ("bias_bits", 17),
    ("bias_bits", True),
])
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        quantize.QuantizeConfig(**{field: value})
