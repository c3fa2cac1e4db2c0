"""TFLite latency of every registered model: float and int8, 1 and 2 threads, XNNPACK
and the builtin kernels, in one process.

Latency depends on shapes and ops, not on the weights' values (the int8 kernels run
zeros like any other weight), so each model is freshly initialised, its BatchNorm
folded and its weights put on the int8 grid, then converted from real images of
its dataset (calibration). Each configuration is timed in ``--rounds`` rounds of
``--repeats`` single-image invokes after a warm-up, a model's configurations
taking turns round by round (so drift in the machine's speed falls on all of
them alike); the table gives the median over all invokes and the spread of the
round medians (min-max). The ratios (int8 against float, and against the cut
model) come from the two files alternating invoke by invoke (``paired_ratio``).
The ops of each .tflite are listed with the number of partitions XNNPACK made
(DELEGATE nodes); LiteRT's Python API has no per-op profiler.

Before and after structured pruning: each model is also exported with the share
``--channels`` of every family of tied channel groups cut out (``ucpjax.channels``;
the lowest-ranked groups of the fresh model, which is what latency depends on)
and timed in the same process; the accuracy such a model keeps is measured by a
real run (RESULTS.md).

Command:
    .venv/bin/python scripts/bench_latency.py      # --models lenet300,cifar_cnn
    .venv/bin/python scripts/bench_latency.py --from-json   # tables again, no timing
Writes results/bench_latency.json and results/bench_latency.md and prints the table.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

from ucpjax import channels, data, export, models, quantize
from ucpjax.model import Model
from ucpjax.run_folder import RunFolder

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMMAND = " ".join([".venv/bin/python", *sys.argv])
DATASETS = {"lenet300": "mnist", "lenet5": "mnist", "pcqat_mnist": "mnist",
            "fashion_cnn": "fashion_mnist", "cifar_cnn": "cifar10", "resnet8": "cifar10",
            "mobilenet_cifar": "cifar10"}
CALIBRATION = 100


def cpu_name() -> str:
    """The CPU's model name and the SIMD flags int8 kernels care about."""
    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    name = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")),
                platform.processor() or "unknown")
    flags = next((x.split(":", 1)[1].split() for x in lines if x.startswith("flags")), [])
    simd = [f for f in flags if f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni",
                                      "amx_int8")]
    vnni = {"avx512_vnni", "avx_vnni"} & set(simd)
    return f"{name}, flags {' '.join(simd) or 'none'}" + (
        "" if vnni else " (no VNNI: no int8 dot product)")


def slimmed(model: Model, input_shape, fraction: float) -> Model:
    """``model`` with ``fraction`` of each family of channel groups cut out."""
    groups = channels.find_groups(model.apply_fn(), model.params, input_shape)
    alive = channels.drop_lowest(channels.group_scores(model.params, groups),
                                 np.ones(groups.count, bool), groups, fraction)
    return Model(channels.Slimmed(model.module),
                 channels.shrink(model.variables, groups, ~np.asarray(alive)), model.frozen,
                 folded_bn=True)


def tflite_pair(name: str, dataset, channel_fraction: float = 0.0) -> tuple[bytes, bytes]:
    """(int8, float) .tflite of a fresh ``name`` with folded BatchNorm (and
    ``channel_fraction`` of its channels cut out)."""
    module = models.create(name, dataset.num_classes)
    model = Model(module, models.init(module, dataset.input_shape)).folded(dataset.input_shape)
    if channel_fraction:
        model = slimmed(model, dataset.input_shape, channel_fraction)
    apply_fn = model.apply_fn()
    params = quantize.quantize_weights(model.params, quantize.QuantizeConfig())
    rep = dataset.x_train[:CALIBRATION]
    return (export.to_tflite(apply_fn, params, dataset.input_shape, rep),
            export.to_tflite(apply_fn, params, dataset.input_shape, rep, int8=False))


def _invoke_us(runner: export.TfliteRunner, x: np.ndarray, count: int,
               first: int = 0) -> list[float]:
    """Microseconds of ``count`` single-image invokes, cycling through ``x``'s images
    from image ``first``."""
    interp, index = runner.interpreter, runner.input["index"]
    times = []
    for i in range(first, first + count):
        interp.set_tensor(index, x[i % len(x)])
        start = time.perf_counter_ns()
        interp.invoke()
        times.append((time.perf_counter_ns() - start) / 1e3)
    return times


def _warm_runner(model_bytes: bytes, threads: int, use_xnnpack: bool,
                 warmup: int = 50) -> tuple[export.TfliteRunner, np.ndarray]:
    """An interpreter of ``model_bytes`` after ``warmup`` invokes, and its 8 inputs."""
    runner = export.TfliteRunner(model_bytes, threads=threads, use_xnnpack=use_xnnpack)
    x = runner.quantize_input(
        np.random.default_rng(0).random((8, 1, *runner.input_shape), np.float32))
    _invoke_us(runner, x, warmup)
    return runner, x


def timings(files: dict[str, bytes], configs: list[tuple[str, str, int, bool]], *,
            rounds: int, repeats: int) -> dict[str, dict]:
    """``{key: {"median_us", "round_medians_us"}}`` of each ``(key, kind, threads,
    xnnpack)`` configuration of the ``.tflite`` ``files[kind]``. The configurations
    take turns round by round, so drift in the machine's speed over minutes falls
    on all of them alike; their ratios come from ``paired_ratio``, which alternates
    finer."""
    runners = {key: _warm_runner(files[kind], threads, xnnpack)
               for key, kind, threads, xnnpack in configs}
    every = {key: [] for key in runners}
    medians = {key: [] for key in runners}
    for _ in range(rounds):
        for key, (runner, x) in runners.items():
            times = _invoke_us(runner, x, repeats)
            medians[key].append(statistics.median(times))
            every[key] += times
    return {key: {"median_us": statistics.median(every[key]), "round_medians_us": medians[key]}
            for key in runners}


def paired_ratio(a: bytes, b: bytes, *, rounds: int, repeats: int) -> dict:
    """How many times longer an invoke of ``.tflite`` ``a`` takes than one of ``b`` (1
    thread, XNNPACK): the two alternate invoke by invoke, so both meet the same
    machine, and the ratio of each round's medians is taken; returns their median
    and the round ratios. Timed as separate blocks, cifar_cnn's int8 model against
    its cut one gave round ratios from 1.02 to 2.71 (this machine's speed jumps
    about 2x for seconds at a time); alternating, 1.98 to 2.08."""
    pair = [_warm_runner(model_bytes, 1, True) for model_bytes in (a, b)]
    ratios = []
    for _ in range(rounds):
        times = ([], [])
        for i in range(repeats):
            for (runner, x), into in zip(pair, times, strict=True):
                into.extend(_invoke_us(runner, x, 1, first=i))
        ratios.append(statistics.median(times[0]) / statistics.median(times[1]))
    return {"ratio": statistics.median(ratios), "round_ratios": ratios}


def op_counts(model_bytes: bytes, use_xnnpack: bool) -> dict:
    """Op types of the interpreter's execution plan: with XNNPACK, the delegated nodes
    appear as one DELEGATE op each, and what is left runs on the builtin kernels."""
    interp = export.interpreter(model_bytes, use_xnnpack=use_xnnpack)
    return dict(collections.Counter(op["op_name"] for op in interp._get_ops_details()))


def bench(name: str, rounds: int, repeats: int, channel_fraction: float) -> dict:
    dataset = data.load(DATASETS[name])
    files = dict(zip(("int8", "float"), tflite_pair(name, dataset), strict=True))
    if channel_fraction:
        files.update(zip(("int8_slim", "float_slim"),
                         tflite_pair(name, dataset, channel_fraction), strict=True))
    result = {"model": name, "data": DATASETS[name], "bytes": {k: len(v) for k, v in files.items()},
              "ops": {k: op_counts(v, False) for k, v in files.items()},
              "ops_with_xnnpack": {k: op_counts(v, True) for k, v in files.items()}}
    configs = [(f"{kind}/{threads}t/{'xnnpack' if xnnpack else 'builtin'}", kind, threads, xnnpack)
               for kind in files for threads in (1, 2)
               for xnnpack in ((True, False) if kind in ("int8", "float") else (True,))]
    result["latency"] = timings(files, configs, rounds=rounds, repeats=repeats)
    pairs = {"int8_vs_float": ("int8", "float")}
    if channel_fraction:
        pairs["slim_speedup"] = ("int8", "int8_slim")
    result["ratios"] = {key: paired_ratio(files[a], files[b], rounds=rounds, repeats=repeats)
                        for key, (a, b) in pairs.items()}
    for key, t in result["latency"].items():
        print(f"{name} {key}: {t['median_us']:.1f} us", flush=True)
    return result


def cell(t: dict) -> str:
    lo, hi = min(t["round_medians_us"]), max(t["round_medians_us"])
    return f"{t['median_us']:.1f} [{lo:.1f}-{hi:.1f}]"


def ratio_cell(row: dict, key: str, a: str, b: str, unit: str = "") -> str:
    """``paired_ratio``'s figure [round range]; a results file from before it has the
    ratio of the two medians alone."""
    if key not in row.get("ratios", {}):
        t = row["latency"]
        return f"{t[a]['median_us'] / t[b]['median_us']:.2f}{unit}"
    r = row["ratios"][key]
    return f"{r['ratio']:.2f}{unit} [{min(r['round_ratios']):.2f}-{max(r['round_ratios']):.2f}]"


def markdown(rows: list[dict], meta: dict) -> str:
    keys = [f"{kind}/{t}t/{k}" for kind in ("float", "int8") for t in (1, 2)
            for k in ("xnnpack", "builtin")]
    lines = [
        "# TFLite latency per image (us): float vs int8, 1-2 threads, XNNPACK vs builtin",
        "",
        (f"CPU: {meta['cpu']} ({meta['cpus']} cores), x86-64; phones are ARM, so the "
         "ratios, not the microseconds, are what carries over. Median over "
         f"{meta['rounds']} x {meta['repeats']} single-image invokes [min-max of the "
         f"{meta['rounds']} round medians], a model's configurations taking turns "
         "round by round. The ratio columns come from the two models alternating "
         "invoke by invoke, 1 thread, XNNPACK (`paired_ratio`): median of the round "
         "ratios [min-max]. Load average before / after: "
         f"{meta['load_before']} / {meta['load_after']}."),
        "",
        "| model | " + " | ".join(keys) + " | int8 / float (1t, XNNPACK) |",
        "|---|" + "---|" * (len(keys) + 1),
    ]
    for r in rows:
        t = r["latency"]
        ratio = ratio_cell(r, "int8_vs_float", "int8/1t/xnnpack", "float/1t/xnnpack")
        lines.append(f"| {r['model']} | " + " | ".join(cell(t[k]) for k in keys)
                     + f" | {ratio} |")
    lines += ["", "Ops of each int8 .tflite and the partitions XNNPACK made of the int8 "
              "and float graphs (DELEGATE nodes; one means it took the graph whole):", "",
              "| model | int8 ops | XNNPACK partitions, int8 / float | bytes, int8 / float |",
              "|---|---|---|---|"]
    for r in rows:
        ops = ", ".join(f"{k} {v}" for k, v in sorted(r["ops"]["int8"].items()))
        parts = " / ".join(str(r["ops_with_xnnpack"][k].get("DELEGATE", 0))
                           for k in ("int8", "float"))
        lines.append(f"| {r['model']} | {ops} | {parts} | "
                     f"{r['bytes']['int8']:,} / {r['bytes']['float']:,} |")
    slim = [r for r in rows if "int8_slim/1t/xnnpack" in r["latency"]]
    if slim:
        lines += ["", f"Before and after structured pruning (a share of {meta['channels']} "
                  "of every family of tied channels cut out; XNNPACK; us per image):", "",
                  "| model | int8 1t | int8 slim 1t | speed-up | int8 2t | int8 slim 2t | "
                  "float 1t | float slim 1t | bytes, int8 / int8 slim |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in slim:
            t = r["latency"]
            speedup = ratio_cell(r, "slim_speedup", "int8/1t/xnnpack", "int8_slim/1t/xnnpack",
                                 "x")
            lines.append(
                f"| {r['model']} | {cell(t['int8/1t/xnnpack'])} | "
                f"{cell(t['int8_slim/1t/xnnpack'])} | {speedup} | "
                f"{cell(t['int8/2t/xnnpack'])} | {cell(t['int8_slim/2t/xnnpack'])} | "
                f"{cell(t['float/1t/xnnpack'])} | {cell(t['float_slim/1t/xnnpack'])} | "
                f"{r['bytes']['int8']:,} / {r['bytes']['int8_slim']:,} |")
    lines += ["", f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DATASETS))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--channels", type=float, default=0.5,
                        help="share of each channel family cut out for the after-"
                             "structured-pruning rows (0: none)")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "results")
    parser.add_argument("--from-json", action="store_true",
                        help="write the tables again from --out's bench_latency.json")
    args = parser.parse_args()
    if args.from_json:
        saved = json.loads((args.out / "bench_latency.json").read_text())
        md = markdown(saved["rows"], {"channels": 0, **saved, "cpu": cpu_name()})  # same machine
        RunFolder(args.out).write_bytes("bench_latency.md", md.encode())
        print(md)
        return
    names = args.models.split(",")
    unknown = sorted(set(names) - set(DATASETS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {sorted(DATASETS)}")
    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    rows = [bench(name, args.rounds, args.repeats, args.channels) for name in names]
    meta = {"cpu": cpu_name(), "cpus": os.cpu_count(), "rounds": args.rounds,
            "repeats": args.repeats, "channels": args.channels, "load_before": load_before,
            "load_after": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
            "command": COMMAND}
    md = markdown(rows, meta)
    results = RunFolder(args.out)  # its atomic writes
    results.write_json("bench_latency.json", {**meta, "rows": rows})
    results.write_bytes("bench_latency.md", md.encode())
    print(md)


if __name__ == "__main__":
    main()
