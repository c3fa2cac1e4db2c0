"""The search's choice here (best_experiment.py) with the last layer as the D = 1 rules
have it (s=0.5, k=8): what giving a layer back is worth (RESULTS.md, session 25).

    .venv/bin/ucpjax compress --config results/search/lenet300_replan/last_layer_as_d1.py \
        --out runs/l3_swap_s0 seed=0
"""

import dataclasses
import pathlib

from ucpjax import experiment
from ucpjax.rules import LayerRule

EXPERIMENT = pathlib.Path(__file__).parent / '../../../experiments/lenet300_mnist.py'
OVERRIDES = ['init_from=runs/bench/lenet300/dense', 'prune.train.epochs=40', 'prune.fine_tune.epochs=10', 'distill.train.epochs=30', 'cluster.fine_tune.epochs=8', 'prune.teacher_alpha=0.9', 'prune.criterion=activation', 'cluster.criterion=activation', 'quantize.bias_bits=8']
RULES = (
    LayerRule(pattern='^Dense_0/kernel$', sparsity=0.97, clusters=4, bits=None),
    LayerRule(pattern='^Dense_1/kernel$', sparsity=0.86, clusters=4, bits=None),
    LayerRule(pattern='^Dense_2/kernel$', sparsity=0.5, clusters=8, bits=None),
)


def get_config(smoke: bool = False) -> experiment.Experiment:
    base = experiment.apply_overrides(experiment.load(EXPERIMENT, smoke=smoke), OVERRIDES)
    return dataclasses.replace(base, recipe=dataclasses.replace(base.recipe, rules=RULES))
