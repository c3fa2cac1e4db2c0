"""Models written as users write them, none of them ours, through ``ucpjax.compress``.

    .venv/bin/python scripts/check_user_models.py            # about 10 minutes on 2 cores
    .venv/bin/python scripts/check_user_models.py --only GeluMlp,HardSwish
    .venv/bin/python scripts/check_user_models.py --recipe default --only SqueezeExcite

Each model is trained for 6 epochs on 8,000 MNIST images (Adam 1e-3), then
compressed with the smoke recipe (every stage, a short budget: this checks that
a kind of model goes through end to end, not the accuracy it reaches) and its
``.tflite`` measured in LiteRT on 1,000 test images. A row says what the run
did: passed the final int8 check, refused before any work (with its one-line
message), or failed. Covers what QAT models exactly (ReLU/ReLU6, BatchNorm,
strides, dilation, avg/max/global pools, concatenation, depth multipliers) and
what it does not (GELU, hard-swish, sigmoid, tanh, LayerNorm, a BatchNorm after a
ReLU), which the int8 preflight measures before the stages. The ``Nnx*`` models
are Flax NNX modules trained by their own loop (the same epochs and optimizer)
and passed to ``compress`` as they are.
``--recipe default`` compresses with the default stage settings instead, as a
user who passes no recipe does (minutes per model), to show what accuracy a kind
of model keeps. Writes results/user_models.{json,md} (user_models_default.* with
the default recipe, user_models_default_s0.75.* with ``--sparsity 0.75``).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import ucpjax
from ucpjax import data, experiment, train
from ucpjax.config import ConfigError
from ucpjax.experiment import Experiment
from ucpjax.export import ToleranceError
from ucpjax.model import with_train_argument
from ucpjax.pooling import GlobalAveragePool
from ucpjax.residual import Add
from ucpjax.run_folder import RunFolder

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_baselines as bench  # noqa: E402


def _conv_bn(x, train: bool, strides: int = 1):
    x = nn.Conv(8, (3, 3), strides=strides, use_bias=False)(x)
    return nn.BatchNorm(use_running_average=not train)(x)


class LnMlp(nn.Module):
    """Dense, LayerNorm, GELU, Dense."""

    @nn.compact
    def __call__(self, x, train=False):
        x = x.reshape((x.shape[0], -1))
        x = nn.gelu(nn.LayerNorm()(nn.Dense(64)(x)))
        return nn.Dense(10)(x)


class BiasConvAvg(nn.Module):
    """Convs with biases, VALID padding, stride 2, nn.avg_pool, flatten."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Conv(8, (5, 5), padding="VALID")(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(16, (3, 3), strides=(2, 2))(x))
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


class SeqNet(nn.Module):
    """nn.Sequential of a flatten lambda, Dense, ReLU, Dense."""

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Sequential([lambda y: y.reshape((y.shape[0], -1)), nn.Dense(32), nn.relu,
                              nn.Dense(10)])(x)


class DepthMult(nn.Module):
    """Conv + BatchNorm, a grouped conv with depth multiplier 2 + BatchNorm, GlobalAveragePool."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(_conv_bn(x, train))
        x = nn.Conv(16, (3, 3), feature_group_count=8, use_bias=False)(x)  # depth multiplier 2
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = GlobalAveragePool()(x)
        return nn.Dense(10)(x)


class Swish(nn.Module):
    """Strided convs with swish and sigmoid activations."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.swish(nn.Conv(8, (3, 3), strides=2)(x))
        x = nn.sigmoid(nn.Conv(8, (3, 3), strides=2)(x))
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


class GlobalMax(nn.Module):
    """Conv, a global max pool written as jnp.max over H and W, Dense."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))
        x = jnp.max(x, axis=(1, 2))
        return nn.Dense(10)(x)


class Concat(nn.Module):
    """Two conv branches (3x3 and 1x1) concatenated on channels."""

    @nn.compact
    def __call__(self, x, train=False):
        a = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
        b = nn.relu(nn.Conv(8, (1, 1), strides=2)(x))
        x = jnp.concatenate([a, b], axis=-1)
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


class ResBlock(nn.Module):
    """Conv + BatchNorm stem, a residual block through ucpjax.residual.Add, nn.max_pool."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(_conv_bn(x, train, strides=2))
        y = _conv_bn(nn.relu(_conv_bn(x, train)), train)
        x = nn.relu(Add()(x, y))
        x = nn.max_pool(x, (2, 2), (2, 2))
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


class DilatedConv(nn.Module):
    """A dilated 3x3 conv (kernel_dilation=2), nn.max_pool."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Conv(8, (3, 3), kernel_dilation=2)(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


class BnFirst(nn.Module):
    """BatchNorm on the input image, conv, Dense + BatchNorm (no conv before it)."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
        x = nn.Dense(32)(x.reshape((x.shape[0], -1)))
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        return nn.Dense(10)(x)


class PointwiseDense(nn.Module):
    """A Dense applied over the channel axis of NHWC feature maps."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
        x = nn.relu(nn.Dense(8)(x))   # Dense over the channel axis of NHWC
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


class Tanh(nn.Module):
    """An MLP with tanh and ReLU6."""

    @nn.compact
    def __call__(self, x, train=False):
        x = x.reshape((x.shape[0], -1))
        x = nn.tanh(nn.Dense(64)(x))
        x = nn.relu6(nn.Dense(32)(x))
        return nn.Dense(10)(x)


class GeluMlp(nn.Module):
    """An MLP with GELU."""

    @nn.compact
    def __call__(self, x, train=False):
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(10)(nn.gelu(nn.Dense(64)(x)))


class LnReluMlp(nn.Module):
    """Dense, LayerNorm, ReLU, Dense."""

    @nn.compact
    def __call__(self, x, train=False):
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(10)(nn.relu(nn.LayerNorm()(nn.Dense(64)(x))))


class HardSwish(nn.Module):
    """A strided conv with hard-swish."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.hard_swish(nn.Conv(8, (3, 3), strides=2)(x))
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


class BnAfterRelu(nn.Module):
    """Conv, ReLU, then BatchNorm (not foldable into the conv), Dense."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


class SqueezeExcite(nn.Module):
    """Conv + BatchNorm, a squeeze-and-excitation gate of 1x1 convs (sigmoid, multiply)."""

    @staticmethod
    def gate_layer(features: int) -> nn.Module:
        return nn.Conv(features, (1, 1))

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(_conv_bn(x, train, strides=2))
        gate = GlobalAveragePool(keepdims=True)(x)
        gate = nn.sigmoid(self.gate_layer(8)(nn.relu(self.gate_layer(4)(gate))))
        x = nn.max_pool(x * gate, (2, 2), (2, 2))
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


class SqueezeExciteDense(SqueezeExcite):
    """SqueezeExcite with Dense layers on the (N, 1, 1, C) pool, as some code writes it."""

    @staticmethod
    def gate_layer(features: int) -> nn.Module:
        return nn.Dense(features)


class GroupNormConv(nn.Module):
    """Convs each followed by GroupNorm and ReLU, flatten."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.GroupNorm(num_groups=4)(nn.Conv(8, (3, 3), strides=2)(x)))
        x = nn.relu(nn.GroupNorm(num_groups=4)(nn.Conv(16, (3, 3), strides=2)(x)))
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


class BareResidual(nn.Module):
    """Inverted residual blocks (expand, depthwise, project; BatchNorm, ReLU6), a bare `+`."""

    @nn.compact
    def __call__(self, x, train=False):
        def bn(y):
            return nn.BatchNorm(use_running_average=not train)(y)
        x = nn.relu6(bn(nn.Conv(8, (3, 3), strides=2, use_bias=False)(x)))
        for _ in range(2):
            y = nn.relu6(bn(nn.Conv(24, (1, 1), use_bias=False)(x)))
            y = nn.relu6(bn(nn.Conv(24, (3, 3), feature_group_count=24, use_bias=False)(y)))
            x = x + bn(nn.Conv(8, (1, 1), use_bias=False)(y))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(10)(x)


class SetupBlocks(nn.Module):
    """Layers made in setup() under names of their own, a block module used twice, GAP."""

    def setup(self):
        self.stem = nn.Conv(8, (3, 3), strides=(2, 2), name="stem")
        self.blocks = [ConvBlock(16), ConvBlock(16)]
        self.pool = GlobalAveragePool()
        self.head = nn.Dense(10, use_bias=False)

    def __call__(self, x, train=False):
        x = nn.relu(self.stem(x))
        for block in self.blocks:
            x = block(x, train)
        return self.head(self.pool(x))


class ConvBlock(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x, train):
        x = nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)(x)
        return nn.relu(nn.BatchNorm(use_running_average=not train)(x))


class AvgPoolGap(nn.Module):
    """Conv + BatchNorm, a global average pool written as nn.avg_pool over the whole map."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(_conv_bn(x, train, strides=2))
        x = nn.avg_pool(x, x.shape[1:3])
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


class TiedDense(nn.Module):
    """One Dense layer applied twice (shared weights), leaky ReLU."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.leaky_relu(nn.Dense(64)(x.reshape((x.shape[0], -1))))
        shared = nn.Dense(64)
        x = nn.leaky_relu(shared(nn.leaky_relu(shared(x))))
        return nn.Dense(10)(x)


class GroupedConv(nn.Module):
    """A grouped conv (4 groups, not depthwise) and a channel shuffle, as ShuffleNet has."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))
        x = nn.relu(nn.Conv(16, (3, 3), feature_group_count=4)(x))
        n, h, w, c = x.shape
        x = x.reshape((n, h, w, 4, c // 4)).swapaxes(3, 4).reshape((n, h, w, c))
        x = nn.max_pool(x, (2, 2), (2, 2))
        return nn.Dense(10)(x.reshape((n, -1)))


class EinsumDense(nn.Module):
    """Hand-written layers: params made with self.param, an einsum matmul, ELU."""

    @nn.compact
    def __call__(self, x, train=False):
        x = x.reshape((x.shape[0], -1))
        w = self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], 64))
        b = self.param("b", nn.initializers.zeros, (64,))
        x = nn.elu(jnp.einsum("bi,io->bo", x, w) + b)
        return nn.Dense(10)(x)


class Bf16Compute(nn.Module):
    """Convs and Dense computing in bfloat16 (float32 params), cast back to float32 logits."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Conv(8, (3, 3), strides=2, dtype=jnp.bfloat16)(x))
        x = nn.Dense(10, dtype=jnp.bfloat16)(x.reshape((x.shape[0], -1)))
        return x.astype(jnp.float32)


class Bf16Params(nn.Module):
    """A conv and a Dense with bfloat16 params (param_dtype), computing in float32."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Conv(8, (3, 3), strides=2, param_dtype=jnp.bfloat16)(x))
        return nn.Dense(10, param_dtype=jnp.bfloat16)(x.reshape((x.shape[0], -1)))


class DropoutMlp(nn.Module):
    """Dense, ReLU, Dropout(0.3) when training, Dense; flatten with reshape(-1, ...)."""

    @nn.compact
    def __call__(self, x, train=False):
        x = x.reshape((-1, 28 * 28))
        x = nn.Dropout(0.3, deterministic=not train)(nn.relu(nn.Dense(64)(x)))
        return nn.Dense(10)(x)


class TrainingKwarg(nn.Module):
    """A `training` argument instead of `train`, switching Dropout."""

    @nn.compact
    def __call__(self, x, training=False):
        x = nn.relu(nn.Dense(32)(x.reshape((x.shape[0], -1))))
        return nn.Dense(10)(nn.Dropout(0.3, deterministic=not training)(x))


class DeterministicKwarg(nn.Module):
    """Dropout switched by a `deterministic` argument, as Flax's own layers are."""

    @nn.compact
    def __call__(self, x, deterministic=True):
        x = nn.relu(nn.Dense(32)(x.reshape((x.shape[0], -1))))
        return nn.Dense(10)(nn.Dropout(0.3, deterministic=deterministic)(x))


class PlainCall(nn.Module):
    """A conv net called as `__call__(x)` alone (no Dropout, no BatchNorm)."""

    @nn.compact
    def __call__(self, x):
        x = nn.max_pool(nn.relu(nn.Conv(8, (3, 3))(x)), (2, 2), strides=(2, 2))
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


class TupleOut(nn.Module):
    """Returns (logits, features)."""

    @nn.compact
    def __call__(self, x, train=False):
        features = nn.relu(nn.Dense(32)(x.reshape((x.shape[0], -1))))
        return nn.Dense(10)(features), features


class NnxDepthwise(nnx.Module):
    """NNX: Conv + BatchNorm, depthwise 3x3 + BatchNorm, 1x1 conv + BatchNorm, flatten, Dropout."""

    pool = "flatten"

    def __init__(self, rngs: nnx.Rngs):
        self.stem = nnx.Conv(1, 8, (3, 3), use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(8, rngs=rngs)
        self.depthwise = nnx.Conv(8, 8, (3, 3), strides=2, feature_group_count=8,
                                  use_bias=False, rngs=rngs)
        self.depthwise_bn = nnx.BatchNorm(8, rngs=rngs)
        self.pointwise = nnx.Conv(8, 16, (1, 1), use_bias=False, rngs=rngs)
        self.pointwise_bn = nnx.BatchNorm(16, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.head = nnx.Linear(16 * 14 * 14 if self.pool == "flatten" else 16, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.stem_bn(self.stem(x)))
        x = nnx.relu(self.depthwise_bn(self.depthwise(x)))
        x = nnx.relu(self.pointwise_bn(self.pointwise(x)))
        if self.pool == "flatten":
            x = x.reshape((x.shape[0], -1))
        elif self.pool == "module":
            x = GlobalAveragePool()(x)
        else:
            x = jnp.mean(x, axis=(1, 2))
        return self.head(self.drop(x))


class NnxDepthwiseGap(NnxDepthwise):
    """NNX: the depthwise net above with ucpjax's GlobalAveragePool called inside it."""

    pool = "module"


class NnxDepthwiseMean(NnxDepthwise):
    """NNX: the depthwise net above with a bare jnp.mean as its pool."""

    pool = "mean"


class NnxResidualMlp(nnx.Module):
    """NNX: Linear layers in an nnx.List, residuals through ucpjax Add, LayerNorm, Dropout."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Linear(784, 64, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(64, 64, rngs=rngs) for _ in range(2)])
        self.norm = nnx.LayerNorm(64, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.head = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.embed(x.reshape((x.shape[0], -1))))
        for block in self.blocks:
            x = Add()(x, nnx.relu(block(x)))
        return self.head(self.drop(self.norm(x)))


class NnxHandParam(nnx.Module):
    """NNX: a Linear layer, then a hand-made nnx.Param matrix."""

    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(784, 32, rngs=rngs)
        self.w = nnx.Param(jax.random.normal(rngs.params(), (32, 10)) / 6)

    def __call__(self, x):
        return nnx.relu(self.dense(x.reshape((x.shape[0], -1)))) @ self.w


MODELS = {cls.__name__: cls for cls in (
    LnMlp, LnReluMlp, GeluMlp, BiasConvAvg, SeqNet, DepthMult, Swish, HardSwish, GlobalMax,
    Concat, ResBlock, DilatedConv, BnFirst, BnAfterRelu, PointwiseDense, Tanh,
    SqueezeExcite, SqueezeExciteDense, GroupNormConv, BareResidual, SetupBlocks, AvgPoolGap,
    TiedDense, GroupedConv, EinsumDense, Bf16Compute, Bf16Params, DropoutMlp, TrainingKwarg,
    DeterministicKwarg, PlainCall, TupleOut, NnxDepthwise, NnxDepthwiseGap, NnxDepthwiseMean,
    NnxResidualMlp, NnxHandParam)}


# Modules ucpjax.train cannot drive either (a tuple output): they keep their initial
# variables, as compress must refuse them before any work.
UNTRAINED = {"TupleOut"}


def run_model(name: str, dataset, recipe) -> dict:
    begin = time.perf_counter()
    if issubclass(MODELS[name], nnx.Module):  # an nnx model carries its trained state
        module, trained = _fit_nnx(MODELS[name](nnx.Rngs(0)), dataset), None
    else:
        module = MODELS[name]()
        variables = dict(module.init(jax.random.key(0), dataset.x_train[:1]))
        trained = variables if name in UNTRAINED else _fit(module, variables, dataset)
    row = {"model": name, "about": MODELS[name].__doc__.strip().splitlines()[0]}
    try:
        result = ucpjax.compress(module, trained, train=(dataset.x_train, dataset.y_train),
                                 test=(dataset.x_test, dataset.y_test),
                                 recipe=recipe)
    except (ConfigError, ToleranceError) as err:
        return {**row, "outcome": f"{type(err).__name__}: {err}",
                "seconds": time.perf_counter() - begin}
    except Exception as err:  # a crash is a finding: record it and go on to the next model
        first = (str(err).strip().splitlines() or [""])[0][:300]
        return {**row, "outcome": f"crashed ({type(err).__name__}: {first})",
                "seconds": time.perf_counter() - begin}
    final, stages = result.report["final"], result.report["stages"]
    return {**row, "outcome": "passed", "dense_accuracy": result.report["rows"][0]["accuracy"],
            **{key: final[key] for key in ("jax_accuracy", "tflite_accuracy",
                                           "tflite_agreement", "tflite_max_logit_error_steps",
                                           "weights_faithful")},
            "preflight_ops": stages.get("preflight/tflite_ops"),
            "seconds": time.perf_counter() - begin}


def _fit(module, variables: dict, dataset) -> dict:
    config = train.TrainConfig(epochs=6, batch_size=100)
    steps = train.total_steps(config, len(dataset.x_train))
    loss = train.classification_loss(with_train_argument(module)[0])  # the user's own switch
    state, _ = train.fit(variables["params"], loss,
                         train.make_optimizer(config, steps), dataset.x_train, dataset.y_train,
                         config=config, seed=0,
                         extra={k: v for k, v in variables.items() if k != "params"})
    return {"params": state.params, **state.extra}


def _fit_nnx(model: nnx.Module, dataset) -> nnx.Module:
    """Trains an nnx model as its user would: its own loop, the same 6 epochs of Adam 1e-3."""
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
        optimizer.update(model, nnx.grad(loss)(model))

    model.train()
    rng = np.random.default_rng(0)
    for _ in range(6):
        shuffled = rng.permutation(len(dataset.x_train))
        for start in range(0, len(shuffled) - 99, 100):
            batch = shuffled[start:start + 100]
            step(model, optimizer, dataset.x_train[batch], dataset.y_train[batch])
    model.eval()
    return model


def markdown(rows: list[dict], commands: list[str], recipe: str) -> str:
    lines = [f"# Users' models through ucpjax.compress ({recipe} recipe)", "",
             "| model | what it has | outcome | dense | JAX final | .tflite | drop (points) "
             "| agreement | max logit error (steps) | preflight: TFLite ops QAT does not model |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["outcome"] != "passed":
            lines.append(f"| {r['model']} | {r['about']} | {r['outcome']} | | | | | | | |")
            continue
        ops = "not needed" if r["preflight_ops"] is None else ", ".join(r["preflight_ops"])
        drop = 100 * (r["dense_accuracy"] - r["tflite_accuracy"])
        lines.append(f"| {r['model']} | {r['about']} | passed | {r['dense_accuracy']:.3f} "
                     f"| {r['jax_accuracy']:.3f} | {r['tflite_accuracy']:.3f} | {drop:.1f} "
                     f"| {r['tflite_agreement']:.4f} | {r['tflite_max_logit_error_steps']:.0f} "
                     f"| {ops} |")
    lines += ["", *(f"Command: `{c}`" for c in commands), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default="", help="comma-separated models (default: all)")
    parser.add_argument("--recipe", choices=("smoke", "default"), default="smoke",
                        help="the smoke recipe (seconds) or the default one (minutes)")
    parser.add_argument("--sparsity", type=float, default=None,
                        help="prune.target_sparsity (default: the recipe's)")
    args = parser.parse_args()
    only = [m for m in args.only.split(",") if m]
    unknown = sorted(set(only) - set(MODELS))
    if unknown:
        parser.error(f"--only {','.join(unknown)}: no such model; the models are "
                     f"{', '.join(MODELS)}")
    dataset = data.load("mnist").take(8000, 1000)
    recipe = Experiment().recipe
    recipe = experiment.smoke(Experiment()).recipe if args.recipe == "smoke" else recipe
    label = args.recipe
    if args.sparsity is not None:
        recipe = dataclasses.replace(recipe, prune=dataclasses.replace(
            recipe.prune, target_sparsity=args.sparsity))
        label += f"_s{args.sparsity:g}"
    stem = "user_models" + ("" if label == "smoke" else f"_{label}")
    command = "python scripts/check_user_models.py" + (
        "" if args.recipe == "smoke" else f" --recipe {args.recipe}") + (
        "" if args.sparsity is None else f" --sparsity {args.sparsity:g}") + (
        f" --only {args.only}" if only else "")
    folder = RunFolder(ROOT / "results")
    earlier = folder.read_json(f"{stem}.json") or {}
    commands = bench.commands_with(earlier, command)
    rows = {r["model"]: r for r in earlier.get("rows", [])}
    for name in only or MODELS:
        rows[name] = run_model(name, dataset, recipe)
        ordered = [rows[m] for m in MODELS if m in rows]
        folder.write_json(f"{stem}.json", {"commands": commands, "rows": ordered})
        folder.write_bytes(f"{stem}.md", markdown(ordered, commands, label).encode())
    print(markdown([rows[m] for m in MODELS if m in rows], commands, label))


if __name__ == "__main__":
    main()
