"""Short biases: each int32 bias of the ``.tflite`` a few-bit code shifted left.

TFLite stores a Dense/Conv bias as int32 on the scale ``s_in * s_w`` (the input's
scale times the kernel's, per output channel where the kernel has a scale per
channel). Its low bits are noise to deflate: in LeNet-300-100 compressed 62x,
the 410 biases, each layer's zipped alone, took 1,557 B (the whole ``.tflite``
zipped: 17,010 B), and as float32 an eighth of the packed file.

On the short grid a bias is ``code << shift`` on that scale: a ``bits``-bit code
(``|code| <= 2^(bits-1) - 1``) and one shift per layer, the smallest that fits
the layer's largest bias. The int32 TFLite's kernels read keeps its meaning; it
has ``shift`` zero low bits and a sign-extended code above them, which deflate
takes in about 2 bytes (LeNet-300-100's 300 first-layer biases, zipped alone:
994 -> 590 B), and the packed file stores the codes and one float32 step
(``read_grid``).
"""

from __future__ import annotations

import numpy as np

from ucpjax.int8_grid import weight_qmax


def onto_grid(bias: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray | None:
    """``bias`` rounded to ``code * 2**shift * scale`` (float32), or None where the
    converter would not round it back to exactly ``code << shift``.

    Args:
      bias: float32 biases, one per output channel.
      scale: the int32 bias scale ``s_in * s_w`` (float32; one, or one per channel).
      bits: code bits.
    """
    scale = np.broadcast_to(np.asarray(scale, np.float32), bias.shape)
    steps = bias.astype(np.float64) / scale
    qmax = weight_qmax(bits)
    peak = float(np.abs(steps).max(initial=0.0))
    shift = max(0, int(np.ceil(np.log2(peak / qmax)))) if peak > 0 else 0
    # + 0.0: a code rounded to zero from below is -0.0, which would stay in the bias.
    ints = np.clip(np.round(steps / 2.0 ** shift), -qmax, qmax) * 2.0 ** shift + 0.0
    short = (ints.astype(np.float32) * scale).astype(np.float32)
    # The converter divides by the scale and rounds: exact while the product's
    # rounding error stays below half a step (ints below ~2^22).
    if not np.array_equal(np.round(short.astype(np.float64) / scale), ints):
        return None
    return short


def read_grid(array: np.ndarray, max_bits: int = 16) -> tuple[int, np.float32, np.ndarray] | None:
    """``(bits, step, codes)`` if 1-D float32 ``array`` is exactly ``codes * step`` in
    float32 (one step for the tensor, ``|codes| <= 2^(bits-1) - 1``), else None.

    The biases ``onto_grid`` gives a layer with one scale are such a tensor, the
    step being ``2**shift * scale``. Each candidate code ``top`` of the largest
    bias gives a step; candidates under which some ratio to the largest bias is
    not near ``code / top`` are ruled out together, the rest tried exactly (the
    step to within two ulps of ``peak / top``).
    """
    if array.dtype != np.float32 or array.ndim != 1 or not np.all(np.isfinite(array)):
        return None
    peak = np.float32(np.abs(array).max(initial=0.0))
    if peak == 0 or np.any(np.signbit(array) & (array == 0)):
        return None
    ratios = array.astype(np.float64) / float(peak)
    tops = np.arange(1, weight_qmax(max_bits) + 1, dtype=np.float64)
    for sample in (ratios[:16], ratios):  # a few ratios rule out most candidates
        scaled = tops[:, None] * sample[None, :]
        # Each float32 value is within 2^-24 of code * step: the ratio, of 2^-23.
        tolerance = np.maximum(1e-3, tops * 2.0 ** -21)
        tops = tops[np.abs(scaled - np.round(scaled)).max(axis=1) < tolerance]
    for top in tops:
        found = _exact_step(array, np.float32(peak / np.float32(top)))
        if found is not None:
            return int(np.ceil(np.log2(top + 1))) + 1, *found
    return None


def _exact_step(array: np.ndarray, base: np.float32) -> tuple[np.float32, np.ndarray] | None:
    below, above = np.nextafter(base, 0), np.nextafter(base, np.inf)
    nearby = (base, below, above, np.nextafter(below, 0), np.nextafter(above, np.inf))
    for step in np.asarray(nearby, np.float32):
        codes = np.round(array / step)
        if np.array_equal((codes * step).astype(np.float32), array):
            return np.float32(step), codes.astype(np.int32)
    return None
