"""A user's depthwise BatchNorm CNN through ``ucpjax.compress`` at 75% sparsity, default settings.

    .venv/bin/python scripts/bench_depthwise.py            # about 40 minutes on 2 cores
    .venv/bin/python scripts/bench_depthwise.py --smoke    # a data slice, minutes
    .venv/bin/python scripts/bench_depthwise.py --seeds 1,2 --only GlobalAveragePool


The net of the conv-nets issue: conv + BatchNorm, a depthwise 3x3 conv and a
1x1 conv each with BatchNorm, max-pool, a global average pool, Dropout,
Dense + BatchNorm, Dense. It is trained on 10,000 MNIST images (Adam 5e-3, 8
epochs), then compressed with ``Recipe(prune=PruneConfig(target_sparsity=0.75))``
and every other setting at its default, and the ``.tflite`` is measured in
LiteRT on the full test set. Variants: the pool written as a flatten, as
``ucpjax.pooling.GlobalAveragePool`` and as a bare ``jnp.mean`` (refused before
any training: the message is recorded), and, as controls, the module pool
pruned with the former default ``scope="layer"`` (uniform 75% per layer) and
without equalising the depthwise conv's input channels (``QuantizeConfig.equalize``);
and, as the alternative allocation, per-layer sparsities chosen from measured
pruning curves (``scope="sensitivity"``); and weights pruned and clustered by
their inputs (``criterion="activation"``, ``ucpjax.saliency``).
A seed draws the dense model's initialisation, its batches and the compression's;
rows of earlier calls (other seeds, other variants) stay in the table, and a variant
run under several seeds gets its mean and sample spread.
Writes results/bench_depthwise.{json,md} (--smoke: bench_depthwise_smoke.*).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import jax

import ucpjax
from ucpjax import data, experiment, models, train
from ucpjax.cluster import ClusterConfig
from ucpjax.config import ConfigError
from ucpjax.model import Model, check_quantizable
from ucpjax.prune import PruneConfig
from ucpjax.quantize import QuantizeConfig
from ucpjax.recipe import Recipe
from ucpjax.run_folder import RunFolder

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_baselines as bench  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent




# name: (pool, prune scope, equalize the depthwise conv's input channels, the prune and
# cluster stages' criterion)
VARIANTS = {
    "flatten": ("flatten", "erk", True, None),
    "GlobalAveragePool": ("module", "erk", True, None),
    "bare jnp.mean": ("mean", "erk", True, None),
    "GlobalAveragePool with scope=layer (former default)": ("module", "layer", True, None),
    "GlobalAveragePool without equalization (former default)": ("module", "erk", False, None),
    "GlobalAveragePool with scope=sensitivity": ("module", "sensitivity", True, None),
    "GlobalAveragePool with criterion=activation": ("module", "erk", True, "activation"),
}


def dense(module, dataset, epochs: float, seed: int) -> tuple[dict, float]:
    variables = dict(module.init(jax.random.key(seed), dataset.x_train[:1], train=False))
    config = train.TrainConfig(epochs=epochs, batch_size=64, learning_rate=5e-3)
    state, _ = train.fit(variables["params"], train.classification_loss(module),
                         train.make_optimizer(config, train.total_steps(config, len(
                             dataset.x_train))), dataset.x_train, dataset.y_train,
                         config=config, seed=seed,
                         extra={"batch_stats": variables["batch_stats"]})
    model = Model(module, {"params": state.params, **state.extra}).settled(dataset.x_train)
    return model.variables, train.accuracy(model.apply_fn(), model.params, dataset.x_test,
                                           dataset.y_test)


def run_variant(name: str, variant: tuple[str, str, bool, str | None], dataset,
                epochs: float, smoke: bool, seed: int) -> dict:
    pool, scope, equalize, criterion = variant
    module = models.DepthwiseCnn(pool=pool)
    recipe = Recipe(prune=PruneConfig(target_sparsity=0.75, scope=scope, criterion=criterion),
                    cluster=ClusterConfig(criterion=criterion),
                    quantize=QuantizeConfig(equalize=equalize), seed=seed)
    if smoke:
        recipe = experiment.smoke(experiment.Experiment(recipe=recipe)).recipe
    began = time.perf_counter()
    try:
        initial = module.init(jax.random.key(0), dataset.x_train[:1], train=False)
        check_quantizable(Model(module, dict(initial)), dataset.input_shape)
    except ConfigError as err:
        print(f"{name}: refused: {err}", flush=True)
        return {"variant": name, "seed": seed, "refused": str(err)}
    variables, dense_accuracy = dense(module, dataset, epochs, seed)
    result = ucpjax.compress(module, variables, train=(dataset.x_train, dataset.y_train),
                             test=(dataset.x_test, dataset.y_test),
                             val=(dataset.x_val, dataset.y_val), recipe=recipe, check=False)
    final = result.report["final"]
    row = {"variant": name, "seed": seed, "dense_accuracy": dense_accuracy,
           "prune_accuracy": result.report["rows"][1]["accuracy"],
           "stage_accuracies": {r["stage"]: r["accuracy"] for r in result.report["rows"]},
           "drop_points": 100 * (dense_accuracy - final["tflite_accuracy"]),
           "seconds": time.perf_counter() - began,
           **{key: final[key] for key in (
               "tflite_accuracy", "sparsity", "tflite_zip_bytes", "packed_bytes",
               "tflite_codes_per_channel", "weights_faithful", "tflite_within_tolerance")}}
    print(f"{name}, seed {seed}: dense {dense_accuracy:.4f} -> .tflite "
          f"{final['tflite_accuracy']:.4f} ({row['drop_points']:+.2f} points)", flush=True)
    return row


def markdown(rows: list[dict], command: str) -> str:
    lines = ["# A depthwise BatchNorm CNN at 75% sparsity, default settings", "",
             "| variant | seed | dense | after prune | .tflite | drop (points) | sparsity "
             "| zipped B | packed B | codes/channel | faithful |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        seed = r.get("seed", 0)  # rows from before seeds were seed 0
        if "refused" in r:
            lines.append(f"| {r['variant']} | {seed} | refused before training: "
                         f"{r['refused']} | | | | | | | | |")
            continue
        lines.append(f"| {r['variant']} | {seed} | {r['dense_accuracy']:.4f} "
                     f"| {r['prune_accuracy']:.4f} "
                     f"| {r['tflite_accuracy']:.4f} | {r['drop_points']:.2f} "
                     f"| {r['sparsity']:.3f} | {r['tflite_zip_bytes']:,} "
                     f"| {r['packed_bytes']:,} | {r['tflite_codes_per_channel']} "
                     f"| {r['weights_faithful']} |")
    lines += ["", *spread_lines(rows), "", *(f"Command: `{c}`" for c in command), ""]
    return "\n".join(lines)


def spread_lines(rows: list[dict]) -> list[str]:
    """Mean ± sample sd of the drop for each variant run under two or more seeds."""
    drops: dict[str, list[float]] = {}
    for r in rows:
        if "drop_points" in r:
            drops.setdefault(r["variant"], []).append(r["drop_points"])
    return [f"- {name}: drop {statistics.mean(d):.2f} ± {statistics.stdev(d):.2f} points over "
            f"{len(d)} seeds ({', '.join(f'{x:.2f}' for x in d)})"
            for name, d in drops.items() if len(d) > 1]


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s]
    except ValueError:
        seeds = []
    if not seeds:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers")
    return seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--seeds", type=_seeds, default="0", help="comma-separated, e.g. 0,1,2")
    parser.add_argument("--only", default="", help="comma-separated variants (default: all)")
    args = parser.parse_args()
    seeds = args.seeds
    only = [v for v in args.only.split(",") if v]
    unknown = sorted(set(only) - set(VARIANTS))
    if unknown:
        parser.error(f"--only {','.join(unknown)}: no such variant; the variants are "
                     f"{', '.join(VARIANTS)}")
    mnist = data.load("mnist", val_size=1000)
    dataset = mnist.take(1000, 500) if args.smoke else mnist.take(10_000, len(mnist.x_test))
    epochs = 2 if args.smoke else 8
    flags = [f for f in (("--smoke" if args.smoke else ""),
                         (f"--seeds {','.join(map(str, seeds))}" if seeds != [0] else ""),
                         (f"--only '{args.only}'" if only else "")) if f]
    command = " ".join(["python scripts/bench_depthwise.py", *flags])
    stem = "bench_depthwise_smoke" if args.smoke else "bench_depthwise"
    folder = RunFolder(ROOT / "results")
    earlier = folder.read_json(f"{stem}.json") or {}
    commands = bench.commands_with(earlier, command)
    rows = {(r["variant"], r.get("seed", 0)): r for r in earlier.get("rows", [])}
    for seed in seeds:
        for name, variant in VARIANTS.items():
            if only and name not in only:
                continue
            rows[name, seed] = run_variant(name, variant, dataset, epochs, args.smoke, seed)
            # Written after every variant, so a long run shows its rows as they come.
            folder.write_json(f"{stem}.json", {"commands": commands, "rows": in_order(rows)})
            folder.write_bytes(f"{stem}.md", markdown(in_order(rows), commands).encode())
    print(markdown(in_order(rows), commands))


def in_order(rows: dict) -> list[dict]:
    """Rows by variant (as VARIANTS lists them), then seed."""
    return sorted(rows.values(), key=lambda r: (list(VARIANTS).index(r["variant"]),
                                                r.get("seed", 0)))


if __name__ == "__main__":
    main()
