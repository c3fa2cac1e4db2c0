"""The paper's second finding on LeNet-300-100 / MNIST: does a teacher aligned with the
student (its own dense model) distill better than a teacher of another architecture?

    .venv/bin/ucpjax train --model pcqat_mnist --data mnist --epochs 10 --learning-rate 2e-3 \
        --out runs/dense_pcqat
    for s in 1 2; do .venv/bin/ucpjax train --model pcqat_mnist --data mnist --epochs 10 \
        --learning-rate 2e-3 --seed $s --out runs/dense_pcqat_seed$s; done
    .venv/bin/ucpjax study --config experiments/findings_teacher.py --out runs/findings_teacher
    .venv/bin/python scripts/findings.py --finding teacher --study runs/findings_teacher

Two sparsities x three seeds x two teachers, each the default recipe's prune stage
then its 15-epoch distill stage (alpha 0.9, T 4): ``distill``, taught by the dense
LeNet-300-100 the student was pruned from (the variants of
``findings_distill.py``), and
``pcqat_teacher``, taught by the small convolutional pcqat_mnist model (conv
12@3x3, max-pool, dense; 98.25% against the aligned teacher's 98.79%) that the
first commands train, one per seed: a seed holds out its own validation split, and
a teacher trained under another seed has trained on it (the run refuses that).
Both variants of one sparsity and seed share the dense and pruned models, so
their difference is the teacher alone. Export is off.
"""

import dataclasses

import findings_distill  # sibling experiment: ucpjax puts this folder on sys.path


def teacher(seed: int) -> str:
    """The pcqat_mnist teacher trained under ``seed``, so on the student's split."""
    return "runs/dense_pcqat" + (f"_seed{seed}" if seed else "")


def get_variants(smoke: bool = False) -> dict:
    variants = {}
    for name, config in findings_distill.get_variants(smoke).items():
        if not name.endswith("_distill"):
            continue
        variants[name] = config
        distill = dataclasses.replace(config.recipe.distill, teacher_from=teacher(config.seed))
        variants[name.replace("_distill", "_pcqat_teacher")] = dataclasses.replace(
            config, recipe=dataclasses.replace(config.recipe, distill=distill))
    return variants
