"""Flax models by name. Every model maps NHWC images to logits: ``__call__(x, train)``."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ucpjax.pooling import GlobalAveragePool, max_pool

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    """Class decorator adding a model to the registry under ``name``."""
    def add(cls):
        _REGISTRY[name] = cls
        return cls
    return add


def create(name: str, num_classes: int = 10) -> nn.Module:
    """Returns a new model ``name``; raises ValueError naming the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}: use one of {sorted(_REGISTRY)}")
    return _REGISTRY[name](num_classes=num_classes)


def names() -> list[str]:
    return sorted(_REGISTRY)


def init(model: nn.Module, input_shape: tuple[int, ...], seed: int = 0) -> dict:
    """The model's variables (``params`` and, with BatchNorm, ``batch_stats``)."""
    x = jnp.zeros((1, *input_shape), jnp.float32)
    return dict(jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(seed)))


def param_count(params) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(params))


@register("lenet300")
class LeNet300(nn.Module):
    """LeNet-300-100 (LeCun et al. 1998), as in Deep Compression: 784-300-100-10."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(300)(x))
        x = nn.relu(nn.Dense(100)(x))
        return nn.Dense(self.num_classes)(x)


@register("lenet5")
class LeNet5(nn.Module):
    """Caffe's LeNet-5 variant used by Deep Compression (431,080 parameters)."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(20, (5, 5), padding="VALID")(x)
        x = max_pool(x, 2)
        x = nn.Conv(50, (5, 5), padding="VALID")(x)
        x = max_pool(x, 2)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(500)(x))
        return nn.Dense(self.num_classes)(x)


@register("pcqat_mnist")
class PcqatMnist(nn.Module):
    """The model of TensorFlow's PCQAT tutorial: conv 12@3x3, max-pool 2, dense 10."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(12, (3, 3), padding="VALID")(x))
        x = max_pool(x, 2)
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes)(x)


@register("fashion_cnn")
class FashionCnn(nn.Module):
    """A small CNN for Fashion-MNIST: two conv blocks with BatchNorm, dense 128."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        for width in (32, 64):
            x = nn.Conv(width, (3, 3), use_bias=False)(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
            x = max_pool(x, 2)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(128)(x))
        return nn.Dense(self.num_classes)(x)


@register("cifar_cnn")
class CifarCnn(nn.Module):
    """VGG-style CNN with BatchNorm for CIFAR-10, sized for training on two CPU cores.

    A 2x2 stride-2 conv stem (32 channels, a learned space-to-depth) brings the
    image to 16x16, then three stages of two 3x3 convs (48, 96, 192 channels) with
    BatchNorm and ReLU, max-pooled between stages, global average pooling and one
    dense layer: 0.66M parameters, 25M multiply-adds per image. Why: XLA on CPU
    computes the weight gradient of a 3x3 conv at 32x32 resolution 10-15x slower
    than its forward pass, so the former all-32x32 first stage (35M MACs) trained
    at ~40 images/s against ~150 for this net. Plain conv/BN/ReLU/max-pool/mean/dense,
    every BatchNorm right after its conv (foldable), so every layer maps to an int8
    TFLite op.
    """

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(32, (2, 2), strides=(2, 2), padding="VALID", use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        for stage, width in enumerate((48, 96, 192)):
            if stage:
                x = max_pool(x, 2)
            for _ in range(2):
                x = nn.Conv(width, (3, 3), use_bias=False)(x)
                x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        x = GlobalAveragePool()(x)
        return nn.Dense(self.num_classes)(x)
