"""The add of a residual connection, as a module that QAT can see."""

from __future__ import annotations

import flax.linen as nn
import jax


class Add(nn.Module):
    """``x + y`` of two activation tensors (a residual connection).

    A module rather than a bare ``+`` so that QAT sees both inputs: TFLite's int8
    ADD takes two int8 tensors with scales of their own. On a ResNet's residual
    path the second conv has no ReLU to fuse, so its output is rounded to int8
    there and only there; ``ucpjax.quantize`` fake-quantizes both inputs of every
    ``Add``. Write ``nn.relu(Add()(x, y))``: the converter fuses the ReLU into ADD.
    """

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        return x + y
