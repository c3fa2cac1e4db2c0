"""Where a training step's time goes: each conv's forward, input and weight gradient.

For each model, every ``conv_general_dilated`` of its train-mode forward pass
(read from the jaxpr, so shapes, strides, padding and groups are exact) is
timed alone, three ways (forward, input gradient, weight gradient), with XLA's
own rules ("lax"), with ``ucpjax.conv`` ("ours": the path its shape rules pick)
and, for ungrouped convs, as ``ucpjax.conv``'s im2col product ("im2col"),
whatever the rules pick: the measurements behind those rules. The whole jitted
loss-and-gradient step is timed too, plain and under ``fast_convs()``; what
the convs do not account for is BatchNorm, ReLU, pooling, the dense layers and
the loss. Times are medians of repeated calls after a compile call.

Command:
    .venv/bin/python scripts/profile_train_step.py      # --repeats 5
Writes results/profile_train_step.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax
from jax import lax

from ucpjax import conv, models
from ucpjax.run_folder import RunFolder

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The command as run (relative script path, flags), for the written results.
COMMAND = " ".join([".venv/bin/python", *sys.argv])

CASES = [("pcqat_mnist", (28, 28, 1), 128), ("lenet5", (28, 28, 1), 128),
         ("cifar_cnn", (32, 32, 3), 48), ("resnet8", (32, 32, 3), 64),
         ("mobilenet_cifar", (32, 32, 3), 64)]
PARTS = ("forward", "input grad", "weight grad")
IMPLS = ("lax", "ours", "im2col")


def conv_calls(model, variables, x) -> list[dict]:
    """Shape, strides, padding and groups of every conv in ``model``'s train-mode forward."""
    fn = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
    calls = []
    for eqn in jax.make_jaxpr(fn)(variables, x).jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            calls.append({"x": lhs, "kernel": rhs, "strides": eqn.params["window_strides"],
                          "padding": eqn.params["padding"],
                          "groups": eqn.params["feature_group_count"]})
    return calls


def median_ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        runs.append(time.perf_counter() - start)
    return statistics.median(runs) * 1e3


def time_conv(call: dict, impl, repeats: int) -> dict:
    """Milliseconds of the forward pass and of each gradient of one conv."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, call["x"])
    kernel = jax.random.normal(k2, call["kernel"])
    fwd = lambda x, w: impl(x, w, call["strides"], call["padding"],
                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                            feature_group_count=call["groups"])
    dy = jax.random.normal(k3, jax.eval_shape(fwd, x, kernel).shape)
    grad = lambda i: jax.jit(lambda x, w, dy: jax.vjp(fwd, x, w)[1](dy)[i])
    return {"forward": median_ms(jax.jit(fwd), x, kernel, repeats=repeats),
            "input grad": median_ms(grad(0), x, kernel, dy, repeats=repeats),
            "weight grad": median_ms(grad(1), x, kernel, dy, repeats=repeats)}


def im2col(x, kernel, strides, padding, dimension_numbers, feature_group_count):
    """``ucpjax.conv``'s im2col product for any ungrouped conv (``padding`` explicit)."""
    del dimension_numbers, feature_group_count
    return conv._im2col_conv(x, kernel, tuple(strides), tuple(map(tuple, padding)), None)


def step_ms(model, variables, x, convs, repeats: int) -> float:
    params = {k: v for k, v in variables.items() if k == "params"}["params"]
    extra = {k: v for k, v in variables.items() if k != "params"}
    y = jnp.arange(x.shape[0]) % 10

    def loss(params):
        with convs():
            logits, _ = model.apply({"params": params, **extra}, x, train=True,
                                    mutable=list(extra))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return median_ms(jax.jit(jax.value_and_grad(loss)), params, repeats=repeats)


def profile(name: str, shape: tuple, batch: int, repeats: int) -> dict:
    model = models.create(name)
    variables = models.init(model, shape)
    x = jax.random.normal(jax.random.key(1), (batch, *shape))
    layers = []
    for call in conv_calls(model, variables, x):
        layers.append({**call, "lax": time_conv(call, lax.conv_general_dilated, repeats),
                       "ours": time_conv(call, conv.conv_general_dilated, repeats),
                       "im2col": (time_conv(call, im2col, repeats) if call["groups"] == 1
                                  else None)})
    return {"batch": batch, "layers": layers,
            "step_lax_ms": step_ms(model, variables, x, contextlib.nullcontext, repeats),
            "step_ours_ms": step_ms(model, variables, x, conv.fast_convs, repeats)}


def markdown(results: dict, repeats: int, loads) -> str:
    out = ["# Where the training step's time goes (XLA CPU)",
           (f"Each conv of the model timed alone (median of {repeats} calls, ms): forward, "
            "input gradient, weight gradient, as XLA computes them (lax), as "
            "`ucpjax.conv` does (ours) and as its im2col product (im2col; - for grouped "
            "convs, and in the totals where a grouped conv has none). 'step' is the whole "
            "jitted loss and gradient. "
            f"Load average (1, 5, 15 min) before/after: {loads[0]} / {loads[1]} on "
            f"{os.cpu_count()} CPUs; jax {jax.__version__}.")]
    for name, r in results.items():
        head = " | ".join(f"{part} {impl}" for part in ("fwd", "dX", "dW") for impl in IMPLS)
        rows = [f"| conv (x -> kernel, stride, groups) | {head} |", "|---" * 10 + "|"]
        # A total only where every conv has the time (im2col has none for grouped convs).
        totals = {(impl, part): (sum(layer[impl][part] for layer in r["layers"])
                                 if all(layer[impl] for layer in r["layers"]) else None)
                  for impl in IMPLS for part in PARTS}
        ms = lambda v: "-" if v is None else f"{v:.1f}"
        for layer in r["layers"]:
            cells = " | ".join(ms(layer[impl] and layer[impl][part])
                               for part in PARTS for impl in IMPLS)
            rows.append(f"| {'x'.join(map(str, layer['x']))} -> "
                        f"{'x'.join(map(str, layer['kernel']))}, s{layer['strides'][0]}, "
                        f"g{layer['groups']} | {cells} |")
        cells = " | ".join(f"**{ms(totals[impl, part])}**" for part in PARTS for impl in IMPLS)
        rows.append(f"| all convs | {cells} |")
        lax_convs = sum(totals["lax", p] for p in PARTS)
        ours_convs = sum(totals["ours", p] for p in PARTS)
        out += [f"## {name} (batch {r['batch']})", "\n".join(rows),
                (f"Whole step: {r['step_lax_ms']:.1f} ms plain, {r['step_ours_ms']:.1f} ms "
                 f"with `fast_convs()`. The convs alone sum to {lax_convs:.1f} ms (lax) / "
                 f"{ours_convs:.1f} ms (ours), of which the weight gradient "
                 f"{totals['lax', 'weight grad']:.1f} / {totals['ours', 'weight grad']:.1f} ms.")]
    out.append(f"Command: `{COMMAND}`")
    return "\n\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="", help="comma-separated models (default: all)")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "results")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    fmt = lambda: ", ".join(f"{v:.1f}" for v in os.getloadavg())
    before = fmt()
    results = {name: profile(name, shape, batch, args.repeats)
               for name, shape, batch in CASES if not only or name in only}
    md = markdown(results, args.repeats, (before, fmt()))
    folder = RunFolder(args.out)
    folder.write_bytes("profile_train_step.md", md.encode())
    print(md)


if __name__ == "__main__":
    main()
