"""A Flax module with its variables, as the pipeline and its stages see it."""

from __future__ import annotations

import dataclasses
import inspect
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Literal

from ucpjax import batchnorm, fold, jaxprs, train
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
            # A module whose only param is fixed (a BatchNorm without offset) may have
            # lost its emptied dict on the way (checkpoints keep no empty subtrees).
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return merged


def check_model(model: Model, input_shape: tuple[int, ...], num_classes: int,
                sample=None) -> None:
    """Refuses, in one line, a module that cannot classify these inputs.

    Traces ``module.apply(variables, x, train=False)`` on one example's shape
    (no compute): a BatchNorm model without ``batch_stats``, variables of
    another model, or logits of the wrong shape fail here rather than inside a
    stage. With ``sample`` (a few
    inputs) it also refuses a module that returns probabilities: the losses
    apply a softmax themselves, so training on a softmax's output would crawl
    without any error.
    """
    if "params" not in model.variables:
        raise ConfigError(f"variables has {sorted(model.variables)}: expected the module's "
                          "variables dict with 'params' (and 'batch_stats' with BatchNorm)")
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    try:
        out = jax.eval_shape(model.apply_fn(), model.params, x)
    except Exception as err:  # anything the user's module raises
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        first = re.sub(r"\s*\(https?://\S*\)?", "", first)[:200]  # flax's links to its docs
        fix = (_shape_hint(input_shape) or "pass the module and its trained variables "
               "('params', and 'batch_stats' with BatchNorm)")
        raise ConfigError(f"module.apply(variables, x, train=False) fails on inputs of shape "
                          f"{x.shape} ({type(err).__name__}: {first}); {fix}") from None
    if isinstance(out, (tuple, list, dict)):
        raise ConfigError(f"module returns a {type(out).__name__} of {len(out)} outputs: "
                          "ucpjax needs the logits alone, (batch, classes); return them "
                          "alone (e.g. a wrapper module whose __call__ returns out[0])")
    if getattr(out, "ndim", 0) != 2 or out.shape[-1] < num_classes:
        hint = _shape_hint(input_shape)
        raise ConfigError(f"module output has shape {getattr(out, 'shape', type(out))}: "
                          f"expected logits (batch, classes) with at least {num_classes} "
                          f"classes{'; ' + hint if hint else ''}")
    if sample is not None:
        out = np.asarray(model.apply_fn()(model.params, sample))
        if np.all(out >= 0) and np.allclose(out.sum(-1), 1, atol=1e-3):
            raise ConfigError("module output looks like probabilities (non-negative rows "
                              "summing to 1): return the logits, without the softmax; the "
                              "losses and distillation apply it themselves")


# Names users give the argument that switches Dropout/BatchNorm to training, and
# whether it means "training" (True) or its negation (False, as Dropout's own).
TRAIN_SWITCHES = {"train": True, "training": True, "is_training": True,
                  "deterministic": False}


def with_train_argument(module: nn.Module) -> tuple[nn.Module, str | None]:
    """The module called as ``apply(variables, x, train=...)``, as every stage calls it.

    A module whose ``__call__`` names its switch ``training``, ``is_training`` or
    ``deterministic`` (inverted), or has none (a plain MLP), becomes a subclass of
    its own class whose ``__call__(x, train)`` forwards to it: same variables and
    layer names, so its trained variables apply unchanged.

    Returns:
      ``(module, switch)``: the module to use, and the argument ``train`` goes to
      (None when there is none) if it was adapted, else ``(module, None)`` as is.
    """
    arguments = _call_arguments(module)
    if arguments is None or "train" in arguments:
        return module, None
    required = [name for name in _required_arguments(module)[1:]  # those after x
                if name not in TRAIN_SWITCHES]
    if required:
        raise ConfigError(f"module.__call__({', '.join(arguments)}) needs {', '.join(required)}: "
                          "ucpjax calls module.apply(variables, x, train=...); give them "
                          "defaults or wrap the module so it takes (x, train)")
    switch = next((name for name in TRAIN_SWITCHES if name in arguments), None)
    base = type(module)

    def __call__(self, x, train: bool = False):
        if switch is None:
            return base.__call__(self, x)
        return base.__call__(self, x, **{switch: train if TRAIN_SWITCHES[switch] else not train})

    adapted = type(base.__name__, (base,), {"__call__": __call__, "__module__": base.__module__,
                                            "__qualname__": base.__qualname__})
    fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
              if f.init and f.name not in ("parent", "name")}
    return adapted(**fields), switch


def _required_arguments(module: nn.Module) -> list[str]:
    parameters = inspect.signature(type(module).__call__).parameters.values()
    return [p.name for p in parameters
            if p.default is inspect.Parameter.empty
            and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)][1:]


def _shape_hint(input_shape: tuple[int, ...]) -> str:
    """Advice for inputs of a rank a conv net may not expect (they go in as given)."""
    if len(input_shape) == 2:
        return ("for images without a channel axis pass x[..., None] (N, H, W, 1): "
                "inputs go to the module as given")
    if len(input_shape) == 1:
        return "for flattened images pass them as (N, H, W, C): inputs go to the module as given"
    return ""


def _call_arguments(module: nn.Module) -> list[str] | None:
    """The names ``module.__call__`` takes after ``self`` (None when it takes ``**kwargs``
    or cannot be inspected, so no false refusal)."""
    try:
        parameters = inspect.signature(type(module).__call__).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return [p.name for p in parameters][1:]


def check_quantizable(model: Model, input_shape: tuple[int, ...]) -> list[str]:
    """Refuses, in one line, a model with an int8 tensor that QAT cannot see.

    The int8 .tflite rounds the input of a spatial mean and both inputs of a
    residual add to int8, but QAT only fake-quantizes the inputs of the modules
    it knows, so with a bare ``jnp.mean(x, axis=(1, 2))`` or ``x + y`` of two
    activations the exported model would compute what no QAT step trained.
    Traced without compute; ``GlobalAveragePool`` and ``Add`` calls are exempt.

    Returns:
      The other operations on activations QAT does not model (a sigmoid, GELU's
      ``tanh``, LayerNorm's ``rsqrt``, a BatchNorm with no Conv/Dense right
      before it to fold into; empty for ReLU nets), sorted: whether TFLite's
      int8 rounding inside them matters is for ``export.preflight`` to measure.
    """
    batchnorms = []

    def exempt(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, GlobalAveragePool):
            x = args[0][:, :1, :1, :]  # same shape, no reduction to find
            return x if context.module.keepdims else x[:, 0, 0, :]
        if context.method_name == "__call__" and isinstance(context.module, Add):
            return args[0]  # same shape, no add to find
        if context.method_name == "__call__" and isinstance(context.module, nn.BatchNorm):
            batchnorms.append(context.module.path)
        return next_fun(*args, **kwargs)

    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    with nn.intercept_methods(exempt):
        closed = jax.make_jaxpr(model.apply_fn())(model.params, x)
    jaxpr = closed.jaxpr
    narrow = _narrow_floats(jaxpr)
    if narrow:
        raise ConfigError(f"the model computes in {', '.join(sorted(narrow))} (a layer built "
                          "with dtype=jnp.bfloat16 or a cast): QAT and the int8 export follow "
                          "float32 arithmetic; build its layers with the default float32 "
                          "dtype for compression")
    sums, adds, unmodeled = _hidden_int8_ops(jaxpr, {jaxpr.invars[-1]: frozenset({"input"})})
    if batchnorms and "batch_stats" in model.variables:
        folded = {bn for _, bn, _ in fold.find_batchnorm_pairs(model.module, model.variables,
                                                                input_shape)}
        unmodeled |= {f"{'/'.join(path)} (a BatchNorm with no Conv/Dense right before it)"
                      for path in batchnorms if path not in folded}
    if sums:
        raise ConfigError("the model averages over its spatial axes with a bare mean or a "
                          "whole-map pool (jnp.mean(x, axis=(1, 2)), nn.avg_pool(x, "
                          "x.shape[1:3])), whose int8 input QAT cannot see: use "
                          "ucpjax.pooling.GlobalAveragePool() instead (keepdims=True for a gate)")
    if adds:
        raise ConfigError(f"the model adds two activations with a bare + ({adds} residual "
                          "add(s), e.g. nn.relu(x + y)), whose int8 inputs QAT cannot see: "
                          "use nn.relu(ucpjax.residual.Add()(x, y)) instead")
    return sorted(unmodeled)


def _narrow_floats(jaxpr) -> set[str]:
    """The float dtypes narrower than float32 that ``jaxpr`` (or a sub-jaxpr) casts to.

    The converter cannot lower such casts into an int8 model (it fails with pages
    of MLIR after the whole pipeline), and QAT's ranges would be another model's.
    """
    found = set()
    for eqn in jaxpr.eqns:
        cast = eqn.primitive.name == "convert_element_type"
        dtype = eqn.params["new_dtype"] if cast else None
        if cast and jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
            found.add(jnp.dtype(dtype).name)
        for sub in jaxprs.sub_jaxprs(eqn):
            found |= _narrow_floats(sub)
    return found


# Primitives whose output is a new activation (a layer's output) rather than a
# pointwise function of their input.
_LAYER_PRIMITIVES = frozenset({"dot_general", "conv_general_dilated"})
# Primitives on activations whose int8 result QAT reproduces (ReLU, ReLU6, pooling,
# layout, a layer's bias or folded scale); any other one on an activation is
# TFLite int8 arithmetic QAT does not model (``export.preflight`` measures it).
_MODELED_PRIMITIVES = _LAYER_PRIMITIVES | frozenset({
    "add", "sub", "mul", "div", "max", "min", "clamp", "reduce_max", "reduce_sum",
    "reduce_window_max", "reduce_window_sum", "reshape", "transpose", "broadcast_in_dim",
    "squeeze", "expand_dims", "concatenate", "slice", "dynamic_slice", "pad", "rev",
    "convert_element_type", "copy", "stop_gradient", "select_n",
    "pjit", "jit", "closed_call", "custom_jvp_call", "custom_vjp_call",
    "custom_vjp_call_jaxpr", "remat", "checkpoint"})
# Of those, the ones that are unmodeled when both operands are activations (x * x).
_BINARY_PRIMITIVES = frozenset({"sub", "mul", "div", "max", "min"})


def _hidden_int8_ops(jaxpr, sources: dict) -> tuple[int, int, set[str]]:
    """``(spatial sums or whole-map average pools, residual adds, unmodeled)`` in
    ``jaxpr`` and its sub-jaxprs;
    ``unmodeled`` names the other operations on activations that QAT does not model.

    ``sources`` maps each variable that depends on the input image to the layer
    outputs it is a pointwise function of (updated in place). A residual add
    takes two input-dependent tensors of different sources; bias and BatchNorm
    adds take one operand from the params, and an add inside one tensor's
    activation function (GELU's ``x + 0.044715 * x**3``) has one source, so
    neither counts.
    """
    sums = adds = 0
    unmodeled = set()
    for eqn in jaxpr.eqns:
        known = [None if isinstance(v, Literal) else sources.get(v) for v in eqn.invars]
        hot = [source for source in known if source is not None]
        name = eqn.primitive.name
        if hot and (name not in _MODELED_PRIMITIVES
                    or name in _BINARY_PRIMITIVES and len(hot) == 2):
            unmodeled.add(name if len(hot) == 1 else f"{name} of two activations")
        if name == "reduce_sum":
            operand = eqn.invars[0].aval
            sums += operand.ndim == 4 and bool({1, 2} & set(eqn.params["axes"]))
        if name == "reduce_window_sum" and hot:
            # An average pool whose window covers the whole map is a spatial mean too:
            # TFLite's AVERAGE_POOL_2D rounds its input and keeps that scale.
            operand = eqn.invars[0].aval
            sums += operand.ndim == 4 and (
                tuple(eqn.params["window_dimensions"][1:3]) == operand.shape[1:3])
        if name == "add" and len(hot) == 2 and hot[0] != hot[1]:
            adds += 1
        for sub in jaxprs.sub_jaxprs(eqn):
            # A jit's jaxpr takes the call's operands in order; where the counts
            # differ, nothing inside counts as input-dependent (never a false refusal).
            inner = dict(zip(sub.invars, known)) if len(sub.invars) == len(known) else {}
            inner = {v: source for v, source in inner.items() if source is not None}
            s, a, u = _hidden_int8_ops(sub, inner)
            sums, adds, unmodeled = sums + s, adds + a, unmodeled | u
            if len(sub.outvars) == len(eqn.outvars):
                sources.update({out: inner[v] for out, v in zip(eqn.outvars, sub.outvars)
                                if not isinstance(v, Literal) and v in inner})
        if hot and not any(v in sources for v in eqn.outvars):
            mixed = (frozenset({id(eqn)}) if name in _LAYER_PRIMITIVES
                     else frozenset().union(*hot))
            sources.update(dict.fromkeys(eqn.outvars, mixed))
    return sums, adds, unmodeled
