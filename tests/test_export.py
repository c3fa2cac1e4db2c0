"""Tests of ucpjax.export: the int8 .tflite holds the JAX weights and predicts like JAX.

One small LeNet-300-100 is trained once per module (5k MNIST examples, one
epoch) and converted a few times; conversion takes seconds, so every .tflite is
built in a module-scoped fixture.
"""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ucpjax import (
    export,
    int8_grid,
    measure,
    models,
    pooling,
    quantize,
    residual,
    train,
)

NUM_CLUSTERS = 16
CALIBRATION = 300  # representative examples given to the converter


@pytest.fixture(scope="module")
def mnist(mnist_5k):
    return mnist_5k


@pytest.fixture(scope="module")
def trained(lenet300_trained):
    return lenet300_trained


@pytest.fixture(scope="module")
def per_channel(trained, mnist):
    """Kernels on the per-channel int8 grid (what the converter will store), converted."""
    apply_fn, params = trained
    params = quantize.quantize_weights(params, quantize.QuantizeConfig())
    return params, export.to_tflite(apply_fn, params, mnist.input_shape,
                                    mnist.x_train[:CALIBRATION])


def _clustered_on_tensor_grid(params):
    """90% of the weights zeroed, the rest on 16 values of one per-tensor int8 grid."""
    def shared(w):
        w = np.asarray(w)
        if w.ndim != 2:
            return w
        w = np.where(np.abs(w) < np.quantile(np.abs(w), 0.9), 0.0, w).astype(np.float32)
        centroids = np.quantile(w[w != 0], np.linspace(0, 1, NUM_CLUSTERS)).astype(np.float32)
        nearest = centroids[np.abs(w[..., None] - centroids).argmin(-1)]
        return np.where(w == 0, 0.0, nearest).astype(np.float32)

    shared_params = jax.tree.map(shared, params)
    return quantize.quantize_weights(shared_params, quantize.QuantizeConfig(per_channel=False))


@pytest.fixture(scope="module")
def per_tensor(trained, mnist):
    apply_fn, params = trained
    params = _clustered_on_tensor_grid(params)
    def convert(sparse):
        return export.to_tflite(apply_fn, params, mnist.input_shape,
                                mnist.x_train[:CALIBRATION], per_tensor_dense=True,
                                sparse=sparse)

    return params, convert(False), convert(True)


def test_weights_are_int8_and_biases_int32(per_channel):
    _, model_bytes = per_channel
    report = export.weights_check(model_bytes, per_channel[0])
    assert report["all_int8"] and report["biases_int32"]
    runner = export.TfliteRunner(model_bytes)
    assert runner.input["dtype"] == np.int8 and runner.output["dtype"] == np.int8


def test_float_model_is_not_int8(trained, mnist):
    apply_fn, params = trained
    model_bytes = export.to_tflite(apply_fn, params, mnist.input_shape,
                                   mnist.x_train[:CALIBRATION], int8=False)
    assert not export.weights_check(model_bytes, params)["all_int8"]
    # Float32 TFLite computes what JAX computes, up to summation order.
    result = _measured(model_bytes, apply_fn, params, mnist.x_test[:500], mnist.y_test[:500])
    assert result["tflite_agreement"] == 1.0


def test_tflite_accuracy_equals_jax_within_tolerance(per_channel, trained, mnist):
    apply_fn, _ = trained
    params, model_bytes = per_channel
    int8_fn = export.simulated_int8(apply_fn, params, mnist.x_train[:CALIBRATION])
    result = _measured(model_bytes, int8_fn, params, mnist.x_test, mnist.y_test)
    assert result["jax_int8_accuracy"] > 0.8  # a trained model, not a trivial one
    config = export.ExportConfig()
    assert result["tflite_agreement"] >= config.min_agreement
    assert result["tflite_accuracy_gap"] <= config.accuracy_tolerance
    # A trained model decides nearly every image; a logit moves by a step or two.
    assert result["tflite_near_ties"] <= 0.05 * len(mnist.x_test)
    assert result["tflite_max_logit_error_steps"] <= 4
    export.check(result, config)


def test_evaluate_matches_runner(per_channel, mnist):
    _, model_bytes = per_channel
    x, y = mnist.x_test[:200], mnist.y_test[:200]
    result = export.evaluate(model_bytes, x, y)
    logits = export.TfliteRunner(model_bytes, use_xnnpack=False)(x)
    np.testing.assert_array_equal(result["predictions"], logits.argmax(-1))
    assert result["accuracy"] == pytest.approx(np.mean(logits.argmax(-1) == y))



def test_stripped_model_is_smaller_and_computes_the_same(per_channel, mnist):
    params, model_bytes = per_channel
    stripped = export.strip_strings(model_bytes)
    assert export.strip_strings(stripped) == stripped
    assert measure.zip_bytes(stripped) < measure.zip_bytes(model_bytes)
    assert b"Dense_0" in model_bytes and b"Dense_0" not in stripped
    assert b"CONVERSION_METADATA" not in stripped
    x = mnist.x_test[:200]
    np.testing.assert_array_equal(export.TfliteRunner(stripped)(x),
                                  export.TfliteRunner(model_bytes)(x))
    assert export.weights_check(stripped, params)["faithful"]

def test_weights_check_per_channel_grid_is_exact(per_channel):
    params, model_bytes = per_channel
    report = export.weights_check(model_bytes, params)
    assert report["faithful"] and report["unmatched"] == 0
    for name in ("Dense_0", "Dense_1", "Dense_2"):
        assert report[f"{name}/kernel/max_error_steps"] <= 0.01
        assert report[f"{name}/kernel/zeros_equal"]
    assert report["max_abs_error"] < 1e-6


def test_weights_check_detects_other_weights(per_channel):
    params, model_bytes = per_channel
    # Move one weight by half a quantization step: the check must notice.
    kernel = np.array(params["Dense_1"]["kernel"])
    kernel[3, 7] += np.abs(kernel[:, 7]).max() / 127 / 2
    moved = {**params, "Dense_1": {**params["Dense_1"], "kernel": jnp.asarray(kernel)}}
    report = export.weights_check(model_bytes, moved)
    assert not report["faithful"]
    assert report["Dense_1/kernel/max_error_steps"] > 0.4
    assert report["Dense_0/kernel/max_error_steps"] <= 0.01


def test_per_tensor_grid_keeps_k_values(per_tensor):
    params, model_bytes, _ = per_tensor
    report = export.weights_check(model_bytes, params)
    assert report["faithful"] and report["all_int8"]
    for name in ("Dense_0", "Dense_1", "Dense_2"):
        assert report[f"{name}/kernel/distinct"] <= NUM_CLUSTERS
        assert report[f"{name}/kernel/distinct"] == report[f"{name}/kernel/distinct_params"]
        assert report[f"{name}/kernel/zeros_equal"]


def test_sparse_format_is_smaller_and_predicts_the_same(per_tensor, mnist):
    _, dense_bytes, sparse_bytes = per_tensor
    assert len(sparse_bytes) < 0.5 * len(dense_bytes)
    x, y = mnist.x_test[:300], mnist.y_test[:300]
    # The sparse model cannot use XNNPACK; evaluate falls back to the builtin kernels.
    sparse = export.evaluate(sparse_bytes, x, y)
    dense = export.evaluate(dense_bytes, x, y, use_xnnpack=False)
    np.testing.assert_array_equal(sparse["predictions"], dense["predictions"])


def test_latency_is_measured(per_channel):
    _, model_bytes = per_channel
    microseconds = export.latency_us(model_bytes, repeats=50, warmup=5)
    assert 0 < microseconds < 50_000


def _measured(model_bytes, apply_fn, params, x, y) -> dict:
    """What ``export.verify`` measures, for a model exported here."""
    tflite = export.evaluate(model_bytes, x, y)
    jax_logits = train.predict(apply_fn, params, x)
    return {"tflite_accuracy": tflite["accuracy"],
            **export.faithfulness(tflite, jax_logits, y, export.ExportConfig().tie_steps),
            "weights_faithful": export.weights_check(model_bytes, params)["faithful"]}


def test_check_names_each_miss():
    config = export.ExportConfig()
    good = {"tflite_agreement": 0.999, "tflite_accuracy_gap": 0.0005, "weights_faithful": True}
    export.check(good, config)
    misses = [({"tflite_agreement": 0.99}, "export.min_agreement"),
              ({"tflite_accuracy_gap": 0.0025}, "export.accuracy_tolerance"),
              ({"weights_faithful": False}, "weights_check")]
    for change, culprit in misses:
        with pytest.raises(export.ToleranceError, match=culprit) as err:
            export.check({**good, **change}, config)
        assert "\n" not in str(err.value)
    export.check({**good, "tflite_accuracy_gap": 0.0025},
                 dataclasses.replace(config, accuracy_tolerance=0.01))


def test_a_gap_of_one_image_is_within_any_tolerance():
    """On 400 decided images one flip is a 0.0025 gap: the resolution, not a miss."""
    one = {"tflite_agreement": 0.9975, "tflite_accuracy_gap": 1 / 400, "tflite_decided": 400,
           "weights_faithful": True}
    export.check(one, export.ExportConfig())
    with pytest.raises(export.ToleranceError, match="export.accuracy_tolerance"):
        export.check({**one, "tflite_accuracy_gap": 2 / 400}, export.ExportConfig())


class SquashedLogits(nn.Module):
    """tanh over tiny logits: TFLite stores its output on a 1/128 grid, so the
    ten logits collapse to a few codes that the JAX int8 model does not round."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(32)(x.reshape((x.shape[0], -1))))
        return 100 * jnp.tanh(0.01 * nn.Dense(10)(x))


def test_preflight_refuses_an_export_that_cannot_follow_in_one_line(mnist):
    from ucpjax.model import Model, check_quantizable

    module = SquashedLogits()
    variables = dict(module.init(jax.random.key(0), mnist.x_train[:1]))
    unmodeled = check_quantizable(Model(module, variables), mnist.input_shape)
    assert unmodeled == ["tanh"]
    with pytest.raises(export.ToleranceError) as err:
        export.preflight(train.inference_fn(module, {}), variables["params"], mnist.take(500),
                         config=export.ExportConfig(), reason=", ".join(unmodeled),
                         quantize_config=quantize.QuantizeConfig())
    message = str(err.value)
    assert "\n" not in message and "TANH" in message and "before any compression" in message
    # The pipeline checks again after each stage; the message then names the stage.
    with pytest.raises(export.ToleranceError, match="after the prune stage"):
        export.preflight(train.inference_fn(module, {}), variables["params"], mnist.take(500),
                         config=export.ExportConfig(), reason=", ".join(unmodeled),
                         quantize_config=quantize.QuantizeConfig(), when="after the prune stage")


class Sorted(nn.Module):
    """A sort, which TFLite's converter has no op for."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(16)(x.reshape((x.shape[0], -1))))
        return nn.Dense(10)(jnp.sort(x, axis=-1))


def test_preflight_refuses_a_model_that_does_not_convert_in_one_line(mnist):
    from ucpjax.config import ConfigError

    module = Sorted()
    variables = dict(module.init(jax.random.key(0), mnist.x_train[:1]))
    with pytest.raises(ConfigError) as err:
        export.preflight(train.inference_fn(module, {}), variables["params"], mnist.take(300),
                         config=export.ExportConfig(), reason="sort",
                         quantize_config=quantize.QuantizeConfig())
    assert "\n" not in str(err.value) and "does not convert" in str(err.value)
    assert "'vhlo.sort_v1' op is not part" in str(err.value)  # the converter's own words
    assert not re.search(r"\.py\"?:\d+", str(err.value))  # no path of this machine


def test_preflight_passes_a_relu_model(trained, mnist):
    apply_fn, params = trained
    measured = export.preflight(apply_fn, params, mnist.take(500, 300),
                                config=export.ExportConfig(), reason="-",
                                quantize_config=quantize.QuantizeConfig())
    assert measured["tflite_agreement"] >= 0.995 and measured["tflite_ops"] == []


def test_weights_check_reads_conv_layouts(mnist):
    """LeNet-5: Conv_0 (1 input channel) becomes DEPTHWISE_CONV_2D (1HWO), Conv_1 CONV_2D
    (OHWI); both must be found and equal the per-channel grid weights (untrained is fine)."""
    model = models.create("lenet5")
    params = quantize.quantize_weights(models.init(model, mnist.input_shape)["params"],
                                    quantize.QuantizeConfig())
    model_bytes = export.to_tflite(train.inference_fn(model, {}), params, mnist.input_shape,
                                   mnist.x_train[:50])
    ops = {op["op_name"] for op in export.interpreter(model_bytes)._get_ops_details()}
    assert {"DEPTHWISE_CONV_2D", "CONV_2D", "FULLY_CONNECTED"} <= ops
    report = export.weights_check(model_bytes, params)
    assert report["faithful"] and report["unmatched"] == 0 and report["all_int8"]
    assert report["Conv_0/kernel/max_error_steps"] <= 0.01
    assert report["Conv_1/kernel/max_error_steps"] <= 0.01


def test_dead_channels_take_the_converters_smallest_step(mnist):
    """A channel whose weights all lie below 5e-7 (BatchNorm's scale decayed to ~0)
    gets the converter's step 5e-7 / 127, not max|w| / 127: QAT's grid must be the
    same or the .tflite holds other codes (found on a resnet8 after 240 epochs)."""
    model = models.create("lenet5")
    params = models.init(model, mnist.input_shape)["params"]
    for name, peak in (("Conv_0", 3e-10), ("Conv_1", 4e-8)):
        kernel = params[name]["kernel"]
        params[name]["kernel"] = kernel.at[..., 0].multiply(peak / abs(kernel[..., 0]).max())
        params[name]["kernel"] = params[name]["kernel"].at[..., 1].set(0.0)
    params = quantize.quantize_weights(params, quantize.QuantizeConfig())
    model_bytes = export.to_tflite(train.inference_fn(model, {}), params, mnist.input_shape,
                                   mnist.x_train[:50])
    report = export.weights_check(model_bytes, params)
    assert report["faithful"], {k: v for k, v in report.items() if "Conv" in k}
    assert int8_grid.channel_grid(np.asarray(params["Conv_1"]["kernel"])) is not None


class PooledNet(nn.Module):
    """Conv -> residual block -> conv -> global average pool -> Dense: the ops of
    resnet8 and the head of cifar_cnn."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(16, (3, 3), strides=(2, 2), padding="VALID")(x))  # 13x13
        y = nn.Conv(16, (3, 3), padding="SAME")(x)  # no ReLU: int8 only as ADD's input
        x = nn.relu(residual.Add()(x, y))
        x = nn.relu(nn.Conv(32, (3, 3), padding="SAME")(x))
        return nn.Dense(10)(pooling.GlobalAveragePool()(x))


@pytest.fixture(scope="module")
def pooled(mnist):
    model = PooledNet()
    params = models.init(model, mnist.input_shape)["params"]
    config = train.TrainConfig(epochs=2, batch_size=32, learning_rate=1e-2)
    optimizer = train.make_optimizer(config, train.total_steps(config, len(mnist.x_train)))
    state, _ = train.fit(params, train.classification_loss(model), optimizer,
                         mnist.x_train, mnist.y_train, config=config, seed=0)
    apply_fn = train.inference_fn(model, {})
    params = quantize.quantize_weights(state.params, quantize.QuantizeConfig())
    rep = mnist.x_train[:CALIBRATION]
    return apply_fn, params, export.to_tflite(apply_fn, params, mnist.input_shape, rep)


def test_activation_scales_are_the_simulated_ones(pooled, mnist):
    """The converter calibrates each tensor to the min/max over the representative
    examples, as quantize.calibrate does: the .tflite's scales and zero points are
    the ones simulated_int8 quantizes to, including MEAN's input (the conv output)
    and both of ADD's (the block input and the conv output that only ADD rounds)."""
    apply_fn, params, model_bytes = pooled
    ranges = quantize.calibrate(apply_fn, params, mnist.x_train[:CALIBRATION])
    expected = {name: tuple(float(v) for v in quantize.activation_qparams(r["min"], r["max"], 8))
                for name, r in ranges.items()}
    interp = export.interpreter(model_bytes, use_xnnpack=False)
    ops = interp._get_ops_details()
    mean_op = next(op for op in ops if op["op_name"] in ("MEAN", "SUM"))
    add_op = next(op for op in ops if op["op_name"] == "ADD")
    tensors = {"Conv_0": interp.get_input_details()[0]["index"],
               "GlobalAveragePool_0": mean_op["inputs"][0],
               quantize.OUTPUT: interp.get_output_details()[0]["index"]}
    details = {d["index"]: d for d in interp.get_tensor_details()}
    # ADD's first input is the block input (Conv_1's input too): its own range.
    tensors["Add_0[0]"] = add_op["inputs"][0]
    # Its second, the residual conv's output, the converter widens to the ADD's
    # output maximum; simulated_int8 reads that range from the file.
    scale, zero_point = details[add_op["inputs"][1]]["quantization"]
    assert scale > expected["Add_0[1]"][0] * 1.01
    from_file = export._converter_add_ranges(
        model_bytes, quantize.visit_order(apply_fn, params, mnist.input_shape))["Add_0[1]"]
    assert quantize.activation_qparams(from_file["min"], from_file["max"], 8) == pytest.approx(
        (scale, zero_point), rel=1e-6)
    for name, index in tensors.items():
        scale, zero_point = details[index]["quantization"]
        assert scale == pytest.approx(expected[name][0], rel=1e-6), name
        assert zero_point == expected[name][1], name


def test_pooled_model_is_faithful(pooled, mnist):
    apply_fn, params, model_bytes = pooled
    report = export.weights_check(model_bytes, params)
    assert report["faithful"] and report["unmatched"] == 0
    # The converter folds the mean's 1/(13*13) into the Dense weights; codes unchanged.
    assert report["Dense_0/kernel/folded_factor"] == pytest.approx(1 / 169, rel=1e-5)
    assert report["Conv_2/kernel/folded_factor"] == 1.0
    int8_fn = export.simulated_int8(apply_fn, params, mnist.x_train[:CALIBRATION], model_bytes)
    result = _measured(model_bytes, int8_fn, params, mnist.x_test, mnist.y_test)
    assert result["jax_int8_accuracy"] > 0.5  # learning, if slowly: a mean-pooled head on MNIST
    export.check(result, export.ExportConfig())
