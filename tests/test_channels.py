"""Structured pruning: channel groups, gradual group masks, and the slimmed model."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ucpjax
from ucpjax import channels, models, prune, train
from ucpjax.export import ExportConfig
from ucpjax.prune import PruneConfig
from ucpjax.quantize import QuantizeConfig
from ucpjax.recipe import Recipe

_SHAPES = {"resnet8": (32, 32, 3), "mobilenet_cifar": (32, 32, 3), "lenet300": (28, 28, 1),
           "depthwise_cnn": (28, 28, 1), "lenet5": (28, 28, 1)}


def _model(name, **kwargs):
    module = models.DepthwiseCnn(**kwargs) if name == "depthwise_cnn" else models.create(name)
    variables = models.init(module, _SHAPES[name], 0)
    # Non-zero biases and running means, so a slice left behind would show.
    variables = jax.tree.map(lambda w: w + 0.1 if w.ndim == 1 else w, variables)
    extra = {k: v for k, v in variables.items() if k != "params"}
    groups = channels.find_groups(train.inference_fn(module, extra), variables["params"],
                                  _SHAPES[name])
    return module, variables, groups


def _group(groups, path, axis=-1):
    """The group of each index of the leaf ``path`` along ``axis``."""
    (found,) = [s.group for s in groups.slices if s.path == path and s.axis == axis]
    return found


def test_channels_tied_by_a_residual_add_form_one_group():
    _, _, groups = _model("resnet8")
    stem, block1_out = _group(groups, ("Conv_0", "kernel")), _group(groups, ("Conv_2", "kernel"))
    np.testing.assert_array_equal(stem, block1_out)  # x + y: channel c of both goes together
    np.testing.assert_array_equal(_group(groups, ("Conv_4", "kernel")),
                                  _group(groups, ("Conv_5", "kernel")))  # and the shortcut
    inner = _group(groups, ("Conv_1", "kernel"))
    assert not set(inner) & set(stem)  # the residual path's inner conv is free
    # The stem's channels are also the next block's input rows and its BatchNorm's.
    np.testing.assert_array_equal(_group(groups, ("Conv_1", "kernel"), axis=-2), stem)
    assert sorted(len(f) for f in groups.families()) == [16, 16, 32, 32, 64, 64]
    # The dense classifier's outputs reach the logits: never removable.
    assert not any(s.path == ("Dense_0", "kernel") and s.axis == -1 for s in groups.slices)


def test_depthwise_and_flatten_slices_follow_their_channel():
    _, _, groups = _model("depthwise_cnn", pool="flatten")
    first = _group(groups, ("Conv_0", "kernel"))
    np.testing.assert_array_equal(_group(groups, ("Conv_1", "kernel")), first)  # depthwise
    pointwise = _group(groups, ("Conv_2", "kernel"))
    rows = _group(groups, ("Dense_0", "kernel"), axis=-2)  # flatten of 7x7x64
    assert len(rows) == 7 * 7 * 64
    np.testing.assert_array_equal(rows, np.tile(pointwise, 49))


@pytest.mark.parametrize("name", ["lenet300", "depthwise_cnn", "resnet8"])
def test_slimmed_model_computes_the_masked_models_logits(name):
    module, variables, groups = _model(name)
    rng = np.random.default_rng(0)
    alive = np.ones(groups.count, bool)
    for family in groups.families():
        alive[rng.choice(family, len(family) // 2, replace=False)] = False
    masks = channels.group_masks(variables["params"], groups, jnp.asarray(alive))
    masked = {**variables, "params": jax.tree.map(lambda w, m: jnp.where(m, w, 0.0),
                                                  variables["params"], masks)}
    if "batch_stats" in masked:  # settled statistics of a zero channel: mean 0
        means = channels.group_masks(masked["batch_stats"], groups, jnp.asarray(alive),
                                     "batch_stats")
        masked["batch_stats"] = jax.tree.map(lambda w, m: jnp.where(m, w, 0.0),
                                             masked["batch_stats"], means)
    removed = channels.removed_groups(masked, groups)
    np.testing.assert_array_equal(removed, ~alive)
    slim = channels.shrink(masked, groups, removed)
    size = lambda v: sum(w.size for w in jax.tree.leaves(v["params"]))  # noqa: E731
    assert size(slim) < 0.6 * size(variables)
    x = jax.random.normal(jax.random.key(1), (4, *_SHAPES[name]))
    np.testing.assert_allclose(channels.Slimmed(module).apply(slim, x, train=False),
                               module.apply(masked, x, train=False), rtol=1e-5, atol=1e-5)


def test_channel_pruning_removes_the_scheduled_share_of_each_family():
    module, variables, groups = _model("lenet300")
    params = variables["params"]
    tx = optax.chain(optax.sgd(0.1), channels.channel_pruning(
        groups, lambda step: jnp.where(step >= 4, 0.5, 0.25), begin_step=0, end_step=4,
        frequency=2))
    state = tx.init(params)
    update = jax.jit(tx.update)
    x = jax.random.normal(jax.random.key(0), (16, 28, 28, 1))
    grad_fn = jax.jit(jax.grad(lambda p: jnp.mean(module.apply({"params": p}, x) ** 2)))
    for _ in range(6):
        updates, state = update(grad_fn(params), state, params)
        params = optax.apply_updates(params, updates)
    alive = np.asarray(state[-1].alive)
    assert update._cache_size() == 1
    for family in groups.families():
        assert (~alive[family]).sum() == len(family) // 2
    np.testing.assert_array_equal(channels.removed_groups({"params": params}, groups), ~alive)
    # A dead group's every entry is zero, its next layer's rows included.
    dead = ~alive[_group(groups, ("Dense_0", "kernel"))]
    assert dead.sum() == 150
    assert not np.asarray(params["Dense_0"]["kernel"])[:, dead].any()
    assert not np.asarray(params["Dense_1"]["kernel"])[dead].any()


def test_channel_pruned_model_exports_a_smaller_tflite(mnist_small):
    module, variables, _ = _model("depthwise_cnn")
    budget = train.TrainConfig(epochs=1, batch_size=64, learning_rate=1e-3)
    recipe = Recipe(
        stages=("prune", "quantize"),
        prune=PruneConfig(target_sparsity=0.5, channel_sparsity=0.5, frequency=5,
                          train=budget, fine_tune=None),
        quantize=QuantizeConfig(train=dataclasses.replace(budget, epochs=0.3,
                                                          learning_rate=1e-4)),
        export=ExportConfig(accuracy_tolerance=0.004))
    result = ucpjax.compress(module, variables, train=(mnist_small.x_train, mnist_small.y_train),
                             test=(mnist_small.x_test, mnist_small.y_test), recipe=recipe,
                             check=False)  # untrained, so at chance: the asserts below check
    final = result.report["final"]
    # 32 / 64 / 64 channels: half of each family goes (the last Dense is the classifier).
    assert final["channel_groups_removed"] == 16 + 32 + 32
    kernels = {k: v["kernel"].shape for k, v in result.variables["params"].items()
               if "kernel" in v}
    assert kernels["Conv_0"] == (3, 3, 1, 16) and kernels["Conv_1"] == (3, 3, 1, 16)
    assert kernels["Conv_2"] == (1, 1, 16, 32) and kernels["Dense_0"] == (32, 32)
    assert final["macs_slimmed"] < 0.5 * final["macs_dense"]
    # The .tflite holds exactly these (smaller) weights, and agrees with the JAX model,
    # which the pipeline has checked against the masked model's logits.
    assert final["weights_faithful"] and final["tflite_agreement"] >= 0.97
    x = mnist_small.x_test[:8]
    logits = result.module.apply(result.variables, x, train=False)
    assert logits.shape == (8, 10)


def test_prune_refuses_channel_pruning_of_weight_shared_layers(mnist_small):
    module, variables, _ = _model("lenet300")
    params = dict(variables["params"])
    codes = np.arange(300 * 100) % 4
    params["Dense_1"] = {**params["Dense_1"],
                         "kernel": jnp.asarray(np.float32([0.1, 0.2, 0.3, 0.4])[codes]
                                               .reshape(300, 100))}
    from ucpjax.config import ConfigError
    with pytest.raises(ConfigError, match="channel_sparsity"):
        prune.prune(params, PruneConfig(channel_sparsity=0.5), apply_fn=train.inference_fn(
            module, {}), data=mnist_small, seed=0)


class _BareNorm(nn.Module):
    """Conv + a BatchNorm with its optional scale and offset switched off."""

    scale: bool

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(16, (3, 3), strides=2, use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, use_scale=self.scale, use_bias=False)(x)
        return nn.Dense(10)(nn.relu(x).reshape((x.shape[0], -1)))


@pytest.mark.parametrize("scale", [True, False], ids=["no offset", "no scale or offset"])
def test_batchnorm_without_optional_params_is_cut_and_folded(mnist_small, scale):
    """A param-less BatchNorm still has statistics to cut, and a scale-only one is
    left with no trainable params once its scale is frozen by the fold."""
    small = mnist_small.take(1000, 200)
    module = _BareNorm(scale)
    variables = dict(module.init(jax.random.key(0), small.x_train[:1]))
    budget = train.TrainConfig(epochs=1, batch_size=50, learning_rate=1e-3)
    recipe = Recipe(stages=("prune", "quantize"),
                    prune=PruneConfig(target_sparsity=0.5, channel_sparsity=0.25, frequency=5,
                                      train=budget, fine_tune=None),
                    quantize=QuantizeConfig(train=dataclasses.replace(budget, epochs=0.2)),
                    export=ExportConfig(latency_repeats=1))
    result = ucpjax.compress(module, variables, train=(small.x_train, small.y_train),
                             test=(small.x_test, small.y_test), recipe=recipe, check=False,
                             log=lambda _: None)
    final = result.report["final"]
    assert final["channel_groups_removed"] == 4
    assert result.variables["batch_stats"]["BatchNorm_0"]["mean"].shape == (12,)
    assert final["weights_faithful"] and final["tflite_agreement"] >= 0.97
