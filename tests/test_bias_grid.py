"""Tests of ucpjax.bias_grid: biases whose int32 in the .tflite is a short code shifted left."""

import jax
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ucpjax import bias_grid, export, measure, packing, quantize, train
from ucpjax.rules import LayerRule

CALIBRATION = 300


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), bits=st.integers(2, 16), exponent=st.integers(-12, 0))
@example(seed=2_147_483_647, bits=14, exponent=-7)  # a bias half a step off, rounded up
def test_onto_grid_rounds_to_a_code_shifted_left_and_reads_back(seed, bits, exponent):
    rng = np.random.default_rng(seed)
    bias = rng.normal(size=50).astype(np.float32) * np.float32(0.1)
    scale = np.float32(rng.uniform(1, 2) * 2.0 ** (exponent - 8))
    short = bias_grid.onto_grid(bias, scale, bits)
    ints = np.round(short.astype(np.float64) / scale).astype(np.int64)
    shift = _shift(ints)
    assert np.abs(ints >> shift).max() <= 2 ** (bits - 1) - 1
    # Within half a step of the bias (the step is 2**shift * scale), give or take the
    # float32 rounding of the product, and never -0.0.
    rounding = np.spacing(np.abs(bias).max() + 2.0 ** shift * scale)
    assert np.abs(short - bias).max() <= 2.0 ** (shift - 1) * scale + rounding
    assert not np.any(np.signbit(short) & (short == 0))
    read_bits, step, read_codes = bias_grid.read_grid(short)
    assert read_bits <= bits
    np.testing.assert_array_equal((read_codes * step).astype(np.float32), short)


def _shift(ints: np.ndarray) -> int:
    """The most trailing zero bits all of ``ints`` share."""
    nonzero = np.abs(ints[ints != 0])
    return min((int(v & -v).bit_length() - 1 for v in nonzero), default=0)


def test_read_grid_refuses_unshared_floats_and_negative_zero():
    rng = np.random.default_rng(0)
    assert bias_grid.read_grid(rng.normal(size=100).astype(np.float32)) is None
    assert bias_grid.read_grid(np.float32([0.5, -0.0, 0.25])) is None
    assert bias_grid.read_grid(np.zeros((4, 4), np.float32)) is None  # not 1-D


def _int32_biases(model_bytes: bytes) -> list[np.ndarray]:
    interp = export.interpreter(model_bytes)
    return [interp.get_tensor(d["index"]) for d in interp.get_tensor_details()
            if d["dtype"] == np.int32 and len(d["shape"]) == 1 and d["shape"][0] > 2]


@pytest.mark.parametrize("per_channel", [True, False])
def test_short_biases_land_in_the_tflite_as_shifted_codes(lenet300_trained, mnist_5k,
                                                         per_channel):
    apply_fn, params = lenet300_trained
    mnist = mnist_5k
    config = quantize.QuantizeConfig(per_channel=per_channel)
    params = quantize.quantize_weights(params, config)
    modes, bits = quantize.weight_modes(params, config), quantize.weight_bits(params, config)
    rep = mnist.x_train[:CALIBRATION]
    short, layers = quantize.short_biases(apply_fn, params, modes, bits, 8, rep)
    short = jax.tree.map(np.asarray, short)
    assert layers == ["Dense_0", "Dense_1", "Dense_2"]

    def convert(p):
        return export.strip_strings(export.to_tflite(
            apply_fn, p, mnist.input_shape, rep, per_tensor_dense=not per_channel))

    before, after = convert(params), convert(short)
    biases = _int32_biases(after)
    assert len(biases) == 3
    for ints in biases:  # each layer: one shift, codes within 8 bits
        assert np.abs(ints.astype(np.int64) >> _shift(ints.astype(np.int64))).max() <= 127
    assert measure.zip_bytes(after) < measure.zip_bytes(before)
    # The .tflite computes what the JAX int8 model with these biases computes.
    x, y = mnist.x_test[:500], mnist.y_test[:500]
    logits = train.predict(export.simulated_int8(apply_fn, short, rep), short, x)
    assert np.mean(export.evaluate(after, x, y)["predictions"] == logits.argmax(-1)) >= 0.995
    # The packed file decodes them bit-exactly; with one weight scale per layer (one
    # step per bias), it stores their codes and the step: 300 of 8 bits, not 4 bytes each.
    rules = (LayerRule(pattern="kernel"),)
    packed = packing.encode(short, rules=rules)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32)),
                 short, packing.decode(packed))
    bias_record = packing.size_breakdown(short, rules=rules)["layers"]["Dense_0/bias"]
    if per_channel:  # a step per channel: raw float32
        assert bias_record["raw"] == 300 * 4
    else:
        assert bias_record["codebook"] == 300
