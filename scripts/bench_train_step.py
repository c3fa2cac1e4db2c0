"""Training-step speed: plain flax/lax ops against ucpjax's pooling and convolutions.

For each model: the jitted loss-and-gradient of one batch (cross-entropy,
train mode) three ways, measured in one run:

* plain: flax's ``nn.max_pool`` and XLA's own conv gradients;
* pool: ``ucpjax.pooling.max_pool`` (scatter-free gradient), XLA's convs;
* ours: ``ucpjax.pooling.max_pool`` and ``ucpjax.conv.fast_convs()`` on one device;
* split: ours with the batch split over the CPU devices as ``ucpjax.train`` now
  runs it (``ucpjax.devices``: one XLA host device per core; a model without
  convolutions stays on one device, so its split equals ours).

Times are the median of repeated calls after one untimed compile call, each
ended with ``jax.block_until_ready``, the variants taking turns call by call;
speed-up = plain median / split median.
The machine is shared, so the load average is written next to the numbers.

Command:
    .venv/bin/python scripts/bench_train_step.py        # --repeats 10
Writes results/bench_train_step.json and results/bench_train_step.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import platform
import statistics
import sys
import time

import flax.linen as nn

from ucpjax import devices

devices.use_cpu_cores()  # before JAX starts: the split variant needs one device per core

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from ucpjax import models  # noqa: E402
from ucpjax.conv import fast_convs  # noqa: E402
from ucpjax.run_folder import RunFolder  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The command as run (relative script path, flags), for the written results.
COMMAND = " ".join([".venv/bin/python", *sys.argv])

# (model, input shape of one image, batch size of its experiment)
CASES = [("lenet300", (28, 28, 1), 128), ("pcqat_mnist", (28, 28, 1), 128),
         ("lenet5", (28, 28, 1), 128),
         ("fashion_cnn", (28, 28, 1), 128), ("cifar_cnn", (32, 32, 3), 48),
         ("resnet8", (32, 32, 3), 64), ("mobilenet_cifar", (32, 32, 3), 64)]
VARIANTS = ("plain", "pool", "ours", "split")


@contextlib.contextmanager
def flax_pooling():
    """Builds models with ``nn.max_pool`` (scatter gradient) in place of ours."""
    ours = models.max_pool
    models.max_pool = lambda x, size: nn.max_pool(x, (size, size), (size, size))
    try:
        yield
    finally:
        models.max_pool = ours


def loss_and_grad(name: str, shape: tuple, batch: int, convs, split: bool):
    """``(jitted value_and_grad, (params, x, y))`` of one batch; ``convs()`` wraps the
    trace; ``split`` places the batch as ``ucpjax.train`` does (else on one device)."""
    model = models.create(name)
    variables = models.init(model, shape)
    params = variables.pop("params")
    x = jax.random.normal(jax.random.key(0), (batch, *shape))
    y = jnp.arange(batch) % 10

    def loss(params, x, y):
        with convs():
            logits, _ = model.apply({"params": params, **variables}, x, train=True,
                                    mutable=list(variables))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    args = (params, x, y)
    if split:
        share = devices.weight_grad_share(jax.make_jaxpr(jax.grad(loss))(*args).jaxpr, params)
        mesh = devices.training_mesh(batch, split=share >= devices.SPLIT_SHARE)
        args = (jax.device_put(params, NamedSharding(mesh, PartitionSpec())),
                *jax.device_put((x, y), NamedSharding(mesh, PartitionSpec("data"))))
    return jax.jit(jax.value_and_grad(loss)), args


def interleaved_seconds(calls: dict, repeats: int) -> dict[str, list[float]]:
    """Wall time of ``repeats`` calls of each ``fn(*args)`` in ``calls``, after one
    untimed call each (which compiles, unless the caller has). The variants take
    turns, call by call, so a change in the machine's speed during the run falls
    on all of them alike."""
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    runs = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (fn, args) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            runs[name].append(time.perf_counter() - start)
    return runs


def flops(fn, *args) -> float:
    """XLA's count of the floating-point operations of one call."""
    cost = fn.lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def matmul_rate(repeats: int, n: int = 1024) -> float:
    """The machine's float32 matrix-product rate, FLOP/s (median): what a step at full
    speed could reach, the yardstick for the steps' own rates."""
    a = jnp.ones((n, n), jnp.float32)
    product = jax.jit(lambda a, b: a @ b)
    runs = interleaved_seconds({"product": (product, (a, a))}, repeats)["product"]
    return 2 * n ** 3 / statistics.median(runs)


def measure(name: str, shape: tuple, batch: int, repeats: int) -> dict:
    settings = {"plain": (flax_pooling, contextlib.nullcontext, False),
                "pool": (contextlib.nullcontext, contextlib.nullcontext, False),
                "ours": (contextlib.nullcontext, fast_convs, False),
                "split": (contextlib.nullcontext, fast_convs, True)}
    row, calls = {"batch": batch}, {}
    for variant in VARIANTS:
        pooling, convs, split = settings[variant]
        with pooling():  # the pooling is chosen when the model is traced: by the first call
            fn, args = calls[variant] = loss_and_grad(name, shape, batch, convs, split)
            jax.block_until_ready(fn(*args))
    for variant, runs in interleaved_seconds(calls, repeats).items():
        row[f"{variant}_s"] = runs
    fn, args = calls["ours"]
    row["ours_flops"] = flops(fn, *args)
    row["split_devices"] = len(calls["split"][1][1].sharding.device_set)
    row["speedup"] = statistics.median(row["plain_s"]) / statistics.median(row["split_s"])
    return row


def markdown(rows: dict, repeats: int, load_before, load_after, peak: float) -> str:
    ms = lambda runs: f"{statistics.median(runs) * 1e3:.1f}"
    lines = ["| model | batch | plain ms | + ucpjax max_pool ms | + ucpjax conv (ours) ms "
             "| ours, batch split ms (devices) | split images/s | speed-up | ours GFLOP/s "
             "| share of matmul rate |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        rate = row["batch"] / statistics.median(row["split_s"])
        achieved = row["ours_flops"] / statistics.median(row["ours_s"])
        lines.append(f"| {name} | {row['batch']} | {ms(row['plain_s'])} | {ms(row['pool_s'])} "
                     f"| {ms(row['ours_s'])} | {ms(row['split_s'])} ({row['split_devices']}) "
                     f"| {rate:.0f} | {row['speedup']:.2f}x "
                     f"| {achieved / 1e9:.1f} | {achieved / peak:.0%} |")
    fmt = lambda load: ", ".join(f"{v:.1f}" for v in load)
    return "\n\n".join([
        "# Training step: plain flax/XLA ops vs ucpjax's max_pool and convolutions",
        (f"Jitted loss and gradient of one batch (train mode), median of {repeats} calls "
         "after the compile call. plain: `nn.max_pool`, XLA's conv gradients; "
         "+ ucpjax max_pool: `ucpjax.pooling.max_pool`; + ucpjax conv: also "
         "`ucpjax.conv.fast_convs()`, on one device; batch split: also the batch "
         "split over the CPU devices as `ucpjax.train` runs every step (`ucpjax.devices`). "
         "Speed-up: plain / split. "
         f"Load average (1, 5, 15 min) before: {fmt(load_before)}, after: {fmt(load_after)} "
         f"on {os.cpu_count()} CPUs; jax {jax.__version__}, "
         f"{jax.default_backend()}. GFLOP/s: XLA's FLOP count of the step over its "
         f"time; the matmul rate (a 1024x1024 float32 product, median) is "
         f"{peak / 1e9:.1f} GFLOP/s."),
        "\n".join(lines),
        f"Command: `{COMMAND}`",
    ]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--only", default="", help="comma-separated models (default: all)")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "results")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    load_before = os.getloadavg()
    peak = matmul_rate(args.repeats)
    rows = {name: measure(name, shape, batch, args.repeats)
            for name, shape, batch in CASES if not only or name in only}
    load_after = os.getloadavg()
    md = markdown(rows, args.repeats, load_before, load_after, peak)
    summary = {"command": COMMAND, "repeats": args.repeats, "rows": rows,
               "matmul_flops_per_s": peak,
               "machine": {"cpus": os.cpu_count(), "load_average_before": load_before,
                           "load_average_after": load_after,
                           "python": platform.python_version(), "jax": jax.__version__}}
    folder = RunFolder(args.out)  # atomic writes
    folder.write_json("bench_train_step.json", summary)
    folder.write_bytes("bench_train_step.md", md.encode())
    print(md)


if __name__ == "__main__":
    main()
