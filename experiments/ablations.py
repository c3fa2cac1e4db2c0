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

from ucpjax import experiment
from ucpjax.cluster import INITS
from ucpjax.experiment import Experiment
from ucpjax.recipe import STAGES
from ucpjax.train import TrainConfig


def _shift(epochs: float, learning_rate: float) -> TrainConfig:
    return TrainConfig(epochs=epochs, learning_rate=learning_rate, augment="shift")


def _base() -> Experiment:
    config = lenet300_mnist.get_config()
    recipe, replace = config.recipe, dataclasses.replace
    return replace(config, recipe=replace(
        recipe,
        prune=replace(recipe.prune, train=_shift(8, 1e-3), fine_tune=_shift(2, 1e-4)),
        distill=replace(recipe.distill, train=_shift(5, 1e-3)),
        cluster=replace(recipe.cluster, fine_tune=_shift(2, 1e-4)),
        quantize=replace(recipe.quantize, train=_shift(1, 2e-5)),
        export=replace(recipe.export, enabled=False),
    ))


def get_variants(smoke: bool = False) -> dict:
    base = _base()
    replace, recipe = dataclasses.replace, base.recipe

    def variant(**changes) -> Experiment:
        return replace(base, recipe=replace(recipe, **changes))

    variants = {"order_" + "-".join(order): variant(stages=order)
                for order in itertools.permutations(STAGES)}
    variants["no_distill"] = variant(stages=("prune", "cluster", "quantize"))
    for init in INITS:
        variants[f"init_{init}"] = variant(cluster=replace(recipe.cluster, init=init))
    for k in (4, 8, 16, 32):
        variants[f"k{k}"] = variant(cluster=replace(recipe.cluster, num_clusters=k))
    for bits in (4, 6, 8):
        variants[f"bits{bits}"] = variant(quantize=replace(recipe.quantize, weight_bits=bits))
    return {k: experiment.smoke(v) for k, v in variants.items()} if smoke else variants
