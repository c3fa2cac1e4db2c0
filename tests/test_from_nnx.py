"""A Flax NNX model lifted to linen computes what it computes, and compresses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ucpjax
from ucpjax import experiment, from_nnx
from ucpjax.config import ConfigError
from ucpjax.model import Model, check_quantizable
from ucpjax.pooling import GlobalAveragePool
from ucpjax.residual import Add


class _DepthwiseNet(nnx.Module):
    """Conv + BatchNorm, a depthwise conv + BatchNorm, Dropout, Linear layers in a list."""

    def __init__(self, rngs: nnx.Rngs, pool: str = "flatten"):
        self.conv = nnx.Conv(1, 8, (3, 3), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.depthwise = nnx.Conv(8, 8, (3, 3), strides=2, feature_group_count=8,
                                  use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.pool = pool
        width = 8 * 14 * 14 if pool == "flatten" else 8
        self.head = nnx.List([nnx.Linear(width, 32, rngs=rngs), nnx.Linear(32, 10, rngs=rngs)])

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x)))
        y = nnx.relu(self.bn2(self.depthwise(x)))
        if self.pool == "flatten":
            x = y.reshape((y.shape[0], -1))
        elif self.pool == "module":
            x = GlobalAveragePool()(nnx.relu(Add()(y, y)))
        else:
            x = jnp.mean(y, axis=(1, 2))
        return self.head[1](self.drop(nnx.relu(self.head[0](x))))


class _HandMadeParam(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (784, 10)))

    def __call__(self, x):
        return x.reshape((x.shape[0], -1)) @ self.w


class _Bf16Mlp(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(784, 10, dtype=jnp.bfloat16, rngs=rngs)

    def __call__(self, x):
        return self.dense(x.reshape((x.shape[0], -1))).astype(jnp.float32)


def _images(n: int = 8) -> np.ndarray:
    return np.random.default_rng(0).random((n, 28, 28, 1), np.float32)


def test_the_lifted_module_computes_what_the_nnx_model_does():
    model = _DepthwiseNet(nnx.Rngs(0))
    model.eval()
    x = _images()
    module, variables = from_nnx.lift(model)
    assert sorted(variables["params"]) == ["bn", "bn2", "conv", "depthwise", "head.0", "head.1"]
    assert sorted(variables["batch_stats"]) == ["bn", "bn2"]
    np.testing.assert_array_equal(module.apply(variables, x, train=False), model(x))
    # `train` switches BatchNorm to batch statistics and Dropout on, as model.train() does.
    _, updated = module.apply(variables, x, train=True, rngs={"dropout": jax.random.key(0)},
                              mutable=["batch_stats"])
    assert not np.allclose(updated["batch_stats"]["bn"]["mean"],
                           variables["batch_stats"]["bn"]["mean"])


@pytest.mark.parametrize(("pool", "refused"), [("module", False), ("mean", True)])
def test_qat_sees_the_pool_and_add_modules_inside_an_nnx_model(pool, refused):
    module, variables = from_nnx.lift(_DepthwiseNet(nnx.Rngs(0), pool))
    model = Model(module, variables)
    if refused:
        with pytest.raises(ConfigError, match="bare mean"):
            check_quantizable(model, (28, 28, 1))
    else:
        assert check_quantizable(model, (28, 28, 1)) == []


def test_a_parameter_outside_the_known_layers_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"parameter 'w' is outside the layers") as refusal:
        from_nnx.lift(_HandMadeParam(nnx.Rngs(0)))
    assert "\n" not in str(refusal.value)


@pytest.mark.parametrize(("module", "variables", "message"), [
    (_DepthwiseNet(nnx.Rngs(0)), {"params": {}}, "an nnx model carries its own state"),
    (object(), {"params": {}}, "module is a object: pass a flax.linen Module"),
    (_Bf16Mlp(nnx.Rngs(0)), None, "computes in bfloat16"),
])
def test_compress_refuses_what_is_not_a_flax_model_and_its_state(module, variables, message):
    x, y = _images(256), np.arange(256) % 10
    with pytest.raises(ConfigError, match=message):
        ucpjax.compress(module, variables, train=(x, y), test=(x, y))


def test_an_nnx_model_compresses_to_a_faithful_tflite(mnist_small):
    model = _DepthwiseNet(nnx.Rngs(0))
    x, y = mnist_small.x_train, mnist_small.y_train
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
        optimizer.update(model, nnx.grad(loss)(model))

    model.train()
    for start in range(0, len(x) - 99, 100):
        step(model, optimizer, x[start:start + 100], y[start:start + 100])
    model.eval()
    test = (mnist_small.x_test, mnist_small.y_test)
    dense = float(np.mean(np.argmax(model(test[0]), -1) == test[1]))
    result = ucpjax.compress(model, train=(x, y), test=test,
                             recipe=experiment.smoke(experiment.Experiment()).recipe,
                             log=lambda line: None)
    final = result.report["final"]
    assert final["tflite_within_tolerance"]
    assert final["tflite_accuracy"] > 0.5 and dense > 0.5
    assert np.mean(result.variables["params"]["head.0"]["kernel"] == 0) > 0.3
