"""Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune").

The sparsity of each pruned leaf follows a cubic ramp from ``initial`` to
``target`` between two steps of the pruning phase; every ``frequency`` steps
(and at both ends of the ramp) the lowest-scoring weights are masked: the
smallest in magnitude, or in magnitude times their input's RMS
(``ucpjax.saliency``).
The masks live in the state of an optax transform that sits last in the
chain, so pruned weights are exactly zero after every update and the training
loop needs no hook. A fine-tuning phase with the final zeros fixed follows.

Weight-shared leaves (an earlier clustering stage) are trained as centroids by
``constraints.fit_preserving``, so they cannot be masked weight by weight:
they are pruned once, before training, to their target, and keep at most
their number of distinct non-zero values.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ucpjax import batchnorm, channels, constraints, distill, saliency, train
from ucpjax import rules as rules_lib
from ucpjax.config import ConfigError, check
from ucpjax.rules import DEFAULT_RULES, Rules
from ucpjax.train import TrainConfig

SCOPES = ("erk", "sensitivity", "layer", "global")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneConfig:
    """Gradual magnitude pruning, then fine-tuning with the zeros fixed.

    Which leaves are pruned, and per-leaf targets, come from the recipe's
    ``LayerRule``s (``ucpjax.rules``).

    Attributes:
      target_sparsity: final fraction of zeros in each pruned leaf (``layer``)
        or over all pruned leaves together (``erk``, ``global``).
      initial_sparsity: sparsity at the start of the ramp.
      scope: how the target is shared among the leaves whose rule sets no
        sparsity of its own. ``erk`` (the default) gives each its own target
        by the Erdos-Renyi-Kernel rule (``erk_sparsities``): small layers, such
        as a first conv, a depthwise conv or a last dense, stay denser;
        ``sensitivity`` gives each the share that costs least by its measured
        one-shot pruning curve (``sensitivity_sparsities``; ``ucpjax.recipe``
        measures the curves on the validation split before the stage);
        ``layer`` prunes each to ``target_sparsity``; ``global`` ranks them all
        by one magnitude threshold (weight-shared leaves are pruned one-shot
        to their own target in every scope).
      frequency: steps between mask updates during the ramp.
      begin, end: the ramp's first and last step, as fractions of the pruning
        phase (``train``); the steps after ``end`` train with the final masks.
      power: exponent of the ramp (3 in the paper).
      min_per_channel: non-zeros every output channel keeps (capped at its fan-in),
        however high the target, so that no channel is cut off: a depthwise 3x3
        channel has only 9 weights, and uniform 75% sparsity leaves it about 2.
        The floor wins over the target, so the reported sparsity can fall
        short of it. 0: no floor.
      channel_sparsity: fraction of whole channels removed (structured pruning,
        ``ucpjax.channels``): in each family of tied channel groups, the lowest
        ranked ``floor(channel_sparsity * size)`` go, on the same ramp as the
        weights, and the export shrinks the model (smaller tensors, fewer
        multiplications, a faster .tflite). 0: none. Runs with the magnitude
        pruning (whose zeros then include the removed channels').
      teacher_alpha: weight of a teacher's softened logits in the loss of both
        phases (Hinton et al.'s loss, as the distill stage's, at
        ``teacher_temperature``), so the teacher guides the net while its
        weights go, not only after; the teacher is the distill stage's (the
        dense model, or ``distill.teacher_from`` when the recipe has a distill
        stage). None or 0: the labels alone.
      teacher_temperature: softmax temperature of that soft term; None: the
        distill stage's default (4).
      criterion: what ranks the weights (``ucpjax.saliency``): ``magnitude``
        (``|w|``) or ``activation`` (``|w|`` times the RMS of the input it
        multiplies, measured once at the start of the stage on the first
        ``saliency.SAMPLES`` training examples). None: ``magnitude``.
      (These three default to None, so a run folder made before they existed
      resumes.)
      train: budget of the pruning phase.
      fine_tune: budget of the fine-tuning phase, or None to skip it.
    """

    target_sparsity: float = 0.9
    initial_sparsity: float = 0.0
    scope: str = "erk"
    frequency: int = 50
    begin: float = 0.0
    end: float = 0.7
    power: float = 3.0
    min_per_channel: int = 2
    channel_sparsity: float = 0.0
    teacher_alpha: float | None = None
    teacher_temperature: float | None = None
    criterion: str | None = None
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(epochs=10))
    fine_tune: TrainConfig | None = dataclasses.field(
        default_factory=lambda: TrainConfig(epochs=2, learning_rate=1e-4))

    def __post_init__(self):
        check(0 <= self.target_sparsity < 1, "target_sparsity", self.target_sparsity,
              "must be in [0, 1)")
        check(0 <= self.initial_sparsity <= self.target_sparsity, "initial_sparsity",
              self.initial_sparsity, "must be in [0, target_sparsity]")
        check(self.scope in SCOPES, "scope", self.scope, f"one of {SCOPES}")
        check(isinstance(self.frequency, int) and self.frequency >= 1, "frequency",
              self.frequency, "must be an integer >= 1")
        check(0 <= self.begin <= 1, "begin", self.begin, "must be in [0, 1]")
        check(0 <= self.end <= 1 and self.begin < self.end, "end", self.end,
              "must be in [0, 1] and > begin")
        check(self.power > 0, "power", self.power, "must be > 0")
        check(isinstance(self.min_per_channel, int) and self.min_per_channel >= 0,
              "min_per_channel", self.min_per_channel, "must be an integer >= 0")
        check(0 <= self.channel_sparsity < 1, "channel_sparsity", self.channel_sparsity,
              "must be in [0, 1)")
        check(self.teacher_alpha is None or 0 <= self.teacher_alpha <= 1, "teacher_alpha",
              self.teacher_alpha, "must be in [0, 1], or None")
        check(self.teacher_temperature is None or self.teacher_temperature > 0,
              "teacher_temperature", self.teacher_temperature, "must be > 0, or None")
        check(self.criterion is None or self.criterion in saliency.CRITERIA, "criterion",
              self.criterion, f"one of {saliency.CRITERIA}, or None")


def _is_none(x) -> bool:
    return x is None


def polynomial_sparsity(step, *, initial: float, target: float, begin_step: int,
                        end_step: int, power: float = 3) -> jax.Array:
    """Sparsity at ``step``: ``s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))**power``.

    Args:
      step: current step (int or traced scalar).
      initial, target: sparsity ``s_i`` at ``begin_step`` and ``s_f`` from ``end_step`` on.
      begin_step, end_step: the ramp's ends ``t0 <= t1``; clamped outside.
      power: exponent of the ramp.

    Returns:
      A float32 scalar.
    """
    step = jnp.asarray(step, jnp.float32)
    progress = jnp.clip((step - begin_step) / max(end_step - begin_step, 1), 0.0, 1.0)
    ramp = target + (initial - target) * (1.0 - progress) ** power
    # At and after end_step exactly the target (also when begin_step == end_step).
    return jnp.where(step >= end_step, jnp.float32(target), ramp).astype(jnp.float32)


class MagnitudePruningState(NamedTuple):
    count: jax.Array  # int32: updates done so far
    masks: Any  # per leaf: bool mask (pruned leaves) or a scalar True (others)


def _keep_largest(scores: jax.Array, num_pruned: jax.Array) -> jax.Array:
    """True for all but the ``num_pruned`` lowest scores (ties broken by position).

    The same as pruning the first ``num_pruned`` of a stable argsort, without the
    sort: the threshold is found by bisection over the scores' bit patterns (32
    counting passes), which on CPU is ~10x faster for a 266K-weight model and runs
    at every mask update.
    """
    flat = scores.ravel().astype(jnp.float32)
    keys = _order_keys(jnp.where(flat == 0, 0.0, flat))  # -0.0 ties with 0.0, as in a sort
    num_pruned = jnp.clip(num_pruned, 0, flat.size)

    def bisect(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        enough = jnp.sum(keys <= mid, dtype=jnp.int32) >= num_pruned
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)
    info = jnp.iinfo(jnp.int32)
    # The num_pruned-th smallest key: the least v with count(keys <= v) >= num_pruned.
    threshold = jax.lax.fori_loop(0, 32, bisect, (jnp.int32(info.min), jnp.int32(info.max)))[0]
    ties = keys == threshold
    quota = num_pruned - jnp.sum(keys < threshold, dtype=jnp.int32)  # ties pruned, first first
    pruned = (keys < threshold) | (ties & (jnp.cumsum(ties, dtype=jnp.int32) <= quota))
    return (~pruned | (num_pruned == 0)).reshape(scores.shape)


def _order_keys(x: jax.Array) -> jax.Array:
    """int32 keys in the order of the float32 values (IEEE bits, negatives' flipped)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _score(weights: jax.Array, scale) -> jax.Array:
    return jnp.abs(weights) if scale is None else jnp.abs(weights) * scale


def _count(sparsity: jax.Array, size: int) -> jax.Array:
    return jnp.round(sparsity * size).astype(jnp.int32)


def _protected(scores: jax.Array, min_per_channel: int) -> jax.Array:
    """True for the ``min_per_channel`` highest live scores of each output channel.

    The output channel is the last axis (Dense ``(in, out)``, Conv ``(h, w, in,
    out)``, depthwise ``(h, w, 1, channels)``); live scores are >= 0.
    """
    if not min_per_channel or scores.ndim < 2:
        return jnp.zeros(scores.shape, bool)
    columns = scores.reshape(-1, scores.shape[-1])
    order = jnp.argsort(-columns, axis=0, stable=True)
    ranks = jnp.argsort(order, axis=0)  # each entry's rank within its channel
    keep = (ranks < min(min_per_channel, columns.shape[0])) & (columns >= 0)
    return keep.reshape(scores.shape)


def _keep_with_floor(scores: jax.Array, num_pruned, protected: jax.Array) -> jax.Array:
    """``_keep_largest`` that never prunes a protected entry (it prunes fewer instead).

    When no protected entry is among the ``num_pruned`` lowest, the result is
    exactly ``_keep_largest(scores, num_pruned)``.
    """
    num_pruned = jnp.minimum(num_pruned, scores.size - jnp.sum(protected, dtype=jnp.int32))
    return _keep_largest(jnp.where(protected, jnp.inf, scores), num_pruned)


def magnitude_pruning(
    targets, *, initial_sparsity: float = 0.0, begin_step: int, end_step: int,
    frequency: int = 1, power: float = 3.0, global_leaves=None, min_per_channel: int = 0,
    scales=None,
) -> optax.GradientTransformation:
    """Elementwise magnitude masks in the optimizer state; put it last in the chain.

    At steps ``begin_step, begin_step + frequency, ...`` and at ``end_step``
    the masks are recomputed from the magnitudes of the weights after this
    update (``params + updates``), each times its ``scales`` entry if given:
    in each leaf (or over the ``global_leaves`` together) the lowest-scoring
    weights are masked so that the count of masked entries is
    ``round(sparsity(step) * size)``. Masked entries stay masked
    and weights that are zero at ``init`` start masked. The update of a masked
    entry is ``-params``, so the weight is exactly 0.0 after every step.
    Mask updates run under ``lax.cond``: no recompilation per step.

    Args:
      targets: pytree like params: the final sparsity (float) of each pruned
        leaf, None for leaves left alone.
      initial_sparsity: sparsity at ``begin_step`` (capped at each target).
      begin_step, end_step: the ramp (see ``polynomial_sparsity``).
      frequency: steps between mask updates.
      power: exponent of the ramp.
      global_leaves: optional pytree of bools like params: these leaves are
        ranked together by one threshold; they must share one target.
      min_per_channel: non-zeros each output channel keeps (see ``PruneConfig``).
      scales: optional pytree like params: per leaf, None or non-negative
        factors broadcastable to it (``saliency.input_scales``).

    Returns:
      An ``optax.GradientTransformation`` whose update needs ``params``.
    """
    target_list, _ = jax.tree.flatten(targets, is_leaf=_is_none)
    if global_leaves is None:
        group = [False] * len(target_list)
    else:
        group = [bool(g) for g in jax.tree.leaves(global_leaves)]
    if len(group) != len(target_list):
        raise ValueError("global_leaves must have the structure of targets")
    group = [g and t is not None for g, t in zip(group, target_list)]
    scale_list = ([None] * len(target_list) if scales is None
                  else jax.tree.flatten(scales, is_leaf=_is_none)[0])
    if len(scale_list) != len(target_list):
        raise ValueError("scales must have the structure of targets")
    global_targets = {t for t, g in zip(target_list, group) if g}
    if len(global_targets) > 1:
        raise ValueError(f"global_leaves must share one target, got {sorted(global_targets)}")

    def sparsity(target, step):
        return polynomial_sparsity(step, initial=min(initial_sparsity, target), target=target,
                                   begin_step=begin_step, end_step=end_step, power=power)

    def init_fn(params):
        leaves = jax.tree.leaves(params)
        masks = [(p != 0) if t is not None else jnp.array(True)
                 for p, t in zip(leaves, target_list)]
        return MagnitudePruningState(jnp.zeros((), jnp.int32),
                                     jax.tree.unflatten(jax.tree.structure(params), masks))

    def recompute(masks, p_list, u_list, step):
        new = list(masks)
        candidates = [p + u for p, u in zip(p_list, u_list)]
        # Already-masked entries score -1, below every magnitude, so they stay masked.
        scores = [None if t is None else jnp.where(m, _score(c, f), -1.0)
                  for m, c, t, f in zip(masks, candidates, target_list, scale_list)]
        floor = [None if s is None else _protected(s, min_per_channel) for s in scores]
        for i, target in enumerate(target_list):
            if target is not None and not group[i]:
                k = _count(sparsity(target, step), scores[i].size)
                new[i] = masks[i] & _keep_with_floor(scores[i], k, floor[i])
        members = [i for i, g in enumerate(group) if g]
        if members:
            flat = jnp.concatenate([scores[i].ravel() for i in members])
            protected = jnp.concatenate([floor[i].ravel() for i in members])
            k = _count(sparsity(target_list[members[0]], step), flat.size)
            keep, start = _keep_with_floor(flat, k, protected), 0
            for i in members:
                size = scores[i].size
                new[i] = masks[i] & keep[start:start + size].reshape(scores[i].shape)
                start += size
        return new

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("magnitude_pruning needs params: call update(g, state, params)")
        treedef = jax.tree.structure(params)
        u_list, p_list = jax.tree.leaves(updates), jax.tree.leaves(params)
        masks = jax.tree.leaves(state.masks)
        step = state.count
        due = ((step >= begin_step) & (step <= end_step)
               & (((step - begin_step) % frequency == 0) | (step == end_step)))
        # The weights after this update are formed only in the branch that ranks them:
        # outside it they would cost a pass over every weight at every step.
        masks = jax.lax.cond(due, recompute, lambda m, p, u, s: list(m), masks, p_list,
                             u_list, step)
        u_list = [jnp.where(m, u, -p) for m, u, p in zip(masks, u_list, p_list)]
        return (jax.tree.unflatten(treedef, u_list),
                MagnitudePruningState(step + 1, jax.tree.unflatten(treedef, masks)))

    return optax.GradientTransformation(init_fn, update_fn)


def leaf_targets(params, config: PruneConfig, rules: Rules = DEFAULT_RULES,
                 curves: dict[str, dict[float, float]] | None = None) -> Any:
    """Per leaf: its final sparsity, None if not pruned.

    A leaf's rule's sparsity if it sets one; else ``target_sparsity``, or in
    ``erk`` scope its share of it (``erk_sparsities``), or in ``sensitivity``
    scope its share by ``curves`` (``{leaf name: {sparsity: drop}}``, from
    ``ucpjax.sensitivity.measure``; ``sensitivity_sparsities``).
    """
    targets = rules_lib.setting(params, rules, "sparsity", config.target_sparsity)
    targets = jax.tree.map(lambda t: float(t) if t else None, targets, is_leaf=_is_none)
    if config.scope not in ("erk", "sensitivity"):
        return targets
    check(config.scope == "erk" or curves is not None, "scope", config.scope,
          "needs the measured pruning curves: run it through ucpjax.compress, or pass "
          "curves= (ucpjax.sensitivity.measure)")
    flat, treedef = jax.tree.flatten(targets, is_leaf=_is_none)
    own = jax.tree.leaves(_own_target(params, rules))
    leaves = jax.tree_util.tree_leaves_with_path(params)
    shared = [i for i, (t, o) in enumerate(zip(flat, own, strict=True)) if t is not None and not o]
    if config.scope == "erk":
        shares = erk_sparsities([np.shape(leaves[i][1]) for i in shared], config.target_sparsity)
    else:
        shares = sensitivity_sparsities(
            [curves[rules_lib.path_name(leaves[i][0])] for i in shared],
            [np.size(leaves[i][1]) for i in shared], config.target_sparsity)
    for i, sparsity in zip(shared, shares, strict=True):
        flat[i] = sparsity
    return jax.tree.unflatten(treedef, flat)


def erk_sparsities(shapes: list[tuple[int, ...]], target: float) -> list[float]:
    """Per-layer sparsities by the Erdos-Renyi-Kernel rule (Evci et al. 2020, "RigL").

    A layer's density is proportional to ``sum(shape) / prod(shape)``, scaled so
    that the layers together keep ``(1 - target)`` of their weights: a 3x3
    depthwise kernel (3, 3, 1, 32) gets ~4x the density of a 1x1 conv
    (1, 1, 32, 64). A layer whose density would pass 1 stays dense and the
    others share the rest.
    """
    sizes = np.array([np.prod(s) for s in shapes], np.float64)
    ratio = np.array([sum(s) / np.prod(s) for s in shapes], np.float64)
    dense = np.zeros(len(shapes), bool)
    while True:
        budget = (1 - target) * sizes.sum() - sizes[dense].sum()
        scale = budget / max((ratio * sizes)[~dense].sum(), 1e-30)
        density = np.where(dense, 1.0, scale * ratio)
        if not np.any(density[~dense] > 1):
            return [float(1 - d) for d in np.clip(density, 0, 1)]
        dense |= density > 1


def sensitivity_sparsities(curves: list[dict[float, float]], sizes: list[int],
                           target: float, step: float = 0.01) -> list[float]:
    """Per-layer sparsities that reach ``target`` over all layers at the least
    predicted accuracy cost.

    Each layer's cost is its curve (accuracy drop in points when that layer alone
    is pruned to each sparsity, ``ucpjax.sensitivity.measure``), read as its running
    maximum (so noise cannot make more zeros look free), linearly interpolated from
    0 at sparsity 0, and not extended past its last point. Greedy: the layer whose
    next ``step`` costs the least drop per weight zeroed goes first, until the
    layers hold ``target`` of their weights as zeros (the last step is cut to land
    on it). A large robust layer (a 64x64 dense) thus takes many zeros and a small
    steep one (a depthwise conv) few; the sum of one-shot drops over-states what
    fine-tuning leaves, but it ranks the layers.
    """
    grids = [np.array([0.0, *sorted(c)]) for c in curves]
    costs = [np.maximum.accumulate(np.array([0.0, *(c[k] for k in sorted(c))]))
             for c in curves]
    counts = np.asarray(sizes, np.float64)
    ceiling = np.array([g[-1] for g in grids])
    sparsity = np.zeros(len(curves))
    needed = target * counts.sum()  # zeros, over all layers
    while (sparsity * counts).sum() < needed - 0.5:
        after = np.minimum(sparsity + step, ceiling)
        movable = after > sparsity
        if not movable.any():
            break  # every layer at the end of its curve: the target is out of reach
        rise = np.array([np.interp(a, g, c) - np.interp(s, g, c)
                         for a, s, g, c in zip(after, sparsity, grids, costs, strict=True)])
        per_weight = np.where(movable, rise / np.maximum((after - sparsity) * counts, 1e-12),
                              np.inf)
        i = int(np.argmin(per_weight))
        missing = (needed - (sparsity * counts).sum()) / counts[i]
        sparsity[i] = min(after[i], sparsity[i] + missing)
    return [float(x) for x in sparsity]


def _own_target(params, rules: Rules) -> Any:
    """Per leaf: whether its rule sets a sparsity of its own (not ranked globally)."""
    own = rules_lib.setting(params, rules, "sparsity", None)
    return jax.tree.map(lambda t: t is not None, own, is_leaf=_is_none)


# Jitted whole (one compile per shape): op by op, its bisection and floor compile
# dozens of small programs, and ``ucpjax.sensitivity`` calls it on every layer.
@functools.partial(jax.jit, static_argnames=("min_per_channel",))
def prune_once(weights, sparsity: float, min_per_channel: int = 0, scale=None) -> jax.Array:
    """Zeros the lowest-scoring weights so that ``round(sparsity * size)`` are zero.

    A weight's score is its magnitude, times its ``scale`` entry if given
    (``saliency.input_scales``). Existing zeros count as pruned; each output
    channel keeps ``min_per_channel`` non-zeros. Only zeros are added, so a
    weight-shared tensor keeps at most its distinct non-zero values
    (weight-shared leaves are pruned this way, and ``ucpjax.sensitivity``
    prunes one layer alone this way).
    """
    w = jnp.asarray(weights)
    scores = jnp.where(w != 0, _score(w, scale), -1.0)
    keep = _keep_with_floor(scores, _count(jnp.float32(sparsity), w.size),
                            _protected(scores, min_per_channel))
    return jnp.where(keep, w, 0.0)



def sparsity_report(params, rules: Rules = DEFAULT_RULES, prefix: str = "prune") -> dict:
    """Per-leaf and overall sparsity and non-zero count over the selected leaves."""
    report, zeros, total = {}, 0, 0
    for path, w in jax.tree_util.tree_leaves_with_path(params):
        name = rules_lib.path_name(path)
        if rules_lib.rule_for(name, rules) is None:
            continue
        w = np.asarray(w)
        n_zero = int(np.sum(w == 0))
        report[f"{prefix}/{name}/sparsity"] = n_zero / w.size
        zeros, total = zeros + n_zero, total + w.size
    report[f"{prefix}/sparsity"] = zeros / max(total, 1)
    report[f"{prefix}/nonzero"] = total - zeros
    report[f"{prefix}/size"] = total
    return report


def prune(params, config: PruneConfig, *, apply_fn, data, seed: int,
          rules: Rules = DEFAULT_RULES, curves=None, teacher=None) -> tuple[Any, dict]:
    """Gradual magnitude pruning, then fine-tuning with the final zeros fixed.

    Args:
      params: Flax params; zeros already present count as pruned and stay zero.
      config: a ``PruneConfig``.
      apply_fn: ``apply_fn(params, x) -> logits`` in inference mode (a
        ``batchnorm.LiveBatchNorm`` trains its BatchNorm too).
      data: a ``ucpjax.data.Dataset``.
      seed: training seed.
      rules: which leaves are pruned, and per-leaf targets.
      curves: per-leaf pruning curves, for ``sensitivity`` scope (``leaf_targets``).
      teacher: ``(apply_fn, params)`` of the teacher; needed when
        ``config.teacher_alpha`` > 0, unused otherwise.

    Returns:
      ``(params, report)``: report has ``prune/sparsity`` (over the selected
      leaves), ``prune/nonzero``, ``prune/<Layer>/<name>/sparsity``,
      ``prune/val_accuracy`` and ``prune/loss`` (last epoch's training loss).
    """
    targets = leaf_targets(params, config, rules, curves)
    scales = saliency.scales(config.criterion, apply_fn, params, data.x_train)
    books = constraints.codebooks(params, rules)
    shared = jax.tree.map(lambda b: b is not None, books,
                          is_leaf=lambda b: b is None or isinstance(b, constraints.Codebook))
    # Weight-shared leaves cannot be masked weight by weight: pruned once, up front.
    params = jax.tree.map(
        lambda w, t, s, f: prune_once(w, t, config.min_per_channel, f) if s and t else w,
        params, targets, shared, scales, is_leaf=_is_none)
    mask_targets = jax.tree.map(lambda t, s: None if s else t, targets, shared, is_leaf=_is_none)
    global_leaves = None
    if config.scope == "global":
        global_leaves = jax.tree.map(lambda t, o: t is not None and not o,
                                     mask_targets, _own_target(params, rules), is_leaf=_is_none)

    steps = train.total_steps(config.train, len(data.x_train))
    last = max(steps - 1, 0)
    ramp = {"begin_step": round(config.begin * last), "end_step": round(config.end * last)}
    pruning = magnitude_pruning(
        mask_targets, initial_sparsity=config.initial_sparsity, **ramp,
        frequency=config.frequency, power=config.power, global_leaves=global_leaves,
        min_per_channel=config.min_per_channel, scales=scales)
    groups = None
    if config.channel_sparsity:
        if any(jax.tree.leaves(shared)):
            raise ConfigError("prune.channel_sparsity: channels cannot be removed from "
                              "weight-shared layers; run prune before cluster")
        groups = channels.find_groups(apply_fn, params, data.x_train.shape[1:])
        share = functools.partial(polynomial_sparsity, initial=0.0,
                                  target=config.channel_sparsity, power=config.power, **ramp)
        pruning = optax.chain(channels.channel_pruning(
            groups, share, frequency=config.frequency, **ramp), pruning)
    make_loss, extra = distill.teacher_loss(apply_fn, teacher, alpha=config.teacher_alpha,
                                            temperature=config.teacher_temperature,
                                            stage="prune")
    params, _, history = constraints.fit_preserving(
        params, make_loss, x=data.x_train, y=data.y_train, config=config.train, seed=seed,
        rules=rules, extra=extra, last_transform=pruning, desc="prune")
    if config.fine_tune is not None:
        params, _, history = constraints.fit_preserving(
            params, make_loss, x=data.x_train, y=data.y_train, config=config.fine_tune,
            seed=seed + 1, rules=rules, extra=extra, desc="prune fine-tune")
    report = sparsity_report(params, rules)
    if groups is not None:
        report["prune/channel_groups"] = groups.count
        report["prune/channel_groups_removed"] = int(
            channels.removed_groups({"params": params}, groups).sum())
    report["prune/val_accuracy"] = train.accuracy(
        batchnorm.settled(apply_fn, params, data.x_train), params, data.x_val, data.y_val)
    report["prune/loss"] = history[-1]["loss"]
    return params, report
