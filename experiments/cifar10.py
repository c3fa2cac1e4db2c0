"""CIFAR-10 (JPEG copy in ../shared/data) with ``cifar_cnn``, the full pipeline.

    .venv/bin/ucpjax compress --config experiments/cifar10.py --out runs/cifar10
    .venv/bin/ucpjax compress --config experiments/cifar10.py --out runs/c --smoke

The dense model is trained with SGD + Nesterov, cosine decay, weight decay and
random crops/flips (24 epochs of 48 images, about 70 minutes on 2 CPU cores); to reuse the
model of scripts/train_baselines.py add ``init_from=runs/baselines/cifar_cnn``.
The compression stages get 9 epochs in all (prune 4 + 2, distill 1, cluster 1,
quantize 1).
"""

from ucpjax import experiment
from ucpjax.cluster import ClusterConfig
from ucpjax.distill import DistillConfig
from ucpjax.experiment import Experiment
from ucpjax.prune import PruneConfig
from ucpjax.quantize import QuantizeConfig
from ucpjax.recipe import Recipe
from ucpjax.train import TrainConfig

_SGD = {"optimizer": "sgd", "weight_decay": 5e-4, "augment": "crop_flip"}


def _fine_tune(epochs: float, learning_rate: float) -> TrainConfig:
    return TrainConfig(epochs=epochs, learning_rate=learning_rate, augment="crop_flip")


def get_config(smoke: bool = False) -> Experiment:
    config = Experiment(
        model="cifar_cnn",
        data="cifar10",
        # Same as cifar_cnn in scripts/train_baselines.py (keep in sync).
        dense=TrainConfig(epochs=24, batch_size=48, learning_rate=0.05, **_SGD),
        # After BatchNorm is folded into the convolutions nothing renormalises the
        # activations: SGD at 0.02 destroyed the folded net (10% accuracy) in its first
        # steps, so the compression stages fine-tune with Adam at small steps.
        recipe=Recipe(
            prune=PruneConfig(target_sparsity=0.7, scope="global", frequency=100,
                              train=_fine_tune(4, 1e-4), fine_tune=_fine_tune(2, 5e-5)),
            distill=DistillConfig(train=_fine_tune(1, 5e-5)),
            cluster=ClusterConfig(num_clusters=32, init="linear", fine_tune=_fine_tune(1, 2e-5)),
            quantize=QuantizeConfig(train=_fine_tune(1, 1e-5)),
        ),
    )
    return experiment.smoke(config) if smoke else config
