"""Fashion-MNIST with a small BatchNorm CNN (``fashion_cnn``), the full pipeline.

    .venv/bin/ucpjax compress --config experiments/fashion_mnist.py --out runs/fashion
    .venv/bin/ucpjax compress --config experiments/fashion_mnist.py --out runs/f --smoke

Shows BatchNorm folded before compression (the .tflite must match the JAX model).
Budget: 6 dense + 8 compression epochs.
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
        model="fashion_cnn",
        data="fashion_mnist",
        dense=TrainConfig(epochs=6, learning_rate=1e-3),
        recipe=Recipe(
            prune=PruneConfig(target_sparsity=0.85, scope="global", frequency=100,
                              train=TrainConfig(epochs=3, learning_rate=5e-4),
                              fine_tune=TrainConfig(epochs=1, learning_rate=1e-4)),
            distill=DistillConfig(train=TrainConfig(epochs=2, learning_rate=2e-4)),
            cluster=ClusterConfig(num_clusters=16, init="linear",
                                  fine_tune=TrainConfig(epochs=1, learning_rate=1e-4)),
            quantize=QuantizeConfig(train=TrainConfig(epochs=1, learning_rate=2e-5)),
        ),
    )
    return experiment.smoke(config) if smoke else config
