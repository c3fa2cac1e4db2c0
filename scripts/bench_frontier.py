"""Accuracy-against-size frontiers: every row of bench_baselines over a sparsity x clusters grid.

    .venv/bin/python scripts/bench_frontier.py --model pcqat_mnist --scale 0.5 --out runs/frontier
    .venv/bin/python scripts/bench_frontier.py --model pcqat_mnist --scale 0.5 \\
        --out runs/frontier --seeds 1,2 --only 0.9:16,0.95:8 --tools ucpjax,pcqat
        # more seeds on chosen points, for chosen tools
    .venv/bin/python scripts/bench_frontier.py --model pcqat_mnist --smoke --sparsities 0.8,0.9 \\
        --clusters 4 --out runs/frontier_smoke

One point of the grid is one run of scripts/bench_baselines.py's rows (ucpjax, ucpjax
prune only, Deep-Compression-style, TFMOT PCQAT) at that sparsity and number of
clusters, with its matched budgets (``--scale`` shortens every row alike). All points of
one seed share the dense models (ucpjax's and TensorFlow's); prune only does not
cluster, so it runs once per sparsity. Finished runs are reused, so a killed sweep
resumes where it stopped and more seeds can be added later.

A tool's frontier is its set of points that no other point of the same tool beats in
both accuracy and zipped bytes (means over seeds). ucpjax is compared with PCQAT at
each PCQAT frontier point: ucpjax's best accuracy at no more bytes. A difference is
called only where it exceeds the noise: the larger of the two points' noises, a
point's noise being its seed spread (sample sd) where it ran under several seeds
and ``--noise`` points (default 0.2, 20 MNIST test images) where it ran once.

Writes results/frontier_<model>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_baselines as bench  # noqa: E402

ROOT = bench.ROOT
TOOLS = (bench.FULL, bench.DEEP_COMPRESSION, bench.PRUNE_ONLY, bench.PCQAT)
# --tools names
TOOL_FLAGS = {"ucpjax": bench.FULL, "dc": bench.DEEP_COMPRESSION, "prune": bench.PRUNE_ONLY,
              "pcqat": bench.PCQAT}
SHORT = {bench.FULL: "ucpjax", bench.DEEP_COMPRESSION: "Deep Compression",
         bench.PRUNE_ONLY: "prune only", bench.PCQAT: "TFMOT PCQAT"}


def _replace_arg(args: list[str], flag: str, value) -> list[str]:
    i = args.index(flag)
    return [*args[:i + 1], str(value), *args[i + 2:]]


def grid_plan(base: bench.Plan, sparsity: float, clusters: int, seed: int,
              tools: set[str]) -> bench.Plan:
    """``base`` at one grid point and seed, its ucpjax rows cut to ``tools``: the same
    overrides on every ucpjax row and TF."""
    point = [f"prune.target_sparsity={sparsity}", f"cluster.num_clusters={clusters}",
             f"seed={seed}"]
    rows = {name: [*overrides, *point] for name, overrides in base.rows.items()
            if name in tools}
    tf_args = base.tf_args
    for flag, value in (("--sparsity", sparsity), ("--clusters", clusters), ("--seed", seed)):
        tf_args = _replace_arg(tf_args, flag, value)
    return dataclasses.replace(base, rows=rows, tf_args=tf_args,
                               dense_args=_replace_arg(base.dense_args, "--seed", seed))


def run_point(base: bench.Plan, out: pathlib.Path, dataset, npz, *, sparsity, clusters, seed,
              tools: set[str], smoke: bool) -> list[dict]:
    """The rows of ``tools`` at one grid point and seed, each tagged with its point."""
    seed_dir = out / f"seed{seed}"
    p = grid_plan(base, sparsity, clusters, seed, tools)
    with_tf = bench.PCQAT in tools
    if with_tf:  # TensorFlow's dense model, trained once per seed
        weights = seed_dir / "tf_dense.npz"
        p = dataclasses.replace(p, tf_args=[*p.tf_args, "--dense-weights",
                                            bench.relative(weights)])
    rows = bench.run_model(p, seed_dir / f"s{sparsity:g}_k{clusters}", dataset, npz,
                           smoke=smoke, with_tf=with_tf, dense_dir=seed_dir / "dense")
    for row in rows:
        row.update(target_sparsity=sparsity, clusters=None if row["name"] == bench.PRUNE_ONLY
                   else clusters, seed=seed)
    return rows


def aggregate(rows: list[dict]) -> list[dict]:
    """One point per (tool, sparsity, clusters): mean and spread over its seeds."""
    groups: dict = {}
    for row in rows:
        key = (row["name"], row["target_sparsity"], row["clusters"])
        groups.setdefault(key, []).append(row)
    points = []
    for (name, sparsity, clusters), group in groups.items():
        acc = [100 * r["tflite_accuracy"] for r in group]
        points.append({
            "tool": name, "sparsity": sparsity, "clusters": clusters,
            "seeds": sorted(r["seed"] for r in group),
            "accuracy": statistics.fmean(acc),
            "spread": statistics.stdev(acc) if len(acc) > 1 else None,
            "zip_bytes": statistics.fmean(r["tflite_zip_bytes"] for r in group),
            "packed_bytes": (statistics.fmean(r["packed_bytes"] for r in group)
                             if all(r.get("packed_bytes") for r in group) else None),
            "compress_seconds": statistics.fmean(r["compress_seconds"] for r in group),
        })
    return sorted(points, key=lambda p: (TOOLS.index(p["tool"]), p["zip_bytes"]))


def frontier(points: list[dict]) -> list[dict]:
    """The points of one tool that no other point beats in both bytes and accuracy."""
    best, kept = float("-inf"), []
    for p in sorted(points, key=lambda p: (p["zip_bytes"], -p["accuracy"])):
        if p["accuracy"] > best:
            kept.append(p)
            best = p["accuracy"]
    return kept


def compare(ours: list[dict], theirs: list[dict], noise: float) -> list[dict]:
    """At each of ``theirs`` frontier points: our best accuracy at no more bytes, and a verdict."""
    lines = []
    for p in frontier(theirs):
        fits = [q for q in ours if q["zip_bytes"] <= p["zip_bytes"]]
        if not fits:
            lines.append({"at": p, "ours": None, "verdict": "no ucpjax point this small"})
            continue
        q = max(fits, key=lambda q: q["accuracy"])
        diff = q["accuracy"] - p["accuracy"]
        # A point's seed spread where it has seeds, ``noise`` where it has one run.
        margin = max(noise if s is None else s for s in (p["spread"], q["spread"]))
        verdict = ("ucpjax ahead" if diff > margin else "PCQAT ahead" if diff < -margin
                   else "within noise")
        lines.append({"at": p, "ours": q, "diff": diff, "margin": margin, "verdict": verdict})
    return lines


def _point(p: dict) -> str:
    k = "-" if p["clusters"] is None else p["clusters"]
    spread = "" if p["spread"] is None else f" ± {p['spread']:.2f}"
    return f"s={p['sparsity']:g} k={k}: {p['accuracy']:.2f}%{spread} at {p['zip_bytes']:,.0f} B"


def markdown(results: dict) -> str:
    points, lines = results["points"], [f"# Frontiers: {results['model']}\n",
                                        *(f"`{c}`\n" for c in results["commands"]),
                                        f"{results['date']}; {results['machine']}\n",
                                        results["budget"] + "\n"]
    lines += ["| tool | sparsity | k | seeds | TFLite acc % | spread | zipped B | packed B "
              "| compress s | on frontier |", "|---|---|---|---|---|---|---|---|---|---|"]
    on = {id(p) for tool in TOOLS for p in frontier([q for q in points if q["tool"] == tool])}
    for p in points:
        spread = "-" if p["spread"] is None else f"{p['spread']:.2f}"
        packed = "-" if p["packed_bytes"] is None else f"{p['packed_bytes']:,.0f}"
        lines.append(
            f"| {SHORT[p['tool']]} | {p['sparsity']:g} | {p['clusters'] or '-'} | "
            f"{len(p['seeds'])} | {p['accuracy']:.2f} | {spread} | {p['zip_bytes']:,.0f} | "
            f"{packed} | {p['compress_seconds']:.0f} | {'yes' if id(p) in on else ''} |")
    lines += ["", "ucpjax against PCQAT's frontier (ucpjax's best accuracy at no more bytes):", ""]
    for c in results["comparison"]:
        ours = "-" if c["ours"] is None else (f"{_point(c['ours'])}, {c['diff']:+.2f} points "
                                              f"(noise {c['margin']:.2f})")
        lines.append(f"- PCQAT {_point(c['at'])}: ucpjax {ours}: **{c['verdict']}**")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for tool in TOOLS:
        points = [p for p in results["points"] if p["tool"] == tool]
        if not points:
            continue
        line = frontier(points)
        dots = ax.errorbar([p["zip_bytes"] for p in points], [p["accuracy"] for p in points],
                           yerr=[p["spread"] or 0 for p in points], fmt="o", alpha=0.5,
                           label=SHORT[tool])
        ax.step([p["zip_bytes"] for p in line], [p["accuracy"] for p in line], where="post",
                color=dots[0].get_color())
    ax.set_xscale("log")
    ax.set_xlabel("zipped int8 .tflite (bytes)")
    ax.set_ylabel("test accuracy of the .tflite (%)")
    ax.set_title(f"{results['model']}: accuracy against size (frontier = steps)")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def _key(row: dict) -> str:
    return f"{row['name']}|{row['target_sparsity']}|{row['clusters']}|{row['seed']}"


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers") from None


def _tools(text: str) -> set[str]:
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in TOOL_FLAGS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: expected some of {','.join(TOOL_FLAGS)}")
    return {TOOL_FLAGS[name] for name in names}


def _pairs(text: str) -> set[tuple[float, float]]:
    pairs = [pair.split(":") for pair in text.split(",") if pair]
    if any(len(pair) != 2 for pair in pairs):
        raise argparse.ArgumentTypeError(f"{text!r}: expected sparsity:k pairs, e.g. 0.9:16")
    return {(v[0], v[1]) for v in (_floats(",".join(pair)) for pair in pairs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="pcqat_mnist", choices=tuple(bench.EXPERIMENTS))
    parser.add_argument("--sparsities", type=_floats, default="0.8,0.875,0.9,0.95")
    parser.add_argument("--clusters", type=_floats, default="4,8,16")
    parser.add_argument("--seeds", type=_floats, default="0", help="comma-separated")
    parser.add_argument("--only", type=_pairs, default="",
                        help="grid points to run, as sparsity:k pairs (default: the whole grid)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every compression stage's epochs (all rows alike)")
    parser.add_argument("--dense-epochs", type=float, default=None)
    parser.add_argument("--noise", type=float, default=0.2,
                        help="accuracy points within which one-seed differences are noise")
    parser.add_argument("--tools", type=_tools, default=",".join(TOOL_FLAGS),
                        help=f"comma-separated, of {','.join(TOOL_FLAGS)} (default: all)")
    parser.add_argument("--smoke", action="store_true", help="tiny budgets: plumbing only")
    parser.add_argument("--out", default="runs/frontier")
    parser.add_argument("--results-dir", default="results")
    args = parser.parse_args(argv)

    from ucpjax import data as data_lib

    clusters = [int(k) for k in args.clusters]
    seeds = [int(s) for s in args.seeds]
    grid = [(s, k) for s in args.sparsities for k in clusters
            if not args.only or (s, k) in args.only]
    outside = args.only - set(grid)
    if outside:
        parser.error(f"--only {sorted(outside)}: not on the grid of --sparsities and "
                     "--clusters; add them there")
    base = bench.plan(args.model, smoke=args.smoke, scale=args.scale,
                      dense_epochs=args.dense_epochs)  # fails on a bad mapping before running
    if bench.PCQAT in args.tools:
        subprocess.run(["bash", str(bench.TF_DIR / "setup_tf_env.sh")], check=True,
                             cwd=ROOT)
    dataset = data_lib.load("mnist")
    if args.smoke:
        dataset = dataset.take(1000, 250)
    out = (ROOT / args.out).resolve() / args.model
    out.mkdir(parents=True, exist_ok=True)
    npz = out / "mnist.npz"
    bench.write_npz(dataset, npz)

    suffix = "_smoke" if args.smoke else ""
    json_path = (ROOT / args.results_dir).resolve() / f"frontier_{args.model}{suffix}.json"
    # Rows of earlier calls (other seeds or points) stay unless this call measures them again.
    earlier = bench._read(json_path) or {}
    rows = {_key(r): r for r in earlier.get("rows", [])}
    for seed in seeds:
        for s, k in grid:
            print(f"[frontier] seed {seed}, sparsity {s:g}, k {k}", flush=True)
            rows.update((_key(r), r) for r in run_point(
                base, out, dataset, npz, sparsity=s, clusters=k, seed=seed,
                # prune only does not cluster: once per sparsity, at its smallest k
                tools=args.tools - ({bench.PRUNE_ONLY} if k > min(
                    kk for ss, kk in grid if ss == s) else set()), smoke=args.smoke))
    rows = list(rows.values())
    points = aggregate(rows)
    ours = [p for p in points if p["tool"] == bench.FULL]
    theirs = [p for p in points if p["tool"] == bench.PCQAT]
    results = {
        # The grid sets each point's sparsity, k and seed (the table's columns).
        "model": args.model, "rows": rows, "points": points,
        "budget": base.budget.removeprefix(base.point),
        "comparison": compare(ours, theirs, args.noise),
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": bench.machine(),
        # Every call whose rows are in the table, oldest first.
        "commands": bench.commands_with(earlier, " ".join([
            ".venv/bin/python", "scripts/bench_frontier.py",
            *bench._relative_args(sys.argv[1:] if argv is None else argv)])),
    }
    text = markdown(results)
    bench._write_atomic(json_path, json.dumps(results, indent=2).encode())
    bench._write_atomic(json_path.with_suffix(".md"), text.encode())
    plot(results, json_path.with_suffix(".png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
