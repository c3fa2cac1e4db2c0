"""Sizes and compute of a model: float32 bytes, zipped bytes, multiply-accumulates.

``zip_bytes`` follows TFMOT's convention (its notebooks call it "gzipped" but
write a zip with DEFLATE), so numbers compare like with like with TF baselines.
``sparsity`` is the fraction of exact zeros in the kernels. ``macs`` counts per
layer, for one example, both the dense multiplications and those with a
non-zero weight (what a sparse kernel would have to do).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable

import flax.linen as nn
import jax
import numpy as np

from ucpjax import rules as rules_lib


def float32_bytes(params) -> int:
    """Bytes of the params stored as float32: parameter count x 4."""
    return 4 * sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params))


def sparsity(params, rules: rules_lib.Rules = rules_lib.DEFAULT_RULES) -> float:
    """Fraction of exact zeros over the leaves the rules select (kernels by default)."""
    chosen = [np.asarray(w) for w, sel in zip(jax.tree.leaves(params),
              jax.tree.leaves(rules_lib.selected(params, rules))) if sel]
    size = sum(w.size for w in chosen)
    return sum(w.size - np.count_nonzero(w) for w in chosen) / size if size else 0.0


def zip_bytes(data: bytes, name: str = "model") -> int:
    """Size of ``data`` as the only member of a zip (ZIP_DEFLATED, level 9), as TFMOT does."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr(name, data)
    return len(buffer.getvalue())


def macs(apply_fn: Callable, params, input_shape: tuple[int, ...]) -> dict:
    """Multiplications per example of every nn.Dense and nn.Conv call.

    The model is traced abstractly (``jax.eval_shape``) with
    ``flax.linen.intercept_methods`` recording each layer's input and output
    shapes; weights are read from ``params`` at the layer's module path.
    Dense: kernel size x positions (``in * out`` for a flat input); Conv: kernel
    size (``kh * kw * in / groups * out``) x output positions. The non-zero count
    uses the non-zero kernel entries instead of the kernel size.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits`` of a Flax linen model.
      params: the params pytree (concrete arrays, for the non-zero counts).
      input_shape: one example's shape.

    Returns:
      ``{"total": {"dense": int, "nonzero": int}, "layers": {path: {"dense",
      "nonzero", "input_shape", "output_shape"}}}`` (a layer called twice gets
      ``path#2``: ``rules.call_name``).
    """
    calls = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and isinstance(module, (nn.Dense, nn.Conv)):
            calls.append((module.scope.path, args[0].shape, out.shape))
        return out

    x = jax.ShapeDtypeStruct((1, *input_shape), np.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda x: apply_fn(params, x), x)

    layers, total, nonzero = {}, 0, 0
    for path, in_shape, out_shape in calls:
        kernel = params
        for key in path:
            kernel = kernel[key]
        kernel = np.asarray(kernel["kernel"])
        # Positions where the kernel is applied: everything but batch and features.
        positions = int(np.prod(out_shape[1:-1], dtype=np.int64))
        entry = {"dense": kernel.size * positions,
                 "nonzero": int(np.count_nonzero(kernel)) * positions,
                 "input_shape": tuple(in_shape[1:]), "output_shape": tuple(out_shape[1:])}
        base, call = "/".join(path), 0
        while rules_lib.call_name(base, call) in layers:
            call += 1
        layers[rules_lib.call_name(base, call)] = entry
        total, nonzero = total + entry["dense"], nonzero + entry["nonzero"]
    return {"total": {"dense": total, "nonzero": nonzero}, "layers": layers}
