"""The paper's two findings on a conv net: pcqat_mnist (conv 12@3x3, max-pool, dense).

    .venv/bin/ucpjax train --model pcqat_mnist --data mnist --epochs 10 --learning-rate 2e-3 \
        --out runs/dense_pcqat
    .venv/bin/python scripts/train_baselines.py --only lenet5
    .venv/bin/ucpjax study --config experiments/findings_conv.py --out runs/findings_conv
    .venv/bin/python scripts/findings.py --finding distill_conv --study runs/findings_conv
    .venv/bin/python scripts/findings.py --finding teacher_conv --study runs/findings_conv

Two sparsities x three seeds x three variants, each the Table 2 recipe's prune stage
(global magnitude, 6 + 2 epochs) from the dense model ``runs/dense_pcqat``
(98.25%), then its 4-epoch distill stage (alpha 0.9, T 4):

* ``distill``: taught by that dense model, the teacher aligned with the student;
* ``finetune``: the same stage with alpha 0 (labels only), the first finding's
  equal-epoch control;
* ``lenet5_teacher``: taught by LeNet-5 (two convs, 431K parameters, 99.38%), a
  stronger teacher of another architecture, the second finding's control.

The variants of one sparsity and seed share the dense and pruned models (the study
runner reuses finished stages), so each difference is the distill stage's alone.
Export is off: the figure is the JAX model's test accuracy after the stage.
"""

import dataclasses

import table2_pcqat  # sibling experiment: ucpjax puts this folder on sys.path

from ucpjax import experiment

STUDENT = "runs/dense_pcqat"
OTHER_TEACHER = "runs/baselines/lenet5"
SPARSITIES = (0.8, 0.9)
SEEDS = (0, 1, 2)


def get_variants(smoke: bool = False) -> dict:
    base = dataclasses.replace(table2_pcqat.get_config(), init_from=STUDENT)
    replace, recipe = dataclasses.replace, base.recipe
    teachers = {"distill": recipe.distill,
                "finetune": replace(recipe.distill, alpha=0.0),
                "lenet5_teacher": replace(recipe.distill, teacher_from=OTHER_TEACHER)}
    variants = {}
    for sparsity in SPARSITIES:
        for seed in SEEDS:
            for name, distill in teachers.items():
                variants[f"s{round(sparsity * 100)}_seed{seed}_{name}"] = replace(
                    base, recipe=replace(
                        recipe, stages=("prune", "distill"), seed=seed,
                        prune=replace(recipe.prune, target_sparsity=sparsity),
                        distill=distill, export=replace(recipe.export, enabled=False)))
    return {k: experiment.smoke(v) for k, v in variants.items()} if smoke else variants
