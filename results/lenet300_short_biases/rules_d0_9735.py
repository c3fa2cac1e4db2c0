"""The rules `ucpjax search` chose for LeNet-300-100 (results/search/lenet300_long_d1),
with Dense_0 at sparsity 0.9735: set by hand between the search grid's 0.97 and
0.98 (session 23), not chosen by search.

    .venv/bin/ucpjax compress --config results/lenet300_short_biases/rules_d0_9735.py \\
        --out runs/l3_kdc9735_s0 init_from=runs/bench/lenet300/dense quantize.bias_bits=8 \\
        seed=0 prune.teacher_alpha=0.9 cluster.teacher_alpha=0.9
"""

import dataclasses
import pathlib

from ucpjax import experiment
from ucpjax.rules import LayerRule

CHOSEN = pathlib.Path(__file__).parent / "../search/lenet300_long_d1/best_experiment.py"
DENSE_0 = LayerRule(pattern="^Dense_0/kernel$", sparsity=0.9735, clusters=4)


def get_config(smoke: bool = False) -> experiment.Experiment:
    chosen = experiment.load(CHOSEN, smoke=smoke)
    rules = tuple(DENSE_0 if rule.pattern == DENSE_0.pattern else rule
                  for rule in chosen.recipe.rules)
    return dataclasses.replace(chosen, recipe=dataclasses.replace(chosen.recipe, rules=rules))
