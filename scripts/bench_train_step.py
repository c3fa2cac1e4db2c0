"""Training-step speed with flax's max pooling against ucpjax.pooling.max_pool.

For each pooled model of the registry: the jitted loss-and-gradient of one
batch (cross-entropy, train mode), once with every ``max_pool`` of the model
as ucpjax ships it and once with flax's ``nn.max_pool`` swapped in. Times are
the median of repeated calls after one untimed compile call, each ended with
``jax.block_until_ready``; speed-up = flax median / ours median.

Command:
    .venv/bin/python scripts/bench_train_step.py            # --repeats 20
Writes results/bench_train_step.json and results/bench_train_step.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import platform
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ucpjax import models
from ucpjax.run_folder import RunFolder

ROOT = pathlib.Path(__file__).resolve().parent.parent
# (model, input shape of one image, batch size of its experiment)
CASES = [("pcqat_mnist", (28, 28, 1), 128), ("lenet5", (28, 28, 1), 128),
         ("fashion_cnn", (28, 28, 1), 128), ("cifar_cnn", (32, 32, 3), 64)]


@contextlib.contextmanager
def flax_pooling():
    """Builds models with ``nn.max_pool`` (scatter gradient) in place of ours."""
    ours = models.max_pool
    models.max_pool = lambda x, size: nn.max_pool(x, (size, size), (size, size))
    try:
        yield
    finally:
        models.max_pool = ours


def step_seconds(name: str, shape: tuple, batch: int, repeats: int) -> list[float]:
    model = models.create(name)
    variables = models.init(model, shape)
    params = variables.pop("params")
    x = jax.random.normal(jax.random.key(0), (batch, *shape))
    y = jnp.arange(batch) % 10

    def loss(params):
        logits, _ = model.apply({"params": params, **variables}, x, train=True,
                                mutable=list(variables))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grad = jax.jit(jax.value_and_grad(loss))
    jax.block_until_ready(grad(params))
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(grad(params))
        runs.append(time.perf_counter() - start)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "results")
    args = parser.parse_args()
    rows = {}
    for name, shape, batch in CASES:
        ours = step_seconds(name, shape, batch, args.repeats)
        with flax_pooling():
            theirs = step_seconds(name, shape, batch, args.repeats)
        rows[name] = {"batch": batch, "ours_s": ours, "flax_s": theirs,
                      "speedup": statistics.median(theirs) / statistics.median(ours)}
    lines = ["| model | batch | nn.max_pool ms | ucpjax max_pool ms | speed-up |",
             "|---|---|---|---|---|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['batch']} | {statistics.median(row['flax_s']) * 1e3:.1f} "
                     f"| {statistics.median(row['ours_s']) * 1e3:.1f} | {row['speedup']:.2f}x |")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    md = "\n\n".join([
        "# Training step: flax max pooling vs ucpjax.pooling.max_pool",
        (f"Jitted loss and gradient of one batch, median of {args.repeats} calls after the "
         f"compile call. Load average at the end: {load} on {os.cpu_count()} CPUs; "
         f"jax {jax.__version__}, {jax.default_backend()}."),
        "\n".join(lines),
        "Command: `.venv/bin/python scripts/bench_train_step.py`",
    ]) + "\n"
    summary = {"command": ".venv/bin/python scripts/bench_train_step.py", "rows": rows,
               "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg(),
                           "python": platform.python_version(), "jax": jax.__version__}}
    folder = RunFolder(args.out)  # atomic writes
    folder.write_json("bench_train_step.json", summary)
    folder.write_bytes("bench_train_step.md", md.encode())
    print(md)


if __name__ == "__main__":
    main()
