"""LeNet-300-100 on MNIST, the full pipeline: the README's main job.

    .venv/bin/ucpjax compress --config experiments/lenet300_mnist.py --out runs/lenet300
    .venv/bin/ucpjax compress --config experiments/lenet300_mnist.py --out runs/smoke --smoke

Budget: under 10 minutes on 2 CPU cores. Pruning to 96% is global (one magnitude
threshold), so the 784x300 input layer, whose border pixels carry nothing,
gives up most of its weights while the small layers keep more.
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
    # Random 2-pixel shifts: the MLP sees each digit in new places every epoch.
    return TrainConfig(epochs=epochs, learning_rate=learning_rate, augment="shift")


def get_config(smoke: bool = False) -> Experiment:
    """The experiment; ``smoke`` shrinks it to a seconds-long run on a data slice."""
    config = Experiment(
        model="lenet300",
        data="mnist",
        dense=_budget(30, 1e-3),
        recipe=Recipe(
            prune=PruneConfig(target_sparsity=0.96, scope="global", frequency=100,
                              end=0.7, min_per_channel=0,  # as published: before the floor
                              train=_budget(20, 1e-3), fine_tune=_budget(5, 1e-4)),
            distill=DistillConfig(temperature=4.0, alpha=0.9, train=_budget(15, 1e-3)),
            cluster=ClusterConfig(num_clusters=16, init="linear", fine_tune=_budget(4, 1e-4)),
            quantize=QuantizeConfig(train=_budget(2, 2e-5)),
        ),
    )
    return experiment.smoke(config) if smoke else config
