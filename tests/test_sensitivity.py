"""Tests of ucpjax.sensitivity: each layer's cost alone, and rules within a budget."""

import jax
import numpy as np
import pytest

from ucpjax import cluster, data, models, prune, saliency, sensitivity, train
from ucpjax.train import TrainConfig


@pytest.fixture(scope="module")
def trained():
    mnist = data.load("mnist").take(2048, 512)
    model = models.create("lenet300")
    params = models.init(model, mnist.input_shape)["params"]
    config = TrainConfig(epochs=1, batch_size=128)
    state, _ = train.fit(params, train.classification_loss(model),
                         train.make_optimizer(config, 16), mnist.x_train, mnist.y_train,
                         config=config, seed=0)
    return state.params, train.inference_fn(model, {}), mnist


def test_drops_are_the_accuracy_lost_by_one_layer_alone(trained):
    params, apply_fn, mnist = trained
    table = sensitivity.measure(params, apply_fn=apply_fn, data=mnist,
                                sparsities=(0.5, 0.99), clusters=(2, 32))
    base = train.accuracy(apply_fn, params, mnist.x_val, mnist.y_val)
    assert table["val_accuracy"] == base > 0.5
    assert list(table["layers"]) == ["Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"]
    alone = {**params, "Dense_2": {**params["Dense_2"],
                                   "kernel": prune.prune_once(params["Dense_2"]["kernel"], 0.99)}}
    expected = 100 * (base - train.accuracy(apply_fn, alone, mnist.x_val, mnist.y_val))
    assert table["layers"]["Dense_2/kernel"]["prune"]["0.99"] == pytest.approx(expected)
    shared = cluster.share_leaf(np.asarray(params["Dense_2"]["kernel"]), 2,
                                cluster.ClusterConfig(num_clusters=32, fine_tune=None),
                                jax.random.fold_in(jax.random.key(0), 5))[0]
    assert len(np.unique(shared)) == 2
    # Pruning the 1,000-weight output layer to 1% hurts more than halving it.
    entry = table["layers"]["Dense_2/kernel"]
    assert entry["prune"]["0.99"] > entry["prune"]["0.5"] and entry["size"] == 1000


def test_the_activation_criterion_prunes_as_the_prune_stage_would(trained):
    params, apply_fn, mnist = trained
    table = sensitivity.measure(params, apply_fn=apply_fn, data=mnist, sparsities=(0.95,),
                                clusters=(), criterion="activation")
    assert table["criterion"] == "activation"
    scale = saliency.input_scales(apply_fn, params, mnist.x_train[:saliency.SAMPLES])
    kernel = params["Dense_0"]["kernel"]
    alone = {**params, "Dense_0": {**params["Dense_0"], "kernel": prune.prune_once(
        kernel, 0.95, scale=scale["Dense_0"]["kernel"])}}
    assert not np.array_equal(alone["Dense_0"]["kernel"] != 0,
                              np.asarray(prune.prune_once(kernel, 0.95)) != 0)
    base = train.accuracy(apply_fn, params, mnist.x_val, mnist.y_val)
    expected = 100 * (base - train.accuracy(apply_fn, alone, mnist.x_val, mnist.y_val))
    assert table["layers"]["Dense_0/kernel"]["prune"]["0.95"] == pytest.approx(expected)
    assert "Dense_2/kernel" in sensitivity.markdown(table)


def test_allocation_stops_at_the_first_drop_over_each_layers_share():
    table = {"val_accuracy": 0.98, "layers": {
        "a/kernel": {"size": 100, "prune": {"0.5": 0.1, "0.9": 0.8, "0.95": 0.2},
                     "cluster": {"4": 3.0, "8": 0.2, "16": 0.0}},
        "b/kernel": {"size": 10, "prune": {"0.5": 2.0, "0.9": 5.0},
                     "cluster": {"4": 2.0, "8": 2.0}}}}
    a, b = sensitivity.allocate(table, max_drop=1.0)  # 0.5 points per layer
    assert (a.pattern, a.sparsity, a.clusters) == ("^a/kernel$", 0.5, 8)  # 0.95 is noise
    assert (b.sparsity, b.clusters) == (0.0, 8)  # nothing fits: dense, largest k
