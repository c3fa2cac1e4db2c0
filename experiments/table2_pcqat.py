"""Table 2: TensorFlow's PCQAT tutorial model on MNIST through ucpjax.

    .venv/bin/ucpjax compress --config experiments/table2_pcqat.py --out runs/table2
    .venv/bin/ucpjax compress --config experiments/table2_pcqat.py --out runs/t2 --smoke

Conv 12@3x3 -> max-pool -> dense 10 (20,410 parameters). TensorFlow's own
PCQAT on the same model and data is scripts/bench_baselines.py.
"""

from ucpjax import experiment
from ucpjax.cluster import ClusterConfig
from ucpjax.distill import DistillConfig
from ucpjax.experiment import Experiment
from ucpjax.prune import PruneConfig
from ucpjax.quantize import QuantizeConfig
from ucpjax.recipe import Recipe
from ucpjax.train import TrainConfig


def get_config(smoke: bool = False) -> Experiment:
    config = Experiment(
        model="pcqat_mnist",
        data="mnist",
        dense=TrainConfig(epochs=10, learning_rate=2e-3),
        recipe=Recipe(
            prune=PruneConfig(target_sparsity=0.9, scope="global", frequency=100,
                              min_per_channel=0,  # as published: before the floor
                              train=TrainConfig(epochs=6, learning_rate=1e-3),
                              fine_tune=TrainConfig(epochs=2, learning_rate=2e-4)),
            distill=DistillConfig(train=TrainConfig(epochs=4, learning_rate=5e-4)),
            cluster=ClusterConfig(num_clusters=16, init="linear",
                                  fine_tune=TrainConfig(epochs=2, learning_rate=2e-4)),
            quantize=QuantizeConfig(train=TrainConfig(epochs=2, learning_rate=5e-5)),
        ),
    )
    return experiment.smoke(config) if smoke else config
