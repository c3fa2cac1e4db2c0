"""LeNet-300-100 on MNIST, the full pipeline: the README's main job.

    .venv/bin/ucpjax compress --config experiments/lenet300_mnist.py --out runs/lenet300
    .venv/bin/ucpjax compress --config experiments/lenet300_mnist.py --out runs/smoke --smoke

Budget: about 10 minutes on 2 CPU cores. Pruning is global (one magnitude
threshold), so the 784x300 input layer, whose border pixels carry nothing,
gives up most of its weights while the small layers keep more.
"""

from ucpjax.cluster import ClusterConfig
from ucpjax.distill import DistillConfig
from ucpjax import pipeline
from ucpjax.pipeline import PipelineConfig
from ucpjax.prune import PruneConfig
from ucpjax.quant import QuantConfig
from ucpjax.train import TrainConfig


def get_config(smoke: bool = False) -> PipelineConfig:
    """The experiment; ``smoke`` shrinks it to a seconds-long run on a data slice."""
    config = PipelineConfig(
        model="lenet300",
        data="mnist",
        dense=TrainConfig(epochs=20, learning_rate=1e-3),
        prune=PruneConfig(target_sparsity=0.95, scope="global", frequency=100, end=0.7,
                          train=TrainConfig(epochs=15, learning_rate=5e-4),
                          fine_tune=TrainConfig(epochs=3, learning_rate=1e-4)),
        distill=DistillConfig(temperature=4.0, alpha=0.9,
                              train=TrainConfig(epochs=10, learning_rate=2e-4)),
        cluster=ClusterConfig(num_clusters=16, init="linear",
                              train=TrainConfig(epochs=3, learning_rate=1e-4)),
        quantize=QuantConfig(train=TrainConfig(epochs=2, learning_rate=2e-5)),
    )
    return pipeline.smoke(config) if smoke else config
