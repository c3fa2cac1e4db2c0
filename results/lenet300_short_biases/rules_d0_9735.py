"""The rules `ucpjax search` chose for experiments/lenet300_mnist.py, with Dense_0 at 0.9735
(session 23: set by hand between the search grid's 0.97 and 0.98, not chosen by search).

    .venv/bin/ucpjax compress --config results/lenet300_short_biases/rules_d0_9735.py --out runs/l3_kdc9735_s0 \
        init_from=runs/bench/lenet300/dense quantize.bias_bits=8 seed=0 prune.teacher_alpha=0.9 cluster.teacher_alpha=0.9

Found by `ucpjax search --config experiments/lenet300_mnist.py --max-drop 1
--objective zip`: candidate cand-080f2044c6, validation drop
0.62 points, test drop 0.37 points. Everything but the
per-layer rules is the original experiment's.
"""

import dataclasses
import pathlib

from ucpjax import experiment
from ucpjax.rules import LayerRule

EXPERIMENT = pathlib.Path(__file__).parent / '../../experiments/lenet300_mnist.py'
OVERRIDES = ['prune.train.epochs=40', 'prune.fine_tune.epochs=10', 'distill.train.epochs=30', 'cluster.fine_tune.epochs=8']
RULES = (
    LayerRule(pattern='^Dense_0/kernel$', sparsity=0.9735, clusters=4, bits=None),
    LayerRule(pattern='^Dense_1/kernel$', sparsity=0.85, clusters=4, bits=None),
    LayerRule(pattern='^Dense_2/kernel$', sparsity=0.5, clusters=8, bits=None),
)


def get_config(smoke: bool = False) -> experiment.Experiment:
    base = experiment.apply_overrides(experiment.load(EXPERIMENT, smoke=smoke), OVERRIDES)
    return dataclasses.replace(base, recipe=dataclasses.replace(base.recipe, rules=RULES))
