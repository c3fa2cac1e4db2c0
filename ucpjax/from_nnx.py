"""A Flax NNX model as the linen module every stage works on.

The stages see a model through linen: params trees keyed by layer paths, and
``nn.intercept_methods`` on ``nn.Dense``/``nn.Conv``/``nn.BatchNorm`` calls (QAT's
fake-quant, the BatchNorm fold, the layer census). ``lift`` turns an NNX model
into a linen module that runs the model's own ``__call__`` with each of its
layers (Linear, Conv, BatchNorm, Dropout, LayerNorm, GroupNorm) answered by the
linen layer of the same settings, named by its attribute path
(``blocks.0.conv/kernel``), and the variables those layers read. Whatever the
model computes between its layers (activations, pools, reshapes, adds) runs as
written. A parameter outside those layers (``nnx.Param`` used by hand, an
``nnx.Embed``) is refused: no stage would see it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
from flax import nnx

from ucpjax.config import ConfigError


def _dense(layer: nnx.Linear, name: str) -> nn.Module:
    return nn.Dense(layer.out_features, use_bias=layer.use_bias, dtype=layer.dtype, name=name)


def _conv(layer: nnx.Conv, name: str) -> nn.Module:
    return nn.Conv(layer.out_features, tuple(layer.kernel_size), strides=layer.strides,
                   padding=layer.padding, input_dilation=layer.input_dilation,
                   kernel_dilation=layer.kernel_dilation,
                   feature_group_count=layer.feature_group_count, use_bias=layer.use_bias,
                   mask=layer.mask, dtype=layer.dtype, name=name)


def _batch_norm(layer: nnx.BatchNorm, name: str) -> nn.Module:
    return nn.BatchNorm(axis=layer.axis, momentum=layer.momentum, epsilon=layer.epsilon,
                        use_bias=layer.use_bias, use_scale=layer.use_scale, dtype=layer.dtype,
                        name=name)


def _layer_norm(layer: nnx.LayerNorm, name: str) -> nn.Module:
    return nn.LayerNorm(epsilon=layer.epsilon, use_bias=layer.use_bias,
                        use_scale=layer.use_scale, reduction_axes=layer.reduction_axes,
                        feature_axes=layer.feature_axes, dtype=layer.dtype, name=name)


def _group_norm(layer: nnx.GroupNorm, name: str) -> nn.Module:
    return nn.GroupNorm(num_groups=layer.num_groups, group_size=layer.group_size,
                        epsilon=layer.epsilon, use_bias=layer.use_bias,
                        use_scale=layer.use_scale, reduction_axes=layer.reduction_axes,
                        dtype=layer.dtype, name=name)


# NNX layer -> (the linen layer of its settings, its variables: collection -> names).
LAYERS: dict[type, tuple[Callable[[Any, str], nn.Module], dict[str, tuple[str, ...]]]] = {
    nnx.Linear: (_dense, {"params": ("kernel", "bias")}),
    nnx.Conv: (_conv, {"params": ("kernel", "bias")}),
    nnx.BatchNorm: (_batch_norm, {"params": ("scale", "bias"), "batch_stats": ("mean", "var")}),
    nnx.LayerNorm: (_layer_norm, {"params": ("scale", "bias")}),
    nnx.GroupNorm: (_group_norm, {"params": ("scale", "bias")}),
}


def _name(path: tuple) -> str:
    return ".".join(str(part) for part in path)


def _layers(model: nnx.Module) -> dict[int, tuple[str, nnx.Module]]:
    """The model's translatable layers and Dropouts by id: ``(path name, layer)``."""
    return {id(node): (_name(path), node) for path, node in nnx.iter_graph(model)
            if type(node) in LAYERS or isinstance(node, nnx.Dropout)}


def _check_covered(model: nnx.Module, layers: dict) -> None:
    covered = {name for name, layer in layers.values()}
    for path, value in nnx.iter_graph(model):
        if isinstance(value, (nnx.Param, nnx.BatchStat)) and _name(path[:-1]) not in covered:
            raise ConfigError(
                f"nnx model: parameter {_name(path)!r} is outside the layers ucpjax "
                f"compresses ({', '.join(t.__name__ for t in LAYERS)}): build it from "
                "those nnx layers, or write the model in flax.linen")


def _variables(layers: dict) -> dict:
    variables: dict = {}
    for name, layer in layers.values():
        if isinstance(layer, nnx.Dropout):
            continue
        for collection, names in LAYERS[type(layer)][1].items():
            values = {n: getattr(layer, n)[...] for n in names
                      if getattr(layer, n, None) is not None}
            if values:
                variables.setdefault(collection, {})[name] = values
    return variables


class Lifted(nn.Module):
    """The NNX ``model``'s own ``__call__``, its layers answered by linen layers."""

    model: Any

    @nn.compact
    def __call__(self, x, train: bool = False):
        layers, made = _layers(self.model), {}

        def call(layer, inputs, *args, **kwargs):
            name = layers[id(layer)][0]
            if isinstance(layer, nnx.Dropout):
                deterministic = kwargs.get("deterministic")
                if deterministic is None:
                    deterministic = not train
                if id(layer) not in made:
                    made[id(layer)] = nn.Dropout(layer.rate, layer.broadcast_dims, name=name)
                return made[id(layer)](inputs, deterministic=deterministic)
            if id(layer) not in made:
                made[id(layer)] = LAYERS[type(layer)][0](layer, name)
            if isinstance(layer, nnx.BatchNorm):
                explicit = args[0] if args else kwargs.get("use_running_average")
                return made[id(layer)](inputs, use_running_average=(
                    not train if explicit is None else explicit))
            return made[id(layer)](inputs)

        with _answered_by(call):
            return self.model(x)


@contextlib.contextmanager
def _answered_by(call: Callable):
    """Every translatable NNX layer class's ``__call__`` replaced by ``call`` meanwhile."""
    classes = [*LAYERS, nnx.Dropout]
    saved = {cls: cls.__dict__["__call__"] for cls in classes}
    try:
        for cls in classes:
            cls.__call__ = call
        yield
    finally:
        for cls, method in saved.items():
            cls.__call__ = method


def lift(model: nnx.Module) -> tuple[nn.Module, dict]:
    """``(linen module, variables)`` computing what the NNX ``model`` computes.

    The linen module is called as ``apply(variables, x, train=...)``: ``train``
    switches its BatchNorm to batch statistics and its Dropout on, whatever
    mode (``model.train()``/``model.eval()``) the NNX model was left in.
    """
    layers = _layers(model)
    _check_covered(model, layers)
    return Lifted(model), _variables(layers)
