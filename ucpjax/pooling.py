"""Max pooling whose gradient is fast on XLA's CPU backend.

XLA lowers the gradient of ``nn.max_pool`` to ``select_and_scatter``, which on
CPU costs ~20x the forward pass (128x26x26x12: 0.95 ms vs 19.6 ms), half of a
training step of ``pcqat_mnist``.
Non-overlapping windows need no scatter: every input belongs to one window, so
the gradient is the output gradient routed to the first maximum of each window
(XLA's own choice among ties). The forward pass stays ``nn.max_pool``, so
jax2tf still exports one MAX_POOL_2D.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool(x: jax.Array, size: int = 2) -> jax.Array:
    """``nn.max_pool(x, (size, size), strides=(size, size))`` of NHWC ``x``, VALID."""
    return nn.max_pool(x, (size, size), (size, size))


def _forward(x, size):
    y = max_pool(x, size)
    return y, (x, y)


def _backward(size, residuals, dy):
    x, y = residuals
    n, height, width, c = x.shape
    _, rows, cols, _ = y.shape
    cropped = x[:, :rows * size, :cols * size]  # VALID drops the incomplete windows
    windows = cropped.reshape(n, rows, size, cols, size, c)
    # Visit each window's places row by row; the first maximum takes dy. (A cumsum
    # over the window marks the same place but runs as a reduce-window on CPU:
    # 3x slower for the whole gradient.)
    taken = jnp.zeros(y.shape, bool)
    places = []
    for i in range(size):
        for j in range(size):
            first = (windows[:, :, i, :, j] == y) & ~taken
            taken = taken | first
            places.append(jnp.where(first, dy, 0.0))
    dx = jnp.stack(places, axis=3).reshape(n, rows, cols, size, size, c)
    dx = dx.transpose(0, 1, 3, 2, 4, 5).reshape(n, rows * size, cols * size, c).astype(dy.dtype)
    return (jnp.pad(dx, ((0, 0), (0, height - rows * size), (0, width - cols * size), (0, 0))),)


max_pool.defvjp(_forward, _backward)


class GlobalAveragePool(nn.Module):
    """Mean over the spatial axes of NHWC ``x``.

    A module rather than a bare ``jnp.mean`` so that QAT can see its input: in
    the int8 .tflite the tensor feeding MEAN is quantized (it is a conv's output),
    and ``ucpjax.quant`` fake-quantizes the inputs of the modules TFLite
    quantizes. Without it the JAX model would skip one int8 rounding the .tflite does.
    """

    keepdims: bool = False  # (N, 1, 1, C), as a squeeze-and-excitation gate wants

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.mean(x, axis=(1, 2), keepdims=self.keepdims)
