"""CIFAR-10 with MLPerf Tiny's ResNet-8 (``resnet8``, 78K parameters), the full pipeline.

    .venv/bin/ucpjax compress --config experiments/resnet8_cifar10.py --out runs/resnet8
    .venv/bin/ucpjax compress --config experiments/resnet8_cifar10.py --out runs/r8 --smoke

The MLPerf Tiny reference trains 500 epochs with Adam; here the dense model gets
SGD + Nesterov, cosine decay, weight decay and random crops/flips for 30 epochs
of 64 images: 82.01% test (2026-12-03, `scripts/train_baselines.py --only
resnet8`, 2 h on 2 CPU cores shared with other jobs; the benchmark's 85% needs
a longer schedule than fits here). To reuse the model of
scripts/train_baselines.py add ``init_from=runs/baselines/resnet8``. The
compression recipe mirrors experiments/cifar10.py: 9 epochs in all (prune 4 + 2,
distill 1, cluster 1, quantize 1; 2026-12-03: .tflite 79.95% at 35,271 B zipped,
RESULTS.md). Sparsity 70% shared
by the ERK rule and 16 values per layer aim at the conv-nets issue's 40 KB zipped
(the dense int8 .tflite is 92 KB). The benchmark's accuracy target is 85%.
On one H200 (2026-12-04, RESULTS.md) the same flags gave 84.10% dense in 150
epochs (177 s) and 84.86% in 240 epochs of 128 at learning rate 0.1; with the
stages 5x longer the 150-epoch model's .tflite scored 82.95% at 35,698 B zipped.
Those 240 epochs with weight decay on the kernels only (``--weight-decay-on
kernels``, 2 CPU cores, 2026-12-07): 85.28% dense, and with the stages 5x longer
(the SGD stages' decay on the kernels too) the .tflite scored 83.87% at 29,666 B
zipped, and with ``prune.target_sparsity=0.6`` 84.46% at 34,774 B (RESULTS.md).
At 60% without the distill stage (``stages=[prune,cluster,quantize]``), with
``cluster.num_clusters=24 cluster.fine_tune.learning_rate=1e-3
quantize.train.learning_rate=1e-4``: 84.94% at 39,035 B (session 33), 0.06 points
short of the benchmark's 85%; not clustered, 85.10% at 48,025 B.
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
        model="resnet8",
        data="cifar10",
        # Same as resnet8 in scripts/train_baselines.py (keep in sync).
        dense=TrainConfig(epochs=30, batch_size=64, learning_rate=0.05, **_SGD),
        # As experiments/cifar10.py: BatchNorm stays live until QAT, so prune and
        # distill fine-tune with SGD; centroids and the folded QAT weights take
        # small Adam steps.
        recipe=Recipe(
            prune=PruneConfig(target_sparsity=0.7, frequency=100,
                              train=_sgd(4, 0.01), fine_tune=_sgd(2, 0.005)),
            distill=DistillConfig(train=_sgd(1, 0.002)),
            cluster=ClusterConfig(num_clusters=16, init="linear", fine_tune=_adam(1, 2e-5)),
            quantize=QuantizeConfig(train=_adam(1, 1e-5)),
        ),
    )
    return experiment.smoke(config) if smoke else config
