"""ucpjax.conv: lax's conv values and gradients, through flax modules and interceptors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ucpjax import conv, models
from ucpjax.conv import conv_general_dilated, fast_convs

_DN = ("NHWC", "HWIO", "NHWC")
# float32 sums in another order: relative differences of a few 1e-6.
_TOL = {"rtol": 2e-5, "atol": 2e-5}


def _both(fn, x, kernel):
    """Values and (x, kernel) gradients of a weighted sum of ``fn(x, kernel)``."""
    weights = jax.random.normal(jax.random.key(9), jax.eval_shape(fn, x, kernel).shape)
    loss = lambda x, k: jnp.sum(jnp.sin(fn(x, k)) * weights)
    return jax.jit(fn)(x, kernel), jax.jit(jax.grad(loss, argnums=(0, 1)))(x, kernel)


@pytest.mark.parametrize("case", range(12))
def test_random_convs_match_lax(case):
    rng = np.random.default_rng(case)
    k = int(rng.choice([1, 2, 3, 5]))
    depthwise = case % 3 == 0
    c = int(rng.integers(1, 6))
    # Depthwise with a depth multiplier of 1, 2 or 3 outputs per channel.
    features = c * (case % 9 // 3 + 1) if depthwise else int(rng.integers(1, 7))
    strides = tuple(int(s) for s in rng.integers(1, 4, size=2))
    padding = [
        "SAME", "VALID", ((int(rng.integers(0, 3)), int(rng.integers(0, 3))),
                          (int(rng.integers(0, 3)), int(rng.integers(0, 3))))][case % 3 - 1]
    height, width = (int(v) for v in rng.integers(k + 2, 12, size=2))
    x = jnp.asarray(rng.normal(size=(2, height, width, c)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(k, k, 1 if depthwise else c, features)), jnp.float32)
    groups = c if depthwise else 1

    def call(impl):
        return lambda x, w: impl(x, w, strides, padding, dimension_numbers=_DN,
                                 feature_group_count=groups)

    want, want_grads = _both(call(lax.conv_general_dilated), x, kernel)
    pads = lax.padtype_to_pads(x.shape[1:3], (k, k), strides, padding) if isinstance(
        padding, str) else padding
    # The custom rule and the im2col product themselves (the public function picks
    # one of them or lax by the conv's shape).
    pads = tuple(map(tuple, pads))
    forced = lambda x, w: conv._conv(x, w, strides, pads, depthwise, None)
    im2col = lambda x, w: conv._im2col_conv(x, w, strides, pads, None)
    for impl in (call(conv_general_dilated), forced) + (() if depthwise else (im2col,)):
        got, got_grads = _both(impl, x, kernel)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, **_TOL)
        for g, w in zip(got_grads, want_grads):
            np.testing.assert_allclose(g, w, **_TOL)


def _jaxpr(x, kernel, strides=(1, 1)):
    return str(jax.make_jaxpr(lambda x, k: conv_general_dilated(
        x, k, strides, "SAME", dimension_numbers=_DN))(x, kernel))


def test_grad_is_not_laxs_own():
    # The test above could pass by falling back to lax: check our paths run.
    few_channels = _jaxpr(jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 4)))
    assert "conv_general_dilated" not in few_channels and "dot_general" in few_channels
    assert "conv_general_dilated" not in _jaxpr(jnp.ones((1, 12, 12, 20)), jnp.ones((5, 5, 20, 8)))
    # A 5x5 on 64 channels would make an im2col matrix 25x its input: a conv stays.
    assert "conv_general_dilated" in _jaxpr(jnp.ones((1, 12, 12, 64)), jnp.ones((5, 5, 64, 8)))
    strided = _jaxpr(jnp.ones((1, 8, 8, 16)), jnp.ones((3, 3, 16, 8)), strides=(2, 2))
    assert "custom_vjp_call" in strided
    # 3x3 stride 1 on 16 channels at 16x16: XLA's conv, as measured faster.
    assert "custom_vjp_call" not in _jaxpr(jnp.ones((1, 16, 16, 16)), jnp.ones((3, 3, 16, 8)))


def test_unsupported_calls_fall_back_to_lax():
    x, kernel = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 2, 4))
    fn = lambda x, k: conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=_DN,
                                           feature_group_count=2)
    assert "custom_vjp_call" not in str(jax.make_jaxpr(fn)(x, kernel))
    dilated = lambda x, k: conv_general_dilated(x, k[:, :, :4], (1, 1), "SAME",
                                                rhs_dilation=(2, 2), dimension_numbers=_DN)
    assert "custom_vjp_call" not in str(jax.make_jaxpr(dilated)(x, jnp.ones((3, 3, 4, 4))))
    cropped = lambda x, k: conv_general_dilated(x, k, (2, 2), ((-1, 0), (0, 0)),
                                                dimension_numbers=_DN)
    got = jax.jit(cropped)(x, jnp.ones((3, 3, 4, 4)))
    assert "custom_vjp_call" not in str(jax.make_jaxpr(cropped)(x, jnp.ones((3, 3, 4, 4))))
    assert got.shape == (1, 3, 3, 4)


class _Net(nn.Module):
    """Every Conv flavour our models use, plus flax-side attributes fast_convs must honour."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(6, (2, 2), strides=2, padding="VALID", use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = nn.Conv(6, (3, 3), feature_group_count=6)(x)  # depthwise, with bias
        x = nn.Conv(8, (3, 3), padding="CIRCULAR", strides=(1, 2))(x)
        x = nn.Conv(8, (1, 1), padding=((1, 0), (0, 1)))(x)
        x = nn.Conv(8, (3, 3), kernel_dilation=2)(x)  # falls back to lax
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def _model_grads(model, variables, x, intercept):
    def loss(params):
        with intercept():
            out, _ = model.apply({**variables, "params": params}, x, train=True,
                                 mutable=["batch_stats"])
        return jnp.sum(jnp.sin(out))
    return jax.jit(jax.value_and_grad(loss))(variables["params"])


@pytest.mark.parametrize("name, shape", [("_net", (13, 11, 3)), ("resnet8", (32, 32, 3)),
                                         ("mobilenet_cifar", (32, 32, 3))])
def test_whole_model_grads_match(name, shape):
    model = _Net() if name == "_net" else models.create(name)
    variables = models.init(model, shape, seed=1)
    x = jax.random.normal(jax.random.key(2), (4, *shape))
    (want, want_grads) = _model_grads(model, variables, x, _Nothing)
    (got, got_grads) = _model_grads(model, variables, x, fast_convs)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4),
                 got_grads, want_grads)


def test_fast_convs_reaches_every_plain_conv_and_restores_the_module():
    model, calls = _Net(), []
    variables = models.init(model, (13, 11, 3))

    def spy(*args, **kwargs):
        calls.append(kwargs.get("feature_group_count", 1))
        return conv_general_dilated(*args, **kwargs)

    with fast_convs(spy):
        model.apply(variables, jnp.ones((1, 13, 11, 3)))
    assert calls == [1, 6, 1, 1, 1]
    # Outside the context flax's own conv runs again.
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, jnp.ones((1, 13, 11, 3))))(variables)
    assert "custom_vjp_call" not in str(jaxpr)


def test_inference_takes_ours_for_the_depthwise_conv_only():
    """``depthwise_only`` (evaluation's choice) computes the depthwise conv from shifted
    views and leaves every other conv to lax: the same logits to float rounding."""
    model = _Net()
    variables = models.init(model, (13, 11, 3))
    x = jax.random.normal(jax.random.key(1), (4, 13, 11, 3))

    def forward(v):
        with fast_convs(conv.depthwise_only):
            return model.apply(v, x)
    assert str(jax.make_jaxpr(forward)(variables)).count("custom_vjp_call") == 1
    np.testing.assert_allclose(forward(variables), model.apply(variables, x),
                               rtol=1e-5, atol=1e-5)


def test_fast_convs_leaves_convs_to_xla_off_cpu(monkeypatch):
    # A GPU's own conv gradients are the fast ones: there the context changes nothing.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    model = _Net()
    variables = models.init(model, (13, 11, 3))
    with fast_convs():
        jaxpr = jax.make_jaxpr(lambda v: model.apply(v, jnp.ones((1, 13, 11, 3))))(variables)
    assert "custom_vjp_call" not in str(jaxpr)


def test_composes_with_an_inner_interceptor_that_rewrites_inputs():
    # The quantize stage enters its interceptor inside the step (so inside ours)
    # and replaces a Conv's input: that rewrite must still reach the conv.
    model = nn.Conv(4, (3, 3))
    variables = model.init(jax.random.key(0), jnp.ones((1, 6, 6, 2)))
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 2))

    def double_input(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Conv):
            return next_fun(2 * args[0], *args[1:], **kwargs)
        return next_fun(*args, **kwargs)

    def run(outer):
        def loss(params):
            with outer(), nn.intercept_methods(double_input):
                return jnp.sum(model.apply({"params": params}, x) ** 2)
        return jax.value_and_grad(loss)(variables["params"])

    got, want = run(fast_convs), run(_Nothing)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    np.testing.assert_allclose(got[1]["kernel"], want[1]["kernel"], rtol=1e-5, atol=1e-5)
    plain = jnp.sum(model.apply(variables, x) ** 2)
    assert not np.isclose(float(got[0]), float(plain))  # the rewrite took effect


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
