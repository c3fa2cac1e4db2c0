"""LeNet-5 (Caffe variant, 431,080 parameters) on MNIST, the full pipeline.

    .venv/bin/ucpjax compress --config experiments/lenet5_mnist.py --out runs/lenet5
    .venv/bin/ucpjax compress --config experiments/lenet5_mnist.py --out runs/l5 --smoke

Target (issue): test error at most 0.8% with packed compression at least 39x
(Deep Compression: 0.74% at 39x).
"""

from ucpjax import pipeline
from ucpjax.cluster import ClusterConfig
from ucpjax.distill import DistillConfig
from ucpjax.pipeline import PipelineConfig
from ucpjax.prune import PruneConfig
from ucpjax.quant import QuantConfig
from ucpjax.train import TrainConfig


def get_config(smoke: bool = False) -> PipelineConfig:
    config = PipelineConfig(
        model="lenet5",
        data="mnist",
        dense=TrainConfig(epochs=15, learning_rate=1e-3),
        prune=PruneConfig(target_sparsity=0.93, scope="global", frequency=100,
                          train=TrainConfig(epochs=10, learning_rate=5e-4),
                          fine_tune=TrainConfig(epochs=2, learning_rate=1e-4)),
        distill=DistillConfig(train=TrainConfig(epochs=5, learning_rate=2e-4)),
        cluster=ClusterConfig(num_clusters=16, init="linear",
                              train=TrainConfig(epochs=2, learning_rate=1e-4)),
        quantize=QuantConfig(train=TrainConfig(epochs=1, learning_rate=2e-5)),
    )
    return pipeline.smoke(config) if smoke else config
