"""CIFAR-10 (JPEG copy in ../shared/data) with ``cifar_cnn``, the full pipeline.

    .venv/bin/ucpjax compress --config experiments/cifar10.py --out runs/cifar10
    .venv/bin/ucpjax compress --config experiments/cifar10.py --out runs/c --smoke

The dense model is trained with SGD + Nesterov, cosine decay, weight decay and
random crops/flips (20 epochs, about an hour on 2 CPU cores); to reuse the
model of scripts/train_baselines.py add ``init_from=runs/baselines/cifar_cnn``.
The compression stages get 6 epochs in all (prune 2 + 1, distill 1, cluster 1,
quantize 1).
"""

from ucpjax import pipeline
from ucpjax.cluster import ClusterConfig
from ucpjax.distill import DistillConfig
from ucpjax.pipeline import PipelineConfig
from ucpjax.prune import PruneConfig
from ucpjax.quant import QuantConfig
from ucpjax.train import TrainConfig

_SGD = {"optimizer": "sgd", "weight_decay": 5e-4, "augment": "crop_flip"}


def get_config(smoke: bool = False) -> PipelineConfig:
    config = PipelineConfig(
        model="cifar_cnn",
        data="cifar10",
        # Same as cifar_cnn in scripts/train_baselines.py (keep in sync).
        dense=TrainConfig(epochs=20, batch_size=64, learning_rate=0.05, **_SGD),
        prune=PruneConfig(target_sparsity=0.7, scope="global", frequency=100,
                          train=TrainConfig(epochs=2, learning_rate=0.02, **_SGD),
                          fine_tune=TrainConfig(epochs=1, learning_rate=0.005, **_SGD)),
        distill=DistillConfig(train=TrainConfig(epochs=1, learning_rate=0.005, **_SGD)),
        cluster=ClusterConfig(num_clusters=32, init="linear",
                              train=TrainConfig(epochs=1, learning_rate=1e-3, **_SGD)),
        quantize=QuantConfig(train=TrainConfig(epochs=1, learning_rate=5e-4, **_SGD)),
    )
    return pipeline.smoke(config) if smoke else config
