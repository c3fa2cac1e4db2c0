"""CIFAR-10 with MLPerf Tiny's ResNet-8 (``resnet8``, 78K parameters), the full pipeline.

    .venv/bin/ucpjax compress --config experiments/resnet8_cifar10.py --out runs/resnet8
    .venv/bin/ucpjax compress --config experiments/resnet8_cifar10.py --out runs/r8 --smoke

The MLPerf Tiny reference trains 500 epochs with Adam; here the dense model gets
SGD + Nesterov, cosine decay, weight decay and random crops/flips for 20 epochs
of 64 images (an estimate of about an hour on 2 CPU cores, from the step time in
results/bench_train_step.md; not yet run). To reuse the model of
scripts/train_baselines.py add ``init_from=runs/baselines/resnet8``. The
compression recipe mirrors experiments/cifar10.py: 9 epochs in all (prune 4 + 2,
distill 1, cluster 1, quantize 1). The benchmark's accuracy target is 85%.
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
        model="resnet8",
        data="cifar10",
        # Same as resnet8 in scripts/train_baselines.py (keep in sync).
        dense=TrainConfig(epochs=20, batch_size=64, learning_rate=0.05, **_SGD),
        # Folded BatchNorm leaves nothing to renormalise the activations, so the
        # compression stages fine-tune with Adam at small steps (as cifar10.py).
        # A 78K-parameter net has little to spare: prune to 50%, not 70%.
        recipe=Recipe(
            prune=PruneConfig(target_sparsity=0.5, scope="global", frequency=100,
                              train=_fine_tune(4, 1e-4), fine_tune=_fine_tune(2, 5e-5)),
            distill=DistillConfig(train=_fine_tune(1, 5e-5)),
            cluster=ClusterConfig(num_clusters=32, init="linear", fine_tune=_fine_tune(1, 2e-5)),
            quantize=QuantizeConfig(train=_fine_tune(1, 1e-5)),
        ),
    )
    return experiment.smoke(config) if smoke else config
