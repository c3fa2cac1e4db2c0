"""What earlier stages imposed on the weights, read back from the weights themselves.

A stage never receives masks or codebooks from the stage before it: pruned
weights are exactly zero and shared weights take few distinct values, so both
are derived from the params. That keeps every stage ``params -> params`` and
lets stages run in any order.

* ``zero_mask``: 0/1 masks of the selected leaves; ``keep_zeros`` is the optax
  transform, last in a chain, that keeps masked weights exactly zero.
* ``factor``: splits weight-shared leaves into trainable centroids and fixed
  indices, so training moves each centroid by the sum of its members'
  gradients (Deep Compression) and zeros stay zero. Once BatchNorm is folded
  into a weight-shared layer, its k values differ per output channel; QAT then
  keeps at most k per channel (``ChannelCodebook``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ucpjax import batchnorm, train
from ucpjax.rules import DEFAULT_RULES, MAX_CLUSTERS, Rules, selected


def zero_mask(params, rules: Rules = DEFAULT_RULES) -> Any:
    """Bool masks: ``w != 0`` on the leaves the rules select, all-True elsewhere."""
    return jax.tree.map(
        lambda w, sel: (w != 0) if sel else jnp.ones(jnp.shape(w), bool),
        params, selected(params, rules))


class KeepZerosState(NamedTuple):
    mask: Any


def keep_zeros(mask) -> optax.GradientTransformation:
    """Masks updates so that masked weights are exactly zero after every step.

    Put it last in the chain. Where the mask is False the update is ``-params``,
    so ``params + update`` is 0.0 exactly, even for a weight that was not yet zero.
    """
    def init_fn(params):
        del params
        return KeepZerosState(mask)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("keep_zeros needs params: call optimizer.update(g, s, params)")
        updates = jax.tree.map(lambda u, p, m: jnp.where(m, u, -p), updates, params, state.mask)
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


class Codebook(NamedTuple):
    """A weight-shared tensor: ``weights = concat([centroids, 0])[index]``."""

    centroids: jax.Array  # (k,) the non-zero shared values
    index: jax.Array  # int32, shape of the weights; k stands for an exact zero

    @property
    def trainable(self):
        return self.centroids

    def with_trainable(self, trainable) -> Codebook:
        return self._replace(centroids=trainable)

    def decode(self) -> jax.Array:
        table = jnp.concatenate([self.centroids, jnp.zeros((1,), self.centroids.dtype)])
        return table[self.index]


class ChannelCodebook(NamedTuple):
    """A tensor with few values per output channel (last axis), each channel its own book.

    What a weight-shared layer becomes once BatchNorm is folded into it: each
    output channel's k shared values scaled by that channel's factor.
    """

    centroids: jax.Array  # (k, channels): column c holds channel c's values, zero-padded
    index: jax.Array  # int32, shape of the weights; k stands for an exact zero

    @property
    def trainable(self):
        return self.centroids

    def with_trainable(self, trainable) -> ChannelCodebook:
        return self._replace(centroids=trainable)

    def decode(self) -> jax.Array:
        channels = self.centroids.shape[1]
        table = jnp.concatenate([self.centroids, jnp.zeros((1, channels), self.centroids.dtype)])
        rows = self.index.reshape(-1, channels)
        return jnp.take_along_axis(table, rows, axis=0).reshape(self.index.shape)


def codebook(weights) -> Codebook | None:
    """The codebook of ``weights`` if they are weight-shared, else None.

    A leaf counts as weight-shared when its distinct non-zero values are at most
    ``MAX_CLUSTERS`` and at most a quarter of its non-zero entries (so a small or
    heavily pruned kernel, whose values are all distinct anyway, is not mistaken
    for a shared one).
    """
    w = np.asarray(weights)
    values, inverse = np.unique(w, return_inverse=True)
    nonzero = values != 0
    k = int(nonzero.sum())
    if k == 0 or k > MAX_CLUSTERS or k > np.count_nonzero(w) // 4:
        return None
    # Re-number so that non-zero values are 0..k-1 and zero is k.
    remap = np.where(nonzero, np.cumsum(nonzero) - 1, k).astype(np.int32)
    return Codebook(jnp.asarray(values[nonzero]), jnp.asarray(remap[inverse].reshape(w.shape)))


def channel_codebook(weights) -> ChannelCodebook | None:
    """Per-channel codebooks of ``weights`` if every output channel has at most
    ``MAX_CLUSTERS`` distinct non-zero values, else None.

    No minimum share is asked, unlike ``codebook``: a channel whose values are
    all distinct becomes one centroid per weight, which trains exactly as the
    weights themselves would, so mistaking it for a shared one costs nothing.
    """
    w = np.asarray(weights)
    if w.ndim < 2 or not np.any(w):
        return None
    columns = w.reshape(-1, w.shape[-1]).T
    books = [np.unique(c[c != 0]) for c in columns]
    k = max(len(b) for b in books)
    if k > MAX_CLUSTERS:
        return None
    centroids = np.zeros((k, len(books)), w.dtype)
    index = np.full(columns.shape, k, np.int32)
    for c, (column, book) in enumerate(zip(columns, books, strict=True)):
        centroids[:len(book), c] = book
        nonzero = column != 0
        index[c, nonzero] = np.searchsorted(book, column[nonzero])
    return ChannelCodebook(jnp.asarray(centroids), jnp.asarray(index.T.reshape(w.shape)))


def codebooks(params, rules: Rules = DEFAULT_RULES, per_channel: bool = False) -> Any:
    """Per leaf: its Codebook when selected and weight-shared, else None.

    With ``per_channel``, a selected leaf that is not weight-shared as a whole
    gets its ``channel_codebook`` (None if a channel has too many values).
    """
    def book(w, sel):
        if not sel:
            return None
        whole = codebook(w)
        return channel_codebook(w) if whole is None and per_channel else whole

    return jax.tree.map(book, params, selected(params, rules))


def _is_book(x) -> bool:
    return x is None or hasattr(x, "with_trainable")


def factor(params, rules: Rules = DEFAULT_RULES, per_channel: bool = False,
           books=None) -> tuple[Any, Callable[[Any], Any]]:
    """Splits params into trainable leaves and a function that rebuilds all weights.

    Weight-shared leaves become their centroids (indices fixed, closed over);
    other leaves stay as they are. ``per_channel``: see ``codebooks``. ``books``:
    a pytree like params of books that replace these where not None (a book has
    ``trainable``, ``with_trainable`` and ``decode``, as ``Codebook``).

    Returns:
      ``(trainable, materialize)`` with ``materialize(trainable)`` equal to params
      (for ``books`` given, to what they decode to).
    """
    found = codebooks(params, rules, per_channel)
    if books is not None:
        found = jax.tree.map(lambda given, b: b if given is None else given, books, found,
                             is_leaf=_is_book)
    trainable = jax.tree.map(lambda b, w: w if b is None else b.trainable,
                             found, params, is_leaf=_is_book)

    def materialize(tree):
        return jax.tree.map(lambda b, t: t if b is None else b.with_trainable(t).decode(),
                            found, tree, is_leaf=_is_book)

    return trainable, materialize


def kernel_mask(params, trainable):
    """``train.kernel_leaves`` of ``params`` carried over to ``trainable`` (``factor``'s):
    a kernel's centroids are a kernel's for weight decay, though they are a vector."""
    return jax.tree.map(lambda kernel, t: jax.tree.map(lambda _: kernel, t),
                        train.kernel_leaves(params), trainable)


def cross_entropy(apply_fn) -> Callable[[Callable[[Any], Any]], Any]:
    """The ``make_loss`` of plain classification fine-tuning, for ``fit_preserving``.

    A live BatchNorm model trains in training mode (``batchnorm.training``).
    """
    forward = batchnorm.training(apply_fn)

    def make_loss(materialize):
        def loss_fn(trainable, extra, x, y, key):
            del key
            logits = forward(materialize(trainable), x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, (extra, {"loss": loss, "accuracy": jnp.mean(logits.argmax(-1) == y)})
        return loss_fn
    return make_loss


def fit_preserving(
    params, make_loss: Callable[[Callable[[Any], Any]], Any], *, x, y, config, seed: int,
    rules: Rules = DEFAULT_RULES, extra=None,
    last_transform: optax.GradientTransformation | None = None,
    per_channel: bool = False, books=None, desc: str = "fine-tune",
):
    """Trains params while keeping every zero and every weight-sharing constraint.

    Args:
      params: full params pytree.
      make_loss: ``make_loss(materialize) -> loss_fn`` over the trainable tree
        (see ``ucpjax.train``); call ``materialize(trainable)`` to get full params.
      x, y: training data.
      config: a ``TrainConfig``.
      seed: training seed.
      rules: which leaves are constrained (``ucpjax.rules``).
      extra: initial non-trained state for the loss.
      last_transform: replaces ``keep_zeros`` as the last transform (pruning).
      per_channel: also keep per-channel value sharing (``codebooks``), as QAT
        must after BatchNorm is folded into weight-shared layers.
      books: replacements for the books ``factor`` finds (see there).
      desc: progress-bar label.

    Returns:
      ``(params, state, history)``: the trained full params, the final TrainState
      (over the trainable tree) and the per-epoch metrics.
    """
    trainable, materialize = factor(params, rules, per_channel, books)
    last = last_transform or keep_zeros(zero_mask(trainable, rules))
    steps = train.total_steps(config, len(x))
    optimizer = optax.chain(
        train.make_optimizer(config, steps, kernels=kernel_mask(params, trainable)), last)
    state, history = train.fit(trainable, make_loss(materialize), optimizer, x, y,
                               config=config, seed=seed, extra=extra, desc=desc)
    return materialize(state.params), state, history
