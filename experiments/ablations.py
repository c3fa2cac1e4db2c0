"""Ablations on LeNet-300-100 / MNIST: stage order, distillation, initialisation, k, bits.

    .venv/bin/ucpjax study --config experiments/ablations.py --out runs/ablations
    .venv/bin/ucpjax study --config experiments/ablations.py --out runs/abl --smoke
    .venv/bin/ucpjax study --config experiments/ablations.py --out runs/ablations --only k4,k8

One dense model is trained once and shared by every variant, and a variant
whose first stages match an earlier variant's (same stages, same settings)
starts from those finished stages (the study runner does both). Each variant
changes one thing of a shorter version of the default pipeline; the export is
off (the figures are the JAX model's test accuracy and the packed size).
"""

import dataclasses
import itertools

import lenet300_mnist  # sibling experiment: ucpjax puts this folder on sys.path

from ucpjax import pipeline
from ucpjax.cluster import INITS
from ucpjax.train import TrainConfig


def _base() -> pipeline.PipelineConfig:
    config = lenet300_mnist.get_config()
    shift = lambda epochs, lr: TrainConfig(epochs=epochs, learning_rate=lr, augment="shift")
    return dataclasses.replace(
        config,
        prune=dataclasses.replace(config.prune, train=shift(8, 1e-3), fine_tune=shift(2, 1e-4)),
        distill=dataclasses.replace(config.distill, train=shift(5, 1e-3)),
        cluster=dataclasses.replace(config.cluster, train=shift(2, 1e-4)),
        quantize=dataclasses.replace(config.quantize, train=shift(1, 2e-5)),
        export=dataclasses.replace(config.export, enabled=False),
    )


def get_variants(smoke: bool = False) -> dict:
    base = _base()
    replace = dataclasses.replace
    variants = {"order_" + "-".join(order): replace(base, stages=order)
                for order in itertools.permutations(pipeline.STAGES)}
    variants["no_distill"] = replace(base, stages=("prune", "cluster", "quantize"))
    for init in INITS:
        variants[f"init_{init}"] = replace(base, cluster=replace(base.cluster, init=init))
    for k in (4, 8, 16, 32):
        variants[f"k{k}"] = replace(base, cluster=replace(base.cluster, num_clusters=k))
    for bits in (4, 6, 8):
        variants[f"bits{bits}"] = replace(base, quantize=replace(base.quantize, weight_bits=bits))
    return {k: pipeline.smoke(v) for k, v in variants.items()} if smoke else variants
