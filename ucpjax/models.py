"""Flax models by name. Every model maps NHWC images to logits: ``__call__(x, train)``
(a registered model with another switch, or none, is adapted: ``model.with_train_argument``)."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ucpjax.model import with_train_argument
from ucpjax.pooling import GlobalAveragePool, max_pool
from ucpjax.residual import Add

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
    return with_train_argument(_REGISTRY[name](num_classes=num_classes))[0]


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


def _conv_bn(x, features: int, kernel: int, strides: int, train: bool, *, groups: int = 1):
    """Conv (no bias: BatchNorm's offset replaces it) and the BatchNorm right after it."""
    x = nn.Conv(features, (kernel, kernel), strides=strides, padding="SAME", use_bias=False,
                feature_group_count=groups)(x)
    return nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)


@register("resnet8")
class ResNet8(nn.Module):
    """ResNet-8 of MLPerf Tiny's image classification benchmark (CIFAR-10, ~78K parameters).

    As in mlcommons/tiny ``benchmark/training/image_classification/keras_model.py``
    (``resnet_v1_eembc`` with 16 filters): a 3x3 conv with 16 filters, then three
    residual stages of 16, 32 and 64 filters (strides 1, 2, 2), each two 3x3
    convs on the residual path and, where the shape changes, a strided 1x1 conv
    on the shortcut; global average pooling and a dense layer. Two differences,
    both to keep every conv foldable: the convs carry no bias (the BatchNorm
    after each has an offset), and the 1x1 shortcut convs get a BatchNorm too
    (the reference has none there).
    """

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(_conv_bn(x, 16, 3, 1, train))
        # Shortcut convs where the stage's width changes, decided from the widths
        # written here, not x.shape: channel pruning may narrow x.
        for width, stride, widens in ((16, 1, False), (32, 2, True), (64, 2, True)):
            y = nn.relu(_conv_bn(x, width, 3, stride, train))
            y = _conv_bn(y, width, 3, 1, train)
            if stride != 1 or widens:
                x = _conv_bn(x, width, 1, stride, train)
            x = nn.relu(Add()(x, y))
        x = GlobalAveragePool()(x)
        return nn.Dense(self.num_classes)(x)


@register("mobilenet_cifar")
class MobileNetCifar(nn.Module):
    """A MobileNet-v1-style depthwise-separable net for CIFAR-10 (0.14M parameters).

    A 3x3 conv stem (32 filters) at 32x32, then six blocks of depthwise 3x3
    conv + BatchNorm + ReLU and pointwise 1x1 conv + BatchNorm + ReLU, with
    (stride, filters) below: 6M multiply-adds per image, a quarter of
    ``cifar_cnn``. Every BatchNorm follows its conv (foldable); the depthwise
    convs map to TFLite's DEPTHWISE_CONV_2D.
    """

    num_classes: int = 10
    blocks: tuple[tuple[int, int], ...] = ((2, 64), (1, 64), (2, 128), (1, 128), (2, 256),
                                           (1, 256))

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(_conv_bn(x, 32, 3, 1, train))
        for stride, width in self.blocks:
            x = nn.relu(_conv_bn(x, x.shape[-1], 3, stride, train, groups=x.shape[-1]))
            x = nn.relu(_conv_bn(x, width, 1, 1, train))
        x = GlobalAveragePool()(x)
        return nn.Dense(self.num_classes)(x)


@register("depthwise_cnn")
class DepthwiseCnn(nn.Module):
    """A user's depthwise CNN (the conv-nets issue): conv, depthwise 3x3 and 1x1
    convs each with BatchNorm, max-pool, global average pooling, Dropout,
    Dense + BatchNorm, Dense.

    ``pool`` writes the pooling three ways: "module" (``GlobalAveragePool``),
    "mean" (a bare ``jnp.mean``, which compression refuses) or "flatten".
    """

    num_classes: int = 10
    pool: str = "module"

    @nn.compact
    def __call__(self, x, train: bool = False):
        def block(layer, x):
            return nn.relu(nn.BatchNorm(use_running_average=not train)(layer(x)))

        x = block(nn.Conv(32, (3, 3), strides=2, use_bias=False), x)
        x = block(nn.Conv(32, (3, 3), feature_group_count=32, use_bias=False), x)
        x = block(nn.Conv(64, (1, 1), use_bias=False), x)
        x = max_pool(x, 2)
        if self.pool == "mean":
            x = jnp.mean(x, axis=(1, 2))
        elif self.pool == "module":
            x = GlobalAveragePool()(x)
        else:
            x = x.reshape((x.shape[0], -1))
        x = nn.Dropout(0.2, deterministic=not train)(x)
        x = block(nn.Dense(64), x)
        return nn.Dense(self.num_classes)(x)
