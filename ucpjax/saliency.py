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

A layer followed by a BatchNorm (on its output alone) has each output channel
multiplied by ``|gamma| / sigma`` before anything reads it, so a weight's share of
what the next layer sees is also scaled by that channel's gain: the factor
includes it (measured as the ratio of the BatchNorm's centred output to its
centred input, which is exactly ``|gamma| / sigma`` per channel). With BatchNorm
folded into the kernels the gain is in the weights already.
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
    A layer whose output goes straight into a BatchNorm has each output channel's
    factors times that BatchNorm's gain ``|gamma| / sigma`` (module docstring).

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
        sums, gains, last = {}, {}, [None, None]  # last: the latest layer output, its path

        def record(next_fun, args, kwargs, context):
            module, x = context.module, args[0] if args else None
            if context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            if isinstance(module, (nn.Dense, nn.Conv)):
                path = tuple(module.scope.path)
                sums[path] = _accumulated(sums.get(path), jnp.square(_rows(x)))
                out = next_fun(*args, **kwargs)
                last[:] = out, path
                return out
            out = next_fun(*args, **kwargs)
            if isinstance(module, nn.BatchNorm) and x is last[0] and x.shape == out.shape:
                centred = [_rows(a) - jnp.mean(_rows(a), axis=0) for a in (x, out)]
                gains[last[1]] = tuple(jnp.sum(jnp.square(c), axis=0) for c in centred)
            return out

        with nn.intercept_methods(record):
            apply_fn(params, x)
        return sums, gains

    moments = jax.jit(moments)
    batches = [jax.device_get(moments(params, x[i:i + batch_size]))
               for i in range(0, len(x), batch_size)]
    rms = {path: np.sqrt(sum(b[0][path][0] for b in batches)
                         / sum(b[0][path][1] for b in batches)) for path in batches[0][0]}
    gain = {path: np.sqrt(sum(b[1][path][1] for b in batches)
                          / np.maximum(sum(b[1][path][0] for b in batches), 1e-30))
            for path in batches[0][1]}

    def scale(path, kernel):
        keys = tuple(getattr(k, "key", None) for k in path)
        if keys[-1] != "kernel" or keys[:-1] not in rms:
            return None
        factor = _per_weight(rms[keys[:-1]], np.shape(kernel))
        return factor * gain[keys[:-1]] if keys[:-1] in gain else factor

    return jax.tree_util.tree_map_with_path(scale, params)


def _rows(x):
    return x.reshape(-1, x.shape[-1]).astype(jnp.float32)


def _accumulated(so_far, squares):
    """``(sum of squares per feature, rows)`` with ``squares``' rows added."""
    total, count = so_far or (0.0, 0)
    return total + jnp.sum(squares, axis=0), count + squares.shape[0]


def _per_weight(rms: np.ndarray, kernel_shape: tuple[int, ...]) -> np.ndarray:
    """The input RMS of each ``(in_per_group, out)`` pair, shaped to broadcast to the kernel."""
    in_per_group, out = kernel_shape[-2:]
    groups = rms.size // in_per_group
    group_of_output = np.arange(out) // (out // groups)
    channel = group_of_output[None, :] * in_per_group + np.arange(in_per_group)[:, None]
    return rms[channel].astype(np.float32).reshape((1,) * (len(kernel_shape) - 2)
                                                   + (in_per_group, out))
