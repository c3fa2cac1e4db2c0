"""CIFAR-10 with ``cifar_cnn`` made faster: 35% of every layer's channels cut out.

    .venv/bin/ucpjax compress --config experiments/cifar10_channels.py --out runs/cifar10_channels
    .venv/bin/ucpjax compress --config experiments/cifar10_channels.py --out runs/c --smoke

experiments/cifar10.py with structured pruning (``prune.channel_sparsity``,
README "Structured pruning"): the export cuts the removed channels out, so the
int8 .tflite has 0.43x the multiplications and runs about 2x faster at 1 thread
(scripts/bench_latency.py --channels 0.35; 1.35x on a Xeon with AMX, whose int8
convs at these sizes are not bound by their multiply-adds). The dense model is the 12-epoch one
of RESULTS.md (83.69%; ``init_from=runs/cifar_dense12`` reuses it). A cut this
deep needs more recovery than unstructured zeros: prune 8 + 4 epochs, and 32
values per layer (with 16, clustering cost 0.0-0.4 points). 2026-12-07, seeds
0-4: .tflite 0.85 points below dense (sd 0.17; -0.76 to -1.14) at 16.4x zipped,
where 6 + 3 epochs and 16 values lost 1.36 (two seeds; RESULTS.md).
"""

import dataclasses

import cifar10

from ucpjax import experiment


def get_config(smoke: bool = False) -> experiment.Experiment:
    base = cifar10.get_config()
    recipe = base.recipe
    prune = dataclasses.replace(
        recipe.prune, channel_sparsity=0.35, target_sparsity=0.7,
        train=dataclasses.replace(recipe.prune.train, epochs=8),
        fine_tune=dataclasses.replace(recipe.prune.fine_tune, epochs=4))
    config = dataclasses.replace(
        base, dense=dataclasses.replace(base.dense, epochs=12),
        recipe=dataclasses.replace(
            recipe, prune=prune,
            cluster=dataclasses.replace(recipe.cluster, num_clusters=32)))
    return experiment.smoke(config) if smoke else config
