"""Weight sharing by per-layer k-means (Deep Compression, Han et al. 2016, eq. 1).

Each selected leaf gets its own 1-D k-means over its non-zero weights; every
weight is replaced by its centroid, zeros stay exactly zero, and the centroids
are then fine-tuned with ``constraints.fit_preserving`` (each centroid moves by
the sum of its members' gradients).

Why the k-means looks unusual: in 1-D the clusters of Lloyd's algorithm are
contiguous runs of the *sorted* values, cut at the midpoints between
neighbouring centroids. So the values are sorted once, prefix sums of values
and squares are taken once, and every iteration is ``k`` binary searches plus
``O(k)`` arithmetic instead of an ``O(n k)`` pass. Prefix sums of ~10^5
float32 values lose digits, so they are kept as float-float pairs (hi + lo,
error-free additions); with them the centroids and the objective match a
float64 computation closely.

With ``criterion="activation"`` each weight's squared error counts by the mean
square of the input it multiplies (``ucpjax.saliency``): the k-means then
minimises the error of the layer's output, not of its weights, and a
centroid is its members' mean weighted so.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ucpjax import batchnorm, constraints, distill, saliency
from ucpjax import rules as rules_lib
from ucpjax import train as train_lib
from ucpjax.config import check
from ucpjax.rules import DEFAULT_RULES, Rules

INITS = ("linear", "density", "forgy", "kmeans++")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """Per-layer k-means weight sharing, then fine-tuning of the centroids.

    Which leaves are clustered, and per-leaf k, come from the recipe's
    ``LayerRule``s (``ucpjax.rules``).

    Attributes:
      num_clusters: non-zero centroids per leaf (zero is an extra, implicit slot).
      init: one of INITS; Deep Compression found linear best.
      iterations: Lloyd iterations.
      fine_tune: budget of the centroid fine-tuning, or None to skip it.
      teacher_alpha, teacher_temperature: as ``PruneConfig``'s, for the centroid
        fine-tuning: a teacher's softened logits in its loss (None: the labels
        alone).
      criterion: how the k-means weighs each weight's error: ``magnitude``
        (alike) or ``activation`` (by its input's mean square, measured as
        ``PruneConfig.criterion`` measures it). None: ``magnitude``.
    """

    num_clusters: int = 16
    init: str = "linear"
    iterations: int = 30
    fine_tune: train_lib.TrainConfig | None = dataclasses.field(
        default_factory=lambda: train_lib.TrainConfig(epochs=2, learning_rate=1e-4))
    teacher_alpha: float | None = None
    teacher_temperature: float | None = None
    criterion: str | None = None

    def __post_init__(self):
        k = self.num_clusters
        check(isinstance(k, int) and k >= 2, "num_clusters", k,
              "fewer than 2 clusters: must be >= 2")
        check(k <= rules_lib.MAX_CLUSTERS, "num_clusters", k,
              f"must be <= {rules_lib.MAX_CLUSTERS}")
        check(self.init in INITS, "init", self.init, f"must be one of {INITS}")
        check(self.iterations >= 1, "iterations", self.iterations, "must be >= 1")
        check(self.teacher_alpha is None or 0 <= self.teacher_alpha <= 1, "teacher_alpha",
              self.teacher_alpha, "must be in [0, 1], or None")
        check(self.teacher_temperature is None or self.teacher_temperature > 0,
              "teacher_temperature", self.teacher_temperature, "must be > 0, or None")
        check(self.criterion is None or self.criterion in saliency.CRITERIA, "criterion",
              self.criterion, f"one of {saliency.CRITERIA}, or None")


# ---------------------------------------------------------------------------
# float-float arithmetic (exact error terms; XLA CPU does not reassociate floats)

def _two_sum(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _dd_add(x, y):
    s, e = _two_sum(x[0], y[0])
    e = e + (x[1] + y[1])
    hi = s + e
    return hi, e - (hi - s)


def _split(a):
    t = 4097.0 * a  # 2^12 + 1: splits a float32 mantissa in halves (Dekker)
    hi = t - (t - a)
    return hi, a - hi


def _two_prod(a, b):
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _dd_cumsum(x):
    """Float-float prefix sums along the last axis of ``x`` (with a leading 0).

    Two scans of ~sqrt(n) steps over vectors: within rows of a square-ish grid,
    then over the row totals. (``jnp.cumsum`` and ``associative_scan`` compile
    several times slower on CPU and lose the low-order digits.)
    """
    n = x.shape[-1]
    cols = max(math.ceil(math.sqrt(n)), 1)
    rows = -(-n // cols)
    pad = [(0, 0)] * (x.ndim - 1) + [(0, rows * cols - n)]
    grid = jnp.moveaxis(jnp.pad(x, pad).reshape(*x.shape[:-1], rows, cols), -1, 0)

    def along_row(carry, column):
        carry = _dd_add(carry, (column, jnp.zeros_like(column)))
        return carry, carry

    zeros = jnp.zeros(grid.shape[1:], x.dtype)
    totals, (hi, lo) = jax.lax.scan(along_row, (zeros, zeros), grid)  # hi: (cols, ..., rows)

    def offsets(carry, total):
        return _dd_add(carry, total), carry

    scalar = jnp.zeros(x.shape[:-1], x.dtype)
    row_major = jax.tree.map(lambda t: jnp.moveaxis(t, -1, 0), totals)
    _, (off_hi, off_lo) = jax.lax.scan(offsets, (scalar, scalar), row_major)
    off = (jnp.moveaxis(off_hi, 0, -1)[None], jnp.moveaxis(off_lo, 0, -1)[None])
    hi, lo = _dd_add((hi, lo), off)
    # (cols, ..., rows) -> (..., rows * cols), trimmed to n, with a leading zero.
    flat = [jnp.moveaxis(t, 0, -1).reshape(*x.shape[:-1], rows * cols)[..., :n] for t in (hi, lo)]
    zero = jnp.zeros((*x.shape[:-1], 1), x.dtype)
    return tuple(jnp.concatenate([zero, t], axis=-1) for t in flat)


def _dd_range(prefix, start, stop):
    """Float-float ``sum(x[start:stop])`` from prefix sums (vectorised over ranges)."""
    hi, lo = prefix
    return _dd_add((hi[..., stop], lo[..., stop]), (-hi[..., start], -lo[..., start]))


# ---------------------------------------------------------------------------
# k-means

# Guards divisions by a cluster's weight; only weightless clusters come near it.
_TINY = float(np.finfo(np.float32).tiny)


def _sort_key(x):
    """An int32 whose order is the float order (XLA sorts ints much faster than floats)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _sorted_members(values, mask, importance=None):
    """``(sorted, count, sorted importance)``: clustered values ascending, then +inf
    for the rest; ``importance`` in the same order (0 past the members), or None."""
    values = jnp.where(mask, values.astype(jnp.float32), jnp.inf)
    count = jnp.sum(mask, dtype=jnp.int32)
    if importance is None:
        keys, importance = jax.lax.sort(_sort_key(values)), None
    else:
        importance = jnp.where(mask, importance.astype(jnp.float32), 0.0)
        keys, importance = jax.lax.sort((_sort_key(values), importance), num_keys=1)
    return jax.lax.bitcast_convert_type(_sort_key(keys), jnp.float32), count, importance


def _initial(sorted_values, count, values, mask, *, k: int, init: str, key):
    last = jnp.maximum(count - 1, 0).astype(jnp.float32)
    if init == "linear":
        return jnp.linspace(sorted_values[0], sorted_values[jnp.maximum(count - 1, 0)], k)
    if init == "density":
        # Evenly spaced on the CDF: the (i + 1/2)/k quantiles, interpolated linearly.
        pos = (jnp.arange(k, dtype=jnp.float32) + 0.5) / k * last
        below = jnp.floor(pos).astype(jnp.int32)
        above = jnp.minimum(below + 1, jnp.maximum(count - 1, 0))
        frac = pos - below
        return sorted_values[below] * (1 - frac) + sorted_values[above] * frac
    if init == "forgy":
        # k distinct members, uniformly: the top-k of Gumbel noise restricted to the mask.
        scores = jnp.where(mask, jax.random.gumbel(key, values.shape), -jnp.inf)
        return values[jax.lax.top_k(scores, k)[1]].astype(jnp.float32)
    return _kmeans_plus_plus(values.astype(jnp.float32), mask, k=k, key=key)


def _kmeans_plus_plus(values, mask, *, k: int, key):
    """D^2 sampling (Arthur & Vassilvitskii 2007): each next centroid ~ squared distance.

    A draw picks a row of a square-ish grid of the weights by its total, then an
    entry within the row: exact D^2 sampling with ~2 sqrt(n) random numbers
    instead of n per draw.
    """
    n = values.shape[0]
    cols = max(math.ceil(math.sqrt(n)), 1)
    rows = -(-n // cols)
    grid = jnp.pad(values, (0, rows * cols - n)).reshape(rows, cols)
    inside = jnp.pad(mask, (0, rows * cols - n)).reshape(rows, cols)

    # All noise drawn at once: one RNG op compiles much faster than one per draw.
    noise = jax.random.gumbel(key, (k, 2, max(rows, cols)))

    def log(w):
        return jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)), -jnp.inf)

    def draw(i, weight, fallback):
        # Gumbel-max sampling: argmax(log p + Gumbel) ~ p.
        row = jnp.argmax(log(jnp.sum(weight, axis=1)) + noise[i, 0, :rows])
        col = jnp.argmax(log(weight[row]) + noise[i, 1, :cols])
        # All remaining weight zero (fewer distinct values than k): repeat a centroid.
        return jnp.where(jnp.sum(weight) > 0, grid[row, col], fallback)

    first = draw(0, inside.astype(jnp.float32), 0.0)
    dist = jnp.where(inside, (grid - first) ** 2, 0.0)

    def body(i, carry):
        centroids, dist = carry
        chosen = draw(i, dist, centroids[i - 1])
        return centroids.at[i].set(chosen), jnp.minimum(dist, (grid - chosen) ** 2)

    start = jnp.zeros((k,), jnp.float32).at[0].set(first)
    return jax.lax.fori_loop(1, k, body, (start, dist))[0]


@functools.partial(jax.jit, static_argnames=("k", "init"))
def initial_centroids(values, mask, *, k: int, init: str, key) -> jax.Array:
    """The ``k`` starting centroids of ``init`` over ``values[mask]``.

    Args:
      values: 1-D float array.
      mask: bool array like ``values``; True entries are clustered (needs >= k of them).
      k: number of centroids (static).
      init: one of ``INITS`` (static).
      key: a JAX PRNG key (used by forgy and kmeans++).

    Returns:
      float32 ``(k,)`` centroids (linear and density ascending).
    """
    if init not in INITS:
        raise ValueError(f"init={init!r}: must be one of {INITS}")
    sorted_values, count, _ = _sorted_members(values, mask)
    return _initial(sorted_values, count, values, mask, k=k, init=init, key=key)


def _lloyd(sorted_values, count, centroids, iterations: int, sorted_importance=None):
    """Lloyd iterations on sorted members; returns (sorted centroids, history).

    With ``sorted_importance`` (per member, >= 0) the means and the objective are
    weighted by it; clusters stay the runs cut at the midpoints.
    """
    valid = jnp.arange(sorted_values.shape[0]) < count
    members = jnp.where(valid, sorted_values, 0.0)
    if sorted_importance is None:
        hi, lo = _dd_cumsum(jnp.stack([members, members * members]))
    else:
        weighted = sorted_importance * members
        hi, lo = _dd_cumsum(jnp.stack([weighted, weighted * members, sorted_importance]))
        weights = (hi[2], lo[2])
    sums, squares = (hi[0], lo[0]), (hi[1], lo[1])

    def step(c, _):
        c = jnp.sort(c)
        # Cluster j is sorted_values[bounds[j]:bounds[j+1]]; a value on a midpoint goes up.
        cuts = jnp.searchsorted(sorted_values, (c[1:] + c[:-1]) / 2).astype(jnp.int32)
        bounds = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.minimum(cuts, count),
                                  count[None]])
        start, stop = bounds[:-1], bounds[1:]
        if sorted_importance is None:
            n = (stop - start).astype(jnp.float32)
        else:
            n = sum(_dd_range(weights, start, stop))
        s_hi, s_lo = _dd_range(sums, start, stop)
        q_hi, q_lo = _dd_range(squares, start, stop)
        # Empty (or weightless): keep the old one. max(n, tiny) guards the division only.
        c = jnp.where(n > 0, (s_hi + s_lo) / jnp.maximum(n, _TINY), c)
        # Within-cluster SS about the new means: (n Q - S^2) / n, in float-float.
        nq, nq_err = _two_prod(n, q_hi)
        ss, ss_err = _two_prod(s_hi, s_hi)
        diff = _dd_add((nq, nq_err + n * q_lo), (-ss, -(ss_err + 2 * s_hi * s_lo)))
        wcss = jnp.where(n > 0, jnp.maximum(diff[0] + diff[1], 0.0) / jnp.maximum(n, _TINY),
                         0.0)
        return c, jnp.sum(wcss)

    centroids, history = jax.lax.scan(step, centroids.astype(jnp.float32), None,
                                      length=iterations)
    return jnp.sort(centroids), history


def _assign(values, mask, centroids):
    """Nearest (sorted) centroid per value; masked-out entries get ``k`` (the zero slot)."""
    k = centroids.shape[0]
    mids = (centroids[1:] + centroids[:-1]) / 2
    index = jnp.searchsorted(mids, values.astype(jnp.float32), side="right",
                             method="compare_all")
    return jnp.where(mask, index, k).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("iterations",))
def lloyd(values, mask, centroids, *, iterations: int):
    """k-means from given starting ``centroids`` (the same computation ``kmeans`` runs).

    Args:
      values: 1-D float array.
      mask: bool array like ``values``; True entries are clustered.
      centroids: float ``(k,)`` starting centroids.
      iterations: Lloyd iterations, all of them run (static).

    Returns:
      ``(centroids, assignment, history)`` as in ``kmeans``.
    """
    sorted_values, count, _ = _sorted_members(values, mask)
    centroids, history = _lloyd(sorted_values, count, centroids, iterations)
    return centroids, _assign(values, mask, centroids), history


@functools.partial(jax.jit, static_argnames=("k", "init", "iterations"))
def kmeans(values, mask, *, k: int, init: str, key, iterations: int, importance=None):
    """1-D k-means of ``values[mask]`` (Lloyd's algorithm, ``iterations`` steps).

    Args:
      values: 1-D float array (a flattened layer).
      mask: bool array like ``values``; True entries are clustered (the non-zero
        weights; needs at least ``k`` of them). Others are left out and assigned ``k``.
      k: number of (non-zero) centroids (static).
      init: ``linear``, ``density``, ``forgy`` or ``kmeans++`` (static).
      key: a JAX PRNG key (forgy and kmeans++ draw from it).
      iterations: Lloyd iterations (static, >= 1); all of them run.
      importance: optional non-negative float array like ``values``: each value's
        weight in the means and in the sum of squares (None: all alike).

    Returns:
      ``(centroids, assignment, history)``: float32 ``(k,)`` centroids, ascending
      (a cluster that empties keeps its previous centroid); int32 index of the
      nearest centroid per value, ``k`` where ``mask`` is False; float32
      ``(iterations,)`` (weighted) within-cluster sum of squares of each
      iteration's clusters about their updated means, which never increases.
    """
    if init not in INITS:
        raise ValueError(f"init={init!r}: must be one of {INITS}")
    sorted_values, count, sorted_importance = _sorted_members(values, mask, importance)
    start = _initial(sorted_values, count, values, mask, k=k, init=init, key=key)
    centroids, history = _lloyd(sorted_values, count, start, iterations, sorted_importance)
    return centroids, _assign(values, mask, centroids), history


def centroids_by_init(weights, k: int, key, iterations: int,
                      padded_size: int = 0) -> dict[str, np.ndarray]:
    """Centroids of every initialisation for one tensor's non-zero weights (for plots).

    Args:
      weights: any-shape array; zeros are left out.
      k: number of centroids.
      key: PRNG key.
      iterations: Lloyd iterations; 0 gives the initial centroids themselves.
      padded_size: as in ``share_leaf``: tensors padded alike share one compile.

    Returns:
      ``{init: centroids}`` (numpy, ascending) for each name in ``INITS``.
    """
    values, mask = _padded(_nonzero(weights), padded_size)
    found = _every_init(values, mask, k=k, key=key, iterations=iterations)
    return {init: np.sort(np.asarray(c)) for init, c in found.items()}


@functools.partial(jax.jit, static_argnames=("k", "iterations"))
def _every_init(values, mask, *, k: int, key, iterations: int) -> dict[str, jax.Array]:
    # All initialisations in one program: one compile instead of one per init.
    sorted_values, count, _ = _sorted_members(values, mask)
    found = {}
    for init in INITS:
        start = _initial(sorted_values, count, values, mask, k=k, init=init, key=key)
        found[init] = (_lloyd(sorted_values, count, start, iterations)[0] if iterations
                       else start)
    return found


# ---------------------------------------------------------------------------
# the stage

def layer_k(name: str, config: ClusterConfig, rules: Rules = DEFAULT_RULES) -> int:
    """The k of leaf ``name``: its rule's, else ``num_clusters``; 0 when not clustered."""
    rule = rules_lib.rule_for(name, rules)
    if rule is None:
        return 0
    return config.num_clusters if rule.clusters is None else rule.clusters


def bits_per_index(k: int) -> int:
    """Index width of a k-centroid leaf, counting the zero slot: ceil(log2(k + 1))."""
    return max(math.ceil(math.log2(k + 1)), 1)


def compact_nonzero(values: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """The non-zero entries of ``values``, zero-padded to a power of two, and their mask.

    k-means only looks at non-zero weights; after pruning those are ~10%, so
    clustering them alone is ~10x less sorting. Padding to a power of two keeps
    the number of distinct shapes (and compiles) small.
    """
    return _padded(_nonzero(values))


def _nonzero(values) -> np.ndarray:
    flat = np.asarray(values, np.float32).ravel()
    return flat[flat != 0]


def common_padded_size(weights) -> int:
    """The ``padded_size`` under which all of ``weights`` pad alike: their largest
    non-zero count. k-means then compiles once per k for all of them (a second or so
    each on CPU), not once per tensor and k."""
    return max((int(np.count_nonzero(w)) for w in weights), default=0)


def _padded(nonzero: np.ndarray, at_least: int = 0) -> tuple[jax.Array, jax.Array]:
    size = max(128, 1 << (max(len(nonzero), at_least) - 1).bit_length())
    padded = np.zeros(size, np.float32)
    padded[:len(nonzero)] = nonzero
    return jnp.asarray(padded), jnp.asarray(np.arange(size) < len(nonzero))


def _at_most_distinct(values: np.ndarray, k: int) -> bool:
    """Whether ``values`` holds at most ``k`` distinct values. A prefix of ``4k + 1``
    values almost always shows more than ``k`` already, which spares sorting them all."""
    return len(np.unique(values[:4 * k + 1])) <= k and len(np.unique(values)) <= k


def share_leaf(w: np.ndarray, requested: int, config: ClusterConfig, key,
               padded_size: int = 0, importance=None) -> tuple[np.ndarray, dict]:
    """Clusters one leaf to ``requested`` values; returns the shared weights and its report.

    The non-zeros are padded to a power of two of at least ``padded_size``: leaves
    padded alike (and with the same k) share one compile of ``kmeans``. Padding
    leaves linear and density starts unchanged; forgy and k-means++ draw over it.
    ``importance``: optional, broadcastable to ``w``: each weight's weight in the
    k-means (``kmeans``).
    """
    values = w.reshape(-1).astype(np.float32)
    where = np.flatnonzero(values)
    nonzero = values[where]
    count = len(nonzero)
    # At most a quarter of the leaf's size, so constraints.codebook sees it as shared.
    k = min(requested, count, max(w.size // 4, 1))
    info = {"k_requested": requested, "k": k, "nonzero": count}
    if k < 2 or _at_most_distinct(nonzero, k):
        # Already shared (or too few weights): keep the values as they are.
        info.update(k=len(np.unique(nonzero)), kept=1, wcss=0.0)
        return w, info
    padded, padded_mask = _padded(nonzero, padded_size)
    if importance is not None:
        importance = _padded(np.broadcast_to(importance, w.shape).reshape(-1)[where],
                             padded_size)[0]
    centroids, assignment, _ = kmeans(padded, padded_mask, k=k, init=config.init, key=key,
                                      iterations=config.iterations, importance=importance)
    members = np.asarray(centroids)[np.asarray(assignment)[:count]]
    shared = np.zeros_like(values)
    shared[where] = members
    info.update(kept=0, wcss=float(np.sum((nonzero - members).astype(np.float64) ** 2)))
    return shared.reshape(w.shape).astype(w.dtype), info


def cluster(params, config: ClusterConfig, *, apply_fn, data, seed: int,
            rules: Rules = DEFAULT_RULES, teacher=None):
    """Shares each selected leaf's non-zero weights among k centroids, then fine-tunes them.

    Args:
      params: Flax params pytree (zeros are pruned weights and stay exactly zero).
      config: a ``ClusterConfig``.
      apply_fn: ``apply_fn(params, x) -> logits`` in inference mode.
      data: a ``ucpjax.data.Dataset``.
      seed: fixes forgy / kmeans++ draws and fine-tuning.
      rules: which leaves are clustered, and per-leaf k.
      teacher: ``(apply_fn, params)`` of the teacher; needed when
        ``config.teacher_alpha`` > 0, unused otherwise.

    Returns:
      ``(params, report)``; per leaf ``cluster/<leaf>/{k, distinct, wcss,
      bits_per_index, kept}`` (``kept`` = 1: the leaf already had <= k distinct
      non-zero values and was left as is), plus ``cluster/val_accuracy``.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [rules_lib.path_name(path) for path, _ in flat]
    wanted = [layer_k(name, config, rules) for name in names]
    root = jax.random.key(seed)
    report, out, ks = {}, [], {}
    padded_size = common_padded_size(w for (_, w), k in zip(flat, wanted) if k)
    scales = jax.tree.leaves(saliency.scales(config.criterion, apply_fn, params, data.x_train),
                             is_leaf=lambda f: f is None)
    for i, ((_, w), name, k) in enumerate(zip(flat, names, wanted, strict=True)):
        if not k:
            out.append(w)
            continue
        importance = None if scales[i] is None else np.square(scales[i])
        shared, info = share_leaf(np.asarray(w), k, config, jax.random.fold_in(root, i),
                                  padded_size, importance)
        out.append(jnp.asarray(shared))
        ks[name] = info["k"]
        report.update({f"cluster/{name}/{key}": value for key, value in info.items()})
    params = jax.tree.unflatten(treedef, out)
    report["cluster/val_accuracy_before_fine_tune"] = train_lib.accuracy(
        batchnorm.settled(apply_fn, params, data.x_train), params, data.x_val, data.y_val)
    if config.fine_tune is not None:
        make_loss, extra = distill.teacher_loss(apply_fn, teacher, alpha=config.teacher_alpha,
                                                temperature=config.teacher_temperature,
                                                stage="cluster")
        params, _, history = constraints.fit_preserving(
            params, make_loss, x=data.x_train, y=data.y_train, config=config.fine_tune,
            seed=seed, rules=rules, extra=extra, desc="cluster")
        report["cluster/train_loss"] = history[-1]["loss"]
    for w, name in zip(jax.tree.leaves(params), names, strict=True):
        if name in ks:
            values = np.asarray(w)
            distinct = len(np.unique(values[values != 0]))
            report[f"cluster/{name}/distinct"] = distinct
            report[f"cluster/{name}/bits_per_index"] = bits_per_index(ks[name])
    report["cluster/val_accuracy"] = train_lib.accuracy(
        batchnorm.settled(apply_fn, params, data.x_train), params, data.x_val, data.y_val)
    return params, report
