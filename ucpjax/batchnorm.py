"""BatchNorm kept live through compression, until QAT folds it.

Pruning, distillation and clustering fine-tune a BatchNorm model as it was
trained: each BatchNorm normalises with the statistics of the batch, its scale
and offset are trained, and the magnitudes that pruning ranks are those of
unscaled kernels, comparable within a layer. After training, the running
statistics are re-estimated for the new weights over a fixed slice of the
training set ("precise BatchNorm", Wu & Johnson 2021): the mean of the batch
means and variances, which is what an exponential moving average converges
to for fixed weights, without its lag. Dropout stays off in fine-tuning.

A stage sees a live model only through its ``apply_fn``: a ``LiveBatchNorm``
is an ordinary ``apply_fn(params, x) -> logits`` in inference mode that also
knows how to run in training mode (``training``) and to re-estimate its
statistics (``settled``). Plain functions pass through both unchanged, so a
model without BatchNorm, or one whose BatchNorm is already folded, trains
exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ucpjax import compile_cache, conv, devices

# Examples (the first of the training set, in order: deterministic) and batch
# size over which running statistics are re-estimated.
CALIBRATION_EXAMPLES = 4096
CALIBRATION_BATCH = 256


class LiveBatchNorm:
    """``apply_fn(params, x)`` of a module whose BatchNorm layers still train.

    Calling it runs inference with the running statistics in ``extra``;
    ``training(params, x)`` runs with batch statistics (Dropout off).
    """

    def __init__(self, module: nn.Module, extra: dict):
        self.module, self.extra = module, extra

    def __call__(self, params, x):
        return self.module.apply({"params": params, **self.extra}, x, train=False)

    def training(self, params, x):
        with nn.intercept_methods(_without_dropout):
            logits, _ = self.module.apply({"params": params, **self.extra}, x, train=True,
                                          mutable=["batch_stats"])
        return logits

    def recalibrated(self, params, x: np.ndarray) -> LiveBatchNorm:
        """The same model with running statistics re-estimated for ``params`` on ``x``."""
        stats = population_statistics(self.module, {"params": params, **self.extra}, x)
        return LiveBatchNorm(self.module, {**self.extra, "batch_stats": stats})


def training(apply_fn: Callable) -> Callable:
    """The training-mode function of ``apply_fn`` (itself unless it is live)."""
    return apply_fn.training if isinstance(apply_fn, LiveBatchNorm) else apply_fn


def settled(apply_fn: Callable, params, x: np.ndarray) -> Callable:
    """``apply_fn`` with running statistics re-estimated for ``params`` (if live)."""
    return apply_fn.recalibrated(params, x) if isinstance(apply_fn, LiveBatchNorm) else apply_fn


def _without_dropout(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dropout) and context.method_name == "__call__":
        return args[0]
    return next_fun(*args, **kwargs)


def _normalises_by_batch(module: nn.BatchNorm, args, kwargs) -> bool:
    """Whether this training-mode call uses (and would update) batch statistics."""
    use_running = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
    return not nn.merge_param("use_running_average", module.use_running_average, use_running)


def _batch_moments(module: nn.Module, variables, x) -> dict:
    """``{batchnorm path: (mean, var)}`` of each BatchNorm's input over one batch."""
    moments = {}

    def capture(next_fun, args, kwargs, context):
        bn = context.module
        if (isinstance(bn, nn.BatchNorm) and context.method_name == "__call__"
                and _normalises_by_batch(bn, args, kwargs)):
            inputs = args[0].astype(jnp.float32)
            features = {a % inputs.ndim for a in np.atleast_1d(bn.axis)}
            axes = tuple(a for a in range(inputs.ndim) if a not in features)
            mean = inputs.mean(axes)
            moments[bn.path] = (mean, jnp.square(inputs - mean).mean(axes))
        return _without_dropout(next_fun, args, kwargs, context)

    with nn.intercept_methods(capture), conv.fast_convs(conv.depthwise_only):
        module.apply(variables, x, train=True, mutable=["batch_stats"])
    return moments


# Compiled once per module (flax modules hash by their fields), not once per call:
# a sensitivity pass re-estimates the statistics after every trial.
_moments_of = compile_cache.per_first_argument(_batch_moments)


def population_statistics(module: nn.Module, variables: dict, x: np.ndarray) -> dict:
    """``batch_stats`` whose mean and var are the averages of batch moments over ``x``.

    Batches of ``CALIBRATION_BATCH`` from the first ``CALIBRATION_EXAMPLES`` of
    ``x``, run in training mode as in fine-tuning. BatchNorms that always use
    their running average keep their statistics.
    """
    x = x[:CALIBRATION_EXAMPLES]
    batch = min(CALIBRATION_BATCH, len(x))
    # Each batch split over the devices as a training batch is (the same moments
    # up to float rounding).
    mesh = devices.inference_mesh()
    mesh = Mesh(mesh.devices[:devices.split_count(batch, True, mesh.size)], ("data",))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    variables = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))
    moments, totals = _moments_of(module), None
    starts = range(0, len(x) - batch + 1, batch)
    for start in starts:
        step = jax.device_get(moments(variables, jax.device_put(x[start:start + batch], rows)))
        totals = step if totals is None else jax.tree.map(np.add, totals, step)
    stats = jax.tree.map(np.asarray, variables["batch_stats"])
    for path, (mean, var) in (totals or {}).items():
        node = stats
        for name in path:
            node = node[name]
        node["mean"] = (mean / len(starts)).astype(node["mean"].dtype)
        node["var"] = (var / len(starts)).astype(node["var"].dtype)
    return jax.tree.map(jnp.asarray, stats)
