"""The rules `ucpjax search` chose for experiments/lenet300_mnist.py.

    .venv/bin/ucpjax compress --config results/search/lenet300_cluster_teacher/best_experiment.py --out runs/best

Found by `ucpjax search --config experiments/lenet300_mnist.py --max-drop 0.5
--objective zip`: candidate cand-946819c0ec, validation drop
0.34 points, test drop 0.30 points. Everything but the
per-layer rules is the original experiment's.
"""

import dataclasses
import pathlib

from ucpjax import experiment
from ucpjax.rules import LayerRule

EXPERIMENT = pathlib.Path(__file__).parent / '../../../experiments/lenet300_mnist.py'
OVERRIDES = ['init_from=runs/bench/lenet300/dense', 'prune.train.epochs=40', 'prune.fine_tune.epochs=10', 'distill.train.epochs=30', 'cluster.fine_tune.epochs=20', 'prune.teacher_alpha=0.9', 'cluster.teacher_alpha=0.9', 'cluster.teacher_temperature=4', 'prune.criterion=activation', 'cluster.criterion=activation', 'quantize.bias_bits=8']
RULES = (
    LayerRule(pattern='^Dense_0/kernel$', sparsity=0.97, clusters=4, bits=None),
    LayerRule(pattern='^Dense_1/kernel$', sparsity=0.86, clusters=4, bits=None),
    LayerRule(pattern='^Dense_2/kernel$', sparsity=0.0, clusters=8, bits=None),
)


def get_config(smoke: bool = False) -> experiment.Experiment:
    base = experiment.apply_overrides(experiment.load(EXPERIMENT, smoke=smoke), OVERRIDES)
    return dataclasses.replace(base, recipe=dataclasses.replace(base.recipe, rules=RULES))
