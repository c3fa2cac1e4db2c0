"""Table 2: TensorFlow's PCQAT tutorial model on MNIST through ucpjax.

    .venv/bin/ucpjax compress --config experiments/table2_pcqat.py --out runs/table2
    .venv/bin/ucpjax compress --config experiments/table2_pcqat.py --out runs/t2 --smoke

Conv 12@3x3 -> max-pool -> dense 10 (20,410 parameters). TensorFlow's own
PCQAT on the same model and data is scripts/bench_baselines.py.
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
        model="pcqat_mnist",
        data="mnist",
        dense=TrainConfig(epochs=10, learning_rate=2e-3),
        prune=PruneConfig(target_sparsity=0.9, scope="global", frequency=100,
                          train=TrainConfig(epochs=6, learning_rate=1e-3),
                          fine_tune=TrainConfig(epochs=2, learning_rate=2e-4)),
        distill=DistillConfig(train=TrainConfig(epochs=4, learning_rate=5e-4)),
        cluster=ClusterConfig(num_clusters=16, init="linear",
                              train=TrainConfig(epochs=2, learning_rate=2e-4)),
        quantize=QuantConfig(train=TrainConfig(epochs=2, learning_rate=5e-5)),
    )
    return pipeline.smoke(config) if smoke else config
