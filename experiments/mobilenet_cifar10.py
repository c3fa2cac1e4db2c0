"""CIFAR-10 with a depthwise-separable net (``mobilenet_cifar``, 0.14M parameters).

    .venv/bin/ucpjax compress --config experiments/mobilenet_cifar10.py --out runs/mobilenet
    .venv/bin/ucpjax compress --config experiments/mobilenet_cifar10.py --out runs/m --smoke

Dense training: SGD + Nesterov, cosine decay, weight decay and random
crops/flips, 20 epochs of 64 images (``scripts/train_baselines.py``, which
writes runs/baselines/mobilenet_cifar for ``init_from``): 82.95% test on an
Intel Xeon with 2 cores (42 minutes; 83.20-83.62% on other machines and code).
XLA's own depthwise conv is ~15x slower than ``ucpjax.conv``'s on CPU, so this
model is only practical to train with ``ucpjax.train``.

The recipe (17 epochs of stages; 57 minutes on 2 cores shared with a second run): 75% sparsity
shared by the ERK rule, which keeps the 9-weight depthwise kernels denser (and
at least 2 non-zeros per channel), 8 + 4 epochs of pruning, 2 of distillation,
16 values per layer with 2 epochs of centroid fine-tuning, 1 of QAT, the
clustered convs on the layer grid (``ucpjax.int8_grid``). From the 82.95% model:
``.tflite`` 82.70% (-0.25 points) at 10.07x zipped, 14.2x packed (one seed;
RESULTS.md, "One book of int8 codes per conv layer").
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


def _sgd(epochs: float, learning_rate: float) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=64, learning_rate=learning_rate, **_SGD)


def _adam(epochs: float, learning_rate: float) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=64, learning_rate=learning_rate,
                       augment="crop_flip")


def get_config(smoke: bool = False) -> Experiment:
    config = Experiment(
        model="mobilenet_cifar",
        data="cifar10",
        # Same as mobilenet_cifar in scripts/train_baselines.py (keep in sync).
        dense=TrainConfig(epochs=20, batch_size=64, learning_rate=0.05, **_SGD),
        # As experiments/cifar10.py: BatchNorm stays live until QAT, so prune and
        # distill fine-tune with SGD; centroids and the folded QAT weights take
        # small Adam steps.
        recipe=Recipe(
            prune=PruneConfig(target_sparsity=0.75, frequency=100,
                              train=_sgd(8, 0.01), fine_tune=_sgd(4, 0.005)),
            distill=DistillConfig(train=_sgd(2, 0.002)),
            cluster=ClusterConfig(num_clusters=16, init="linear", fine_tune=_adam(2, 2e-5)),
            quantize=QuantizeConfig(train=_adam(1, 1e-5)),
        ),
    )
    return experiment.smoke(config) if smoke else config
