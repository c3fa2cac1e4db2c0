"""The paper's second finding on LeNet-300-100 / MNIST: does a teacher aligned with the
student (its own dense model) distill better than a teacher of another architecture?

    .venv/bin/ucpjax train --model lenet5 --data mnist --epochs 8 --augment shift \
        --out runs/teacher_lenet5
    .venv/bin/ucpjax study --config experiments/findings_teacher.py --out runs/findings_distill
    .venv/bin/python scripts/findings.py --finding teacher --study runs/findings_distill

Two sparsities x three seeds x two teachers, each the default recipe's prune stage
then its 15-epoch distill stage (alpha 0.9, T 4): ``distill``, taught by the dense
LeNet-300-100 the student was pruned from (the variants of
``findings_distill.py``, so running into the same study folder reuses them), and
``lenet5_teacher``, taught by a LeNet-5 (convolutional, more accurate) trained by
the first command. Both variants of one sparsity and seed share the dense and
pruned models, so their difference is the teacher alone. Export is off.
"""

import dataclasses

import findings_distill  # sibling experiment: ucpjax puts this folder on sys.path

TEACHER = "runs/teacher_lenet5"


def get_variants(smoke: bool = False) -> dict:
    variants = {}
    for name, config in findings_distill.get_variants(smoke).items():
        if not name.endswith("_distill"):
            continue
        variants[name] = config
        distill = dataclasses.replace(config.recipe.distill, teacher_from=TEACHER)
        variants[name.replace("_distill", "_lenet5_teacher")] = dataclasses.replace(
            config, recipe=dataclasses.replace(config.recipe, distill=distill))
    return variants
