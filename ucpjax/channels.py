"""Structured pruning: whole channels removed, and the model physically shrunk.

Unstructured zeros do not make a .tflite faster (TFLite runs int8 weights
densely), so this removes whole output channels of Conv/Dense layers and
shrinks the model: the .tflite has smaller tensors and fewer multiplications.

**Channel groups.** Removing channel ``c`` of a conv also removes every slice
its output feeds: the BatchNorm entries ``c`` after it, a depthwise conv's
channel ``c`` and that conv's BatchNorm, the next layer's input rows (the
rows ``c, c + C, ...`` of a Dense after a flatten) and, through a residual
``Add``, channel ``c`` of every other layer feeding that add. ``find_groups``
finds these ties from the model itself, for any Flax model built of
Dense/Conv/BatchNorm layers: it runs the model on positive weights and inputs
(so every ReLU and max-pool passes signal), makes each Conv/Dense output a
stopped value plus a zero "delta", and back-propagates a one-hot cotangent
from every input feature of every layer: the deltas it reaches are the
channels that feed that feature directly. Channels and features linked this
way form a group (union-find); a group is removable when it holds at least
one layer output, does not reach the logits directly, and touches no layer
of another kind (LayerNorm, a grouped conv, a user's own parametrised layer).
Groups fed by the same layers form a family (e.g. all channels of one
residual stage).

**Gradual pruning** (``channel_pruning``, an optax transform like
``prune.magnitude_pruning``): each family loses the fraction
``polynomial_sparsity(step)`` of its groups, ranked by a stated criterion:
the |scale| of the BatchNorm right after the layer ("network slimming", Liu et
al. 2017: with a BatchNorm behind it, a filter's own norm is normalised
away), else the filter's L2 norm; each relative to its layer's mean, so that
layers are comparable. Every entry of a removed group is zero after every
update. Later stages keep it so without help: with a channel's output and
the rows that read it all zero, every gradient into the group is exactly
zero (a fixed point of SGD, Adam and weight decay), and BatchNorm folding
maps zeros to zeros.

**Shrinking** (``slimmed``): before export, the groups whose output side is
exactly zero are cut out of the variables and the module is wrapped in
``Slimmed``, which runs each Dense/Conv at the width of its stored kernel.
The slimmed model must compute the same logits as the masked one, or the run
fails.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

# Cotangent rows back-propagated per jitted call while finding groups.
_PROBE_CHUNK = 64


@dataclasses.dataclass(frozen=True)
class Slice:
    """Entries of one leaf along ``axis``: index ``i`` belongs to group ``group[i]``
    (-1: to none)."""

    collection: str  # "params" or "batch_stats"
    path: tuple[str, ...]  # the leaf's path in that collection
    axis: int
    group: np.ndarray
    output: bool  # part of what the channel outputs (vs. a later layer's input rows)


@dataclasses.dataclass(frozen=True)
class Score:
    """A layer's channel scores: |scale| of ``batchnorm_scale`` (the BatchNorm right
    after it) if it has one, else the L2 norm of each filter of ``kernel``;
    ``group[c]`` is channel ``c``'s group (-1: not removable)."""

    kernel: tuple[str, ...]
    batchnorm_scale: tuple[str, ...] | None
    group: np.ndarray


@dataclasses.dataclass(frozen=True)
class ChannelGroups:
    """The removable channel groups of a model (see the module docstring)."""

    slices: tuple[Slice, ...]
    scores: tuple[Score, ...]
    family: np.ndarray  # family id of each group

    @property
    def count(self) -> int:
        return len(self.family)

    def families(self) -> list[np.ndarray]:
        return [np.flatnonzero(self.family == f) for f in np.unique(self.family)]


# --- finding the groups ------------------------------------------------------------

@dataclasses.dataclass
class _Layer:
    path: tuple[str, ...]
    kind: str  # "weights", "depthwise", "batchnorm" or "other"
    output_key: str | None = None  # a Conv/Dense output: its delta's key
    paired_batchnorm: tuple[str, ...] | None = None


def _leaf_params(module: nn.Module) -> bool:
    params = module.variables.get("params", {})
    return any(not isinstance(v, Mapping) for v in params.values())


def _kind(module: nn.Module, x) -> str:
    if isinstance(module, nn.BatchNorm):
        return "batchnorm" if module.axis in (-1, x.ndim - 1) else "other"
    if isinstance(module, (nn.Dense, nn.Conv)):
        groups = getattr(module, "feature_group_count", 1)
        if groups == 1:
            return "weights"
        if groups == x.shape[-1] == module.features:
            return "depthwise"
    return "other"


class _Probe:
    """An interceptor: records each parametrised layer's input and turns each
    Conv/Dense output into ``stop_gradient(output) + delta``."""

    def __init__(self, deltas: dict | None):
        self.deltas, self.layers, self.inputs = deltas, [], []
        self.outputs: dict[str, Any] = {}
        self._last = (None, None)  # the latest Conv/Dense output and its layer

    def __call__(self, next_fun, args, kwargs, context):
        module = context.module
        # A BatchNorm without scale and offset has no params, only statistics to cut.
        tracked = _leaf_params(module) or isinstance(module, nn.BatchNorm)
        if context.method_name != "__call__" or not args or not tracked:
            return next_fun(*args, **kwargs)
        x = args[0]
        layer = _Layer(module.path, _kind(module, x))
        self.layers.append(layer)
        self.inputs.append(x)
        if layer.kind == "batchnorm":
            if x is self._last[0]:
                self._last[1].paired_batchnorm = module.path
            return x  # per-channel affine: the identity carries the same ties
        out = next_fun(*args, **kwargs)
        if layer.kind != "weights":
            return out
        layer.output_key = f"{len(self.outputs)}"
        self.outputs[layer.output_key] = out
        if self.deltas is not None:
            out = jax.lax.stop_gradient(out) + self.deltas[layer.output_key]
        self._last = (out, layer)
        return out


def _positive(w):
    """Weights under which every activation is positive and moderate."""
    w = jnp.asarray(w)
    if w.ndim >= 2:
        return jnp.full(w.shape, 1.0 / max(np.prod(w.shape[:-1]), 1), w.dtype)
    return jnp.full(w.shape, 0.01, w.dtype)


def _reach(apply_fn, params, input_shape) -> tuple[list[_Layer], dict, np.ndarray]:
    """``(layers, reach, to_logits)``: ``reach[i][key]`` is a bool (input width,
    channels) matrix of which channels of output ``key`` feed layer ``i``'s input
    features directly; ``to_logits[key]`` whether a channel feeds the logits."""
    params = jax.tree.map(_positive, params)
    x = jnp.full((1, *input_shape), 0.5, jnp.float32)

    def forward(deltas):
        probe = _Probe(deltas)
        with nn.intercept_methods(probe):
            logits = apply_fn(params, x)
        return logits, probe.inputs

    shapes = _Probe(None)
    with nn.intercept_methods(shapes):
        jax.eval_shape(lambda p: apply_fn(p, x), params)
    deltas = {k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.outputs.items()}
    (logits, inputs), pullback = jax.vjp(forward, deltas)

    @jax.jit
    def reached(target, features):
        """Reach of one-hot rows ``features`` of tensor ``target`` (-1: the logits)."""
        def onehot(t, index):
            hit = (jnp.arange(t.shape[-1]) == features[:, None]) & (target == index)
            return jnp.broadcast_to(hit.reshape(len(features), *[1] * (t.ndim - 1), -1),
                                    (len(features), *t.shape)).astype(t.dtype)
        cotangents = (onehot(logits, -1), [onehot(t, i) for i, t in enumerate(inputs)])
        grads = jax.vmap(pullback)(cotangents)[0]
        return jax.tree.map(lambda d: jnp.any(d != 0, axis=tuple(range(1, d.ndim - 1))), grads)

    def rows(target: int, width: int) -> dict:
        """For each output key: its (width, channels) reach into tensor ``target``."""
        parts = [jax.device_get(reached(target, jnp.arange(start, start + _PROBE_CHUNK) % width))
                 for start in range(0, width, _PROBE_CHUNK)]
        return {k: np.concatenate([p[k] for p in parts])[:width] for k in deltas}

    reach = [rows(i, t.shape[-1]) for i, t in enumerate(inputs)]
    to_logits = {k: m.any(axis=0) for k, m in rows(-1, logits.shape[-1]).items()}
    return shapes.layers, reach, to_logits


class _UnionFind:
    def __init__(self):
        self.parent: dict = {}

    def find(self, a):
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a, b):
        self.parent[self.find(a)] = self.find(b)


def find_groups(apply_fn, params, input_shape: tuple[int, ...]) -> ChannelGroups:
    """The removable channel groups of ``apply_fn(params, x)`` (see the module docstring).

    Args:
      apply_fn: ``apply_fn(params, x) -> logits`` of a Flax model (inference mode).
      params: its params (only their shapes matter).
      input_shape: one example's shape.
    """
    layers, reach, to_logits = _reach(apply_fn, params, input_shape)
    producers = {layer.output_key: layer for layer in layers if layer.output_key}
    sets = _UnionFind()
    for i, layer in enumerate(layers):
        for key, matrix in reach[i].items():
            for feature, channel in zip(*np.nonzero(matrix)):
                sets.union(("in", i, int(feature)), ("out", key, int(channel)))
    _tie_repeated_calls(layers, reach, sets)
    members: dict = {}
    for node in list(sets.parent):
        members.setdefault(sets.find(node), []).append(node)
    group_of, family_of, families = {}, {}, []
    for nodes in members.values():
        outs = [n for n in nodes if n[0] == "out"]
        removable = outs and not any(to_logits[k][c] for _, k, c in outs) and not any(
            layers[n[1]].kind == "other" for n in nodes if n[0] == "in")
        if not removable:
            continue
        family = frozenset(producers[k].path for _, k, _ in outs)
        group_of.update(dict.fromkeys(nodes, len(families)))
        families.append(family_of.setdefault(family, len(family_of)))
    family = np.array(families, np.int32)
    return ChannelGroups(_slices(layers, producers, group_of), _scores(producers, group_of),
                         family)


def _tie_repeated_calls(layers: list[_Layer], reach: list[dict], sets) -> None:
    """A layer called more than once (shared weights) has one kernel: its calls'
    output channels are the same columns and their input features the same rows,
    so each is one group with its twins of the first call."""
    first: dict = {}
    for i, layer in enumerate(layers):
        j = first.setdefault(layer.path, i)
        if j == i or not reach[i]:
            continue
        inputs = len(next(iter(reach[i].values())))
        for feature in range(inputs):
            sets.union(("in", j, feature), ("in", i, feature))
        key, twin = layer.output_key, layers[j].output_key
        if key and twin:
            for channel in range(reach[i][key].shape[1]):
                sets.union(("out", twin, channel), ("out", key, channel))


def _assignment(nodes, size: int) -> np.ndarray:
    group = np.full(size, -1, np.int32)
    for index, gid in nodes:
        group[index] = gid
    return group


def _slices(layers, producers, group_of) -> tuple[Slice, ...]:
    """Every leaf slice of every group, merged over repeated calls of a layer."""
    by_leaf: dict = {}

    def add(collection, path, axis, output, index, gid):
        by_leaf.setdefault((collection, path, axis, output), []).append((index, gid))

    for (side, *where), gid in group_of.items():
        if side == "out":
            key, channel = where
            path = producers[key].path
            add("params", (*path, "kernel"), -1, True, channel, gid)
            add("params", (*path, "bias"), 0, True, channel, gid)
        elif side == "in":
            i, feature = where
            layer = layers[i]
            if layer.kind == "weights":
                add("params", (*layer.path, "kernel"), -2, False, feature, gid)
            elif layer.kind == "depthwise":
                add("params", (*layer.path, "kernel"), -1, True, feature, gid)
                add("params", (*layer.path, "bias"), 0, True, feature, gid)
            elif layer.kind == "batchnorm":
                add("params", (*layer.path, "bias"), 0, True, feature, gid)
                add("batch_stats", (*layer.path, "mean"), 0, True, feature, gid)
                add("params", (*layer.path, "scale"), 0, False, feature, gid)
                add("batch_stats", (*layer.path, "var"), 0, False, feature, gid)
    return tuple(Slice(c, p, a, _assignment(nodes, 1 + max(i for i, _ in nodes)), o)
                 for (c, p, a, o), nodes in sorted(by_leaf.items(), key=str))


def _scores(producers, group_of) -> tuple[Score, ...]:
    scores = []
    for key, layer in producers.items():
        nodes = [(c, gid) for (side, *where), gid in group_of.items()
                 if side == "out" and where[0] == key for c in [where[1]]]
        if not nodes:
            continue
        scale = (*layer.paired_batchnorm, "scale") if layer.paired_batchnorm else None
        scores.append(Score((*layer.path, "kernel"), scale,
                            _assignment(nodes, 1 + max(c for c, _ in nodes))))
    return tuple(scores)


def leaf_at(tree, path):
    for name in path:
        if not isinstance(tree, Mapping) or name not in tree:
            return None
        tree = tree[name]
    return tree


def _along(group: np.ndarray, size: int) -> np.ndarray:
    return np.pad(group, (0, size - len(group)), constant_values=-1)


def _expand(values, axis: int, ndim: int):
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


# --- gradual pruning -----------------------------------------------------------------

def group_scores(params, groups: ChannelGroups) -> jax.Array:
    """Each group's score: the mean over its channels of their layer-relative scores."""
    total = jnp.zeros(groups.count + 1, jnp.float32)  # the last bin takes -1 (no group)
    count = jnp.zeros(groups.count + 1, jnp.float32)
    for score in groups.scores:
        scale = None if score.batchnorm_scale is None else leaf_at(params, score.batchnorm_scale)
        if scale is not None:
            raw = jnp.abs(scale)
        else:
            kernel = leaf_at(params, score.kernel)
            raw = jnp.sqrt(jnp.sum(jnp.square(kernel.reshape(-1, kernel.shape[-1])), axis=0))
        relative = raw / (jnp.mean(raw) + 1e-12)
        index = jnp.asarray(_along(score.group, raw.shape[0]))
        total = total.at[index].add(relative)
        count = count.at[index].add(1.0)
    return (total / jnp.maximum(count, 1.0))[:-1]


def group_masks(params, groups: ChannelGroups, alive: jax.Array, collection: str = "params"):
    """Per leaf of ``params`` (a tree of ``collection``): a mask zeroing every entry of
    a dead group (True: kept)."""
    alive = jnp.concatenate([alive, jnp.ones(1, bool)])  # index -1: no group
    masks = jax.tree.map(lambda w: jnp.ones(jnp.shape(w), bool), params)
    flat = dict(jax.tree_util.tree_flatten_with_path(masks)[0])
    keyed = {tuple(k.key for k in path): path for path in flat}
    for sl in groups.slices:
        if sl.collection != collection or sl.path not in keyed:
            continue
        mask = flat[keyed[sl.path]]
        group = _along(sl.group, mask.shape[sl.axis])
        flat[keyed[sl.path]] = mask & _expand(alive[group], sl.axis, mask.ndim)
    return jax.tree_util.tree_unflatten(jax.tree.structure(masks), list(flat.values()))


class ChannelPruningState(NamedTuple):
    count: jax.Array  # int32: updates done so far
    alive: jax.Array  # bool per group


def drop_lowest(scores, alive, groups: ChannelGroups, fraction) -> jax.Array:
    """``alive`` with the ``floor(fraction * size)`` lowest-scoring groups of each
    family dead (dead ones count first; never a family's last; ties by position)."""
    scores = jnp.where(alive, scores, -1.0)
    alive = jnp.asarray(alive)
    for members in groups.families():
        n = len(members)
        dropped = jnp.minimum(jnp.floor(fraction * n).astype(jnp.int32), n - 1)
        rank = jnp.argsort(jnp.argsort(scores[members], stable=True), stable=True)
        alive = alive.at[members].set(alive[members] & (rank >= dropped))
    return alive


def channel_pruning(groups: ChannelGroups, sparsity, *, begin_step: int, end_step: int,
                    frequency: int = 1) -> optax.GradientTransformation:
    """Whole channel groups masked in the optimizer state; put it last in the chain
    (before ``prune.magnitude_pruning`` when both run).

    At ``begin_step``, every ``frequency`` steps after it and at ``end_step``,
    each family keeps the groups with the highest ``group_scores`` of
    ``params + updates`` and loses ``floor(sparsity(step) * size)`` of them
    (never its last one; ties go by position). A dead group stays dead; its
    entries' update is ``-params``, so they are exactly zero after every step.
    """
    def init_fn(params):
        del params
        return ChannelPruningState(jnp.zeros((), jnp.int32), jnp.ones(groups.count, bool))

    def recompute(alive, candidates, step):
        return drop_lowest(group_scores(candidates, groups), alive, groups, sparsity(step))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("channel_pruning needs params: call update(g, state, params)")
        step = state.count
        due = ((step >= begin_step) & (step <= end_step)
               & (((step - begin_step) % frequency == 0) | (step == end_step)))
        candidates = jax.tree.map(jnp.add, params, updates)
        alive = jax.lax.cond(due, recompute, lambda a, c, s: a, state.alive, candidates, step)
        masks = group_masks(params, groups, alive)
        updates = jax.tree.map(lambda m, u, p: jnp.where(m, u, -p), masks, updates, params)
        return updates, ChannelPruningState(step + 1, alive)

    return optax.GradientTransformation(init_fn, update_fn)


# --- shrinking ----------------------------------------------------------------------

def removed_groups(variables: dict, groups: ChannelGroups) -> np.ndarray:
    """Bool per group: every entry on its output side is exactly zero, so the
    channels output zeros and cutting them out changes nothing."""
    zero = np.ones(groups.count, bool)
    for sl in groups.slices:
        leaf = leaf_at(variables.get(sl.collection, {}), sl.path)
        if not sl.output or leaf is None:
            continue
        leaf = np.moveaxis(np.asarray(leaf), sl.axis, 0)
        group = _along(sl.group, leaf.shape[0])
        nonzero = np.any(leaf.reshape(leaf.shape[0], -1) != 0, axis=1)
        np.logical_and.at(zero, group[group >= 0], ~nonzero[group >= 0])
    return zero


def shrink(variables: dict, groups: ChannelGroups, removed: np.ndarray) -> dict:
    """``variables`` with every slice of the ``removed`` groups cut out."""
    cuts: dict = {}
    for sl in groups.slices:
        leaf = leaf_at(variables.get(sl.collection, {}), sl.path)
        if leaf is None:
            continue
        group = _along(sl.group, np.shape(leaf)[sl.axis])
        gone = np.flatnonzero((group >= 0) & removed[np.maximum(group, 0)])
        cuts.setdefault((sl.collection, sl.path), []).append((sl.axis, gone))

    def cut(collection, path, leaf):
        leaf = np.asarray(leaf)
        for axis, gone in cuts.get((collection, tuple(k.key for k in path)), []):
            leaf = np.delete(leaf, gone, axis=axis)
        return jnp.asarray(leaf)

    return {c: jax.tree_util.tree_map_with_path(lambda p, w, c=c: cut(c, p, w), tree)
            for c, tree in variables.items()}


def _stored_widths(next_fun, args, kwargs, context):
    """Runs a Dense/Conv at the width of its stored kernel (Flax checks a param's
    shape against the module's ``features``)."""
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.Conv)):
        return next_fun(*args, **kwargs)
    kernel = module.get_variable("params", "kernel")
    changes = {"features": kernel.shape[-1]}
    if isinstance(module, nn.Conv) and module.feature_group_count > 1:
        changes["feature_group_count"] = args[0].shape[-1] // kernel.shape[-2]
    saved = {name: getattr(module, name) for name in changes}
    for name, value in changes.items():
        object.__setattr__(module, name, value)  # a frozen dataclass: restored below
    try:
        return next_fun(*args, **kwargs)
    finally:
        for name, value in saved.items():
            object.__setattr__(module, name, value)


@dataclasses.dataclass(frozen=True)
class Slimmed:
    """A module whose Dense/Conv layers run at the widths of the variables passed
    to ``apply`` (those of ``shrink``)."""

    module: nn.Module

    def apply(self, variables, *args, **kwargs):
        with nn.intercept_methods(_stored_widths):
            return self.module.apply(variables, *args, **kwargs)
