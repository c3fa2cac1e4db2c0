"""The pruning criterion's input scales, and pruning by them."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ucpjax import prune, saliency


class _Net(nn.Module):
    """A conv, a grouped conv (2 groups), a depthwise conv, a Dense called twice."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), name="conv")(x)
        x = nn.Conv(6, (1, 1), feature_group_count=2, name="grouped")(x)
        x = nn.Conv(6, (3, 3), feature_group_count=6, name="depthwise")(x)
        x = x.reshape(x.shape[0], -1)
        dense = nn.Dense(x.shape[-1], name="twice")
        return dense(dense(x))


def _inputs_of(module, variables, x):
    """Each layer's inputs, recorded by hand (one list per layer)."""
    seen = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, (nn.Dense, nn.Conv)):
            seen.setdefault(context.module.name, []).append(np.asarray(args[0]))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        module.apply(variables, x)
    return seen


def test_input_scales_are_the_rms_of_what_each_weight_multiplies():
    module = _Net()
    x = np.array(jax.random.normal(jax.random.key(0), (10, 5, 5, 3)))
    x[..., 1] = 0.0  # a dead input channel
    params = module.init(jax.random.key(1), x)["params"]
    apply_fn = lambda p, x: module.apply({"params": p}, x)  # noqa: E731
    scales = saliency.input_scales(apply_fn, params, x, batch_size=4)  # batches pool exactly
    seen = _inputs_of(module, {"params": params}, x)
    rms = {name: np.sqrt(np.mean(np.concatenate([a.reshape(-1, a.shape[-1]) for a in calls])
                                 ** 2, axis=0)) for name, calls in seen.items()}

    conv = scales["conv"]["kernel"]
    assert conv.shape == (1, 1, 3, 4) and scales["conv"]["bias"] is None
    np.testing.assert_allclose(conv[0, 0, :, 0], rms["conv"], rtol=1e-5)
    assert np.all(conv[0, 0, 1] == 0)
    # Grouped: outputs 0-2 read input channels 0-1, outputs 3-5 channels 2-3.
    grouped = scales["grouped"]["kernel"][0, 0]
    assert grouped.shape == (2, 6)
    np.testing.assert_allclose(grouped[:, 0], rms["grouped"][:2], rtol=1e-5)
    np.testing.assert_allclose(grouped[:, 5], rms["grouped"][2:], rtol=1e-5)
    # Depthwise: output channel c reads input channel c alone.
    np.testing.assert_allclose(scales["depthwise"]["kernel"][0, 0, 0], rms["depthwise"],
                               rtol=1e-5)
    # A layer called twice: both calls' inputs pooled.
    np.testing.assert_allclose(scales["twice"]["kernel"][:, 0], rms["twice"], rtol=1e-5)
    for name in ("conv", "grouped", "depthwise", "twice"):
        assert np.broadcast_shapes(scales[name]["kernel"].shape,
                                   params[name]["kernel"].shape) == params[name]["kernel"].shape


def test_a_large_weight_on_a_dead_input_goes_first():
    w = jnp.array([[5.0, 4.0], [1.0, 2.0], [0.5, 3.0]])  # (in, out); input 0 is always zero
    scale = jnp.array([[0.0], [1.0], [1.0]])
    by_magnitude = np.asarray(prune.prune_once(w, 0.5))
    by_activation = np.asarray(prune.prune_once(w, 0.5, scale=scale))
    np.testing.assert_array_equal(by_magnitude != 0, [[1, 1], [0, 0], [0, 1]])
    np.testing.assert_array_equal(by_activation != 0, [[0, 0], [1, 1], [0, 1]])
    # The optimizer transform ranks the same way.
    params = {"k": w}
    tx = prune.magnitude_pruning({"k": 0.5}, begin_step=0, end_step=0, scales={"k": scale})
    updates, _ = tx.update({"k": jnp.zeros_like(w)}, tx.init(params), params)
    np.testing.assert_array_equal(np.asarray(w + updates["k"]) != 0, by_activation != 0)


def test_the_prune_stage_leaves_no_weight_on_a_dead_pixel(mnist_5k):
    from ucpjax import models, train
    model = models.create("lenet300")
    params = models.init(model, (28, 28, 1))["params"]
    apply_fn = train.inference_fn(model, {})
    dead = np.all(mnist_5k.x_train[:saliency.SAMPLES] == mnist_5k.x_train[0], axis=0).ravel()
    assert dead.sum() > 50  # MNIST's border
    kept = {}
    for criterion in ("magnitude", "activation"):
        config = prune.PruneConfig(target_sparsity=0.9, scope="layer", criterion=criterion,
                                   train=train.TrainConfig(epochs=0.25, batch_size=128),
                                   fine_tune=None)
        pruned, report = prune.prune(params, config, apply_fn=apply_fn, data=mnist_5k, seed=0)
        assert report["prune/sparsity"] == pytest.approx(0.9, abs=1e-3)
        kept[criterion] = np.asarray(pruned["Dense_0"]["kernel"])[dead] != 0
    assert kept["magnitude"].sum() > 100  # at random init, magnitude alone keeps many
    assert kept["activation"].sum() == 0


def test_the_cluster_stage_weighs_errors_by_the_input(mnist_5k, lenet300_trained):
    from ucpjax import cluster
    apply_fn, params = lenet300_trained
    params = {**params, "Dense_0": {**params["Dense_0"], "kernel": prune.prune_once(
        params["Dense_0"]["kernel"], 0.9)}}
    scale = saliency.input_scales(apply_fn, params, mnist_5k.x_train[:saliency.SAMPLES])
    weight = np.square(np.broadcast_to(scale["Dense_0"]["kernel"], (784, 300)))
    before = np.asarray(params["Dense_0"]["kernel"])
    errors = {}
    for criterion in ("magnitude", "activation"):
        config = cluster.ClusterConfig(num_clusters=4, criterion=criterion, fine_tune=None)
        shared, report = cluster.cluster(params, config, apply_fn=apply_fn, data=mnist_5k,
                                         seed=0)
        after = np.asarray(shared["Dense_0"]["kernel"])
        assert report["cluster/Dense_0/kernel/distinct"] == 4
        assert np.array_equal(after == 0, before == 0)
        errors[criterion] = (np.sum((after - before) ** 2),
                             np.sum(weight * (after - before) ** 2))
    # Each k-means is better on its own objective: the weights' error, or the output's.
    assert errors["magnitude"][0] < errors["activation"][0]
    assert errors["activation"][1] < errors["magnitude"][1]
