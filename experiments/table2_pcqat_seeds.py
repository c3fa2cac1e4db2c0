"""pcqat_mnist at the 20x budget, three seeds each: is it within 0.5 points of dense?

    .venv/bin/ucpjax study --config experiments/table2_pcqat_seeds.py --out runs/pq_seeds

The two smallest candidates of the doubled-fine-tuning search
(results/search/table2_pcqat_long04: Conv_0 dense at k = 16, Dense_0 at s = 0.85 or
0.88 with k = 4), each under seeds 0, 1 and 2. The seed draws the batches and the
k-means start; the dense model (runs/dense_pcqat, trained as RESULTS.md says) and
its validation split are the same for all. Seed 0 is the search's own run. (The
figures in RESULTS.md were measured when a seed also drew its own validation split.)
"""

import dataclasses

import table2_pcqat  # sibling experiment: ucpjax puts this folder on sys.path

from ucpjax import experiment
from ucpjax.rules import LayerRule

# The search's overrides (results/search/table2_pcqat_long04/best_experiment.py).
OVERRIDES = ["init_from=runs/dense_pcqat", "recipe.prune.train.epochs=12",
             "recipe.prune.fine_tune.epochs=4", "recipe.distill.train.epochs=8",
             "recipe.cluster.fine_tune.epochs=4"]
SPARSITIES = (0.85, 0.88)
SEEDS = (0, 1, 2)


def get_variants(smoke: bool = False) -> dict:
    base = experiment.apply_overrides(table2_pcqat.get_config(), OVERRIDES)
    replace = dataclasses.replace
    variants = {
        f"s{round(sparsity * 100)}_k4_seed{seed}": replace(base, recipe=replace(
            base.recipe, seed=seed, rules=(
                LayerRule(pattern="^Conv_0/kernel$", sparsity=0.0, clusters=16),
                LayerRule(pattern="^Dense_0/kernel$", sparsity=sparsity, clusters=4))))
        for sparsity in SPARSITIES for seed in SEEDS}
    return {k: experiment.smoke(v) for k, v in variants.items()} if smoke else variants
