"""k-means speed: ucpjax.cluster (jitted JAX) against scikit-learn's KMeans, same run.

LeNet-300-100 is trained briefly on MNIST, every kernel pruned to ~90% zeros by
magnitude, and each kernel's non-zero weights clustered with k = 16 by both
implementations from the same starting centroids (density init, which leaves
no cluster empty: sklearn would relocate an empty cluster, we keep it), the
same number of Lloyd iterations, one run, tol = 0 so that every iteration runs.

JAX's first call (trace + compile + run) is reported apart from the run time;
run times are the median (and min / max) of repeated calls, each ended with
``jax.block_until_ready``. Speed-up = sklearn median / ours median.

Command:
    .venv/bin/python scripts/bench_kmeans.py            # --repeats 7 --iterations 30
Writes results/bench_kmeans.json and results/bench_kmeans.md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from ucpjax import cluster, data, models, rules
from ucpjax import train as train_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def trained_pruned_params(epochs: float, sparsity: float, seed: int):
    """LeNet-300-100 trained for ``epochs`` on MNIST, kernels pruned per layer by magnitude."""
    dataset = data.load("mnist")
    model = models.create("lenet300")
    params = models.init(model, dataset.input_shape, seed)["params"]
    config = train_lib.TrainConfig(epochs=epochs, batch_size=128, learning_rate=1e-3)
    steps = train_lib.total_steps(config, len(dataset.x_train))
    state, _ = train_lib.fit(params, train_lib.classification_loss(model),
                             train_lib.make_optimizer(config, steps),
                             dataset.x_train, dataset.y_train, config=config, seed=seed)
    params = jax.tree.map(np.asarray, state.params)
    apply_fn = train_lib.inference_fn(model, {})
    accuracy = train_lib.accuracy(apply_fn, params, dataset.x_test, dataset.y_test)
    for layer in params.values():
        w = layer["kernel"]
        layer["kernel"] = np.where(np.abs(w) > np.quantile(np.abs(w), sparsity), w, 0)
    return params, accuracy, train_lib.accuracy(apply_fn, params, dataset.x_test, dataset.y_test)


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    """(first call seconds, seconds of each of ``repeats`` further calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return first, runs


def spread(runs: list[float]) -> dict:
    return {"median_s": statistics.median(runs), "min_s": min(runs), "max_s": max(runs),
            "runs_s": runs}


def bench_layer(w: np.ndarray, *, k: int, iterations: int, repeats: int) -> dict:
    from sklearn.cluster import KMeans

    values = jnp.asarray(w.ravel(), jnp.float32)
    mask = values != 0
    start = cluster.initial_centroids(values, mask, k=k, init="density", key=jax.random.key(0))
    jax.block_until_ready((values, mask, start))

    result = {}
    ours = lambda: jax.block_until_ready(
        cluster.lloyd(values, mask, start, iterations=iterations))
    first, runs = timed(ours, repeats)
    centroids, assignment, history = ours()
    shared = np.append(np.asarray(centroids), 0)[np.asarray(assignment)]
    nz = w.ravel() != 0
    result["ours_full_layer"] = {"first_call_s": first, **spread(runs)}

    def compacted():  # what cluster.cluster runs: non-zeros only, padded to a power of two
        padded, padded_mask = cluster.compact_nonzero(w)
        return jax.block_until_ready(
            cluster.lloyd(padded, padded_mask, start, iterations=iterations))

    first, runs = timed(compacted, repeats)
    same = np.array_equal(np.asarray(compacted()[0]), np.asarray(centroids))
    result["ours"] = {"first_call_s": first, **spread(runs), "same_centroids_as_full": same,
                      "inertia": float(((w.ravel() - shared)[nz].astype(np.float64) ** 2).sum()),
                      "history_last": float(history[-1])}

    x = w.ravel()[nz].astype(np.float32)[:, None]
    init = np.asarray(start, np.float32)[:, None]
    fit = lambda: KMeans(n_clusters=k, init=init, n_init=1, max_iter=iterations,
                         tol=0, algorithm="lloyd").fit(x)
    first, runs = timed(fit, repeats)
    model = fit()
    # Untimed float64 run: which float32 result is nearer to exact arithmetic.
    exact = KMeans(n_clusters=k, init=init.astype(np.float64), n_init=1, max_iter=iterations,
                   tol=0, algorithm="lloyd").fit(x.astype(np.float64))
    result["sklearn"] = {"first_call_s": first, **spread(runs), "inertia": float(model.inertia_),
                         "n_iter": int(model.n_iter_), "inertia_float64": float(exact.inertia_)}

    # The whole per-layer call as cluster() makes it (non-zeros picked out, k-means with
    # its initialisation, weights written back) against sklearn given the same layer
    # (its non-zeros picked out inside the timing too).
    config = cluster.ClusterConfig(num_clusters=k, init="density", iterations=iterations)
    whole = lambda: cluster.share_leaf(w, k, config, jax.random.key(0))
    first, runs = timed(whole, repeats)
    result["ours_whole_call"] = {"first_call_s": first, **spread(runs)}
    whole_sklearn = lambda: KMeans(n_clusters=k, init=init, n_init=1, max_iter=iterations, tol=0,
                                   algorithm="lloyd").fit(w.ravel()[w.ravel() != 0][:, None])
    first, runs = timed(whole_sklearn, repeats)
    result["sklearn_whole_call"] = {"first_call_s": first, **spread(runs)}
    result.update(size=int(w.size), nonzero=int(nz.sum()), k=k, iterations=iterations,
                  speedup=result["sklearn"]["median_s"] / result["ours"]["median_s"],
                  speedup_whole_call=(result["sklearn_whole_call"]["median_s"]
                                      / result["ours_whole_call"]["median_s"]),
                  centroid_max_abs_diff=float(np.abs(
                      np.sort(model.cluster_centers_[:, 0]) - np.asarray(centroids)).max()))
    return result


LOAD_BEFORE = os.getloadavg()


def sklearn_threads() -> int | None:
    """Threads of the OpenMP pool that sklearn's KMeans uses."""
    from threadpoolctl import threadpool_info

    pools = [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "openmp"]
    return max(pools) if pools else None


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def table(results: dict) -> str:
    lines = [
        ("| layer | weights | non-zero | k | iters | ours first call (s) | ours run ms "
        "median [min-max] | ours, whole layer + mask, ms | sklearn ms median [min-max] | "
        "speed-up median (min/min) | whole call: ours ms | whole call: sklearn ms | "
        "whole call speed-up | inertia ours | "
        "inertia sklearn | rel. diff | inertia sklearn float64 |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        o, s, f = r["ours"], r["sklearn"], r["ours_full_layer"]
        ow, sw = r["ours_whole_call"], r["sklearn_whole_call"]
        rel = abs(o["inertia"] - s["inertia"]) / s["inertia"]
        lines.append(
            f"| {name} | {r['size']:,} | {r['nonzero']:,} | {r['k']} | {r['iterations']} "
            f"(sk {s['n_iter']}) | {o['first_call_s']:.2f} | {ms(o['median_s'])} "
            f"[{ms(o['min_s'])}-{ms(o['max_s'])}] | {ms(f['median_s'])} | "
            f"{ms(s['median_s'])} "
            f"[{ms(s['min_s'])}-{ms(s['max_s'])}] | {r['speedup']:.1f}x "
            f"({s['min_s'] / o['min_s']:.1f}x) | {ms(ow['median_s'])} | "
            f"{ms(sw['median_s'])} | {r['speedup_whole_call']:.1f}x | "
            f"{o['inertia']:.6g} | {s['inertia']:.6g} | {rel:.1e} | "
            f"{s['inertia_float64']:.6g} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "results")
    args = parser.parse_args()
    params, dense_acc, pruned_acc = trained_pruned_params(args.epochs, args.sparsity, seed=0)
    names = jax.tree_util.tree_map_with_path(lambda p, _: rules.path_name(p), params)
    results = {}
    for name, w in zip(jax.tree.leaves(names), jax.tree.leaves(params), strict=True):
        if name.endswith("kernel"):
            results[name] = bench_layer(w, k=args.k, iterations=args.iterations,
                                        repeats=args.repeats)
    ours = sum(r["ours"]["median_s"] for r in results.values())
    theirs = sum(r["sklearn"]["median_s"] for r in results.values())
    ours_whole = sum(r["ours_whole_call"]["median_s"] for r in results.values())
    theirs_whole = sum(r["sklearn_whole_call"]["median_s"] for r in results.values())
    threads = sklearn_threads()
    summary = {
        "command": ".venv/bin/python scripts/bench_kmeans.py",
        # Repository-relative, as every results file records paths.
        "args": {k: os.path.relpath(v.resolve(), ROOT) if isinstance(v, pathlib.Path)
                 else str(v) for k, v in vars(args).items()},
        "test_accuracy_dense": dense_acc, "test_accuracy_pruned": pruned_acc,
        "total_median_s": {"ours": ours, "sklearn": theirs}, "total_speedup": theirs / ours,
        "total_whole_call_median_s": {"ours": ours_whole, "sklearn": theirs_whole},
        "total_whole_call_speedup": theirs_whole / ours_whole, "sklearn_threads": threads,
        "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg(),
                    "python": platform.python_version(), "jax": jax.__version__,
                    "backend": jax.default_backend()},
        "layers": results,
    }
    md = "\n\n".join([
        "# k-means: ucpjax.cluster (JAX, jitted) vs scikit-learn KMeans (lloyd)",
        (f"LeNet-300-100, {args.epochs:g} epoch(s) on MNIST (test accuracy {dense_acc:.4f}), "
        f"kernels pruned to {args.sparsity:.0%} zeros by magnitude per layer "
        f"(accuracy {pruned_acc:.4f}). Same density-init centroids for both, k = {args.k}, "
        f"{args.iterations} iterations, n_init = 1, tol = 0; {args.repeats} timed repeats "
        "after one untimed first call. Ours as cluster() runs it: non-zero weights picked out "
        "(timed) and zero-padded to a power of two, sorted inside the jitted call; sklearn "
        "gets the non-zero weights. Speed-up = sklearn median / ours median. Whole call: "
        "`cluster.share_leaf` as cluster() runs it per layer (non-zeros picked out, "
        "initialisation, k-means, weights written back) against sklearn picking out the "
        f"same non-zeros and fitting. sklearn's OpenMP threads: {threads}. "
        "Load average before / at the end: "
        f"{', '.join(f'{x:.1f}' for x in LOAD_BEFORE)} / "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs."),
        table(results),
        (f"Total (sum of medians): ours {ms(ours)} ms, sklearn {ms(theirs)} ms, "
        f"speed-up {theirs / ours:.1f}x; whole call: ours {ms(ours_whole)} ms, sklearn "
        f"{ms(theirs_whole)} ms, speed-up {theirs_whole / ours_whole:.1f}x."),
        "Command: `.venv/bin/python scripts/bench_kmeans.py`",
    ]) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in (("bench_kmeans.json", json.dumps(summary, indent=2)),
                       ("bench_kmeans.md", md)):
        tmp = args.out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, args.out / name)
    print(md)


if __name__ == "__main__":
    main()
