"""Flax -> int8 TFLite, and running the result in LiteRT to check it is faithful.

TensorFlow is imported only here, lazily inside the functions that need it, so
the JAX side of the project starts fast. The conversion path that works with
this toolchain: ``jax2tf.convert`` in a ``tf.function`` with a fixed batch-1
signature, held by a ``tf.Module`` and converted with
``TFLiteConverter.from_concrete_functions``.

* ``to_tflite``: float or full-integer (int8 weights, activations, input and output).
* ``TfliteRunner`` / ``evaluate``: run a model in LiteRT on numpy data.
* ``weights_check``: do the int8 weights times their scales equal the params?
* ``verify``: export, run on the test set and measure everything; ``check``
  raises ``ToleranceError`` when the ``.tflite`` is not faithful.
* ``latency_us``: median one-sample invoke time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable

import jax
import numpy as np

from ucpjax import int8_grid, measure, quantize, train
from ucpjax.config import ConfigError
from ucpjax.config import check as check_field
from ucpjax.quiet_tf import import_tensorflow
from ucpjax.rules import DEFAULT_RULES, Rules, path_name, selected

# Ops whose input 1 is a weight tensor and input 2 a bias.
_WEIGHT_OPS = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D")


class ToleranceError(RuntimeError):
    """The .tflite model is not faithful to the JAX model (see ``check``)."""


CHANNEL_ORDERS = (None, "similar", "model")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """How the final model is exported, measured and checked.

    The ``.tflite`` passes when, on the test images the JAX model with int8
    activations (``simulated_int8``) decides by more than ``tie_steps`` output
    quantization steps, their argmax agree on at least ``min_agreement`` and
    their accuracies are within ``accuracy_tolerance``, and its int8 weights
    equal the params (``weights_check``). Near-ties are left out because the
    kernels' integer rounding (requantization, int32 biases) moves a logit by a
    step or two, which flips a near-tie without any unfaithfulness; their count
    is reported.
    """

    enabled: bool = True
    sparse: bool = False  # TFLite EXPERIMENTAL_SPARSITY weight storage
    representative_samples: int = 300  # converter calibration (and simulated_int8)
    latency_repeats: int = 200
    accuracy_tolerance: float = 0.001  # as a fraction: 0.1 point
    min_agreement: float = 0.995
    tie_steps: float = 2.0
    strip_strings: bool = True  # ship the .tflite without names and converter metadata
    # Hidden channels reordered to zip smaller (``ucpjax.channel_order``; None
    # or "similar") or as the model built them ("model"): the same function either way.
    channel_order: str | None = None

    def __post_init__(self):
        check_field(self.representative_samples >= 1, "representative_samples",
                    self.representative_samples, "must be >= 1")
        check_field(self.latency_repeats >= 1, "latency_repeats", self.latency_repeats,
                    "must be >= 1")
        check_field(0 <= self.accuracy_tolerance < 1, "accuracy_tolerance",
                    self.accuracy_tolerance, "must be in [0, 1)")
        check_field(0 <= self.min_agreement <= 1, "min_agreement", self.min_agreement,
                    "must be in [0, 1]")
        check_field(0 <= self.tie_steps < 1000, "tie_steps", self.tie_steps,
                    "must be in [0, 1000)")
        check_field(self.channel_order in CHANNEL_ORDERS, "channel_order", self.channel_order,
                    f"must be one of {', '.join(map(str, CHANNEL_ORDERS))}")


def to_tflite(
    apply_fn: Callable, params, input_shape: tuple[int, ...], representative_x: np.ndarray,
    *, int8: bool = True, per_tensor_dense: bool = False, sparse: bool = False,
) -> bytes:
    """Converts ``apply_fn(params, x)`` to a TFLite flatbuffer with batch size 1.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits`` in inference mode.
      params: the params pytree (closed over as constants).
      input_shape: one example's shape, e.g. ``(28, 28, 1)``.
      representative_x: training inputs for calibrating activation ranges (int8
        only): the converter takes each tensor's min and max over all of them
        (``simulated_int8`` computes the same ranges).
      int8: full-integer model (int8 weights, activations, input and output);
        False gives the float32 model.
      per_tensor_dense: one scale per Dense kernel instead of one per output channel
        (keeps a weight-shared kernel on <= k codes when it sits on one int8 grid).
      sparse: store weights of >= 30% sparsity in TFLite's sparse format (smaller
        file, same compute; needs ``OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES``).

    Returns:
      The .tflite file contents.
    """
    tf = import_tensorflow()
    from jax.experimental import jax2tf

    params = jax.tree.map(np.asarray, params)
    module = tf.Module()
    module.fn = tf.function(
        jax2tf.convert(lambda x: apply_fn(params, x), with_gradient=False),
        input_signature=[tf.TensorSpec((1, *input_shape), tf.float32)], autograph=False)
    with _converter_log() as log:
        try:
            return bytes(_converter(tf, module, representative_x, int8=int8,
                                    per_tensor_dense=per_tensor_dense, sparse=sparse).convert())
        except Exception as err:
            # What went wrong is an MLIR "<location>: error: <what>" line, printed to
            # stderr (the exception is then a bare RuntimeError) or in the exception;
            # its location is a call stack of this machine's paths, so only <what> is kept.
            errors = [line.split("error:", 1)[1] for line in f"{log()}\n{err}".splitlines()
                      if "error:" in line]
            detail = (errors[0] if errors else (str(err).strip().splitlines() or [""])[0])
            detail = re.sub(r"(?:[A-Za-z]:)?[/\\]\S*?:\d+:\d+: ", "", detail)
            raise ConversionError(f"{type(err).__name__}: {detail.strip()[:300]}") from err


def _converter(tf, module, representative_x, *, int8: bool, per_tensor_dense: bool,
               sparse: bool):
    """The TFLite converter of ``module.fn``, set up as ``to_tflite`` describes."""
    concrete = module.fn.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], module)
    if int8:
        calibration = np.asarray(representative_x, np.float32)

        def representative_dataset():
            for i in range(len(calibration)):
                yield [calibration[i:i + 1]]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative_dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
        if per_tensor_dense:
            converter._experimental_disable_per_channel_quantization_for_dense_layers = True
    if sparse:
        converter.optimizations = [*converter.optimizations, tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    return converter


class ConversionError(RuntimeError):
    """The TFLite converter refused the model; the message is its first error line."""


@contextlib.contextmanager
def _converter_log():
    """The converter's C++ log (file descriptor 2) captured meanwhile; yields a
    function that reads it. Dropped afterwards: on success it holds only lines such
    as ``Ignored output_format``. ``UCPJAX_DEBUG=1`` leaves stderr as it is."""
    with tempfile.TemporaryFile("w+") as log:

        def read() -> str:
            log.seek(0)
            return log.read()

        if os.environ.get("UCPJAX_DEBUG") == "1":
            yield read
            return
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            yield read
        finally:
            os.dup2(saved, 2)
            os.close(saved)


# Metadata the converter writes for people, not for the runtime.
_INFORMATIONAL_METADATA = (b"min_runtime_version", b"CONVERSION_METADATA")


def strip_strings(model_bytes: bytes) -> bytes:
    """The ``.tflite`` without the strings only people read; the same ops, tensors and weights.

    Drops tensor and subgraph names, the signature (its names; the interpreter's
    input and output details stay) and the converter's informational metadata,
    as TensorFlow's ``tensorflow/lite/tools/strip_strings.py`` does for
    deployment. On the 20K-parameter pcqat_mnist that is ~12% of the zipped file
    (484 B); a deployed model carries none of it. Idempotent.
    """
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_bytes))
    flatbuffer_utils.strip_strings(model)
    kept = []
    for entry in model.metadata or []:
        if entry.name in _INFORMATIONAL_METADATA:
            model.buffers[entry.buffer].data = None  # no tensor points at it
        else:
            kept.append(entry)
    model.metadata = kept or None
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def interpreter(model_bytes: bytes, *, threads: int = 1, use_xnnpack: bool = True):
    """A LiteRT interpreter with tensors allocated.

    With ``use_xnnpack`` the default delegate (XNNPACK) is applied; when it cannot
    prepare the model (int8 weights in TFLite's sparse format), this falls back to
    the builtin kernels instead of failing.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    plain = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    if use_xnnpack:
        try:
            interp = Interpreter(model_content=model_bytes, num_threads=threads)
            interp.allocate_tensors()
            return interp
        except (RuntimeError, ValueError):
            pass
    interp = Interpreter(model_content=model_bytes, num_threads=threads,
                         experimental_op_resolver_type=plain)
    interp.allocate_tensors()
    return interp


class TfliteRunner:
    """Runs a one-input, one-output TFLite model on float inputs, one example at a time.

    Quantizes inputs with the input tensor's (scale, zero point) and dequantizes
    outputs, so int8 and float models are used alike.
    """

    def __init__(self, model_bytes: bytes, *, threads: int = 1, use_xnnpack: bool = True):
        self.interpreter = interpreter(model_bytes, threads=threads, use_xnnpack=use_xnnpack)
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.input["shape"][1:])

    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        dtype = self.input["dtype"]
        if not np.issubdtype(dtype, np.integer):
            return np.asarray(x, dtype)
        scale, zero_point = self.input["quantization"]
        info = np.iinfo(dtype)
        q = np.round(np.asarray(x, np.float32) / scale) + zero_point
        return np.clip(q, info.min, info.max).astype(dtype)

    def dequantize_output(self, q: np.ndarray) -> np.ndarray:
        if not np.issubdtype(q.dtype, np.integer):
            return q.astype(np.float32)
        scale, zero_point = self.output["quantization"]
        return (q.astype(np.float32) - zero_point) * scale

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Float outputs (N, ...) for float inputs (N, *input_shape)."""
        interp, inp, out = self.interpreter, self.input["index"], self.output["index"]
        q = self.quantize_input(x)
        # The graph has a fixed batch of 1 (reshapes bake it in), so loop.
        results = []
        for i in range(len(q)):
            interp.set_tensor(inp, q[i:i + 1])
            interp.invoke()
            results.append(interp.get_tensor(out)[0])
        return self.dequantize_output(np.stack(results))


def evaluate(model_bytes: bytes, x: np.ndarray, y: np.ndarray, *,
             use_xnnpack: bool = True) -> dict:
    """Accuracy of a TFLite classifier on ``(x, y)``.

    Returns:
      ``{"accuracy": float, "predictions": int array (N,), "logits": (N, classes),
      "output_scale": the output's quantization step (0 for a float output)}``.
    """
    runner = TfliteRunner(model_bytes, use_xnnpack=use_xnnpack)
    logits = runner(x)
    predictions = logits.argmax(-1)
    return {"accuracy": float(np.mean(predictions == np.asarray(y))), "predictions": predictions,
            "logits": logits, "output_scale": float(runner.output["quantization"][0])}


def faithfulness(tflite: dict, jax_logits: np.ndarray, y: np.ndarray, tie_steps: float) -> dict:
    """How closely the .tflite's logits (``evaluate``'s result) follow the JAX model's.

    Returns:
      ``jax_int8_accuracy``; ``tflite_agreement`` and ``tflite_accuracy_gap`` on
      the images the JAX model decides by more than ``tie_steps`` output steps;
      ``tflite_near_ties``, the images left out; ``tflite_max_logit_error_steps``.
    """
    jax_logits, y = np.asarray(jax_logits), np.asarray(y)
    step = tflite["output_scale"] or np.finfo(np.float32).eps
    top2 = np.sort(jax_logits, axis=-1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > tie_steps * step
    jax_pred, tflite_pred = jax_logits.argmax(-1), tflite["predictions"]
    gap = np.mean(tflite_pred[decided] == y[decided]) - np.mean(jax_pred[decided] == y[decided])
    return {"jax_int8_accuracy": float(np.mean(jax_pred == y)),
            "tflite_agreement": float(np.mean(tflite_pred[decided] == jax_pred[decided])),
            "tflite_accuracy_gap": float(abs(gap)) if decided.any() else 0.0,
            "tflite_near_ties": int(np.sum(~decided)),
            "tflite_decided": int(np.sum(decided)),
            "tflite_max_logit_error_steps": float(
                np.max(np.abs(tflite["logits"] - jax_logits)) / step)}


def simulated_int8(apply_fn: Callable, params, representative_x: np.ndarray,
                   model_bytes: bytes | None = None) -> Callable:
    """``apply_fn`` computing what the int8 .tflite of ``to_tflite`` computes, in JAX.

    Activations are fake-quantized where TFLite quantizes them, to the ranges the
    converter calibrates from the same ``representative_x`` (min and max over all
    of it), so the .tflite's activation scales and zero points are these; ``params``
    should be on their int8 grid (``quantize.quantize_weights``; QAT leaves them there).
    What is left between the two is integer rounding inside TFLite's kernels
    (requantization multipliers, int32 biases). This is the JAX model the .tflite
    is checked against: the float-activation model is not what ships.

    With ``model_bytes`` the inputs of each ``ucpjax.residual.Add`` take the
    ranges of the converted file's ADD (see ``_converter_add_ranges``).
    """
    x = np.asarray(representative_x, np.float32)
    ranges = quantize.calibrate(apply_fn, params, x)
    if model_bytes is not None:
        names = quantize.visit_order(apply_fn, params, x.shape[1:])
        ranges.update(_converter_add_ranges(model_bytes, names))
    return quantize.quantized_apply(apply_fn, ranges, bits=8)


def _converter_add_ranges(model_bytes: bytes, names: list[str]) -> dict:
    """``{"Add_0[i]": {"min", "max"}}``: the ranges the converter gave each ADD's inputs.

    The converter does not keep every ADD input's calibrated range: where a conv's
    output feeds only the ADD (a residual path with no ReLU to fuse), it widens
    that range to the ADD's output maximum (measured, tests/test_export.py), and
    which input it picks is its own choice. So the simulation reads these ranges
    from the file, matching ADD ops to ``Add`` calls in order; nothing when the
    counts differ (the agreement check then judges the calibrated ranges).
    """
    adds = [name[:-len("[0]")] for name in names if name.endswith("[0]")]
    interp = interpreter(model_bytes, use_xnnpack=False)
    ops = [op for op in interp._get_ops_details() if op["op_name"] == "ADD"]
    if len(ops) != len(adds):
        return {}
    details = {d["index"]: d for d in interp.get_tensor_details()}
    qmin, qmax = quantize.activation_range(8)
    ranges = {}
    for name, op in zip(adds, ops, strict=True):
        for i, index in enumerate(op["inputs"]):
            scale, zero_point = details[index]["quantization"]
            ranges[f"{name}[{i}]"] = {"min": np.float32((qmin - zero_point) * scale),
                                      "max": np.float32((qmax - zero_point) * scale)}
    return ranges


def verify(apply_fn: Callable, params, dataset, *, config: ExportConfig,
           quantize_config: quantize.QuantizeConfig,
           rules: Rules = DEFAULT_RULES) -> tuple[dict, bytes]:
    """Exports the int8 (and float) ``.tflite`` and measures it on the test set.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits`` in inference mode.
      params: the final params, on their int8 grid (QAT leaves them there).
      dataset: a ``ucpjax.data.Dataset``; its test split is the measure.
      config: an ExportConfig.
      quantize_config: the recipe's QuantizeConfig (per-channel choice).
      rules: the compressed leaves.

    Returns:
      ``(measurements, tflite)``: accuracies of the ``.tflite`` and of the JAX
      int8 model, their agreement, sizes, latencies, the weights check and
      ``tflite_within_tolerance``; pass them to ``check``.
    """
    tflite, measured = _int8_and_faithfulness(apply_fn, params, dataset, dataset.x_test,
                                              dataset.y_test, config, quantize_config, rules)
    rep = dataset.x_train[:config.representative_samples]
    float_tflite = to_tflite(apply_fn, params, dataset.input_shape, rep, int8=False)
    if config.strip_strings:
        float_tflite = strip_strings(float_tflite)
    measured = {
        **measured,
        "tflite_bytes": len(tflite),
        "tflite_zip_bytes": measure.zip_bytes(tflite),
        "latency_int8_us": latency_us(tflite, repeats=config.latency_repeats,
                                      use_xnnpack=not config.sparse),
        "latency_float_us": latency_us(float_tflite, repeats=config.latency_repeats),
    }
    weights = weights_check(tflite, params, rules=rules)
    measured["weights_faithful"] = bool(weights["faithful"])
    measured["tflite_codes_per_channel"] = weights["codes_per_channel"]
    measured["tflite_codes_per_layer"] = weights["codes_per_layer"]
    measured["tflite_within_tolerance"] = not _tolerance_misses(measured, config)
    return measured, tflite


def int8_tflite(apply_fn: Callable, params, dataset, *, config: ExportConfig,
                quantize_config: quantize.QuantizeConfig, rules: Rules = DEFAULT_RULES,
                reason: str = "") -> bytes:
    """The int8 ``.tflite`` of ``params`` as the final export makes it.

    Raises:
      ConfigError: in one line, when the converter refuses the model (an op
        TFLite's int8 kernels lack); ``reason`` names what in the model may be why.
    """
    rep = dataset.x_train[:config.representative_samples]
    per_tensor = quantize.dense_per_tensor(params, quantize_config, rules)
    # After QAT the params are on their grids already; after another last stage
    # (post-training quantization) they go on them here, a clustered conv on its
    # layer grid, as ``simulated_int8`` holds them. The converter gets the layer-grid
    # kernels (written into the file below), so it calibrates the activations on the
    # weights the file holds; the others it rounds onto its own grid from the floats.
    int8_config = dataclasses.replace(quantize_config, per_channel=not per_tensor)
    modes = quantize.weight_modes(params, int8_config, rules)  # reads each conv's book once
    on_grid = quantize.fake_quant_weights(params, modes,
                                          quantize.weight_bits(params, int8_config, rules))
    converted = jax.tree.map(lambda w, g, mode: g if mode == quantize.LAYER else w,
                             params, on_grid, modes)
    try:
        tflite = to_tflite(apply_fn, converted, dataset.input_shape, rep,
                           per_tensor_dense=per_tensor, sparse=config.sparse)
    except ConversionError as err:
        raise ConfigError(f"the model does not convert to an int8 TFLite model ("
                          f"{reason + ': ' if reason else ''}{err}); use operations TFLite's "
                          "int8 kernels have (Conv/Dense, ReLU, ReLU6, BatchNorm, 2-D "
                          "pooling)") from None
    biases = quantize.layer_biases(apply_fn, params, dataset.input_shape)
    tflite = write_layer_grids(tflite, on_grid, rules, biases)
    return strip_strings(tflite) if config.strip_strings else tflite


# By TFLite builtin operator code (CONV_2D = 3, DEPTHWISE_CONV_2D = 4): the layout of
# a Flax conv kernel (HWIO) there and its channel axis, OHWI (0) and 1HWO (3).
_CONV_LAYOUTS = {3: ((3, 0, 1, 2), 0), 4: ((2, 0, 1, 3), 3)}


def write_layer_grids(model_bytes: bytes, params, rules: Rules = DEFAULT_RULES,
                      biases: dict[str, tuple[str, ...]] | None = None) -> bytes:
    """The ``.tflite`` with every conv kernel of ``params`` on the layer grid stored on it.

    The converter recomputes each channel's scale as ``max|w| / 127`` and rounds the
    codes again, which moves a channel whose largest code is not 127 off the grid's
    values (``ucpjax.int8_grid``). Each such kernel is found by its layout and
    zeros (and, among equals, by the smallest difference), and its codes and scales
    are written as the params hold them; the bias's scale (input scale times weight
    scale, which TFLite's kernels require) and its int32 values follow, from the
    params' biases: ``biases`` maps a layer to the paths of the biases added to its
    output (``quantize.layer_biases``; by default the layer's own ``bias``). Kernels
    in TFLite's sparse format are left as converted.
    """
    grids = _layer_grid_kernels(params, rules, biases or {})
    if not grids:
        return model_bytes
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_bytes))
    graph = model.subgraphs[0]
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        layout = _CONV_LAYOUTS.get(max(code.builtinCode, code.deprecatedBuiltinCode))
        if layout is None:
            continue
        kernel = graph.tensors[op.inputs[1]]
        if kernel.sparsity is not None:
            continue
        stored = model.buffers[kernel.buffer].data.view(np.int8).reshape(kernel.shape)
        match = _matching_grid(stored, kernel.quantization, grids, *layout)
        if match is None:
            continue
        name, scales, codes, bias = match
        del grids[name]
        model.buffers[kernel.buffer].data = codes.reshape(-1).view(np.uint8)
        kernel.quantization.scale = scales
        if len(op.inputs) > 2 and op.inputs[2] >= 0:
            tensor = graph.tensors[op.inputs[2]]
            if bias is None:  # a bias the converter made (zeros): its own values
                bias = model.buffers[tensor.buffer].data.view(np.int32) * np.asarray(
                    tensor.quantization.scale, np.float64)
            _rescale_bias(model, tensor, bias,
                          graph.tensors[op.inputs[0]].quantization.scale[0], scales)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _layer_grid_kernels(params, rules: Rules, biases: dict[str, tuple[str, ...]]) -> dict:
    """``{leaf name: (kernel, scales, codes shaped like the kernel, bias or None)}`` of
    4-D selected leaves on the layer grid."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    chosen = jax.tree.leaves(selected(params, rules))
    leaves = {path_name(path): np.asarray(w) for path, w in flat}
    grids = {}
    for (path, w), sel in zip(flat, chosen, strict=True):
        w = np.asarray(w)
        grid = int8_grid.layer_grid(w) if sel and w.ndim == 4 else None
        if grid is not None:
            name = path_name(path)
            layer = name.rpartition("/")[0]
            found = [leaves[p] for p in biases.get(layer, (f"{layer}/bias",)) if p in leaves]
            bias = np.sum(found, axis=0, dtype=np.float32) if found else None
            grids[name] = (w, grid[0], grid[1].reshape(w.shape), bias)
    return grids


def _matching_grid(stored: np.ndarray, quant, grids: dict, axes: tuple, channel_axis: int):
    """``(name, scales, codes in TFLite's layout)`` of the layer-grid kernel the
    converter stored as ``stored``, or None."""
    if quant is None or quant.quantizedDimension != channel_axis:
        return None
    shape = [1] * stored.ndim
    shape[channel_axis] = -1
    values = stored * np.asarray(quant.scale, np.float32).reshape(shape)
    best = None
    for name, (w, scales, codes, bias) in grids.items():
        target = w.transpose(axes)
        if target.shape != stored.shape or not np.array_equal(target == 0, stored == 0):
            continue
        # The converter's step is at most the layer grid's, and it rounds to within
        # half of it: another kernel of the same shape and zeros is further away.
        steps = np.abs(values - target) / scales.reshape(shape)
        error = float(steps.max(initial=0.0))
        if error <= 1.0 and (best is None or error < best[0]):
            best = (error, name, scales, codes.transpose(axes), bias)
    return None if best is None else best[1:]


def _rescale_bias(model, tensor, bias: np.ndarray, input_scale: float, scales) -> None:
    """The int32 ``tensor`` rewritten as ``bias`` (the params') on the scales
    ``input_scale * scales``, rounded once, as the converter rounds (so a bias on
    ``ucpjax.bias_grid``'s short grid keeps its zero low bits)."""
    new_scales = (np.float32(input_scale) * scales).astype(np.float32)
    codes = np.round(bias.astype(np.float64) / new_scales.astype(np.float64))
    model.buffers[tensor.buffer].data = codes.astype("<i4").view(np.uint8)
    tensor.quantization.scale = new_scales


def _int8_and_faithfulness(apply_fn, params, dataset, x, y, config: ExportConfig,
                           quantize_config, rules, reason: str = "") -> tuple[bytes, dict]:
    """The int8 ``.tflite`` of ``params`` and, on ``(x, y)``, its accuracy and how
    closely it follows the JAX model with int8 activations (``faithfulness``)."""
    rep = dataset.x_train[:config.representative_samples]
    per_tensor = quantize.dense_per_tensor(params, quantize_config, rules)
    tflite = int8_tflite(apply_fn, params, dataset, config=config,
                         quantize_config=quantize_config, rules=rules, reason=reason)
    evaluation = evaluate(tflite, x, y, use_xnnpack=not config.sparse)
    int8_weights = quantize.quantize_weights(
        params, dataclasses.replace(quantize_config, per_channel=not per_tensor), rules)
    jax_logits = train.predict(simulated_int8(apply_fn, int8_weights, rep, tflite),
                               int8_weights, x)
    return tflite, {"tflite_accuracy": evaluation["accuracy"],
                    **faithfulness(evaluation, jax_logits, y, config.tie_steps)}


# TFLite ops whose int8 tensors QAT and ``simulated_int8`` reproduce (or that are
# exact on int8 codes).
_MODELED_OPS = frozenset({
    "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "MEAN", "MAX_POOL_2D",
    "AVERAGE_POOL_2D", "RESHAPE", "SQUEEZE", "CONCATENATION", "PAD", "QUANTIZE",
    "DEQUANTIZE", "RELU", "RELU6", "SLICE", "STRIDED_SLICE", "TRANSPOSE"})
PREFLIGHT_SAMPLES = 1000


def preflight(apply_fn: Callable, params, dataset, *, config: ExportConfig,
              quantize_config: quantize.QuantizeConfig, rules: Rules = DEFAULT_RULES,
              reason: str, when: str = "before any compression", slack: float = 1.0) -> dict:
    """Refuses, before any compression, a model whose int8 ``.tflite`` the JAX int8
    model does not follow.

    QAT fake-quantizes the int8 tensors of the layers it knows (Conv/Dense inputs,
    ``GlobalAveragePool``, ``Add``, the logits); TFLite also rounds to int8 every
    tensor inside other activations and normalisations (a sigmoid, a hard-swish, a
    LayerNorm). Whether that matters is measured, not guessed: the given model,
    its weights on their int8 grid, is exported and checked as the final model
    will be (``check``'s tolerance) on up to ``PREFLIGHT_SAMPLES`` validation
    images. Seconds of work, where the final check would come after the whole
    pipeline.

    Args:
      apply_fn, params: the uncompressed model (BatchNorm folded).
      dataset: its data; the validation split is used (the test split if empty).
      config, quantize_config, rules: the recipe's, as the final export uses them.
      reason: what in the model QAT does not model, for the message.
      when: where in the run the model is, for the message (the pipeline checks
        again after each stage, as compression moves the int8 tensors' ranges).
      slack: the disagreement and accuracy gap allowed, as a multiple of the
        config's (between stages the pipeline stops only on a wide miss: QAT,
        still to come, recovers a small one).

    Returns:
      The measurements (``faithfulness``'s keys and ``tflite_ops``, the converted
      ops outside what QAT models).

    Raises:
      ToleranceError: the int8 ``.tflite`` misses ``check``'s tolerance.
      ConfigError: the model does not convert to an int8 ``.tflite`` at all.
    """
    x, y = (dataset.x_val, dataset.y_val) if len(dataset.x_val) else (dataset.x_test,
                                                                       dataset.y_test)
    x, y = x[:PREFLIGHT_SAMPLES], y[:PREFLIGHT_SAMPLES]
    int8_weights = quantize.quantize_weights(params, quantize_config, rules)
    tflite, measured = _int8_and_faithfulness(apply_fn, int8_weights, dataset, x, y,
                                              config, quantize_config, rules, reason)
    ops = sorted({op["op_name"] for op in interpreter(tflite, use_xnnpack=False)
                  ._get_ops_details()} - _MODELED_OPS)
    measured["tflite_ops"] = ops
    misses = _tolerance_misses(measured, dataclasses.replace(
        config, min_agreement=1 - slack * (1 - config.min_agreement),
        accuracy_tolerance=slack * config.accuracy_tolerance))
    if misses:
        allowance = "" if slack == 1 else f", {slack:g}x the final check's allowance"
        raise ToleranceError(
            f"the model's int8 .tflite does not follow its JAX int8 model {when} "
            f"({'; '.join(misses)}{allowance}, on {len(x)} images): TFLite rounds to int8 "
            f"inside ops QAT does not model ({', '.join(ops) or '-'}; in JAX: {reason}); use "
            "ReLU or ReLU6 activations and put each BatchNorm right after its Conv/Dense, "
            "or pass check=False (or loosen export.min_agreement / "
            "export.accuracy_tolerance) to accept it")
    return measured


def _tolerance_misses(final: dict, config: ExportConfig) -> list[str]:
    """What of the accuracy gap and the argmax agreement misses the config's tolerance."""
    misses = []
    if final["tflite_agreement"] < config.min_agreement:
        misses.append(f"argmax agreement {final['tflite_agreement']:.4f} < "
                      f"export.min_agreement={config.min_agreement}")
    # Reports written before near-ties were left out have only the two accuracies.
    gap = (final["tflite_accuracy_gap"] if "tflite_accuracy_gap" in final
           else abs(final["tflite_accuracy"] - final["jax_int8_accuracy"]))
    # One image is what the gap can resolve: on fewer than 1 / tolerance decided
    # images, a single flip exceeds the tolerance without saying anything.
    allowed = max(config.accuracy_tolerance, 1 / max(final.get("tflite_decided", math.inf), 1))
    if gap > allowed + 1e-12:  # an exact tolerance, up to float noise
        misses.append(f"accuracy of the .tflite and the JAX int8 model differ by {gap:.5f} "
                      f"> export.accuracy_tolerance={config.accuracy_tolerance}")
    return misses


def check(final: dict, config: ExportConfig, *, qat: bool = True) -> None:
    """Raises ToleranceError, one line saying what missed, unless the .tflite passed.

    Args:
      final: measurements from ``verify`` (a report's ``"final"``).
      config: the ExportConfig they were checked against.
      qat: whether quantization-aware training put the weights on their int8
        grid; without it the export is post-training quantization, whose int8
        weights cannot equal the float params, so only the accuracy counts.
    """
    problems = _tolerance_misses(final, config)
    if qat and not final["weights_faithful"]:
        problems.append("its int8 weights differ from the params (weights_check)")
    if problems:
        raise ToleranceError("the .tflite is not faithful to the JAX model: "
                             + "; ".join(problems))


def latency_us(model_bytes: bytes, input_shape: tuple[int, ...] | None = None, *,
               threads: int = 1, repeats: int = 500, warmup: int = 50,
               use_xnnpack: bool = True, seed: int = 0) -> float:
    """Median one-sample invoke time in microseconds (XNNPACK where it applies).

    Args:
      model_bytes: the .tflite file.
      input_shape: one example's shape; read from the model when None.
      threads: interpreter threads.
      repeats: timed invokes; warmup: untimed invokes before them.
      use_xnnpack: apply the default delegate when the model allows it.
      seed: fixes the random inputs.

    Returns:
      The median of ``repeats`` timed invokes (set_tensor excluded).
    """
    runner = TfliteRunner(model_bytes, threads=threads, use_xnnpack=use_xnnpack)
    shape = runner.input_shape if input_shape is None else tuple(input_shape)
    x = runner.quantize_input(np.random.default_rng(seed).random((8, 1, *shape), np.float32))
    interp, index = runner.interpreter, runner.input["index"]
    times = []
    for i in range(warmup + repeats):
        interp.set_tensor(index, x[i % len(x)])
        start = time.perf_counter_ns()
        interp.invoke()
        if i >= warmup:
            times.append(time.perf_counter_ns() - start)
    return float(np.median(times)) / 1e3


def _layouts(kernel: np.ndarray) -> list[np.ndarray]:
    """The ways TFLite lays out a Flax kernel: Dense (in, out) -> (out, in);
    Conv HWIO -> OHWI; depthwise (1-channel input) HWIO -> 1HWO. A 1-D conv's
    kernel (W, I, O) runs as a 2-D one of height 1 (or width 1)."""
    if kernel.ndim == 2:
        return [kernel.T]
    if kernel.ndim == 3:
        return [layout for axis in (0, 1) for layout in _layouts(np.expand_dims(kernel, axis))]
    if kernel.ndim == 4:
        return [kernel.transpose(3, 0, 1, 2), kernel.transpose(2, 0, 1, 3)]
    return []


def _dequantize(q: np.ndarray, quant: dict) -> tuple[np.ndarray, np.ndarray]:
    """Float values and per-element scales of a quantized tensor."""
    scales = np.asarray(quant["scales"], np.float32)
    zero_points = np.asarray(quant["zero_points"], np.int64)
    if scales.size > 1:
        shape = [1] * q.ndim
        shape[quant["quantized_dimension"]] = -1
        scales, zero_points = scales.reshape(shape), zero_points.reshape(shape)
    values = ((q.astype(np.int64) - zero_points) * scales).astype(np.float32)
    return values, np.broadcast_to(scales, q.shape)


def _codes_per_channel(q: np.ndarray, quant: dict) -> int:
    """The most distinct non-zero stored values in one output channel.

    The channel axis is the quantized dimension; a tensor with one scale (a
    FULLY_CONNECTED weight, laid out (out, in)) reports 0, its output axis.
    """
    axis = quant["quantized_dimension"]
    rows = np.moveaxis(q, axis, 0).reshape(q.shape[axis], -1)
    return max((np.unique(r[r != 0]).size for r in rows), default=0)


def _folded_factor(values: np.ndarray, params: np.ndarray) -> float:
    """The one constant ``c`` with ``values ~= c * params`` (1.0 when they already match).

    Taken from the largest magnitudes, which the int8 grid resolves best; a
    mismatch that is not one constant factor remains in the comparison after it.
    """
    big_values, big_params = np.abs(values).max(initial=0.0), np.abs(params).max(initial=0.0)
    if big_values == 0 or big_params == 0:
        return 1.0
    factor = float(big_values / big_params)
    return 1.0 if np.isclose(factor, 1.0, rtol=1e-6) else factor


def _weight_tensors(interp) -> tuple[list[int], list[int]]:
    """Indices of the weight and bias tensors of FC / conv ops."""
    weights, biases = [], []
    for op in interp._get_ops_details():
        if op["op_name"] in _WEIGHT_OPS:
            inputs = list(op["inputs"])
            weights.append(inputs[1])
            if len(inputs) > 2 and inputs[2] >= 0:
                biases.append(inputs[2])
    return weights, biases


def weights_check(model_bytes: bytes, params, *, rules: Rules = DEFAULT_RULES,
                  tolerance_steps: float = 0.01) -> dict:
    """Compares the .tflite weights with the params they came from.

    Every weight tensor of a FULLY_CONNECTED / CONV_2D / DEPTHWISE_CONV_2D op is
    dequantized (``(q - zero_point) * scale`` per channel) and matched to the
    selected params leaf of the same shape in TFLite's layout that it is closest to.
    The converter may fold a constant that follows a layer into its weights (a
    global average pool's ``1/(H*W)`` into the next FULLY_CONNECTED), which scales
    the int8 grid but keeps the int8 codes: such a per-tensor factor is divided
    out before comparing, and reported.

    Args:
      model_bytes: the .tflite file (dense weight format; sparse-format weights
        are reported as unmatched).
      params: the params pytree the model was converted from.
      rules: the params leaves to match (``ucpjax.rules``; kernels by default).
      tolerance_steps: largest allowed |dequantized - param|, in units of the
        channel's quantization step; 0.01 allows float32 rounding only.

    Returns:
      Flat dict: ``faithful`` (every selected leaf matched, within tolerance, same
      zeros), ``all_int8`` (every weight tensor int8), ``biases_int32``,
      ``max_abs_error``, and per leaf ``<path>/folded_factor`` (1.0 unless the
      converter folded a constant in), ``<path>/max_abs_error``,
      ``<path>/max_error_steps``, ``<path>/zeros_equal``, ``<path>/distinct``
      (distinct non-zero dequantized values), ``<path>/distinct_params``, and
      ``<path>/codes_per_channel`` (the most distinct non-zero stored codes in
      one output channel; ``codes_per_channel`` is the largest over leaves) and
      ``<path>/codes`` (in the whole tensor; ``codes_per_layer`` the largest).
    """
    interp = interpreter(model_bytes, use_xnnpack=False)
    details = {d["index"]: d for d in interp.get_tensor_details()}
    weight_ids, bias_ids = _weight_tensors(interp)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    chosen = jax.tree.leaves(selected(params, rules))
    kernels = {path_name(p): np.asarray(w) for (p, w), s in zip(flat, chosen) if s}
    report = {
        "all_int8": bool(weight_ids) and all(details[i]["dtype"] == np.int8 for i in weight_ids),
        "biases_int32": all(details[i]["dtype"] == np.int32 for i in bias_ids),
    }
    matched = {}
    for index in weight_ids:
        try:
            q = interp.get_tensor(index)
        except ValueError:
            continue  # sparse-format tensors cannot be read back
        d = details[index]
        codes = _codes_per_channel(q, d["quantization_parameters"])
        if d["dtype"] == np.int8:
            values, scales = _dequantize(q, d["quantization_parameters"])
        else:
            values, scales = q.astype(np.float32), np.ones(q.shape, np.float32)
        best = None
        for name, kernel in kernels.items():
            if name in matched:
                continue
            for layout in _layouts(kernel):
                if layout.shape == values.shape:
                    factor = _folded_factor(values, layout)
                    err = np.abs(values / factor - layout)
                    steps = float((err * factor / np.maximum(scales, 1e-30)).max(initial=0.0))
                    if best is None or steps < best[1]:
                        best = (name, steps, float(err.max(initial=0.0)), layout, factor)
        if best is None:
            continue
        name, steps, max_err, layout, factor = best
        matched[name] = {
            "folded_factor": factor,
            "max_abs_error": max_err,
            "max_error_steps": steps,
            "zeros_equal": bool(np.array_equal(values == 0, layout == 0)),
            "distinct": int(np.unique(values[values != 0]).size),
            "distinct_params": int(np.unique(layout[layout != 0]).size),
            "codes_per_channel": codes,
            "codes": int(np.unique(q[q != 0]).size),
        }
    ok = len(matched) == len(kernels)
    for name, entry in matched.items():
        ok = ok and entry["zeros_equal"] and entry["max_error_steps"] <= tolerance_steps
        report.update({f"{name}/{key}": value for key, value in entry.items()})
    report["unmatched"] = len(kernels) - len(matched)
    report["max_abs_error"] = max((e["max_abs_error"] for e in matched.values()), default=0.0)
    report["codes_per_channel"] = max((e["codes_per_channel"] for e in matched.values()),
                                      default=0)
    report["codes_per_layer"] = max((e["codes"] for e in matched.values()), default=0)
    report["faithful"] = bool(ok)
    return report
