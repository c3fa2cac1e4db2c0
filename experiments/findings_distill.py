"""The paper's first finding on LeNet-300-100 / MNIST: does distillation from the dense
teacher recover more accuracy after pruning than plain fine-tuning of equal epochs?

    .venv/bin/ucpjax study --config experiments/findings_distill.py --out runs/findings_distill
    .venv/bin/ucpjax study --config experiments/findings_distill.py --out runs/fd --smoke

Two sparsities x three seeds x two variants, each the default recipe's prune stage
then its 15-epoch distill stage: ``distill`` as the recipe has it (alpha = 0.9,
T = 4) and ``finetune`` with alpha = 0, i.e. the same stage, optimizer, schedule,
augmentation and epochs on the labels alone. The two variants of one sparsity and
seed share the dense model and the pruned model (the study runner reuses finished
stages), so their difference is the distillation alone. Export is off: the figure
is the JAX model's test accuracy after the stage (10,000 images, 0.01 points each).
"""

import dataclasses

import lenet300_mnist  # sibling experiment: ucpjax puts this folder on sys.path

from ucpjax import experiment

SPARSITIES = (0.9, 0.96)
SEEDS = (0, 1, 2)


def get_variants(smoke: bool = False) -> dict:
    base = lenet300_mnist.get_config()
    replace, recipe = dataclasses.replace, base.recipe
    variants = {}
    for sparsity in SPARSITIES:
        for seed in SEEDS:
            for name, alpha in (("distill", recipe.distill.alpha), ("finetune", 0.0)):
                variants[f"s{round(sparsity * 100)}_seed{seed}_{name}"] = replace(
                    base, recipe=replace(
                        recipe, stages=("prune", "distill"), seed=seed,
                        prune=replace(recipe.prune, target_sparsity=sparsity),
                        distill=replace(recipe.distill, alpha=alpha),
                        export=replace(recipe.export, enabled=False)))
    return {k: experiment.smoke(v) for k, v in variants.items()} if smoke else variants
