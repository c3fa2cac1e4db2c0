"""Folding BatchNorm into the Conv or Dense layer that feeds it.

Compression stages and the int8 export need one weight tensor per layer: with
BatchNorm left in place, QAT would quantize the unscaled kernel while TFLite
folds the scale in afterwards, and clusters, zeros and the int8 grid would no
longer be what ships. So before compressing, each BatchNorm whose input is
the direct output of a Conv/Dense has its inference-mode affine map
``(x - mean) * scale / sqrt(var + eps) + bias`` multiplied into that layer's
kernel, and is itself reset to the identity (plus a per-channel bias when the
layer has none). The model's code is unchanged, so a user's own module works.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_WEIGHTED = (nn.Dense, nn.Conv)


def find_batchnorm_pairs(model: nn.Module, variables, input_shape) -> list[tuple]:
    """``[(layer_path, batchnorm_path, epsilon)]`` for each BatchNorm fed by a layer."""
    return batchnorm_pairs(lambda v, x: model.apply(v, x, train=False), variables, input_shape)


def batchnorm_pairs(apply_fn, variables, input_shape) -> list[tuple]:
    """``find_batchnorm_pairs`` of ``apply_fn(variables, x)`` (traced only): of a model
    whose BatchNorms are folded, too (each then the identity plus its bias)."""
    last_output, producer, pairs = [None], [None], []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__":
            return out
        module = context.module
        if isinstance(module, nn.BatchNorm) and args and args[0] is last_output[0]:
            pairs.append((producer[0], module.path, module.epsilon))
        if isinstance(module, _WEIGHTED):
            last_output[0], producer[0] = out, module.path
        return out

    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    with nn.intercept_methods(interceptor):
        # A new function each call: eval_shape caches traces by function, and a
        # cached one would not run the interceptor.
        jax.eval_shape(lambda v, x: apply_fn(v, x), variables, x)
    return pairs


def fold_batchnorm(model: nn.Module, variables, input_shape) -> tuple[dict, tuple]:
    """Returns ``(variables, frozen)`` with every foldable BatchNorm folded.

    Args:
      model: a flax.linen module called as ``model.apply(variables, x, train=False)``.
      variables: its variables, with ``params`` and ``batch_stats``.
      input_shape: one example's shape (no batch axis).

    Returns:
      New variables computing the same inference function, and the paths of
      the folded BatchNorms' ``scale`` params: they must stay 1.0 from now on
      (trained, they would rescale the kernel behind every later stage's back).
      Folding is idempotent. BatchNorms not fed by a layer stay as they are.
    """
    if "batch_stats" not in variables:
        return variables, ()
    pairs = find_batchnorm_pairs(model, variables, input_shape)
    params = jax.tree.map(np.asarray, variables["params"])
    stats = jax.tree.map(np.asarray, variables["batch_stats"])
    for layer_path, bn_path, eps in pairs:
        _fold_one(node(params, layer_path), node(params, bn_path, missing={}),
                  node(stats, bn_path), eps)
    as_jnp = lambda tree: jax.tree.map(jnp.asarray, tree)
    frozen = tuple((*bn, "scale") for _, bn, _ in pairs
                   if "scale" in node(params, bn, missing={}))
    return {**variables, "params": as_jnp(params), "batch_stats": as_jnp(stats)}, frozen


def node(tree: dict, path: tuple, missing=None) -> dict:
    """``tree[path[0]][path[1]]...``; ``missing`` where a BatchNorm without scale and
    offset has no params at all (when given)."""
    for name in path:
        if missing is not None and name not in tree:
            return missing
        tree = tree[name]
    return tree


def _fold_one(layer: dict, bn: dict, bn_stats: dict, eps: float) -> None:
    """Rewrites ``layer`` and ``bn`` in place (numpy copies owned by the caller)."""
    f32 = np.float32
    mean, var = bn_stats["mean"].astype(f32), bn_stats["var"].astype(f32)
    gamma = bn.get("scale", np.ones_like(mean)).astype(f32)
    beta = bn.get("bias", np.zeros_like(mean)).astype(f32)
    multiplier = gamma / np.sqrt(var + f32(eps))
    layer["kernel"] = (layer["kernel"] * multiplier).astype(f32)
    shift = beta - mean * multiplier
    if "bias" in layer:
        layer["bias"] = (layer["bias"] * multiplier + shift).astype(f32)
        shift = np.zeros_like(shift)
    # Identity BatchNorm: (x - 0) * 1 / sqrt(var + eps) * 1 + shift with var + eps
    # rounding to exactly 1.0 in float32, so nothing rescales the folded kernel.
    # Without an offset to hold the shift (use_bias=False), the mean holds it:
    # x - (-shift) = x + shift.
    bn_stats["mean"] = np.zeros_like(mean) if "bias" in bn else -shift
    bn_stats["var"] = np.full_like(var, _unit_variance(eps))
    if "scale" in bn:
        bn["scale"] = np.ones_like(gamma)
    if "bias" in bn:
        bn["bias"] = shift


def _unit_variance(eps: float) -> np.float32:
    var = np.float32(1.0) - np.float32(eps)
    while np.float32(var + np.float32(eps)) != np.float32(1.0):
        var = np.nextafter(var, np.float32(2.0))
    return var

