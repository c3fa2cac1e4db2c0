"""LeNet-5 (Caffe variant, 431,080 parameters) on MNIST, the full pipeline.

    .venv/bin/ucpjax compress --config experiments/lenet5_mnist.py --out runs/lenet5
    .venv/bin/ucpjax compress --config experiments/lenet5_mnist.py --out runs/l5 --smoke

Target (issue): test error at most 0.8% with packed compression at least 39x
(Deep Compression: 0.74% at 39x).
"""

from ucpjax import experiment
from ucpjax.cluster import ClusterConfig
from ucpjax.distill import DistillConfig
from ucpjax.experiment import Experiment
from ucpjax.prune import PruneConfig
from ucpjax.quantize import QuantizeConfig
from ucpjax.recipe import Recipe
from ucpjax.train import TrainConfig


def _budget(epochs: float, learning_rate: float) -> TrainConfig:
    return TrainConfig(epochs=epochs, learning_rate=learning_rate, augment="shift")


def get_config(smoke: bool = False) -> Experiment:
    config = Experiment(
        model="lenet5",
        data="mnist",
        # The recipe of scripts/train_baselines.py: add init_from=runs/baselines/lenet5
        # to start from that model instead of training the same one again.
        dense=_budget(15, 1e-3),
        recipe=Recipe(
            prune=PruneConfig(target_sparsity=0.93, scope="global", frequency=100,
                              min_per_channel=0,  # as published: before the floor
                              train=_budget(8, 1e-3), fine_tune=_budget(2, 1e-4)),
            distill=DistillConfig(train=_budget(5, 1e-3)),
            cluster=ClusterConfig(num_clusters=16, init="linear", fine_tune=_budget(2, 1e-4)),
            quantize=QuantizeConfig(train=_budget(1, 2e-5)),
        ),
    )
    return experiment.smoke(config) if smoke else config
