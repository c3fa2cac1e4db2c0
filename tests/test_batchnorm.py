"""BatchNorm live through prune, distill and cluster; folded at QAT; a user's depthwise CNN."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ucpjax
from ucpjax import batchnorm, cluster, export, models, prune, train
from ucpjax.cluster import ClusterConfig
from ucpjax.config import ConfigError
from ucpjax.export import ExportConfig
from ucpjax.model import Model
from ucpjax.prune import PruneConfig
from ucpjax.quantize import QuantizeConfig
from ucpjax.recipe import Recipe


def _random_stats(variables, key):
    k1, k2 = jax.random.split(key)
    stats = jax.tree.map(lambda a: jax.random.uniform(k1, a.shape, minval=0.5, maxval=2.0),
                         variables["batch_stats"])
    params = jax.tree.map(lambda a: a + 0.2 * jax.random.normal(k2, a.shape),
                          variables["params"])
    return {"params": params, "batch_stats": stats}


def test_population_statistics_average_the_batch_moments():
    class Normed(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.BatchNorm(use_running_average=not train)(x.reshape((x.shape[0], -1)))
            return nn.Dense(3)(x)

    x = np.random.default_rng(0).normal(2.0, 3.0, (2 * batchnorm.CALIBRATION_BATCH, 5))
    x = x.astype(np.float32)
    module = Normed()
    variables = module.init(jax.random.key(0), x[:1])
    stats = batchnorm.population_statistics(module, variables, x)["BatchNorm_0"]
    halves = x.reshape(2, batchnorm.CALIBRATION_BATCH, 5)
    np.testing.assert_allclose(stats["mean"], halves.mean(1).mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats["var"], halves.var(1).mean(0), rtol=1e-4)


def test_fold_after_live_compression_keeps_zeros_and_k_values_per_channel():
    module = models.DepthwiseCnn()
    variables = _random_stats(dict(module.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))),
                              jax.random.key(1))
    k, config = 4, ClusterConfig(num_clusters=4, fine_tune=None)
    params = jax.tree.map(np.asarray, variables["params"])
    for layer in ("Conv_0", "Conv_1", "Conv_2", "Dense_0"):
        pruned = np.asarray(prune.prune_once(params[layer]["kernel"], 0.5, min_per_channel=2))
        params[layer]["kernel"] = cluster.share_leaf(pruned, k, config, jax.random.key(2))[0]
    live = Model(module, {**variables, "params": params})
    folded = live.folded((28, 28, 1))
    x = np.random.default_rng(0).normal(size=(8, 28, 28, 1)).astype(np.float32)
    # The fold is the inference-mode function of the live model ...
    np.testing.assert_allclose(folded.apply_fn()(folded.params, x), live.apply_fn()(params, x),
                               rtol=1e-4, atol=1e-4)
    for layer in ("Conv_0", "Conv_1", "Conv_2", "Dense_0"):
        before = params[layer]["kernel"]
        after = np.asarray(folded.variables["params"][layer]["kernel"])
        # ... whose zeros stay exactly zero, and whose k shared values become at
        # most k values in every output channel.
        np.testing.assert_array_equal(after == 0, before == 0)
        columns = after.reshape(-1, after.shape[-1]).T
        assert max(np.unique(c[c != 0]).size for c in columns) <= k
        assert np.unique(after[after != 0]).size > k  # the channels differ: per-channel books


def _trained(module, data, epochs=12):
    variables = dict(module.init(jax.random.key(0), data.x_train[:1], train=False))
    config = train.TrainConfig(epochs=epochs, batch_size=64, learning_rate=1e-2)
    steps = train.total_steps(config, len(data.x_train))
    state, _ = train.fit(variables["params"], train.classification_loss(module),
                         train.make_optimizer(config, steps), data.x_train, data.y_train,
                         config=config, seed=0, extra={"batch_stats": variables["batch_stats"]})
    # Moving averages lag far behind 375 steps of fast training: re-estimate them.
    return Model(module, {"params": state.params, **state.extra}).settled(data.x_train).variables


def _recipe():
    """The default stage settings (``erk`` scope, a floor of 2 per channel, Adam)
    on a budget that fits a test."""
    budget = train.TrainConfig(epochs=1, batch_size=64, learning_rate=1e-3)
    return Recipe(
        stages=("prune", "cluster", "quantize"),
        prune=PruneConfig(target_sparsity=0.75, frequency=10, train=dataclasses.replace(
            budget, epochs=3), fine_tune=dataclasses.replace(budget, learning_rate=1e-4)),
        cluster=ClusterConfig(num_clusters=8, fine_tune=budget),
        quantize=QuantizeConfig(train=train.TrainConfig(epochs=0.5, batch_size=64,
                                                        learning_rate=1e-4)),
        # 500 test images: one image is 0.002, so allow 2 between .tflite and JAX int8
        # (the argmax agreement check, 0.995, already bounds it there).
        export=ExportConfig(accuracy_tolerance=0.004))


def test_bare_mean_pool_is_refused_before_any_training(mnist_small, tmp_path):
    module = models.DepthwiseCnn(pool="mean")
    variables = dict(module.init(jax.random.key(0), mnist_small.x_train[:1], train=False))
    with pytest.raises(ConfigError) as err:
        ucpjax.compress(module, variables, train=(mnist_small.x_train, mnist_small.y_train),
                        test=(mnist_small.x_test, mnist_small.y_test), recipe=_recipe(),
                        out=tmp_path / "run")
    message = str(err.value)
    assert "\n" not in message and "GlobalAveragePool" in message
    assert not (tmp_path / "run").exists()


def test_depthwise_batchnorm_net_keeps_accuracy_and_k_codes_per_channel(mnist_small):
    module = models.DepthwiseCnn()
    variables = _trained(module, mnist_small)
    dense = train.accuracy(Model(module, variables).apply_fn(), variables["params"],
                           mnist_small.x_test, mnist_small.y_test)
    recipe = _recipe()
    recipe = dataclasses.replace(recipe, quantize=dataclasses.replace(recipe.quantize,
                                                                      bias_bits=8))
    result = ucpjax.compress(module, variables, train=(mnist_small.x_train, mnist_small.y_train),
                             test=(mnist_small.x_test, mnist_small.y_test), recipe=recipe)
    final = result.report["final"]
    assert dense >= 0.8  # a net worth compressing
    # A smoke budget (3 epochs of pruning on 2,000 images; 0.2 points per test
    # image): uniform 75% per layer fell to ~37% here. The drop itself swings with
    # float rounding: two runs differing only in XLA's fusion of the training step
    # lost 5.4 and 9.6 points. scripts/bench_depthwise.py measures the full size.
    assert final["tflite_accuracy"] >= dense - 0.15
    assert final["weights_faithful"] and final["tflite_agreement"] >= 0.97
    assert result.report["stages"]["fold/batchnorm_layers"] == 4
    assert final["tflite_codes_per_channel"] <= 8
    # The 1x1 conv keeps one book of at most k codes (2k with the signs of its
    # BatchNorm factors) for the whole layer in the .tflite. The depthwise conv does
    # where its book reads back from the folded weights; with 2-5 values per channel
    # of k that read-back can fail (int8_grid.layer_grid_book: no channel left meeting
    # two values of the others), and the layer keeps the converter's per-channel
    # books (at most k codes per channel, asserted above).
    stored = export.weights_check(result.tflite, result.variables["params"])
    assert stored["Conv_2/kernel/codes"] <= 16
    assert final["packed_bytes"] <= final["tflite_zip_bytes"]
    depthwise = np.asarray(result.variables["params"]["Conv_1"]["kernel"])  # (3, 3, 1, 32)
    assert np.count_nonzero(depthwise.reshape(-1, 32), axis=0).min() >= 2
    # Short biases: every layer's, the folded BatchNorms' included, is an 8-bit code
    # shifted left in the .tflite's int32 (the layer-grid convs' written by the export).
    assert result.report["stages"]["quantize/short_bias_layers"] == 5
    interp = export.interpreter(result.tflite)
    biases = [interp.get_tensor(d["index"]).astype(np.int64) for d in interp.get_tensor_details()
              if d["dtype"] == np.int32 and len(d["shape"]) == 1 and d["shape"][0] > 4]
    assert len(biases) == 5
    for ints in biases:
        shift = min(int(v & -v).bit_length() - 1 for v in np.abs(ints[ints != 0]))
        assert np.abs(ints >> shift).max() <= 127


def test_clustered_convs_exported_without_qat_go_on_their_layer_grid(mnist_small):
    """Post-training quantization (cluster last): the .tflite holds each clustered
    conv on its layer grid, as the JAX int8 model it is checked against does."""
    module = models.DepthwiseCnn()
    variables = _trained(module, mnist_small, epochs=8)
    result = ucpjax.compress(module, variables, train=(mnist_small.x_train, mnist_small.y_train),
                             test=(mnist_small.x_test, mnist_small.y_test),
                             recipe=dataclasses.replace(_recipe(), stages=("prune", "cluster")),
                             check=False)
    final = result.report["final"]
    assert final["tflite_within_tolerance"] and final["tflite_agreement"] >= 0.97
    stored = export.weights_check(result.tflite, result.variables["params"])
    assert stored["Conv_1/kernel/codes"] <= 16 and stored["Conv_2/kernel/codes"] <= 16
