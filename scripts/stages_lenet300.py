"""Each stage's effect on LeNet-300-100 / MNIST, branching from shared checkpoints.

    .venv/bin/python scripts/stages_lenet300.py            # about 6 minutes on 2 cores
    .venv/bin/python scripts/stages_lenet300.py --smoke

Calls the stage functions directly (they are pure, so branches share their
inputs): dense -> prune; then either plain fine-tuning or distillation for the
same number of epochs (does distillation let pruning go further?); then
clustering with 16 and 8 centroids per layer for each initialisation (Deep
Compression's Fig. 2 comparison); then int8 QAT of the 16-centroid linear
branch. Test error is the JAX model's. Settings are the default experiment's
(experiments/lenet300_mnist.py), its per-layer rules included. Writes
results/stages_lenet300.{json,md} (--smoke: stages_lenet300_smoke.*; --results-dir
puts them elsewhere).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time

import jax
import numpy as np

from ucpjax import cluster, constraints, distill, experiment, prune, quantize, train
from ucpjax.run_folder import RunFolder

ROOT = pathlib.Path(__file__).resolve().parent.parent


def fine_tune(params, config: train.TrainConfig, apply_fn, data, seed: int, rules):
    """Plain cross-entropy training that keeps the zeros: the no-distillation control."""
    params, _, _ = constraints.fit_preserving(
        params, constraints.cross_entropy(apply_fn), x=data.x_train, y=data.y_train,
        config=config, seed=seed, rules=rules, desc="fine-tune")
    return params


def measure(name, params, apply_fn, data, started) -> dict:
    flat = jax.tree.map(np.asarray, params)
    kernels = [w for w in jax.tree.leaves(flat) if w.ndim > 1]
    accuracy = train.accuracy(apply_fn, params, data.x_test, data.y_test)
    row = {"step": name, "test_error": 1 - accuracy, "test_accuracy": accuracy,
           "sparsity": float(np.mean(np.concatenate([w.ravel() == 0 for w in kernels]))),
           "max_distinct": max(len(np.unique(w[w != 0])) for w in kernels),
           "seconds": time.perf_counter() - started}
    print(f"{name:32s} error {100 * row['test_error']:.2f}%  sparsity {row['sparsity']:.3f}  "
          f"distinct {row['max_distinct']}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--results-dir", type=pathlib.Path, default=ROOT / "results",
                        help="folder for the .json and .md")
    args = parser.parse_args()
    config = experiment.load(ROOT / "experiments" / "lenet300_mnist.py", smoke=args.smoke)
    recipe = config.recipe
    rules = recipe.rules
    data = experiment.load_dataset(config)
    model = experiment.initial_model(config, data)
    rows = []

    t = time.perf_counter()
    model, _ = experiment.train_dense(model, config.dense, data, config.seed)
    apply_fn, dense = model.apply_fn(), model.params
    rows.append(measure("dense", dense, apply_fn, data, t))

    t = time.perf_counter()
    pruned, _ = prune.prune(dense, recipe.prune, apply_fn=apply_fn, data=data, seed=1,
                            rules=rules)
    rows.append(measure("prune", pruned, apply_fn, data, t))

    t = time.perf_counter()
    tuned = fine_tune(pruned, recipe.distill.train, apply_fn, data, seed=2, rules=rules)
    rows.append(measure("prune + fine-tune (no distill)", tuned, apply_fn, data, t))

    t = time.perf_counter()
    distilled, _ = distill.distill(pruned, recipe.distill, apply_fn=apply_fn, data=data, seed=2,
                                   teacher_apply_fn=apply_fn, teacher_params=dense,
                                   rules=rules)
    rows.append(measure("prune + distill", distilled, apply_fn, data, t))

    clustered = {}
    for k in (16, 8):
        for init in cluster.INITS:
            t = time.perf_counter()
            cfg = dataclasses.replace(recipe.cluster, num_clusters=k, init=init)
            clustered[k, init], _ = cluster.cluster(distilled, cfg, apply_fn=apply_fn,
                                                    data=data, seed=3, rules=rules)
            rows.append(measure(f"+ cluster k={k} {init}", clustered[k, init], apply_fn, data, t))

    t = time.perf_counter()
    quantized, _ = quantize.quantize(clustered[16, "linear"], recipe.quantize,
                                     apply_fn=apply_fn, data=data, seed=4, rules=rules)
    rows.append(measure("+ cluster k=16 linear + int8 QAT", quantized, apply_fn, data, t))

    write(rows, args.smoke, args.results_dir)


def write(rows: list[dict], smoke: bool, folder: pathlib.Path) -> None:
    lines = ["| step | test error | sparsity | max distinct / layer | time (s) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {100 * r['test_error']:.2f}% | {r['sparsity']:.3f} | "
              f"{r['max_distinct']:,} | {r['seconds']:.0f} |" for r in rows]
    table = "\n".join(lines) + "\n"
    name = "stages_lenet300" + ("_smoke" if smoke else "")
    folder = RunFolder(folder)
    folder.write_json(f"{name}.json", {"rows": rows, "machine": experiment.machine(),
                                       "date": time.strftime("%Y-%m-%d")})
    folder.write_bytes(f"{name}.md", table.encode())
    print("\n" + table)


if __name__ == "__main__":
    main()
