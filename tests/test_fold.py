import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ucpjax import fold, models


def _random_batchnorm(variables, key):
    k1, k2 = jax.random.split(key)
    stats = jax.tree.map(lambda a: jax.random.uniform(k1, a.shape, minval=0.5, maxval=1.5),
                         variables["batch_stats"])
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(k2, a.shape), variables["params"])
    return {"params": params, "batch_stats": stats}


def test_folding_keeps_the_function_and_makes_batchnorm_identity():
    model = models.create("cifar_cnn")
    variables = _random_batchnorm(models.init(model, (32, 32, 3)), jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    folded, frozen = fold.fold_batchnorm(model, variables, (32, 32, 3))
    assert len(frozen) == len(variables["batch_stats"]) >= 1
    assert all(path[-1] == "scale" for path in frozen)
    np.testing.assert_allclose(model.apply(folded, x), model.apply(variables, x),
                               rtol=1e-4, atol=1e-5)
    for bn in folded["batch_stats"].values():
        assert float(jnp.max(jnp.abs(bn["mean"]))) == 0.0
        one = bn["var"] + np.float32(1e-5)
        assert np.all(np.asarray(one, np.float32) == np.float32(1.0))
    again, _ = fold.fold_batchnorm(model, folded, (32, 32, 3))
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(folded), strict=True):
        np.testing.assert_array_equal(a, b)
    kernel_before = variables["params"]["Conv_0"]["kernel"]
    assert not np.allclose(folded["params"]["Conv_0"]["kernel"], kernel_before)


def test_model_without_batchnorm_is_unchanged():
    model = models.create("lenet300")
    variables = models.init(model, (28, 28, 1))
    folded, frozen = fold.fold_batchnorm(model, variables, (28, 28, 1))
    assert frozen == () and folded is variables


class _ConvNorm(nn.Module):
    """Conv + BatchNorm with each of the optional parameters on or off."""

    scale: bool
    offset: bool
    conv_bias: bool

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), strides=2, use_bias=self.conv_bias)(x)
        x = nn.BatchNorm(use_running_average=not train, use_scale=self.scale,
                         use_bias=self.offset)(x)
        return nn.Dense(10)(nn.relu(x).reshape((x.shape[0], -1)))


@pytest.mark.parametrize("scale, offset, conv_bias",
                         list(itertools.product((True, False), repeat=3)))
def test_folding_keeps_the_function_without_optional_parameters(scale, offset, conv_bias):
    """With neither a conv bias nor a BatchNorm offset, the shift ``-mean * multiplier``
    has nowhere else to go: the running mean keeps it (it used to be dropped)."""
    model = _ConvNorm(scale, offset, conv_bias)
    x = jax.random.normal(jax.random.key(1), (4, 12, 12, 1))
    variables = dict(model.init(jax.random.key(0), x[:1]))
    variables["batch_stats"] = jax.tree.map(
        lambda a: a + jax.random.uniform(jax.random.key(2), a.shape), variables["batch_stats"])
    folded, _ = fold.fold_batchnorm(model, variables, (12, 12, 1))
    np.testing.assert_allclose(model.apply(folded, x), model.apply(variables, x),
                               rtol=1e-5, atol=1e-5)
    again, _ = fold.fold_batchnorm(model, folded, (12, 12, 1))
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(folded), strict=True):
        np.testing.assert_array_equal(a, b)
