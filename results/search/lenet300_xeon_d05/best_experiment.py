"""The rules `ucpjax search` chose for experiments/lenet300_mnist.py.

    .venv/bin/ucpjax compress --config results/search/lenet300_xeon_d05/best_experiment.py --out runs/best

Found by `ucpjax search --config experiments/lenet300_mnist.py --max-drop 0.5
--objective zip`: candidate cand-0038b34686, validation drop
0.50 points, test drop 0.48 points. Everything but the
per-layer rules is the original experiment's.
"""

import dataclasses
import pathlib

from ucpjax import experiment
from ucpjax.rules import LayerRule

EXPERIMENT = pathlib.Path(__file__).parent / '../../../experiments/lenet300_mnist.py'
OVERRIDES = ['init_from=runs/bench/lenet300/dense']
RULES = (
    LayerRule(pattern='^Dense_0/kernel$', sparsity=0.92, clusters=4, bits=None),
    LayerRule(pattern='^Dense_1/kernel$', sparsity=0.85, clusters=2, bits=None),
    LayerRule(pattern='^Dense_2/kernel$', sparsity=0.0, clusters=4, bits=None),
)


def get_config(smoke: bool = False) -> experiment.Experiment:
    base = experiment.apply_overrides(experiment.load(EXPERIMENT, smoke=smoke), OVERRIDES)
    return dataclasses.replace(base, recipe=dataclasses.replace(base.recipe, rules=RULES))
