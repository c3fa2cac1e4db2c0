"""Hidden channels reordered for the zip: same logits, same .tflite outputs, fewer bytes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ucpjax import channel_order, channels, cluster, export, measure, models, prune, train
from ucpjax.channels import ChannelGroups, Slice
from ucpjax.cluster import ClusterConfig
from ucpjax.config import ConfigError
from ucpjax.export import ExportConfig
from ucpjax.quantize import QuantizeConfig

_SHAPES = {"resnet8": (32, 32, 3), "mobilenet_cifar": (32, 32, 3), "lenet300": (28, 28, 1),
           "depthwise_cnn": (28, 28, 1)}


def _sparse(variables, seed=0):
    """Half of every kernel zeroed at random and non-zero vectors (biases, BatchNorm),
    so channels differ and a slice left out of the permutation would show."""
    rng = np.random.default_rng(seed)

    def change(w):
        w = np.asarray(w)
        if w.ndim == 1:
            return jnp.asarray(w + rng.uniform(0.05, 0.5, w.shape).astype(w.dtype))
        return jnp.asarray(np.where(rng.random(w.shape) < 0.5, 0.0, w).astype(w.dtype))

    return jax.tree.map(change, variables)


@pytest.mark.parametrize("name,pool", [("lenet300", None), ("depthwise_cnn", "flatten"),
                                       ("depthwise_cnn", "module"), ("resnet8", None),
                                       ("mobilenet_cifar", None)])
def test_reordered_model_computes_the_same_logits(name, pool):
    module = models.DepthwiseCnn(pool=pool) if pool else models.create(name)
    variables = _sparse(models.init(module, _SHAPES[name], 0))
    extra = {k: v for k, v in variables.items() if k != "params"}
    apply_fn = train.inference_fn(module, extra)
    groups = channels.find_groups(apply_fn, variables["params"], _SHAPES[name])
    ordered = channel_order.similar_first(variables, groups)
    x = jax.random.uniform(jax.random.key(1), (8, *_SHAPES[name]))
    reference = module.apply(variables, x, train=False)
    np.testing.assert_allclose(module.apply(ordered, x, train=False), reference, atol=1e-5,
                               rtol=1e-5)
    moved = [a for a, b in zip(jax.tree.leaves(ordered), jax.tree.leaves(variables))
             if not np.array_equal(a, b)]
    assert moved, "no channel moved"
    # A permutation: every leaf keeps its multiset of values.
    for a, b in zip(jax.tree.leaves(ordered), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(np.sort(np.ravel(a)), np.sort(np.ravel(b)))


class _TiedDense(nn.Module):
    """One Dense layer applied twice: its output columns and input rows are tied."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Dense(16)(x.reshape((x.shape[0], -1))))
        shared = nn.Dense(16)
        return nn.Dense(10)(nn.relu(shared(nn.relu(shared(x)))))


def test_a_layer_called_twice_is_reordered_as_one():
    module = _TiedDense()
    variables = _sparse(models.init(module, (28, 28, 1), 0))
    apply_fn = train.inference_fn(module, {})
    groups = channels.find_groups(apply_fn, variables["params"], (28, 28, 1))
    ordered = channel_order.similar_first(variables, groups)
    x = jax.random.uniform(jax.random.key(1), (8, 28, 28, 1))
    np.testing.assert_allclose(module.apply(ordered, x), module.apply(variables, x),
                               atol=1e-5, rtol=1e-5)
    shared = ordered["params"]["Dense_1"]["kernel"]
    assert not np.array_equal(shared, variables["params"]["Dense_1"]["kernel"])


def test_channels_read_alike_end_up_side_by_side():
    # 256 hidden units whose input rows in the next layer each take one of four sparse
    # patterns at random; in chain order each pattern is one block, and the kernels zip
    # smaller.
    rng = np.random.default_rng(0)
    patterns = np.where(rng.random((4, 64)) < 0.8, 0, rng.integers(1, 4, (4, 64)))
    patterns = patterns.astype(np.float32)
    variables = {"params": {"a": {"kernel": jnp.ones((3, 256))},
                            "b": {"kernel": jnp.asarray(patterns[rng.integers(0, 4, 256)])}}}
    group = np.arange(256, dtype=np.int32)
    groups = ChannelGroups(
        slices=(Slice("params", ("a", "kernel"), -1, group, True),
                Slice("params", ("b", "kernel"), -2, group, False)),
        scores=(), family=np.zeros(256, np.int32))
    ordered = channel_order.similar_first(variables, groups)
    rows = np.asarray(ordered["params"]["b"]["kernel"])
    assert np.count_nonzero(np.any(rows[1:] != rows[:-1], axis=1)) == 3
    assert (channel_order.kernel_zip_bytes(ordered["params"])
            < channel_order.kernel_zip_bytes(variables["params"]))


def test_a_family_of_uneven_slices_keeps_its_order():
    variables = {"params": {"a": {"kernel": jnp.arange(12.0).reshape(4, 3)}}}
    # Group 0 holds two rows of the slice, group 1 one: no permutation of groups maps
    # onto a permutation of rows.
    groups = ChannelGroups(slices=(Slice("params", ("a", "kernel"), 0,
                                         np.array([0, 0, 1, -1], np.int32), False),),
                           scores=(), family=np.zeros(2, np.int32))
    ordered = channel_order.similar_first(variables, groups)
    np.testing.assert_array_equal(ordered["params"]["a"]["kernel"],
                                  variables["params"]["a"]["kernel"])


def test_reordered_tflite_zips_smaller_and_outputs_the_same(lenet300_trained, mnist_5k):
    """LeNet-300-100 pruned to 95% and clustered to 4 values, exported in the order the
    model built and in chain order: the same int8 outputs, fewer zipped bytes. (The
    converter calibrates activation ranges on the float model, whose sums in another
    order may move a range by an ulp, and so an output by one step.)"""
    apply_fn, params = lenet300_trained
    config = ClusterConfig(num_clusters=4, init="linear")
    params = {name: {"kernel": jnp.asarray(cluster.share_leaf(
                         np.asarray(prune.prune_once(layer["kernel"], 0.95)), 4, config,
                         jax.random.key(0))[0]), "bias": layer["bias"]}
              for name, layer in params.items()}
    groups = channels.find_groups(apply_fn, params, mnist_5k.input_shape)
    ordered = channel_order.similar_first({"params": params}, groups)["params"]
    files = [export.int8_tflite(apply_fn, p, mnist_5k, config=ExportConfig(),
                                quantize_config=QuantizeConfig()) for p in (params, ordered)]
    x = mnist_5k.x_test[:300]
    before, after = (export.evaluate(f, x, mnist_5k.y_test[:300]) for f in files)
    np.testing.assert_array_equal(after["predictions"], before["predictions"])
    steps = np.abs(after["logits"] - before["logits"]) / before["output_scale"]
    assert steps.max() <= 1.001 and np.mean(steps > 0) < 0.01
    sizes = [measure.zip_bytes(f) for f in files]
    assert sizes[1] < sizes[0], sizes


def test_an_unknown_channel_order_is_refused():
    with pytest.raises(ConfigError, match="channel_order"):
        ExportConfig(channel_order="sorted")
