"""The per-output-channel int8 grids a ``.tflite`` kernel sits on, read back from float weights.

TFLite stores a conv kernel as int8 codes with one positive float32 scale per
output channel (the last axis here); a weight is ``code * scale``. Two grids:

* **The converter's** (``channel_grid``): ``scale = max(max|w|, MIN_PEAK) / qmax``
  per channel, what the TFLite converter computes from float weights.
* **The layer grid** (``layer_grid``, ``LayerGridBook``): one book of codes for
  the whole layer, each channel its own scale, rounded to bfloat16's 8
  significant bits. Once BatchNorm is folded into a weight-shared conv, channel c
  holds ``u_j * f_c`` (the layer's k shared values times the channel's BatchNorm
  factor). On the converter's grid each channel then gets codes of its own (the
  channel's largest value is always 127), up to k per channel but a hundred or
  more per layer, and deflate pays for that alphabet on every non-zero. On the
  layer grid the layer keeps its k codes (2k where factors differ in sign), and
  the short scales, about a fifth of a sparse conv net's zipped ``.tflite``,
  compress too. The converter cannot write it (it recomputes the scales), so
  ``ucpjax.export`` writes it into the converted file.

``code * scale`` is exact in float32 on the layer grid (7 + 8 significant bits),
so JAX, the packed file and the interpreter agree bit for bit.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# TFLite's converter widens a range narrower than 1e-6 to [-5e-7, 5e-7]
# (ExpandVerySmallRange in TensorFlow's MLIR quantizer): a weight channel whose
# largest magnitude is below this (a dead channel, its BatchNorm scale decayed to
# ~0) gets the step MIN_PEAK / qmax in the .tflite, not max|w| / qmax.
MIN_PEAK = np.float32(5e-7)
# Relative distance within which a folded weight counts as a shared value times
# its channel's factor (the fold rounds each product once).
_FACTOR_RTOL = 1e-5


def weight_qmax(bits: int) -> int:
    """Largest code of the narrow symmetric weight grid (127 for 8 bits)."""
    return 2 ** (bits - 1) - 1


# ---------------------------------------------------------------- the converter's grid

def channel_grid(array: np.ndarray) -> tuple[int, np.ndarray, np.ndarray] | None:
    """``(bits, scales, codes)`` if float32 ``array`` is exactly ``codes * scales`` on
    the converter's grid (``scale = max(max|w|, MIN_PEAK) / (2^(b-1) - 1)``, as
    ``ucpjax.quantize`` puts it), else None. ``codes`` is int8, shaped (-1, channels).
    """
    w = _columns(array)
    if w is None:
        return None
    peak = np.abs(w).max(axis=0)
    for bits in range(8, 1, -1):
        found = _exact_scales(w, np.maximum(peak, MIN_PEAK) / np.float32(weight_qmax(bits)))
        if found is not None:
            return bits, *found
    return None


def _columns(array: np.ndarray) -> np.ndarray | None:
    """``array`` as (-1, channels), if it is a finite float32 kernel."""
    if (array.dtype != np.float32 or array.ndim < 2 or not array.size
            or not np.all(np.isfinite(array))):
        return None
    return array.reshape(-1, array.shape[-1])


def _bits(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, np.float32).view(np.uint32)


def _exact_scales(w: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(scales, codes)`` with ``codes * scales`` equal to ``w`` bit for bit, each
    channel's scale the one given or a float up to 2 ulps from it, else None.

    The neighbours matter because the producer's ``max|w| / qmax`` may round the
    other way: XLA on a GPU divides to within an ulp, so a few channels of a
    model trained there sit on a scale one ulp from NumPy's quotient.
    """
    scales = scales.astype(np.float32)
    best, codes = np.empty_like(scales), np.empty_like(w)
    exact = np.zeros(w.shape[1], bool)
    for ulps in (0, 1, -1, 2, -2):
        # Scales are positive, so the float ``ulps`` steps away is that many bit patterns away.
        candidate = (scales.view(np.int32) + ulps).view(np.float32)
        q = np.round(w / candidate)
        same = _bits(q.astype(np.float32) * candidate) == _bits(w)
        hit = ~exact & same.all(axis=0)
        best[hit], codes[:, hit] = candidate[hit], q[:, hit]
        exact |= hit
        if exact.all():
            return best, codes.astype(np.int8)
    return None


# ---------------------------------------------------------------- the layer grid

def short_scale(scale: np.ndarray) -> np.ndarray:
    """Float32 scales rounded to bfloat16's 8 significant bits, never below the
    converter's smallest step (a dead channel still needs a positive scale)."""
    scale = np.maximum(np.asarray(scale, np.float32), MIN_PEAK / np.float32(127))
    return np.asarray(jnp.asarray(scale).astype(jnp.bfloat16).astype(jnp.float32))


def layer_grid(array: np.ndarray, bits: int = 8) -> tuple[np.ndarray, np.ndarray] | None:
    """``(scales, codes)`` if float32 ``array`` is exactly ``codes * scales`` with
    bfloat16-short per-channel scales and codes within ``bits``, else None.

    ``codes`` is int8, shaped (-1, channels). A channel whose codes all share a
    factor fits several grids (codes 2, 4 on scale s are codes 1, 2 on 2s); the
    finest whose codes the layer's unambiguous channels also use is taken, so the
    layer keeps one book, else the coarsest.
    """
    w = _columns(array)
    if w is None:
        return None
    qmax = weight_qmax(bits)
    peak = np.abs(w).max(axis=0)
    # Channel c's largest value is some code m times its scale: try every m.
    multiples = np.arange(1, qmax + 1, dtype=np.float32)
    candidates = peak[:, None] / multiples[None, :]  # (channels, qmax)
    candidates[peak == 0] = short_scale(np.zeros(1))
    valid = np.zeros(candidates.shape, bool)
    short = (_bits(candidates) & 0xFFFF) == 0
    for m in np.flatnonzero(short.any(axis=0)):
        channels = np.flatnonzero(short[:, m])
        s = candidates[channels, m]
        q = np.round(w[:, channels] / s)
        valid[channels, m] = (np.abs(q).max(axis=0) <= qmax) & (
            _bits(q.astype(np.float32) * s) == _bits(w[:, channels])).all(axis=0)
    if not valid.any(axis=1).all():
        return None
    chosen = _shared_choice(w, candidates, valid)
    scales = candidates[np.arange(len(chosen)), chosen]
    return scales, np.round(w / scales).astype(np.int8)


def _shared_choice(w: np.ndarray, candidates: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per channel, the index of the valid candidate scale that keeps one book."""
    def magnitudes(c, m):
        return set(np.abs(np.round(w[:, c] / candidates[c, m])).astype(int).tolist()) - {0}

    unique = valid.sum(axis=1) == 1
    book = set().union(*(magnitudes(c, int(np.flatnonzero(valid[c])[0]))
                         for c in np.flatnonzero(unique)))
    chosen = np.empty(len(valid), np.int64)
    for c, row in enumerate(valid):
        options = np.flatnonzero(row)  # coarsest grid (smallest codes) first
        inside = [m for m in options if magnitudes(c, m) <= book]
        chosen[c] = inside[-1] if inside else options[0]
    return chosen


class LayerGridBook(NamedTuple):
    """A kernel trained onto the layer grid: ``centroids[index] * factors``, put on it.

    ``centroids`` are the layer's shared values (in units of channel 0's or any
    reference channel's factor), ``factors`` one per output channel; both train.
    ``decode`` quantizes the centroids on one step (``max|centroids| / qmax``) and
    gives each channel the scale ``step * |factor|`` rounded to 8 significant bits,
    with straight-through gradients, so the decoded kernel is on ``layer_grid``.
    """

    centroids: jax.Array  # (k,)
    factors: jax.Array  # (channels,)
    index: jax.Array  # int32, the kernel's shape; k stands for an exact zero
    qmax: int

    @property
    def trainable(self):
        return (self.centroids, self.factors)

    def with_trainable(self, trainable) -> LayerGridBook:
        return self._replace(centroids=trainable[0], factors=trainable[1])

    def decode(self) -> jax.Array:
        u, f = self.centroids, self.factors
        step = jax.lax.stop_gradient(jnp.maximum(jnp.max(jnp.abs(u)), MIN_PEAK) / self.qmax)
        x = jnp.clip(u / step, -self.qmax, self.qmax)
        # Value exactly the rounded one (adding an exact zero), gradient the identity.
        codes = jnp.round(x) + (x - jax.lax.stop_gradient(x))
        s = jnp.maximum(step * jnp.abs(f), MIN_PEAK / 127)
        scales = s.astype(jnp.bfloat16).astype(jnp.float32) + (s - jax.lax.stop_gradient(s))
        table = jnp.concatenate([codes, jnp.zeros((1,), codes.dtype)])
        channels = f.shape[0]
        rows = table[self.index.reshape(-1, channels)]
        values = rows * (jnp.sign(f) * scales)
        # A zero stays +0.0 (not -0.0 in a channel of negative factor): zeros are bits too.
        return jnp.where(rows == 0, 0.0, values).reshape(self.index.shape)


def layer_grid_book(array: np.ndarray, bits: int = 8, max_k: int = 16) -> LayerGridBook | None:
    """The ``LayerGridBook`` of a folded weight-shared kernel, or None.

    Reads ``w[..., c] ~= u[index] * f[c]`` back from the weights (each within
    ``_FACTOR_RTOL``; at most ``max_k`` shared values, see ``_read_factors``).
    """
    w = _columns(array)
    if w is None or not np.any(w):
        return None
    found = _read_factors([np.unique(column[column != 0]) for column in w.T], max_k)
    if found is None:
        return None
    factors, shared = found
    index = np.full(w.shape, len(shared), np.int32)
    nonzero = w != 0
    ratio = (w / factors)[nonzero]
    index[nonzero] = _nearest(ratio, shared)
    decoded = shared[np.minimum(index, len(shared) - 1)] * factors * nonzero
    if np.abs(decoded - w).max() > _FACTOR_RTOL * np.abs(w).max():
        return None
    return LayerGridBook(jnp.asarray(shared, jnp.float32), jnp.asarray(factors, jnp.float32),
                         jnp.asarray(index.reshape(array.shape)), weight_qmax(bits))


def _read_factors(books: list[np.ndarray], max_k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(factors, shared)``: one factor per channel and the sorted shared values
    with every channel's distinct values ``books[c]`` among ``shared * factors[c]``.

    Best first, so that a value joins ``shared`` only when no channel can do
    without it: from the channel with the most values, every channel that the
    shared values already explain is taken; when none is left, the one that
    matches the most of them, its other values joining. (Taking channels in a
    fixed order let a channel whose values were not yet shared fail, or join
    under a wrong factor and double the book.) None past ``max_k`` values, or
    when no channel left matches two values: one match fixes no factor.
    """
    factors = np.ones(len(books))
    first = max(range(len(books)), key=lambda c: len(books[c]))
    shared = np.sort(books[first].astype(np.float64))
    pending = [c for c in range(len(books)) if c != first and len(books[c])]
    fits = {c: _factor(books[c], shared) for c in pending}
    while pending and len(shared) <= max_k:
        explained = [c for c in pending if not len(fits[c][2])]
        best = max(pending, key=lambda c: fits[c][1])
        if not explained and fits[best][1] < 2:
            return None
        for c in explained or [best]:
            factors[c], _, new = fits.pop(c)
            shared = np.union1d(shared, new)
            pending.remove(c)
        if not explained:  # the shared values grew: match the others again
            fits = {c: _factor(books[c], shared) for c in pending}
    return None if len(shared) > max_k else (factors, shared)


def _nearest(values: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Index of the nearest entry of sorted ``table`` for each value."""
    right = np.clip(np.searchsorted(table, values), 1, len(table) - 1) if len(table) > 1 else (
        np.zeros(len(values), np.int64))
    left = np.maximum(right - 1, 0)
    return np.where(np.abs(table[left] - values) <= np.abs(table[right] - values), left, right)


# A channel's largest values anchored on each shared value give its candidate factors:
# a few, so that a channel costs a few passes over its values, not one per value (a
# book of 16-64 values reads back in well under 0.1 s; 200 values on 64 channels, 0.5 s).
_ANCHORS = 4


def _factor(values: np.ndarray, shared: np.ndarray) -> tuple[float, int, np.ndarray]:
    """``(factor, matches, values left)``: the factor mapping most of a channel's
    ``values`` onto ``shared`` (its largest values anchored on each shared one in
    turn, the largest first; ties go to the largest shared one), how many it maps,
    and the others over that factor, which would join ``shared``."""
    values = values.astype(np.float64)[np.argsort(-np.abs(values), kind="stable")]
    targets = shared[np.argsort(-np.abs(shared), kind="stable")]
    best = (1.0, 0, values)
    for anchor in values[:_ANCHORS]:
        candidates = anchor / targets
        ratio = values[None, :] / candidates[:, None]
        near = shared[_nearest(ratio.ravel(), shared)].reshape(ratio.shape)
        hits = np.abs(near - ratio) <= _FACTOR_RTOL * np.abs(ratio)
        i = int(np.argmax(hits.sum(axis=1)))
        if hits[i].sum() > best[1]:
            best = (float(candidates[i]), int(hits[i].sum()), ratio[i][~hits[i]])
        if best[1] == len(values):  # all explained: no other anchor does better
            break
    return best
