"""A Flax module with its variables, as the pipeline and its stages see it."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.extend.core import Literal

from ucpjax import batchnorm, fold, train
from ucpjax.config import ConfigError
from ucpjax.pooling import GlobalAveragePool
from ucpjax.residual import Add


@dataclasses.dataclass(frozen=True)
class Model:
    """A module, its variables, and whether its BatchNorm is folded yet.

    Until ``folded_bn`` (set by ``folded``), a model with ``batch_stats`` keeps
    its BatchNorm live: ``apply_fn`` is a ``batchnorm.LiveBatchNorm``, which
    stages train in training mode. Once folded, ``frozen`` names the params
    held fixed (folded BatchNorm scales): stages see ``params`` without them,
    and ``apply_fn`` puts them back.
    """

    module: nn.Module
    variables: dict
    frozen: tuple[tuple[str, ...], ...] = ()
    folded_bn: bool = False

    @property
    def params(self):
        return _split(self.variables["params"], self.frozen)[0]

    @property
    def extra(self) -> dict:
        return {k: v for k, v in self.variables.items() if k != "params"}

    @property
    def live_bn(self) -> bool:
        return "batch_stats" in self.variables and not self.folded_bn

    def apply_fn(self) -> train.ApplyFn:
        """``apply_fn(params, x) -> logits`` in inference mode: a ``LiveBatchNorm``
        while BatchNorm is live, else ``train.inference_fn``."""
        if self.live_bn:
            return batchnorm.LiveBatchNorm(self.module, self.extra)
        apply = train.inference_fn(self.module, self.extra)
        if not self.frozen:
            return apply
        fixed = _split(self.variables["params"], self.frozen)[1]
        return lambda params, x: apply(_merge(params, fixed), x)

    def folded(self, input_shape: tuple[int, ...]) -> Model:
        """BatchNorm folded into the layer before it (idempotent; recovers ``frozen``)."""
        variables, frozen = fold.fold_batchnorm(self.module, self.variables, input_shape)
        return Model(self.module, variables, frozen, folded_bn=True)

    def with_params(self, params) -> Model:
        fixed = _split(self.variables["params"], self.frozen)[1]
        return dataclasses.replace(
            self, variables={**self.variables, "params": _merge(params, fixed)})

    def settled(self, x) -> Model:
        """Running BatchNorm statistics re-estimated on ``x`` for the current params
        (``batchnorm.population_statistics``); a model without live BatchNorm as is."""
        if not self.live_bn:
            return self
        stats = batchnorm.population_statistics(self.module, self.variables, x)
        return dataclasses.replace(self, variables={**self.variables, "batch_stats": stats})


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


def check_quantizable(model: Model, input_shape: tuple[int, ...]) -> None:
    """Refuses, in one line, a model with an int8 tensor that QAT cannot see.

    The int8 .tflite rounds the input of a spatial mean and both inputs of a
    residual add to int8, but QAT only fake-quantizes the inputs of the modules
    it knows, so with a bare ``jnp.mean(x, axis=(1, 2))`` or ``x + y`` of two
    activations the exported model would compute what no QAT step trained.
    Traced without compute; ``GlobalAveragePool`` and ``Add`` calls are exempt.
    """
    def exempt(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, GlobalAveragePool):
            return args[0][:, 0, 0, :]  # same shape, no reduction to find
        if context.method_name == "__call__" and isinstance(context.module, Add):
            return args[0]  # same shape, no add to find
        return next_fun(*args, **kwargs)

    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    with nn.intercept_methods(exempt):
        closed = jax.make_jaxpr(model.apply_fn())(model.params, x)
    jaxpr = closed.jaxpr
    sums, adds = _hidden_int8_ops(jaxpr, {jaxpr.invars[-1]})
    if sums:
        raise ConfigError("the model averages over its spatial axes with a bare mean (e.g. "
                          "jnp.mean(x, axis=(1, 2))), whose int8 input QAT cannot see: use "
                          "ucpjax.pooling.GlobalAveragePool() instead")
    if adds:
        raise ConfigError(f"the model adds two activations with a bare + ({adds} residual "
                          "add(s), e.g. nn.relu(x + y)), whose int8 inputs QAT cannot see: "
                          "use nn.relu(ucpjax.residual.Add()(x, y)) instead")


def _hidden_int8_ops(jaxpr, tainted: set) -> tuple[int, int]:
    """``(spatial sums, adds of two input-dependent tensors)`` in ``jaxpr`` and its
    sub-jaxprs; ``tainted`` holds the variables that depend on the input image
    (bias and BatchNorm adds take one operand from the params, so do not count)."""
    sums = adds = 0
    for eqn in jaxpr.eqns:
        hot = [not isinstance(v, Literal) and v in tainted for v in eqn.invars]
        if eqn.primitive.name == "reduce_sum":
            operand = eqn.invars[0].aval
            sums += operand.ndim == 4 and bool({1, 2} & set(eqn.params["axes"]))
        if eqn.primitive.name == "add" and len(hot) == 2 and all(hot):
            adds += 1
        for sub in train.sub_jaxprs(eqn):
            # A jit's jaxpr takes the call's operands in order; where the counts
            # differ, nothing inside counts as input-dependent (never a false refusal).
            same = len(sub.invars) == len(hot)
            s, a = _hidden_int8_ops(sub, {v for v, h in zip(sub.invars, hot) if h and same})
            sums, adds = sums + s, adds + a
        if any(hot):
            tainted.update(eqn.outvars)
    return sums, adds
