"""A Flax module with its variables, as the pipeline and its stages see it."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from ucpjax import fold, train
from ucpjax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Model:
    """A module, its variables, and which params are held fixed.

    ``frozen`` names params held fixed (folded BatchNorm scales): stages see
    ``params`` without them, and ``apply_fn`` puts them back.
    """

    module: nn.Module
    variables: dict
    frozen: tuple[tuple[str, ...], ...] = ()

    @property
    def params(self):
        return _split(self.variables["params"], self.frozen)[0]

    @property
    def extra(self) -> dict:
        return {k: v for k, v in self.variables.items() if k != "params"}

    def apply_fn(self) -> train.ApplyFn:
        """``apply_fn(params, x) -> logits`` in inference mode (``train.inference_fn``)."""
        apply = train.inference_fn(self.module, self.extra)
        if not self.frozen:
            return apply
        fixed = _split(self.variables["params"], self.frozen)[1]
        return lambda params, x: apply(_merge(params, fixed), x)

    def folded(self, input_shape: tuple[int, ...]) -> Model:
        """BatchNorm folded into the layer before it (idempotent; recovers ``frozen``)."""
        variables, frozen = fold.fold_batchnorm(self.module, self.variables, input_shape)
        return Model(self.module, variables, frozen)

    def with_params(self, params) -> Model:
        fixed = _split(self.variables["params"], self.frozen)[1]
        return Model(self.module, {**self.variables, "params": _merge(params, fixed)},
                     self.frozen)


def _split(params: dict, paths) -> tuple[dict, dict]:
    """``(params without paths, {path: value})``."""
    if not paths:
        return params, {}
    free = jax.tree.map(lambda x: x, params)  # a copy of the dict structure
    fixed = {}
    for path in paths:
        node = free
        for name in path[:-1]:
            node = node[name]
        fixed[path] = node.pop(path[-1])
    return free, fixed


def _merge(params: dict, fixed: dict) -> dict:
    if not fixed:
        return params
    merged = jax.tree.map(lambda x: x, params)
    for path, value in fixed.items():
        node = merged
        for name in path[:-1]:
            node = node[name]
        node[path[-1]] = value
    return merged


def check_model(model: Model, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Refuses, in one line, a module that cannot classify these inputs.

    Traces ``module.apply(variables, x, train=False)`` on one example's shape
    (no compute): a module without a ``train`` argument, a BatchNorm model
    without ``batch_stats``, variables of another model, or logits of the
    wrong shape fail here rather than inside a stage.
    """
    if "params" not in model.variables:
        raise ConfigError(f"variables has {sorted(model.variables)}: expected the module's "
                          "variables dict with 'params' (and 'batch_stats' with BatchNorm)")
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    try:
        out = jax.eval_shape(model.apply_fn(), model.params, x)
    except Exception as err:  # anything the user's module raises
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ConfigError(f"module.apply(variables, x, train=False) fails on inputs of shape "
                          f"{x.shape} ({type(err).__name__}: {first}); pass the module and "
                          "its trained variables ('params', and 'batch_stats' with "
                          "BatchNorm), with __call__(x, train)") from None
    if getattr(out, "ndim", 0) != 2 or out.shape[-1] < num_classes:
        raise ConfigError(f"module output has shape {getattr(out, 'shape', type(out))}: "
                          f"expected logits (batch, classes) with at least {num_classes} "
                          "classes")
