"""The rules `ucpjax search` chose for experiments/table2_pcqat.py.

    .venv/bin/ucpjax compress --config results/search/table2_pcqat_prune_teacher/best_experiment.py --out runs/best

Found by `ucpjax search --config experiments/table2_pcqat.py --max-drop 0.5
--objective zip`: candidate cand-3053d8279a, validation drop
0.45 points, test drop 0.31 points. Everything but the
per-layer rules is the original experiment's.
"""

import dataclasses
import pathlib

from ucpjax import experiment
from ucpjax.rules import LayerRule

EXPERIMENT = pathlib.Path(__file__).parent / '../../../experiments/table2_pcqat.py'
OVERRIDES = ['init_from=runs/dense_pcqat', 'recipe.prune.train.epochs=12', 'recipe.prune.fine_tune.epochs=4', 'recipe.distill.train.epochs=8', 'recipe.cluster.fine_tune.epochs=4', 'recipe.prune.teacher_alpha=0.9']
RULES = (
    LayerRule(pattern='^Conv_0/kernel$', sparsity=0.0, clusters=16, bits=None),
    LayerRule(pattern='^Dense_0/kernel$', sparsity=0.88, clusters=4, bits=None),
)


def get_config(smoke: bool = False) -> experiment.Experiment:
    base = experiment.apply_overrides(experiment.load(EXPERIMENT, smoke=smoke), OVERRIDES)
    return dataclasses.replace(base, recipe=dataclasses.replace(base.recipe, rules=RULES))
