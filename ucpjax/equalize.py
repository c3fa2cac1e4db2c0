"""Equalising the input channels of depthwise convs before int8 QAT.

TFLite gives each activation tensor one int8 scale. The channels that feed a
depthwise conv can span very different ranges (the conv-nets issue's net after
folding: channel maxima from 0.56 to 7.9), so the small ones get a few dozen of
the 256 levels; on that net quantizing this one tensor cost 0.6 points, and QAT
did not train it away. A regular conv mixes its input channels, so the error
averages out; a depthwise channel reads its input channel alone.

With only ReLU, max pooling or a folded BatchNorm between a conv and the
depthwise conv it feeds, multiplying the conv's output channel c by a_c > 0 and
the depthwise weights of channel c by 1 / a_c computes the same function
(relu(a z) = a relu(z)). Cross-layer equalisation (Nagel et al. 2019) uses this
for weight ranges; weights here are int8 per output channel, so the factors are
chosen for the activation: a_c = M / m_c brings each channel's largest value m_c
(over calibration images) to the largest of all, M. Whole channels are scaled,
so every zero stays and each output channel keeps its k shared values.

A pair is kept only if the model's logits stay the same (relative 1e-4) on the
calibration images: anything between the two that is not positively homogeneous
(ReLU6, a residual tap, a sigmoid) leaves that pair as it was.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ucpjax import rules as rules_lib
from ucpjax import train
from ucpjax.fold import node

# Largest factor for one channel, so that a nearly dead channel is not blown up.
_MAX_FACTOR = 1024.0
# How far the logits may move, relative to their largest magnitude, for a pair to stand.
_TOLERANCE = 1e-4
_BATCH = 256


@dataclasses.dataclass(frozen=True)
class Pair:
    """A conv whose output channels feed ``depthwise`` one for one."""

    producer: tuple[str, ...]
    batchnorm: tuple[str, ...] | None  # the (folded) BatchNorm right after the producer
    depthwise: tuple[str, ...]


def find_pairs(apply_fn, params, input_shape: tuple[int, ...]) -> list[Pair]:
    """Each depthwise conv and the last conv before it with as many output channels.

    A candidate only: ``equalize`` checks that the rescaling changes nothing.
    Layers called more than once are left out (one scaling would serve two inputs).
    """
    calls = []  # (path, module, input, output) of every Conv/Dense/BatchNorm call

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if (context.method_name == "__call__" and args
                and isinstance(context.module, (nn.Conv, nn.Dense, nn.BatchNorm))):
            calls.append((context.module.path, context.module, args[0], out))
        return out

    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    with nn.intercept_methods(interceptor):
        jax.eval_shape(apply_fn, params, x)
    paths = [path for path, *_ in calls]
    pairs = []
    for i, (path, module, inputs, _) in enumerate(calls):
        channels = inputs.shape[-1]
        if not _depthwise(module, channels) or paths.count(path) > 1:
            continue
        # Dense producers are left out: a weight-shared Dense kernel is quantized per
        # tensor, which per-channel factors would break.
        convs = [j for j in range(i) if type(calls[j][1]) is nn.Conv
                 and calls[j][3].shape[-1] == channels and paths.count(calls[j][0]) == 1]
        if not convs:
            continue
        producer, _, _, out = calls[convs[-1]]
        batchnorm = next((p for p, m, a, _ in calls[convs[-1] + 1:i]
                          if isinstance(m, nn.BatchNorm) and a is out), None)
        pairs.append(Pair(producer, batchnorm, path))
    return pairs


def _depthwise(module, channels: int) -> bool:
    return isinstance(module, nn.Conv) and channels > 1 and module.feature_group_count == channels


def input_maxima(apply_fn, params, x: np.ndarray, layers) -> dict[tuple, np.ndarray]:
    """``{path: per-channel max |input|}`` of each layer in ``layers`` over ``x``."""
    wanted = set(layers)

    def observe(params, x):
        seen = {}

        def interceptor(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and args and context.module.path in wanted:
                seen[context.module.path] = jnp.abs(args[0]).reshape(
                    -1, args[0].shape[-1]).max(0)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            apply_fn(params, x)
        return seen

    observe = jax.jit(observe)
    batches = [jax.device_get(observe(params, x[i:i + _BATCH]))
               for i in range(0, len(x), _BATCH)]
    return {path: np.max([b[path] for b in batches], axis=0) for path in wanted}


def factors_for(maxima: np.ndarray) -> np.ndarray:
    """``a_c = M / m_c``, at most ``_MAX_FACTOR``; 1 for a dead channel."""
    top = maxima.max()
    safe = np.where(maxima > 0, maxima, top)
    return np.where(maxima > 0, np.minimum(top / safe, _MAX_FACTOR), 1.0).astype(np.float32)


def rescaled(params, pair: Pair, factors: np.ndarray):
    """``params`` with the producer's output channels times ``factors`` and the
    depthwise weights of each channel divided by its factor (a new tree)."""
    params = jax.tree.map(np.array, params)
    producer = node(params, pair.producer)
    for name in ("kernel", "bias"):
        if name in producer:
            producer[name] = producer[name] * factors
    if pair.batchnorm is not None:
        # Folded, the BatchNorm is the identity plus its offset, which scales too.
        batchnorm = node(params, pair.batchnorm, missing={})
        if "bias" in batchnorm:
            batchnorm["bias"] = batchnorm["bias"] * factors
    depthwise = node(params, pair.depthwise)
    multiplier = depthwise["kernel"].shape[-1] // factors.size  # outputs per input channel
    depthwise["kernel"] = depthwise["kernel"] / np.repeat(factors, multiplier)
    return jax.tree.map(jnp.asarray, params)


def equalize(apply_fn, params, x: np.ndarray, prefix: str = "equalize") -> tuple:
    """Equalises the input channels of every depthwise conv that allows it.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits`` in inference mode, BatchNorm folded.
      params: its params.
      x: calibration images (the ranges and the check are taken over them).
      prefix: of the report's keys.

    Returns:
      ``(params, report)``: the same function with rescaled channels, and for each
      depthwise conv the spread of its input channels' maxima (largest over
      smallest non-zero) before and after; ``{prefix}/layers`` counts those rescaled.
    """
    pairs = find_pairs(apply_fn, params, x.shape[1:])
    report = {f"{prefix}/layers": 0}
    if not pairs:
        return params, report
    maxima = input_maxima(apply_fn, params, x, [p.depthwise for p in pairs])
    reference = train.predict(apply_fn, params, x)
    bound = _TOLERANCE * max(float(np.abs(reference).max()), 1.0)
    for pair in pairs:
        factors = factors_for(maxima[pair.depthwise])
        candidate = rescaled(params, pair, factors)
        moved = float(np.abs(train.predict(apply_fn, candidate, x) - reference).max())
        name = f"{prefix}/{rules_lib.path_name(pair.depthwise)}"
        before = maxima[pair.depthwise]
        report[f"{name}/spread_before"] = _spread(before)
        if moved <= bound:
            params = candidate
            report[f"{prefix}/layers"] += 1
            report[f"{name}/spread_after"] = _spread(before * factors)
    return params, report


def _spread(maxima: np.ndarray) -> float:
    alive = maxima[maxima > 0]
    return float(alive.max() / alive.min()) if alive.size else 1.0
