"""Quantization-aware training that computes what TFLite's int8 kernels will compute.

Weights are quantized symmetrically on a narrow grid, ``[-(2^(b-1)-1), 2^(b-1)-1]``
(int8: ``[-127, 127]``, ``scale = max|w| / 127``), exactly as the TFLite converter
does, so ``quantize_weights`` returns the float values the ``.tflite`` will hold
(``int8 * scale``). Activations are asymmetric (``[-2^(b-1), 2^(b-1)-1]`` with an
integral zero point, range containing 0) and are fake-quantized where TFLite
quantizes tensors: the inputs of every Dense/Conv call, of
``ucpjax.pooling.GlobalAveragePool`` and of ``ucpjax.residual.Add`` (both), and
the model output (ReLU is fused into the op before it, max pooling and reshapes
keep the scale). ``ucpjax.model.check_quantizable`` refuses the bare spatial
means and residual adds that would hide an int8 tensor from QAT, and names the
other operations it does not model (a sigmoid, LayerNorm, a BatchNorm with
nothing to fold into), whose effect ``export.preflight`` measures before the
stages.
Their ranges are exponential moving averages kept in the ``extra`` state of the
training loss (see ``ucpjax.train``), keyed by layer path. Before training, the
channels feeding each depthwise conv are equalised (``ucpjax.equalize``): TFLite
gives that input one scale, and a depthwise channel cannot average its error away.

Which kernels are quantized, and with how many bits, come from the recipe's
``LayerRule``s (``ucpjax.rules``); the int8 ``.tflite`` holds every kernel in
8 bits, so fewer bits are for the packed file and for ablations.

Which scale a kernel gets:

* Conv kernels (4-D) are quantized per output channel. A weight-shared conv
  (its k values, or its k values times a per-channel factor once BatchNorm is
  folded into it) goes on the layer grid (``ucpjax.int8_grid``): one book of k
  codes for the layer, QAT training the shared values and each channel's factor.
  Other convs get the converter's grid (``scale = max|w| / 127`` per channel).
* Dense kernels (2-D) are per output channel unless ``dense_per_tensor`` is
  True: the converter switch ``_experimental_disable_per_channel_quantization_for_dense_layers``
  is global, so when one Dense kernel is weight-shared (it must keep its k
  values, which only one scale per tensor does) or ``per_channel=False``,
  every Dense kernel gets one scale per tensor.

Biases train as floats. TFLite stores them as int32 with scale ``s_in * s_w``;
that rounding (below 1e-6 relative for typical layers) is not modelled. With
``bias_bits`` set, each bias is put on the short grid after training
(``ucpjax.bias_grid``): its int32 a ``bias_bits``-bit code shifted left, on the
``s_in`` the export's calibration will give its layer.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ucpjax import batchnorm, bias_grid, constraints, equalize, fold, int8_grid
from ucpjax import rules as rules_lib
from ucpjax import train as train_lib
from ucpjax.config import ConfigError, check
from ucpjax.int8_grid import MIN_PEAK, weight_qmax
from ucpjax.pooling import GlobalAveragePool
from ucpjax.residual import Add
from ucpjax.rules import DEFAULT_RULES, Rules
from ucpjax.train import TrainConfig

# Key of the model output (logits) among the activation ranges.
OUTPUT = "logits"
# Modules whose inputs TFLite quantizes (FULLY_CONNECTED, CONV_2D, DEPTHWISE_CONV_2D,
# MEAN, ADD).
QUANTIZED_LAYERS = (nn.Dense, nn.Conv, GlobalAveragePool, Add)
# Examples whose float activations initialise the ranges before the first step.
CALIBRATION_SIZE = 512
# Scale of an activation range [0, 0] (a dead tensor), to avoid dividing by zero.
_MIN_SCALE = 1e-8

# Per leaf of a params tree: how its values are quantized (LAYER: the layer grid).
NONE, PER_TENSOR, PER_CHANNEL, LAYER = "none", "tensor", "channel", "layer"


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizeConfig:
    """Quantization-aware training.

    Attributes:
      weight_bits: bits of the symmetric weight grid (8 for TFLite int8), for
        leaves whose rule sets no bits of its own.
      activation_bits: bits of the asymmetric activation grid (8 for TFLite int8).
      per_channel: one scale per output channel for Dense kernels; False gives
        one per tensor (Conv kernels stay per channel: the converter has no switch).
      ema_decay: decay of the moving averages of the activation ranges.
      equalize: first rescale the channels that feed each depthwise conv so that
        they share its int8 input range (``ucpjax.equalize``; the same function).
      bias_bits: None keeps TFLite's int32 biases as the converter rounds them;
        2..16 puts each Dense/Conv bias on ``ucpjax.bias_grid``'s short grid after
        training (smaller zipped ``.tflite`` and packed file; not trained, so it
        moves the model by up to half a grid step per bias).
      train: the fine-tuning budget.
    """

    weight_bits: int = 8
    activation_bits: int = 8
    per_channel: bool = True
    ema_decay: float = 0.99
    equalize: bool = True
    bias_bits: int | None = None
    train: TrainConfig = dataclasses.field(
        default_factory=lambda: TrainConfig(epochs=1, learning_rate=1e-4))

    def __post_init__(self):
        for name in ("weight_bits", "activation_bits"):
            bits = getattr(self, name)
            check(isinstance(bits, int) and not isinstance(bits, bool) and 2 <= bits <= 8,
                  name, bits, "an integer in 2..8")
        check(0 < self.ema_decay < 1, "ema_decay", self.ema_decay, "must be in (0, 1)")
        check(self.bias_bits is None or (isinstance(self.bias_bits, int)
                                         and not isinstance(self.bias_bits, bool)
                                         and 2 <= self.bias_bits <= 16),
              "bias_bits", self.bias_bits, "None or an integer in 2..16")


def activation_range(bits: int) -> tuple[int, int]:
    """``(qmin, qmax)`` of the asymmetric activation grid ((-128, 127) for 8 bits)."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def fake_quant(x: jax.Array, scale, zero_point, *, qmin: int, qmax: int) -> jax.Array:
    """Quantize-dequantize with a straight-through gradient.

    The value is ``(clip(round(x / scale + zero_point), qmin, qmax) - zero_point) * scale``
    bit-exactly; the gradient with respect to ``x`` is 1 inside the representable
    range and 0 outside. ``zero_point`` must be integral.

    Args:
      x: values.
      scale: positive, broadcastable to ``x``.
      zero_point: integral, broadcastable to ``x``.
      qmin, qmax: integer code range.

    Returns:
      The dequantized values, same shape and dtype as ``x``.
    """
    q = jnp.clip(jnp.round(x / scale + zero_point), qmin, qmax)
    value = (q - zero_point) * scale
    clipped = jnp.clip(x, (qmin - zero_point) * scale, (qmax - zero_point) * scale)
    # qwix writes clipped + stop_gradient(value - clipped); adding an exact zero
    # instead keeps the value bit-exact (a + (b - a) need not equal b in floats).
    return value + (clipped - jax.lax.stop_gradient(clipped))


# Jitted (one compile per shape and setting): called outside training too, where
# its half-dozen ops would otherwise each compile on their own.
@functools.partial(jax.jit, static_argnames=("mode", "bits"))
def weight_scale(w: jax.Array, mode: str, bits: int) -> jax.Array:
    """``max(max|w|, int8_grid.MIN_PEAK) / qmax`` over the tensor or per output (last)
    axis, as TFLite's converter computes it (it widens ranges below 1e-6).

    Returns:
      A scalar (per tensor) or an array of shape ``(1, ..., 1, channels)``.
    """
    axes = tuple(range(w.ndim - 1)) if mode == PER_CHANNEL else None
    m = jnp.maximum(jnp.max(jnp.abs(w), axis=axes, keepdims=mode == PER_CHANNEL), MIN_PEAK)
    # XLA turns a division by a broadcast scalar into a multiplication by its
    # reciprocal (1 ulp off in ~5% of cases); dividing by an opaque full-shape
    # array keeps the correctly rounded quotient that the converter computes.
    qmax = jax.lax.optimization_barrier(jnp.full(m.shape, weight_qmax(bits), m.dtype))
    return m / qmax


def _quantize_leaf(w, mode: str, bits: int):
    if mode == LAYER:
        return _onto_layer_grid(w, bits)
    return w if mode == NONE else _fake_quant_leaf(w, mode, bits)


def _onto_layer_grid(w, bits: int):
    """``w`` on the layer grid: as it is when already there, else its book decoded
    (host-side: the book is read from the values)."""
    if int8_grid.layer_grid(np.asarray(w), bits) is not None:
        return w
    return _layer_book(w, bits).decode()


def _layer_book(w, bits: int) -> int8_grid.LayerGridBook | None:
    """The layer-grid book of a weight-shared kernel (its k values times a factor
    per channel), else None.

    As in ``constraints.codebook``, k must be at most a quarter of the non-zeros;
    and a kernel on the converter's grid is taken as quantized, not as shared
    (its codes times its scales factor the same way).
    """
    w = np.asarray(w)
    if int8_grid.channel_grid(w) is not None:
        return None
    book = int8_grid.layer_grid_book(w, bits, constraints.MAX_CLUSTERS)
    if book is None or len(book.centroids) > np.count_nonzero(w) // 4:
        return None
    return book


@functools.partial(jax.jit, static_argnames=("mode", "bits"))
def _fake_quant_leaf(w, mode: str, bits: int):
    # The scale follows the weights (TFLite QAT's last-value quantizer); no gradient
    # through it, so every weight sees the plain straight-through estimator.
    scale = jax.lax.stop_gradient(weight_scale(w, mode, bits))
    qmax = weight_qmax(bits)
    return fake_quant(w, scale, 0.0, qmin=-qmax, qmax=qmax)


def fake_quant_weights(params, modes, bits):
    """Fake-quantizes every leaf of ``params`` whose mode (see ``weight_modes``) is not NONE.

    ``bits`` is a pytree like ``params`` (``weight_bits``) or one int for all leaves.

    Zeros map to exactly 0. A weight-shared per-tensor leaf keeps at most its k
    values: quantizing the decoded weights element-wise with one scale equals
    quantizing the centroids and decoding, and its gradient reaches each centroid
    as the sum over its members, as in ``constraints.factor``.
    """
    if isinstance(bits, int):
        bits = jax.tree.map(lambda _: bits, params)
    return jax.tree.map(_quantize_leaf, params, modes, bits)


def _on_grid(w, mode: str, bits: int) -> bool:
    return bool(jnp.array_equal(_quantize_leaf(jnp.asarray(w), mode, bits), w))


def _weight_shared(w, bits: int) -> bool:
    """Whether ``w`` is weight-shared and so needs one scale per tensor.

    A kernel already quantized per channel (few values per channel, many scales)
    can look weight-shared to ``constraints.codebook``; it is not, or quantizing
    it again would move it to another grid.
    """
    if constraints.codebook(w) is None:
        return False
    return not (_on_grid(w, PER_CHANNEL, bits) and not _on_grid(w, PER_TENSOR, bits))


def _layer_shared(w, bits: int) -> bool:
    return int8_grid.layer_grid(np.asarray(w), bits) is not None or (
        _layer_book(w, bits) is not None)


def weight_bits(params, config: QuantizeConfig, rules: Rules = DEFAULT_RULES):
    """Pytree like ``params``: each leaf's weight bits (its rule's, else ``weight_bits``)."""
    bits = rules_lib.setting(params, rules, "bits", config.weight_bits)
    return jax.tree.map(lambda b: config.weight_bits if b is None else b, bits,
                        is_leaf=lambda b: b is None)


def dense_per_tensor(params, config: QuantizeConfig, rules: Rules = DEFAULT_RULES) -> bool:
    """Whether all Dense (2-D) kernels use one scale per tensor.

    True when ``config.per_channel`` is False or any selected 2-D kernel is
    weight-shared. Export passes it to the converter flag
    ``_experimental_disable_per_channel_quantization_for_dense_layers``.

    Args:
      params: params pytree (before or after ``quantize_weights``: same answer).
      config: a QuantizeConfig.
      rules: the quantized leaves and their bits.

    Returns:
      The flag.
    """
    if not config.per_channel:
        return True
    leaves = zip(jax.tree.leaves(params), jax.tree.leaves(rules_lib.selected(params, rules)),
                 jax.tree.leaves(weight_bits(params, config, rules)), strict=True)
    return any(sel and np.ndim(w) == 2 and _weight_shared(w, bits) for w, sel, bits in leaves)


def weight_modes(params, config: QuantizeConfig, rules: Rules = DEFAULT_RULES):
    """Per leaf: NONE (not selected), PER_TENSOR, PER_CHANNEL or LAYER.

    Conv kernels (4-D) are per channel always: the converter quantizes convs per
    channel. A weight-shared one (per layer, or per layer up to a factor per
    channel) is LAYER, which keeps its k codes for the whole layer; others
    PER_CHANNEL.
    """
    dense_tensor = dense_per_tensor(params, config, rules)

    def mode(w, sel, bits):
        if not sel:
            return NONE
        if np.ndim(w) == 4:
            return LAYER if _layer_shared(w, bits) else PER_CHANNEL
        if np.ndim(w) == 2:
            return PER_TENSOR if dense_tensor else PER_CHANNEL
        if np.ndim(w) < 2 or not config.per_channel or _weight_shared(w, bits):
            return PER_TENSOR
        return PER_CHANNEL

    return jax.tree.map(mode, params, rules_lib.selected(params, rules),
                        weight_bits(params, config, rules))


def quantize_weights(params, config: QuantizeConfig, rules: Rules = DEFAULT_RULES):
    """Params with every selected weight tensor on its int grid (what the .tflite holds).

    Idempotent; zeros stay exactly zero.

    Args:
      params: params pytree.
      config: a QuantizeConfig (weight_bits, per_channel).
      rules: the quantized leaves and their bits.

    Returns:
      Params of the same structure; each selected leaf equals ``int codes * scale``.
    """
    return fake_quant_weights(params, weight_modes(params, config, rules),
                              weight_bits(params, config, rules))


# ---------------------------------------------------------------- activations

def activation_qparams(lo, hi, bits: int) -> tuple[jax.Array, jax.Array]:
    """``(scale, zero_point)`` of the range ``[lo, hi]`` widened to contain 0.

    The zero point is rounded to an integer, which nudges the range so that 0 is
    exactly representable (as TFLite and tf.quantization.fake_quant do).
    """
    qmin, qmax = activation_range(bits)
    lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    scale = jnp.maximum((hi - lo) / (qmax - qmin), _MIN_SCALE)
    zero_point = jnp.clip(jnp.round(qmin - lo / scale), qmin, qmax)
    return scale, zero_point


def fake_quant_activation(x, lo, hi, bits: int) -> jax.Array:
    """Asymmetric straight-through fake quantization of ``x`` to the range ``[lo, hi]``."""
    scale, zero_point = activation_qparams(lo, hi, bits)
    qmin, qmax = activation_range(bits)
    return fake_quant(x, scale, zero_point, qmin=qmin, qmax=qmax)


Visit = Callable[[str, jax.Array], jax.Array]


def _run(apply_fn, params, x, visit: Visit) -> jax.Array:
    """``apply_fn(params, x)`` with ``visit(name, tensor)`` applied to each quantized tensor.

    Names are the layer paths (``"Dense_0"``) for the inputs of Dense/Conv calls,
    ``rules.call_name`` for a layer called again (``"Dense_0#2"``), the path and
    the operand for the two inputs of an ``Add`` (``"Add_0[1]"``), and OUTPUT.
    """
    calls: dict[str, int] = {}

    def interceptor(next_fun, args, kwargs, context):
        if (context.method_name != "__call__" or not args
                or not isinstance(context.module, QUANTIZED_LAYERS)):
            return next_fun(*args, **kwargs)
        name = "/".join(context.module.path)
        n = calls.get(name, 0)
        calls[name] = n + 1
        call = rules_lib.call_name(name, n)
        if isinstance(context.module, Add):
            return next_fun(*(visit(f"{call}[{i}]", a) for i, a in enumerate(args)), **kwargs)
        return next_fun(visit(call, args[0]), *args[1:], **kwargs)

    with nn.intercept_methods(interceptor):
        logits = apply_fn(params, x)
    return visit(OUTPUT, logits)


def visit_order(apply_fn, params, input_shape: tuple[int, ...]) -> list[str]:
    """Names of the quantized tensors in the order the model computes them (traced only)."""
    names = []

    def visit(name, t):
        names.append(name)
        return t

    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    jax.eval_shape(lambda p, x: _run(apply_fn, p, x, visit), params, x)
    return names


def _batch_range(x):
    return {"min": jax.lax.stop_gradient(jnp.min(x)), "max": jax.lax.stop_gradient(jnp.max(x))}


def calibrate(apply_fn, params, x: np.ndarray, batch_size: int = 256) -> dict:
    """Activation ranges over ``x``: ``{name: {"min", "max"}}`` for every quantized tensor.

    The min and max over all of ``x`` (taken ``batch_size`` examples at a time),
    which is also how the TFLite converter calibrates from its representative
    dataset. Tracing also discovers the layer paths, so the range tree has its
    final structure before training is jitted.
    """
    def observe(params, x):
        ranges = {}

        def visit(name, t):
            ranges[name] = _batch_range(t)
            return t

        _run(apply_fn, params, x, visit)
        return ranges

    observe = jax.jit(observe)
    batches = [jax.device_get(observe(params, x[i:i + batch_size]))
               for i in range(0, len(x), batch_size)]
    return {name: {"min": np.min([b[name]["min"] for b in batches]),
                   "max": np.max([b[name]["max"] for b in batches])} for name in batches[0]}


def quantized_apply(apply_fn, ranges, bits: int = 8):
    """``apply_fn`` with activations fake-quantized to fixed ``ranges`` (inference).

    Args:
      apply_fn: ``apply_fn(params, x) -> logits`` of a Flax model.
      ranges: ``{name: {"min", "max"}}`` as returned by ``calibrate`` or trained by QAT.
      bits: activation bits.

    Returns:
      ``apply_fn(params, x) -> logits``; pass weights from ``quantize_weights``.
    """
    def visit(name, t):
        return fake_quant_activation(t, ranges[name]["min"], ranges[name]["max"], bits)

    return lambda params, x: _run(apply_fn, params, x, visit)


def qat_loss(apply_fn, modes, bits, config: QuantizeConfig):
    """``make_loss(materialize) -> loss_fn`` for ``constraints.fit_preserving``.

    The loss is the cross-entropy of the model with fake-quantized weights and
    activations; ``extra`` holds the activation ranges, updated as moving averages
    of each batch's min and max (the updated range quantizes the batch).
    """
    decay, activation_bits = config.ema_decay, config.activation_bits

    def make_loss(materialize):
        def loss_fn(trainable, extra, x, y, key):
            del key  # apply_fn runs in inference mode: nothing random
            params = fake_quant_weights(materialize(trainable), modes, bits)
            new = {}

            def visit(name, t):
                if name not in extra:
                    raise KeyError(f"no activation range for {name!r}; calibrate first")
                batch = _batch_range(t)
                new[name] = jax.tree.map(lambda old, b: decay * old + (1 - decay) * b,
                                         extra[name], batch)
                return fake_quant_activation(t, new[name]["min"], new[name]["max"],
                                             activation_bits)

            logits = _run(apply_fn, params, x, visit)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            metrics = {"loss": loss, "accuracy": jnp.mean(logits.argmax(-1) == y)}
            return loss, ({**extra, **new}, metrics)

        return loss_fn

    return make_loss


def quantize(params, config: QuantizeConfig, *, apply_fn, data, seed: int,
             rules: Rules = DEFAULT_RULES, representative_x: np.ndarray | None = None):
    """Quantization-aware fine-tuning, then the weights put on their int grid.

    Zeros and weight sharing of earlier stages are kept (``constraints.fit_preserving``),
    per output channel where BatchNorm was folded into a shared layer, so each
    channel keeps at most k int8 codes.

    Args:
      params: params pytree.
      config: a QuantizeConfig.
      apply_fn: ``apply_fn(params, x) -> logits`` of a Flax model, inference mode.
      data: a ``ucpjax.data.Dataset``.
      seed: training seed.
      rules: the quantized leaves and their bits.
      representative_x: the inputs the export calibrates its activation ranges on
        (``ExportConfig.representative_samples`` training examples), for
        ``bias_bits``; by default the first 512 training examples.

    Returns:
      ``(params, report)``: params equal to ``quantize_weights(trained, config,
      rules)`` (biases on their short grid with ``bias_bits``) and a flat report
      (``quantize/...``).
    """
    if isinstance(apply_fn, batchnorm.LiveBatchNorm):
        raise ConfigError("quantize: the model's BatchNorm is not folded; the int8 model holds "
                          "folded kernels, so fold first (ucpjax.model.Model.folded)")
    calibration = data.x_train[:CALIBRATION_SIZE]
    equalized = {}
    if config.equalize:
        params, equalized = equalize.equalize(apply_fn, params, calibration,
                                              prefix="quantize/equalize")
    modes, bits = weight_modes(params, config, rules), weight_bits(params, config, rules)
    ranges = calibrate(apply_fn, fake_quant_weights(params, modes, bits),
                       calibration)
    # Layer-grid kernels train as their book, which decodes onto the grid itself.
    books = jax.tree.map(lambda w, m, b: int8_grid.layer_grid_book(
        np.asarray(w), b, constraints.MAX_CLUSTERS) if m == LAYER else None, params, modes, bits)
    training_modes = jax.tree.map(lambda m: NONE if m == LAYER else m, modes)
    trained, state, history = constraints.fit_preserving(
        params, qat_loss(apply_fn, training_modes, bits, config),
        x=data.x_train, y=data.y_train, config=config.train, seed=seed, rules=rules,
        extra=ranges, per_channel=True, books=books, desc="quantize")
    ranges = jax.device_get(state.extra)
    quantized = fake_quant_weights(trained, modes, bits)
    report = dict(equalized)
    if config.bias_bits is not None:
        quantized, short = short_biases(
            apply_fn, quantized, modes, bits, config.bias_bits,
            calibration if representative_x is None else representative_x)
        report["quantize/short_bias_layers"] = len(short)
    report.update(_report(quantized, modes, bits, config, ranges))
    report["quantize/train_loss"] = history[-1]["loss"]
    report["quantize/val_accuracy"] = train_lib.accuracy(
        quantized_apply(apply_fn, ranges, config.activation_bits), quantized,
        data.x_val, data.y_val)
    report["quantize/val_accuracy_float_activations"] = train_lib.accuracy(
        apply_fn, quantized, data.x_val, data.y_val)
    return quantized, report


def short_biases(apply_fn, params, modes, bits, bias_bits: int, representative_x):
    """``(params, names)``: ``params`` with each Dense/Conv bias on ``bias_grid``'s
    short grid, and the names of the layers whose biases went on it.

    A bias's int32 scale is its layer's input scale, as the export calibrates it
    on ``representative_x``, times its kernel's scales; that input scale depends on
    the biases of the layers before, so layers go in the order the model calls
    them, each calibrated after those before it moved. Layers called more than
    once (several input scales), whose kernel is not quantized, or whose biases
    would not convert exactly (``bias_grid.onto_grid``) keep their biases.
    """
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    flat_modes = flax.traverse_util.flatten_dict(modes, sep="/")
    flat_bits = flax.traverse_util.flatten_dict(bits, sep="/")
    x = np.asarray(representative_x, np.float32)
    names = visit_order(apply_fn, params, x.shape[1:])
    repeated = {name.split("#")[0] for name in names if "#" in name}
    biases = layer_biases(apply_fn, params, x.shape[1:])
    short = []
    for name in names:
        kernel, paths = f"{name}/kernel", biases.get(name)
        if name in repeated or paths is None or flat_modes.get(kernel, NONE) == NONE:
            continue
        ranges = calibrate(apply_fn, flax.traverse_util.unflatten_dict(flat, sep="/"), x)
        input_scale, _ = activation_qparams(ranges[name]["min"], ranges[name]["max"], 8)
        scale = np.float32(input_scale) * _kernel_scales(flat[kernel], flat_modes[kernel],
                                                          flat_bits[kernel])
        total = np.sum([np.asarray(flat[path]) for path in paths], axis=0, dtype=np.float32)
        on_grid = bias_grid.onto_grid(total, scale, bias_bits)
        if on_grid is not None:
            # The first bias holds the sum, the others zero (x + 0.0 == x exactly).
            flat.update({path: np.zeros_like(on_grid) for path in paths[1:]})
            flat[paths[0]] = on_grid
            short.append(name)
    return flax.traverse_util.unflatten_dict(flat, sep="/"), short


def layer_biases(apply_fn, params, input_shape: tuple[int, ...]) -> dict[str, tuple[str, ...]]:
    """``{layer with a kernel: paths of the biases added to its output}`` (traced
    only): its own bias and that of the folded BatchNorm it feeds (``ucpjax.fold`` leaves
    it the identity plus a trainable bias), whichever it has. TFLite's converter
    folds their sum into the layer's int32 bias."""
    keys = set(flax.traverse_util.flatten_dict(params, sep="/"))
    found = {key.removesuffix("/bias"): (key,) for key in keys
             if key.endswith("/bias") and key.removesuffix("/bias") + "/kernel" in keys}
    for layer_path, bn_path, _ in fold.batchnorm_pairs(apply_fn, params, input_shape):
        layer, bias = "/".join(layer_path), "/".join((*bn_path, "bias"))
        if bias in keys:
            found[layer] = (*found.get(layer, ()), bias)
    return found


def _kernel_scales(w, mode: str, bits: int) -> np.ndarray:
    """The scales the ``.tflite`` gives kernel ``w`` (quantized by ``mode``), flat."""
    if mode == LAYER:
        return int8_grid.layer_grid(np.asarray(w), bits)[0]
    return np.asarray(weight_scale(jnp.asarray(w), mode, bits), np.float32).reshape(-1)


def _report(params, modes, bits, config: QuantizeConfig, ranges) -> dict[str, Any]:
    leaves = list(zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(modes),
                      jax.tree.leaves(bits), strict=True))
    report: dict[str, Any] = {
        "quantize/weight_bits": config.weight_bits,
        "quantize/activation_bits": config.activation_bits,
        "quantize/dense_per_tensor": int(any(m == PER_TENSOR and np.ndim(w) == 2
                                             for (_, w), m, _ in leaves)),
    }
    scales = []
    for (path, w), mode, leaf_bits in leaves:
        if mode == NONE:
            continue
        w = np.asarray(w)
        name = f"quantize/{rules_lib.path_name(path)}"
        report[f"{name}/bits"] = leaf_bits
        if mode == LAYER:
            s, codes = int8_grid.layer_grid(w, leaf_bits)
            report[f"{name}/layer_codes"] = int(np.unique(codes[codes != 0]).size)
        else:
            s = np.asarray(weight_scale(jnp.asarray(w), mode, leaf_bits)).ravel()
        s = s[np.abs(w).reshape(-1, s.size).max(0) > 0] if mode != PER_TENSOR else s
        scales.append(s)
        report[f"{name}/per_channel"] = int(mode != PER_TENSOR)
        # Distinct non-zero values (zero is always representable and not counted).
        report[f"{name}/distinct"] = int(np.unique(w[w != 0]).size)
        if mode != PER_TENSOR:
            columns = w.reshape(-1, w.shape[-1]).T
            report[f"{name}/distinct_per_channel_max"] = max(
                int(np.unique(c[c != 0]).size) for c in columns)
    if scales:
        scales = np.concatenate(scales)
        report["quantize/scale_min"] = float(scales.min()) if scales.size else 1.0
        report["quantize/scale_max"] = float(scales.max()) if scales.size else 1.0
    for name, r in ranges.items():
        scale, zero_point = activation_qparams(r["min"], r["max"], config.activation_bits)
        report[f"quantize/act/{name}/scale"] = float(scale)
        report[f"quantize/act/{name}/zero_point"] = int(zero_point)
    return report

