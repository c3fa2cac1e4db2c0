"""Residual adds: a bare ``x + y`` of two activations is refused before any work, in
one line naming the fix; ``ucpjax.residual.Add`` passes, and bias and BatchNorm adds
(one operand from the params) and adds inside an activation function are not
mistaken for residual adds."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import ucpjax
from ucpjax import models
from ucpjax.config import ConfigError
from ucpjax.model import Model, check_quantizable
from ucpjax.residual import Add

SHAPE = (8, 8, 1)


class Block(nn.Module):
    """conv -> (conv + BatchNorm) added to its input -> ReLU -> Dense."""

    add: str = "module"  # "module", "bare" or "jitted" (a bare add inside a jax.jit)

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        y = nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3))(x))
        if self.add == "module":
            x = nn.relu(Add()(x, y))
        elif self.add == "bare":
            x = nn.relu(x + y)
        else:
            x = nn.relu(jax.jit(jnp.add)(x, y))
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


def _model(add: str) -> Model:
    module = Block(add=add)
    return Model(module, dict(module.init(jax.random.key(0), jnp.zeros((1, *SHAPE)))))


def test_add_module_passes():
    check_quantizable(_model("module"), SHAPE)


@pytest.mark.parametrize("add", ["bare", "jitted"])
def test_bare_residual_add_is_refused_in_one_line(add):
    with pytest.raises(ConfigError) as err:
        check_quantizable(_model(add), SHAPE)
    message = str(err.value)
    assert "\n" not in message and "ucpjax.residual.Add()" in message


class Gelu(nn.Module):
    """GELU (tanh form) adds ``x`` and ``0.044715 * x**3``: one tensor's activation."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.gelu(nn.Dense(16)(x.reshape((x.shape[0], -1))))
        return nn.Dense(10)(x)


def test_an_activation_function_is_not_a_residual_add():
    """... but it is TFLite int8 arithmetic QAT does not model, for the preflight."""
    module = Gelu()
    variables = dict(module.init(jax.random.key(0), jnp.zeros((1, *SHAPE))))
    assert "tanh" in check_quantizable(Model(module, variables), SHAPE)


class NormAfterRelu(nn.Module):
    """A BatchNorm after the ReLU: no Conv/Dense right before it to fold into."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.BatchNorm(use_running_average=not train)(nn.relu(nn.Conv(4, (3, 3))(x)))
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


def test_an_unfoldable_batchnorm_is_int8_arithmetic_qat_does_not_model():
    module = NormAfterRelu()
    variables = dict(module.init(jax.random.key(0), jnp.zeros((1, *SHAPE))))
    unmodeled = check_quantizable(Model(module, variables), SHAPE)
    assert any(item.startswith("BatchNorm_0 (") for item in unmodeled), unmodeled


@pytest.mark.parametrize("name", ["resnet8", "mobilenet_cifar", "cifar_cnn", "lenet300"])
def test_registry_models_pass(name):
    shape = (28, 28, 1) if name == "lenet300" else (32, 32, 3)
    module = models.create(name)
    assert check_quantizable(Model(module, models.init(module, shape)), shape) == []


def test_compress_refuses_a_bare_residual_add_before_any_work(mnist_small, tmp_path):
    small = mnist_small.take(200, 50)
    crop = (slice(None), slice(0, 8), slice(0, 8))  # 8x8 MNIST crops: tracing is all it takes
    module = Block(add="bare")
    variables = dict(module.init(jax.random.key(0), small.x_train[:1][crop]))
    with pytest.raises(ConfigError) as err:
        ucpjax.compress(module, variables, train=(small.x_train[crop], small.y_train),
                        test=(small.x_test[crop], small.y_test), out=tmp_path / "run")
    assert "ucpjax.residual.Add()" in str(err.value)
    assert not (tmp_path / "run").exists()
