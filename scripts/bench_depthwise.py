"""A user's depthwise BatchNorm CNN through ``ucpjax.compress`` at 75% sparsity, default settings.

    .venv/bin/python scripts/bench_depthwise.py            # about 40 minutes on 2 cores
    .venv/bin/python scripts/bench_depthwise.py --smoke    # a data slice, minutes

The net of the conv-nets issue: conv + BatchNorm, a depthwise 3x3 conv and a
1x1 conv each with BatchNorm, max-pool, a global average pool, Dropout,
Dense + BatchNorm, Dense. It is trained on 10,000 MNIST images (Adam 5e-3, 8
epochs), then compressed with ``Recipe(prune=PruneConfig(target_sparsity=0.75))``
and every other setting at its default, and the ``.tflite`` is measured in
LiteRT on the full test set. Variants: the pool written as a flatten, as
``ucpjax.pooling.GlobalAveragePool`` and as a bare ``jnp.mean`` (refused before
any training: the message is recorded), and, as the control, the module pool
pruned with the former default ``scope="layer"`` (uniform 75% per layer).
Writes results/bench_depthwise.{json,md} (--smoke: bench_depthwise_smoke.*).
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax

import ucpjax
from ucpjax import data, experiment, models, train
from ucpjax.config import ConfigError
from ucpjax.model import Model, check_quantizable
from ucpjax.prune import PruneConfig
from ucpjax.recipe import Recipe
from ucpjax.run_folder import RunFolder

ROOT = pathlib.Path(__file__).resolve().parent.parent




VARIANTS = {  # name: (pool, prune scope)
    "flatten": ("flatten", "erk"),
    "GlobalAveragePool": ("module", "erk"),
    "bare jnp.mean": ("mean", "erk"),
    "GlobalAveragePool, scope=layer (former default)": ("module", "layer"),
}


def dense(module, dataset, epochs: float) -> tuple[dict, float]:
    variables = dict(module.init(jax.random.key(0), dataset.x_train[:1], train=False))
    config = train.TrainConfig(epochs=epochs, batch_size=64, learning_rate=5e-3)
    state, _ = train.fit(variables["params"], train.classification_loss(module),
                         train.make_optimizer(config, train.total_steps(config, len(
                             dataset.x_train))), dataset.x_train, dataset.y_train,
                         config=config, seed=0, extra={"batch_stats": variables["batch_stats"]})
    model = Model(module, {"params": state.params, **state.extra}).settled(dataset.x_train)
    return model.variables, train.accuracy(model.apply_fn(), model.params, dataset.x_test,
                                           dataset.y_test)


def run_variant(name: str, pool: str, scope: str, dataset, epochs: float,
                smoke: bool) -> dict:
    module = models.DepthwiseCnn(pool=pool)
    recipe = Recipe(prune=PruneConfig(target_sparsity=0.75, scope=scope))
    if smoke:
        recipe = experiment.smoke(experiment.Experiment(recipe=recipe)).recipe
    began = time.perf_counter()
    try:
        initial = module.init(jax.random.key(0), dataset.x_train[:1], train=False)
        check_quantizable(Model(module, dict(initial)), dataset.input_shape)
    except ConfigError as err:
        print(f"{name}: refused: {err}", flush=True)
        return {"variant": name, "refused": str(err)}
    variables, dense_accuracy = dense(module, dataset, epochs)
    result = ucpjax.compress(module, variables, train=(dataset.x_train, dataset.y_train),
                             test=(dataset.x_test, dataset.y_test),
                             val=(dataset.x_val, dataset.y_val), recipe=recipe, check=False)
    final = result.report["final"]
    row = {"variant": name, "dense_accuracy": dense_accuracy,
           "prune_accuracy": result.report["rows"][1]["accuracy"],
           "drop_points": 100 * (dense_accuracy - final["tflite_accuracy"]),
           "seconds": time.perf_counter() - began,
           **{key: final[key] for key in (
               "tflite_accuracy", "sparsity", "tflite_zip_bytes", "packed_bytes",
               "tflite_codes_per_channel", "weights_faithful", "tflite_within_tolerance")}}
    print(f"{name}: dense {dense_accuracy:.4f} -> .tflite {final['tflite_accuracy']:.4f} "
          f"({row['drop_points']:+.2f} points)", flush=True)
    return row


def markdown(rows: list[dict], command: str) -> str:
    lines = ["# A depthwise BatchNorm CNN at 75% sparsity, default settings", "",
             "| variant | dense | after prune | .tflite | drop (points) | sparsity | zipped B "
             "| packed B | codes/channel | faithful |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['variant']} | refused before training: {r['refused']} "
                         "| | | | | | | | |")
            continue
        lines.append(f"| {r['variant']} | {r['dense_accuracy']:.4f} | {r['prune_accuracy']:.4f} "
                     f"| {r['tflite_accuracy']:.4f} | {r['drop_points']:.2f} "
                     f"| {r['sparsity']:.3f} | {r['tflite_zip_bytes']:,} "
                     f"| {r['packed_bytes']:,} | {r['tflite_codes_per_channel']} "
                     f"| {r['weights_faithful']} |")
    return "\n".join([*lines, "", f"Command: `{command}`", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    mnist = data.load("mnist", val_size=1000)
    dataset = mnist.take(1000, 500) if args.smoke else mnist.take(10_000, len(mnist.x_test))
    epochs = 2 if args.smoke else 8
    command = "python scripts/bench_depthwise.py" + (" --smoke" if args.smoke else "")
    stem = "bench_depthwise_smoke" if args.smoke else "bench_depthwise"
    folder, rows = RunFolder(ROOT / "results"), []
    for name, (pool, scope) in VARIANTS.items():
        rows.append(run_variant(name, pool, scope, dataset, epochs, args.smoke))
        # Written after every variant, so a long run shows its rows as they come.
        folder.write_json(f"{stem}.json", {"command": command, "rows": rows})
        folder.write_bytes(f"{stem}.md", markdown(rows, command).encode())
    print(markdown(rows, command))


if __name__ == "__main__":
    main()
