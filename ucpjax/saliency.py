"""What a weight is worth to the pruning criterion: its magnitude, or its output share.

``magnitude`` ranks weights by ``|w|`` (Zhu & Gupta 2017). ``activation`` ranks
them by ``|w|`` times the root mean square of the input feature the weight
multiplies, measured on training examples (Wanda: Sun et al. 2023, "A Simple and
Effective Pruning Approach for Large Language Models"). For a linear layer that is
the square root of Optimal Brain Damage's saliency of the layer's output,
``w**2 * E[x**2]``: a weight on an input that is always zero (a border pixel of
MNIST) is worth nothing however large it is, and a weight on a quiet input is
worth less than its size says. Magnitude alone keeps such weights, since no
gradient reaches them to shrink them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

CRITERIA = ("magnitude", "activation")
# Training examples (the first, in order: deterministic) the input RMS is taken over.
SAMPLES = 4096


def scales(criterion: str | None, apply_fn, params, x_train: np.ndarray):
    """The factors a ``criterion`` multiplies magnitudes by: a pytree like ``params``.

    ``activation``: ``input_scales`` over the first ``SAMPLES`` of ``x_train``;
    ``magnitude`` or None: None at every leaf (magnitude alone).
    """
    if criterion == "activation":
        return input_scales(apply_fn, params, x_train[:SAMPLES])
    return jax.tree.map(lambda _: None, params)


def input_scales(apply_fn, params, x: np.ndarray, batch_size: int = 256):
    """Per kernel: the RMS over ``x`` of the input each weight multiplies.

    Every ``nn.Dense`` and ``nn.Conv`` call is seen (a layer called twice pools
    both calls' inputs). The RMS of an input feature is taken over the
    examples and, for a conv, over the positions; a grouped or depthwise conv's
    weight ``[..., j, o]`` multiplies input channel ``group(o) * in_per_group + j``.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits`` in inference mode.
      params: the params pytree the layers read their kernels from.
      x: the examples, batch first.
      batch_size: examples per forward pass.

    Returns:
      A pytree like ``params``: for each called layer's ``kernel``, a float32
      array of its shape's rank that broadcasts to it; None for every other leaf.
    """
    def moments(params, x):
        sums = {}

        def record(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name == "__call__" and isinstance(module, (nn.Dense, nn.Conv)):
                inputs = args[0].reshape(-1, args[0].shape[-1]).astype(jnp.float32)
                path = tuple(module.scope.path)
                total, count = sums.get(path, (0.0, 0))
                sums[path] = (total + jnp.sum(inputs ** 2, axis=0), count + inputs.shape[0])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            apply_fn(params, x)
        return sums

    moments = jax.jit(moments)
    batches = [jax.device_get(moments(params, x[i:i + batch_size]))
               for i in range(0, len(x), batch_size)]
    rms = {path: np.sqrt(sum(b[path][0] for b in batches) / sum(b[path][1] for b in batches))
           for path in batches[0]}

    def scale(path, kernel):
        keys = tuple(getattr(k, "key", None) for k in path)
        if keys[-1] != "kernel" or keys[:-1] not in rms:
            return None
        return _per_weight(rms[keys[:-1]], np.shape(kernel))

    return jax.tree_util.tree_map_with_path(scale, params)


def _per_weight(rms: np.ndarray, kernel_shape: tuple[int, ...]) -> np.ndarray:
    """The input RMS of each ``(in_per_group, out)`` pair, shaped to broadcast to the kernel."""
    in_per_group, out = kernel_shape[-2:]
    groups = rms.size // in_per_group
    group_of_output = np.arange(out) // (out // groups)
    channel = group_of_output[None, :] * in_per_group + np.arange(in_per_group)[:, None]
    return rms[channel].astype(np.float32).reshape((1,) * (len(kernel_shape) - 2)
                                                   + (in_per_group, out))
