"""2-D convolution whose gradients are fast on XLA's CPU backend.

XLA on CPU computes a conv's weight gradient as a second convolution whose
"kernel" is the whole output gradient (32x32 for a CIFAR image), a shape its
Eigen kernels handle badly: for a 32-channel 3x3 conv at 32x32, batch 128, the
forward pass takes ~50 ms and the weight gradient ~970 ms. The same gradient is
a sum of K*K matrix products, ``view^T @ dy``, over shifted views of the
padded input: ~450 ms there (an im2col matrix, one product, ~640 ms). Grouped convs
are worse still: a depthwise 3x3 conv (96 channels, 16x16) takes 220 ms
forward and 940 ms for its weight gradient in XLA, against 14 ms and 160 ms as
nine shifted multiply-adds. Those figures are from a loaded machine; on an
idle Intel Xeon, where XLA runs convs as YNNPACK fusions, its stride-1 weight
gradients take 0.7-3.7x the forward pass and stay XLA's, and on few input channels
and 5x5 kernels one im2col product beats both. ``results/profile_train_step.md``
has the numbers.

``conv_general_dilated`` is a drop-in for ``lax.conv_general_dilated``. Convs on
few input channels or with 5x5 kernels become one product over an im2col matrix,
forward and backward (``_im2col_faster``); other regular convs keep XLA's forward
pass and input gradient (both fast) and take the per-tap weight gradient, a
``jax.custom_vjp``, where it measured faster (``_faster_weight_grad``); depthwise
convs are computed entirely from shifted views. Anything else (dilation, other
groupings, other layouts) falls through to lax unchanged.

``fast_convs()`` makes every ``flax.linen.Conv`` use it, in any user's module:
``train.make_train_step`` enters it inside the traced step, and evaluation enters
``fast_convs(depthwise_only)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Pads = tuple[tuple[int, int], tuple[int, int]]

# What flax.linen.Conv passes for NHWC inputs and HWIO kernels.
_NHWC = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
    """``lax.conv_general_dilated`` with fast gradients for NHWC/HWIO 2-D convs.

    Takes the fast path for 4-D NHWC inputs, HWIO kernels, no dilation, and
    ``feature_group_count`` 1 or equal to the channels (depthwise, with any
    depth multiplier: ``m`` outputs per channel); everything else goes to lax
    as given.

    Args:
      lhs: NHWC input.
      rhs: HWIO kernel (``(kh, kw, 1, C * m)`` for depthwise).
      window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count, batch_group_count, precision, preferred_element_type:
        as in ``lax.conv_general_dilated``.

    Returns:
      The convolution, NHWC.
    """
    lax_conv = functools.partial(
        lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)
    if not _supported(lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers,
                      feature_group_count, batch_group_count, preferred_element_type):
        return lax_conv()
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if any(p < 0 for pair in pads for p in pair):  # lax crops there; we only pad
        return lax_conv()
    depthwise = feature_group_count != 1
    if not depthwise:
        if _im2col_faster(rhs.shape):
            return _im2col_conv(lhs, rhs, strides, pads, precision)
        if not _faster_weight_grad(strides):
            return lax_conv()
    return _conv(lhs, rhs, strides, pads, depthwise, precision)


def _im2col_faster(kernel_shape) -> bool:
    """Whether the whole conv (forward and both gradients) measured faster as one
    matrix product over an im2col matrix than as XLA's conv with our weight gradient.

    Measured on an Intel Xeon, 2 cores (jax 0.10.2, milliseconds for the value and
    both gradients, ours vs im2col): few input channels (3x3 on RGB at 32x32, batch 64:
    12.5 vs 5.5; 3x3 on 1 channel at 28x28, batch 128: 12.3 vs 3.6) and 5x5 kernels
    (1 channel at 28x28: 25.3 vs 7.2; 20 channels at 12x12: 33.7 vs 15.4) win; 3x3
    convs on 16-192 channels were 0.4-1.7x, no rule, so they stay on the paths below.
    The im2col matrix is ``kh * kw`` times the input, so a patch stays within the
    longest measured (500 values).
    """
    kh, kw, channels, _ = kernel_shape
    return kh * kw * channels <= 512 and (channels <= 4 or kh * kw >= 25)


def _faster_weight_grad(strides) -> bool:
    """Whether the per-tap weight gradient beat XLA's for such a conv on this CPU.

    Measured (results/profile_train_step.md, weight gradient alone, milliseconds,
    XLA vs ours, jax 0.10.2 on an idle Intel Xeon): strided convs win (resnet8's 3x3
    s2 at 32x32: 5.8 vs 3.3; 1x1 s2: 3.6 vs 0.7 and 2.0 vs 0.6); stride-1 convs lose
    to XLA's YNNPACK fusions (resnet8's 3x3 on 16 channels at 32x32, batch 64: 12.1 vs
    27.8, where a loaded machine had measured 1293 vs 451), so XLA keeps them.
    (Convs on a few input channels go to ``_im2col_conv`` before this rule.)
    """
    return strides != (1, 1)


def _supported(lhs, rhs, strides, lhs_dilation, rhs_dilation, dimension_numbers,
               feature_group_count, batch_group_count, preferred_element_type) -> bool:
    """Whether ``_conv`` computes this call exactly as lax would."""
    if lhs.ndim != 4 or rhs.ndim != 4 or len(strides) != 2 or batch_group_count != 1:
        return False
    if preferred_element_type is not None or lhs.dtype != rhs.dtype:
        return False
    for dilation in (lhs_dilation, rhs_dilation):
        if dilation is not None and any(d != 1 for d in dilation):
            return False
    if dimension_numbers is None or lax.conv_dimension_numbers(
            lhs.shape, rhs.shape, dimension_numbers) != _NHWC:
        return False
    channels = lhs.shape[3]
    if feature_group_count == 1:
        return rhs.shape[2] == channels
    return (feature_group_count == channels and rhs.shape[2] == 1
            and rhs.shape[3] % channels == 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, kernel, strides: tuple[int, int], pads: Pads, depthwise: bool, precision):
    if depthwise:
        return _depthwise(_repeated(x, kernel), kernel[:, :, 0], strides, pads)
    return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_NHWC,
                                    precision=precision)


def _conv_forward(x, kernel, strides, pads, depthwise, precision):
    return _conv(x, kernel, strides, pads, depthwise, precision), (x, kernel)


def _conv_backward(strides, pads, depthwise, precision, residuals, dy):
    x, kernel = residuals
    if depthwise:
        repeated = _repeated(x, kernel)
        dx = _depthwise_input_grad(dy, kernel[:, :, 0], repeated.shape, strides, pads)
        dx = dx.reshape(*x.shape, -1).sum(-1)  # each channel's m copies
        dk = _depthwise_kernel_grad(repeated, dy, kernel.shape[:2], strides, pads)
        return dx, dk[:, :, None]
    # XLA's input gradient is as fast as its forward pass: keep it.
    _, input_vjp = jax.vjp(lambda x: lax.conv_general_dilated(
        x, kernel, strides, pads, dimension_numbers=_NHWC, precision=precision), x)
    (dx,) = input_vjp(dy)
    return dx, _kernel_grad(x, dy, kernel.shape, strides, pads, precision)


_conv.defvjp(_conv_forward, _conv_backward)


def _im2col_conv(x, kernel, strides, pads, precision):
    """The conv as ``patches @ kernel``: the padded input's ``kh * kw`` shifted views
    side by side on the channel axis, against the kernel as a ``(kh * kw * cin, cout)``
    matrix. Plain lax ops, so autodiff gives both gradients (a transposed product and
    pads of the views) and no conv op is left in the step, which then runs in
    ``lax.scan`` windows like a dense net's (``train.window_steps``)."""
    kh, kw, cin, cout = kernel.shape
    ho, wo = _output_hw(x.shape, (kh, kw), strides, pads)
    patches = jnp.concatenate(_shifted_views(x, (kh, kw), strides, pads, (ho, wo)), axis=3)
    return lax.dot_general(patches, kernel.reshape(kh * kw * cin, cout),
                           (((3,), (0,)), ((), ())), precision=precision)


def _repeated(x, kernel):
    """``x`` with each channel repeated for its ``m`` outputs (the depth multiplier):
    lax's output ``o`` of a depthwise conv reads input channel ``o // m``."""
    multiplier = kernel.shape[3] // x.shape[3]
    return x if multiplier == 1 else jnp.repeat(x, multiplier, axis=3)


def _shifted_views(x, window: tuple[int, int], strides, pads, out_hw) -> list[jax.Array]:
    """The ``kh * kw`` strided views of padded ``x`` that meet each kernel tap, row-major."""
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    (sh, sw), (ho, wo) = strides, out_hw
    return [lax.slice(xp, (0, i, j, 0), (x.shape[0], i + sh * (ho - 1) + 1,
                                         j + sw * (wo - 1) + 1, x.shape[3]), (1, sh, sw, 1))
            for i in range(window[0]) for j in range(window[1])]


def _kernel_grad(x, dy, kernel_shape, strides, pads, precision):
    """``dL/dkernel``: one ``view^T @ dy`` product per kernel tap.

    Measured on this CPU (results/profile_train_step.md): building the im2col
    matrix (a concatenation along the channel axis) cost more than the products
    themselves, and per-tap products over contiguous views beat it.
    """
    kh, kw, cin, cout = kernel_shape
    views, dy = _tap_views(x, dy, (kh, kw), strides, pads)
    dk = [lax.dot_general(v, dy, (((0,), (0,)), ((), ())), precision=precision) for v in views]
    return jnp.stack(dk).reshape(kernel_shape).astype(x.dtype)


def _tap_views(x, dy, window, strides, pads) -> tuple[list[jax.Array], jax.Array]:
    """``(views, dy)`` as ``(rows, channels)`` matrices; row r of each view meets row r of dy.

    For stride 1 the padded image is flattened per example, so each tap's view is a
    contiguous slice (a cheap copy; XLA's CPU loops for strided slices are slow):
    the output grid is taken as wide as the padded input, and the extra
    ``kw - 1`` columns of each row, which wrap into the next row, meet zeros in dy.
    """
    n, ho, wo, cout = dy.shape
    if strides != (1, 1):
        views = _shifted_views(x, window, strides, pads, (ho, wo))
        return [v.reshape(-1, x.shape[3]) for v in views], dy.reshape(-1, cout)
    (top, bottom), (left, right) = pads
    wp = x.shape[2] + left + right
    extra = 1 if window[1] > 1 else 0  # room for the last row's wrap-around
    flat = jnp.pad(x, ((0, 0), (top, bottom + extra), (left, right), (0, 0)))
    flat = flat.reshape(n, -1, x.shape[3])
    views = [lax.slice_in_dim(flat, i * wp + j, i * wp + j + ho * wp, axis=1).reshape(
        -1, x.shape[3]) for i in range(window[0]) for j in range(window[1])]
    dy = jnp.pad(dy, ((0, 0), (0, 0), (0, wp - wo), (0, 0))).reshape(-1, cout)
    return views, dy


def _depthwise(x, taps, strides, pads):
    """Depthwise conv as a sum of shifted views times per-channel taps ``(kh, kw, C)``."""
    ho, wo = _output_hw(x.shape, taps.shape[:2], strides, pads)
    views = _shifted_views(x, taps.shape[:2], strides, pads, (ho, wo))
    return functools.reduce(jnp.add, (v * t for v, t in zip(views, taps.reshape(-1, x.shape[3]))))


def _depthwise_kernel_grad(x, dy, window, strides, pads):
    views = _shifted_views(x, window, strides, pads, dy.shape[1:3])
    return jnp.stack([jnp.sum(v * dy, axis=(0, 1, 2)) for v in views]).reshape(
        *window, x.shape[3])


def _depthwise_input_grad(dy, taps, x_shape, strides, pads):
    """The transposed depthwise conv: dilate ``dy`` by the stride, correlate with flipped taps.

    ``dxp[q] = sum_i dyd[q - i] taps[i]`` over the padded input ``xp``, where
    ``dyd`` is ``dy`` with ``stride - 1`` zeros between its rows/columns; one
    ``lax.pad`` (interior for the dilation, edges for the window and the part
    of ``xp`` that no window reached) builds it, and the crop drops ``xp``'s padding.
    """
    kh, kw = taps.shape[:2]
    hp, wp = (x_shape[1] + sum(pads[0]), x_shape[2] + sum(pads[1]))
    config = [(0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0)]
    for axis, (k, size, s) in enumerate(zip((kh, kw), (hp, wp), strides), start=1):
        dilated = s * (dy.shape[axis] - 1) + 1
        config[axis] = (k - 1, size - dilated, s - 1)
    dyd = lax.pad(dy, jnp.zeros((), dy.dtype), config)
    dxp = _depthwise(dyd, taps[::-1, ::-1], (1, 1), ((0, 0), (0, 0)))
    (top, _), (left, _) = pads
    return dxp[:, top:top + x_shape[1], left:left + x_shape[2]]


def _output_hw(x_shape, window, strides, pads) -> tuple[int, int]:
    return tuple((size + lo + hi - k) // s + 1
                 for size, k, s, (lo, hi) in zip(x_shape[1:3], window, strides, pads))


def _can_redirect(module: nn.Module) -> bool:
    """An exact ``nn.Conv`` that has not chosen its own conv function."""
    return (type(module) is nn.Conv and _REDIRECTABLE
            and module.conv_general_dilated is None and module.conv_general_dilated_cls is None)


# flax.linen.Conv calls ``self.conv_general_dilated`` when it is set (a field
# flax marks deprecated); without that field ``fast_convs`` leaves convs alone.
_REDIRECTABLE = "conv_general_dilated" in {f.name for f in dataclasses.fields(nn.Conv)}


def depthwise_only(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, **rest):
    """``conv_general_dilated`` for grouped convs, lax's for the rest: the choice for
    inference, where XLA's forward pass is fast but for depthwise convs (10,000
    images through mobilenet_cifar on 2 cores: 6.7 -> 1.9 s; lenet5's im2col
    forward ran at 0.35x XLA's speed; RESULTS.md, "Evaluations split over the cores
    too")."""
    conv = lax.conv_general_dilated if feature_group_count == 1 else conv_general_dilated
    return conv(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                dimension_numbers, feature_group_count, **rest)


def _interceptor(conv, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not _can_redirect(module):
        return next_fun(*args, **kwargs)
    # Swap the conv function for this call only, then run the rest of the chain
    # (interceptors entered later, e.g. quantization's input rewrite, run
    # inside this one) and flax's own Conv.__call__, which honours every
    # attribute (padding modes, masks, dtypes, extra batch axes) and reads the
    # module's variables as usual.
    object.__setattr__(module, "conv_general_dilated", conv)
    try:
        return next_fun(*args, **kwargs)
    finally:
        object.__setattr__(module, "conv_general_dilated", None)


@contextlib.contextmanager
def fast_convs(conv=conv_general_dilated):
    """Within this context every ``flax.linen.Conv`` call uses ``conv``
    (``conv_general_dilated`` for training, ``depthwise_only`` for inference).

    Enter it where the model is traced (inside a jitted function); values and
    gradients equal lax's to float rounding. On a GPU or TPU backend it changes
    nothing: their own conv gradients are the fast ones (cuDNN's, not Eigen's).
    """
    if jax.default_backend() != "cpu":
        yield
        return
    with nn.intercept_methods(functools.partial(_interceptor, conv)):
        yield

