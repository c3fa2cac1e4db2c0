"""Checks the arrays given to ``ucpjax.compress`` before any compute.

``dataset_from_arrays`` turns ``train=(x, y)``, ``test=(x, y)`` and an optional
``val=(x, y)`` into a ``ucpjax.data.Dataset`` of float32 inputs (NHWC images) and int32
labels, with ``num_classes`` = the largest training label + 1 and ``val``
defaulting to ``test``. Every problem is refused in one line that names the
argument (``train``, ``test``, ``val``), the array (``x`` or ``y``) and the fix:

* not an ``(x, y)`` pair (a ``tf.data.Dataset`` is told the line that makes
  arrays of it), ``x`` and ``y`` of different lengths, an empty set;
* ``x`` without an example axis and a value (1-D, or a zero-width axis),
  channels-first images, non-numeric ``x``, NaN/Inf pixels. Other shapes go to
  the module as they are ((N, H, W, C) images, (N, L, C) sequences, (N, D)
  features): ``model.check_model`` refuses the ones it does not take;
* integer images (uint8 included): the model expects the preprocessing it was
  trained with, so scaling or casting them here would give a silent wrong
  result; the user scales them, e.g. ``x.astype(np.float32) / 255``;
* ``y`` not 1-D (one-hot labels), non-numeric ``y``, float labels that are not
  whole numbers, negative labels, training labels that do not start at 0;
* test/val labels outside the training classes, test/val images of another
  shape than the training images or with pixel ranges 20x wider or narrower
  (e.g. train scaled to [0, 1], test left in [0, 255]).

Float images of other widths are cast to float32 and whole-number float labels
to int32: both casts keep every value.
"""

from __future__ import annotations

import numpy as np

from ucpjax.config import ConfigError
from ucpjax.data import Dataset

# NaN/Inf are looked for in slices of this many images, so the check never
# holds a boolean copy of a large training set in memory.
_FINITE_CHUNK = 4096


def dataset_from_arrays(train, test, val=None, *, name: str = "user") -> Dataset:
    """Validates ``(x, y)`` pairs and builds the Dataset the pipeline trains on.

    Args:
      train: ``(x, y)``: float NHWC images and integer class ids 0..K-1.
      test: ``(x, y)`` for reporting; same image shape, labels among train's.
      val: optional ``(x, y)`` for the stages' validation accuracy (default: test).
      name: the Dataset's name in reports.

    Returns:
      A ``Dataset`` with float32 images, int32 labels and ``num_classes`` = the
      largest training label + 1.

    Raises:
      ConfigError: one line naming the argument and the fix (see the module docstring).
    """
    x_train, y_train = _checked_pair(train, "train")
    if y_train.min() > 0:  # 1-based labels would add a class 0 that no image has
        raise ConfigError(f"train y: the smallest label is {y_train.min()}, not 0; pass "
                          f"class ids 0..K-1, e.g. y - {y_train.min()}")
    num_classes = int(y_train.max()) + 1
    x_test, y_test = _checked_pair(test, "test")
    _check_like_train(x_test, y_test, "test", x_train, num_classes)
    if val is None:
        x_val, y_val = x_test, y_test
    else:
        x_val, y_val = _checked_pair(val, "val")
        _check_like_train(x_val, y_val, "val", x_train, num_classes)
    return Dataset(name=name, x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val,
                   x_test=x_test, y_test=y_test, num_classes=num_classes)


def check_batch_size(batch_size: int, num_examples: int, field: str) -> None:
    """Refuses a batch larger than the training set (it would train zero steps) or
    one that does not split evenly over the JAX devices where it must (training is
    data-parallel; on one CPU host ``devices.training_mesh`` adapts to any batch).

    Args:
      batch_size: the configured batch size.
      num_examples: training examples available.
      field: the config path named in the error, e.g. ``prune.train.batch_size``.

    Raises:
      ConfigError: ``"<field>=<b>: larger than the <n> training examples; ..."``
        or ``"<field>=<b>: not a multiple of the <d> JAX devices; ..."``.
    """
    from ucpjax.devices import batch_multiple

    if batch_size > num_examples:
        raise ConfigError(f"{field}={batch_size}: larger than the {num_examples} training "
                          f"examples; use a batch size <= {num_examples}")
    devices = batch_multiple()
    if batch_size % devices:
        below = batch_size - batch_size % devices
        raise ConfigError(f"{field}={batch_size}: not a multiple of the {devices} JAX devices "
                          f"that share each batch; use {below or devices} or "
                          f"{below + devices}")


# Pixel ranges of train and test/val further apart than this factor mean the two
# were preprocessed differently.
_RANGE_RATIO = 20


def _pixel_range(x: np.ndarray) -> tuple[float, float]:
    """Min and max pixel over (at most) the first ``_FINITE_CHUNK`` images."""
    head = x[:_FINITE_CHUNK]
    return float(head.min()), float(head.max())


def _checked_pair(pair, arg: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x float32, y int32)`` of one argument, or a ConfigError naming it."""
    if hasattr(pair, "as_numpy_iterator"):  # a tf.data.Dataset, as tfds.load returns
        raise ConfigError(f"{arg}: expected a pair (x, y) of arrays, got a tf.data "
                          f"{type(pair).__name__}; for one of (image, label) elements "
                          "(tfds.load(..., as_supervised=True)) pass "
                          f"{arg}=tuple(map(np.stack, zip(*ds.as_numpy_iterator()))), "
                          "images scaled as in training")
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ConfigError(f"{arg}: expected a pair (x, y) of arrays, got "
                          f"{type(pair).__name__}; pass {arg}=(images, labels)")
    x, y = (_as_array(a, f"{arg} {part}") for a, part in zip(pair, "xy"))
    if len(x) != len(y):
        raise ConfigError(f"{arg}: x has {len(x)} examples but y has {len(y)}; "
                          "pass one label per image")
    if len(x) == 0:
        raise ConfigError(f"{arg}: no examples (x has shape {x.shape}); pass at least one")
    return _checked_images(x, f"{arg} x"), _checked_labels(y, f"{arg} y")


def _as_array(value, where: str) -> np.ndarray:
    try:
        array = np.asarray(value)
    except ValueError as err:  # ragged nested lists
        raise ConfigError(f"{where}: not an array ({str(err).splitlines()[0]}); "
                          "pass a numpy array") from None
    if array.ndim == 0:
        raise ConfigError(f"{where}: a scalar ({type(value).__name__}), not an array; "
                          "pass a numpy array with one entry per example")
    return array


def _checked_images(x: np.ndarray, where: str) -> np.ndarray:
    if x.dtype.kind not in "iuf":
        raise ConfigError(f"{where}: dtype {x.dtype} is not numeric; pass float32 images")
    if x.dtype.kind in "iu":
        raise ConfigError(f"{where}: {x.dtype} images: scale them as in training, "
                          "e.g. x.astype(np.float32) / 255")
    if x.ndim < 2 or 0 in x.shape[1:]:
        raise ConfigError(f"{where}: shape {x.shape} holds no example of at least one value; "
                          "pass (N, H, W, C) images, (N, L, C) sequences or (N, D) features")
    if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[2] == x.shape[3] >= 8:
        # A model that flattens would train on transposed pixels without complaint. Only
        # a square plane is taken for one: (N, 1, L, C) is also a strip of C channels.
        raise ConfigError(f"{where}: images of shape {x.shape} look channels-first "
                          "(N, C, H, W); pass NHWC, e.g. x.transpose(0, 2, 3, 1)")
    for start in range(0, len(x), _FINITE_CHUNK):
        bad = ~np.isfinite(x[start:start + _FINITE_CHUNK]).reshape(-1, np.prod(x.shape[1:]))
        if bad.any():
            index = start + int(np.flatnonzero(bad.any(1))[0])
            raise ConfigError(f"{where}: NaN or infinite pixels in image {index}; "
                              "fix or drop those images")
    return x.astype(np.float32, copy=False)


def _checked_labels(y: np.ndarray, where: str) -> np.ndarray:
    if y.dtype.kind not in "biuf":
        raise ConfigError(f"{where}: dtype {y.dtype} is not numeric; pass integer class ids")
    if y.ndim == 2 and y.shape[1] > 1:
        raise ConfigError(f"{where}: labels of shape {y.shape} look one-hot; pass class ids, "
                          "use y.argmax(-1)")
    if y.ndim != 1:
        raise ConfigError(f"{where}: labels of shape {y.shape} are not 1-D; pass class ids "
                          "of shape (N,), e.g. y.reshape(-1)")
    if y.dtype.kind == "f":
        whole = np.isfinite(y) & (y == np.round(y))
        if not whole.all():
            index = int(np.flatnonzero(~whole)[0])
            raise ConfigError(f"{where}: label {y[index]} at index {index} is not a whole "
                              "number; pass integer class ids")
    if y.min() < 0 or y.max() > np.iinfo(np.int32).max:
        index = int(np.argmin(y) if y.min() < 0 else np.argmax(y))
        raise ConfigError(f"{where}: label {y[index]} at index {index} is not a class id; "
                          "pass labels 0..K-1 for K classes")
    return y.astype(np.int32)


def _check_like_train(x: np.ndarray, y: np.ndarray, arg: str, x_train: np.ndarray,
                      num_classes: int) -> None:
    if x.shape[1:] != x_train.shape[1:]:
        raise ConfigError(f"{arg} x: images of shape {x.shape[1:]} but train images are "
                          f"{x_train.shape[1:]}; preprocess {arg} exactly like train")
    (lo, hi), (train_lo, train_hi) = _pixel_range(x), _pixel_range(x_train)
    spread, train_spread = hi - lo, train_hi - train_lo
    if min(spread, train_spread) > 0 and (  # constant images have no range to compare
            max(spread, train_spread) > _RANGE_RATIO * min(spread, train_spread)):
        # e.g. train scaled to [0, 1] and test left in [0, 255]: a silent wrong accuracy.
        raise ConfigError(f"{arg} x: pixel values span [{lo:.3g}, {hi:.3g}] but train's span "
                          f"[{train_lo:.3g}, {train_hi:.3g}]; preprocess {arg} exactly "
                          "like train")
    if y.max() >= num_classes:
        index = int(np.argmax(y))
        raise ConfigError(f"{arg} y: label {y[index]} at index {index} is not a training "
                          f"class (train has labels 0..{num_classes - 1}); drop those "
                          "examples or add the class to train")
