"""Side-by-side benchmark: ucpjax against TensorFlow's PCQAT, Deep Compression, pruning alone.

    .venv/bin/python scripts/bench_baselines.py --model pcqat_mnist --out runs/bench
    .venv/bin/python scripts/bench_baselines.py --model all --out runs/bench
    .venv/bin/python scripts/bench_baselines.py --model all --smoke --out runs/bench_smoke

Per model, four rows with the same sparsity, number of clusters, data (ucpjax.data's
55k/10k MNIST split, written to an npz for TensorFlow) and epoch budget:

  ucpjax                 prune -> distill -> cluster -> quantize (QAT), int8 .tflite
  ucpjax prune only      prune, int8 .tflite by post-training quantization
  Deep Compression       prune -> cluster, int8 .tflite by post-training quantization
  TFMOT PCQAT            scripts/bench_baselines/tf_pcqat.py in .venv-tf

Budget mapping (``plan``): dense epochs are equal; every row gets the same number of
compression epochs. TensorFlow's prune phase gets our prune (train + fine-tune) and
distill epochs, its cluster phase our cluster (fine-tune) epochs, its QAT phase our
quantize epochs. The shorter recipes spend the epochs of the stages they lack on fine-tuning
the stage before. The three ucpjax rows start from one dense model (``ucpjax train``,
timed apart); TensorFlow trains its own dense model for the same epochs.

Every row runs as a child process, measured the same way: wall time of the process
and its peak resident memory (``ru_maxrss`` from ``os.wait4`` of that child alone).
Compression time is what each tool times for its compression phases (dense training,
evaluation and export excluded); each ucpjax row starts with an empty compilation
cache of its own, so its compiles count as on a first run; the full row then runs once
more on that cache ("rerun s": a rerun, a resumed run or a search candidate), and
its .tflite must equal the first run's byte for byte. Every .tflite is
re-measured here with one code path: LiteRT accuracy on the full test set, size,
zipped size, latency.

Writes results/bench_baselines.{json,md} (smoke: results/bench_baselines_smoke.*;
--results-dir puts them elsewhere). Paths and commands recorded in them are relative to
the repository root.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TF_DIR = ROOT / "scripts" / "bench_baselines"
EXPERIMENTS = {
    "pcqat_mnist": ROOT / "experiments" / "table2_pcqat.py",
    "lenet300": ROOT / "experiments" / "lenet300_mnist.py",
}
# Row names, in table order.
FULL, PRUNE_ONLY, DEEP_COMPRESSION, PCQAT = (
    "ucpjax (prune, distill, cluster, QAT)", "ucpjax prune only (PTQ int8)",
    "Deep-Compression-style prune+cluster (PTQ int8)", "TFMOT PCQAT")
UCPJAX_ROWS = (FULL, PRUNE_ONLY, DEEP_COMPRESSION)

# (key, header, format) of the comparison table.
COLUMNS = (
    ("tflite_accuracy", "TFLite acc", "{:.4f}"),
    ("dense_accuracy", "dense acc", "{:.4f}"),
    ("sparsity", "sparsity", "{:.3f}"),
    ("tflite_bytes", ".tflite B", "{:,}"),
    ("tflite_zip_bytes", "zipped B", "{:,}"),
    ("compression_zip", "zip rate", "{:.1f}x"),
    ("packed_bytes", "packed B", "{:,}"),
    ("compression_packed", "packed rate", "{:.1f}x"),
    ("compress_epochs", "epochs", "{:g}"),
    ("compress_seconds", "compress s", "{:.0f}"),
    ("warm_compress_seconds", "rerun s", "{:.0f}"),
    ("dense_seconds", "dense s", "{:.0f}"),
    ("process_seconds", "process s", "{:.0f}"),
    ("peak_rss_mb", "peak MB", "{:,.0f}"),
    ("latency_us", "int8 us", "{:.1f}"),
)
SIDECAR = "bench.json"  # what the orchestrator measured about a row's child process


# ---------------------------------------------------------------- table (no TensorFlow)


def _read(path: pathlib.Path):
    return json.loads(path.read_text()) if path.exists() else None


def _ratio(num, den):
    return num / den if num and den else None


def _finish_row(row: dict, sidecar: dict | None) -> dict:
    """Applies the orchestrator's own measurements and derives the ratios."""
    sidecar = sidecar or {}
    for key in ("process_seconds", "peak_rss_mb", "dense_seconds", "dense_accuracy",
                "warm_compress_seconds"):
        if sidecar.get(key) is not None:
            row[key] = sidecar[key]
    for key, value in sidecar.get("tflite", {}).items():  # re-measured .tflite
        row[f"tool_{key}"] = row.get(key)
        row[key] = value
    row["compression_zip"] = _ratio(row.get("float32_bytes"), row.get("tflite_zip_bytes"))
    row["compression_packed"] = _ratio(row.get("float32_bytes"), row.get("packed_bytes"))
    return row


def compress_epochs(recipe: dict) -> float:
    """Training epochs of a recipe's stages: each stage's ``train`` and ``fine_tune`` budgets.

    Args:
      recipe: a recipe as a dict (``config.to_dict(Recipe)``, a report's ``"recipe"``);
        a budget that is None (skipped) or not a TrainConfig (an old bool) counts 0.
    """
    total = 0.0
    for stage in recipe["stages"]:
        for budget in ("train", "fine_tune"):
            section = recipe[stage].get(budget)
            if isinstance(section, dict):
                total += section["epochs"]
    return total


def row_from_run(run_dir, name: str | None = None) -> dict:
    """One table row from a ucpjax run folder (report.json, config.json, bench.json).

    Args:
      run_dir: a finished ``ucpjax compress`` folder.
      name: row label (default: the folder's name).

    Returns:
      A dict with every key of COLUMNS (None where not measured) plus ``name``,
      ``tool``, ``float32_bytes`` and ``stages``.
    """
    run_dir = pathlib.Path(run_dir)
    report = _read(run_dir / "report.json")
    if report is None:
        raise FileNotFoundError(f"{run_dir} has no report.json (unfinished run?)")
    final = report["final"]
    recipe = report.get("recipe") or report["config"]  # "config": a run of the old layout
    # Compression = the stages after the dense/given model (row 0), as the pipeline timed them.
    stage_rows = report["rows"][1:]
    row = {key: None for key, _, _ in COLUMNS}
    row.update({
        "name": name or run_dir.name, "tool": "ucpjax", "stages": list(recipe["stages"]),
        "tflite_accuracy": final.get("tflite_accuracy"),
        "jax_accuracy": final.get("jax_accuracy"),
        "dense_accuracy": report["rows"][0]["accuracy"],
        "sparsity": final["sparsity"],
        "float32_bytes": final["float32_bytes"],
        "tflite_bytes": final.get("tflite_bytes"),
        "tflite_zip_bytes": final.get("tflite_zip_bytes"),
        "packed_bytes": final["packed_bytes"],
        "compress_epochs": compress_epochs(recipe),
        "compress_seconds": sum(r["seconds"] for r in stage_rows),
        "dense_seconds": report["rows"][0]["seconds"],
        "latency_us": final.get("latency_int8_us"),
    })
    return _finish_row(row, _read(run_dir / SIDECAR))


def row_from_tf(json_path, name: str = PCQAT) -> dict:
    """One table row from tf_pcqat.py's output (and bench.json beside it, if any).

    Compression time is TensorFlow's prune + cluster + QAT phases; its conversion
    (``convert_seconds``) is kept apart, as the ucpjax rows' export is.
    """
    json_path = pathlib.Path(json_path)
    tf = json.loads(json_path.read_text())
    args, wall = tf["args"], tf["wall_s"]
    row = {key: None for key, _, _ in COLUMNS}
    row.update({
        "name": name, "tool": "tfmot", "stages": ["prune", "cluster", "qat"],
        "tflite_accuracy": tf["accuracy"]["tflite"],
        "dense_accuracy": tf["accuracy"]["baseline"],
        "sparsity": tf["tflite_sparsity"],
        "float32_bytes": tf["float32_bytes"],
        "tflite_bytes": tf["tflite_bytes"],
        "tflite_zip_bytes": tf["tflite_zip_bytes"],
        "compress_epochs": args["epochs_prune"] + args["epochs_cluster"] + args["epochs_qat"],
        "compress_seconds": sum(wall[f"phase/{p}"] for p in ("prune", "cluster", "qat")),
        "convert_seconds": wall.get("phase/convert"),
        "dense_seconds": wall["baseline_train"],
        "peak_rss_mb": tf.get("peak_rss_mb"),
        "versions": tf.get("versions"),
    })
    return _finish_row(row, _read(json_path.parent / SIDECAR))


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def markdown(rows: list[dict]) -> str:
    """The rows as one markdown table; a value not measured prints as '-'."""
    header = ["row", *(title for _, title, _ in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join([row["name"], *(_cell(row, k, f) for k, _, f in COLUMNS)])
                     + " |")
    return "\n".join(lines) + "\n"


def verdict(rows: list[dict]) -> str:
    """Whether the full ucpjax row beats PCQAT in accuracy and zipped size at no more time."""
    ours = next((r for r in rows if r["name"] == FULL), None)
    theirs = next((r for r in rows if r["name"] == PCQAT), None)
    if ours is None or theirs is None or ours.get("tflite_accuracy") is None:
        return "target: not evaluated (a row is missing)"
    acc = ours["tflite_accuracy"] - theirs["tflite_accuracy"]
    size = ours["tflite_zip_bytes"] / theirs["tflite_zip_bytes"]
    speed = ours["compress_seconds"] / theirs["compress_seconds"]
    met = acc > 0 and size < 1 and speed <= 1
    warm = ours.get("warm_compress_seconds")
    rerun = (f"; a rerun with its compiles cached {warm / theirs['compress_seconds']:.2f}x "
             f"({warm:.0f} s)" if warm else "")
    return (f"target {'MET' if met else 'NOT MET'}: accuracy {acc * 100:+.2f} points, "
            f"zipped .tflite {size:.2f}x PCQAT's ({ours['tflite_zip_bytes']:,} vs "
            f"{theirs['tflite_zip_bytes']:,} B), compression time {speed:.2f}x PCQAT's "
            f"({ours['compress_seconds']:.0f} vs {theirs['compress_seconds']:.0f} s){rerun}")


def report_markdown(results: dict) -> str:
    """All models' tables with the machine, versions and date."""
    parts = [f"# Side-by-side benchmark{' (smoke)' if results.get('smoke') else ''}\n",
             f"{results['date']}; {results['machine']}\n", f"TensorFlow side: {results['tf']}\n"]
    for model, entry in results["models"].items():
        parts += [f"## {model}\n", entry["budget"] + "\n", markdown(entry["rows"]),
                  verdict(entry["rows"]) + "\n"]
    return "\n".join(parts)


# ---------------------------------------------------------------- plan (configs, budgets)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything one model's benchmark runs: ucpjax overrides per row and TF's arguments."""

    model: str
    experiment: pathlib.Path
    dense_args: list[str]
    rows: dict  # row name -> list of `ucpjax compress` overrides
    tf_args: list[str]
    budget: str  # starts with ``point``
    point: str = ""  # the sparsity, k and seed every row runs at


def _epochs(train_config) -> float:
    return 0.0 if train_config is None else float(train_config.epochs)


def _num(value: float):
    """Whole numbers as ints: config.override rejects 10.0 for a float field holding 10."""
    return int(value) if float(value).is_integer() else value


def _integral(value: float, what: str) -> int:
    if abs(value - round(value)) > 1e-9:
        raise ValueError(f"{what} = {value} epochs: TensorFlow needs whole epochs")
    return int(round(value))


def plan(model: str, smoke: bool = False, scale: float = 1.0,
         dense_epochs: float | None = None) -> Plan:
    """The matched settings of one model, all derived from its experiment file.

    Args:
      model: a key of EXPERIMENTS.
      smoke: tiny budgets (experiment.smoke on our side, 1 epoch per phase on a data
        slice for TensorFlow); only the plumbing is checked.
      scale: multiplies every compression stage's epochs (TensorFlow's phases must
        come out whole), for a shorter matched budget.
      dense_epochs: dense training epochs for both sides (default: the experiment's).

    Returns:
      A Plan; ``rows`` maps each ucpjax row to its CLI overrides (``ucpjax compress``
      routes recipe fields, e.g. ``prune.train.epochs``, without the ``recipe.`` prefix).
    """
    from ucpjax import experiment
    from ucpjax.config import to_dict
    from ucpjax.recipe import STAGES

    config = experiment.load(EXPERIMENTS[model], smoke=False)
    recipe = config.recipe
    if tuple(recipe.stages) != tuple(STAGES) or config.val_size != 5000:
        raise ValueError(f"{model}: the benchmark expects all four stages and val_size=5000")
    if recipe.prune.fine_tune is None or recipe.cluster.fine_tune is None:
        raise ValueError(f"{model}: the benchmark moves epochs into prune.fine_tune and "
                         "cluster.fine_tune: neither may be None")
    scaled = [] if scale == 1 else [
        f"{path}.epochs={_num(scale * _epochs(train))}" for path, train in (
            ("prune.train", recipe.prune.train), ("prune.fine_tune", recipe.prune.fine_tune),
            ("distill.train", recipe.distill.train),
            ("cluster.fine_tune", recipe.cluster.fine_tune),
            ("quantize.train", recipe.quantize.train))]
    if dense_epochs is not None:
        scaled.append(f"dense.epochs={_num(dense_epochs)}")
    config = experiment.apply_overrides(config, scaled)
    recipe = config.recipe
    dense = config.dense
    if dense.schedule != "cosine":
        raise ValueError("`ucpjax train` trains with the cosine schedule only")
    e = {"prune": _epochs(recipe.prune.train), "fine_tune": _epochs(recipe.prune.fine_tune),
         "distill": _epochs(recipe.distill.train), "cluster": _epochs(recipe.cluster.fine_tune),
         "quantize": _epochs(recipe.quantize.train)}
    total = sum(e.values())
    budget_rows = {
        FULL: [*scaled],
        PRUNE_ONLY: [*scaled, "stages=('prune',)",
                     f"prune.fine_tune.epochs={_num(total - e['prune'])}"],
        DEEP_COMPRESSION: [*scaled, "stages=('prune', 'cluster')",
                           f"prune.fine_tune.epochs={_num(e['fine_tune'] + e['distill'])}",
                           f"cluster.fine_tune.epochs={_num(e['cluster'] + e['quantize'])}"],
    }
    tf_epochs = {"train": _integral(_epochs(dense), "dense"),
                 "prune": _integral(e["prune"] + e["fine_tune"] + e["distill"], "TF prune"),
                 "cluster": _integral(e["cluster"], "TF cluster"),
                 "qat": _integral(e["quantize"], "TF QAT")}
    for overrides in budget_rows.values():  # every row: the same compression epochs
        resolved = experiment.apply_overrides(config, overrides)
        spent = compress_epochs(to_dict(resolved.recipe))
        assert abs(spent - total) < 1e-9, (overrides, spent, total)
    assert sum(tf_epochs.values()) - tf_epochs["train"] == total
    if smoke:  # experiment.smoke's budgets; only the stage lists survive
        budget_rows = {name: [o for o in rows if o.startswith("stages=")]
                       for name, rows in budget_rows.items()}
        tf_epochs = dict.fromkeys(tf_epochs, 1)
    dense_epochs = 0.05 if smoke else dense.epochs
    dense_args = ["--model", config.model, "--data", config.data, "--seed", str(recipe.seed),
                  "--epochs", str(dense_epochs), "--batch-size", str(dense.batch_size),
                  "--learning-rate", str(dense.learning_rate), "--optimizer", dense.optimizer,
                  "--weight-decay", str(dense.weight_decay), "--augment", dense.augment]
    tf_args = ["--model", config.model, "--sparsity", str(recipe.prune.target_sparsity),
               "--clusters", str(recipe.cluster.num_clusters),
               "--epochs-train", str(tf_epochs["train"]),
               "--epochs-prune", str(tf_epochs["prune"]),
               "--epochs-cluster", str(tf_epochs["cluster"]),
               "--epochs-qat", str(tf_epochs["qat"]),
               "--batch-size", str(recipe.prune.train.batch_size), "--seed", str(recipe.seed)]
    point = (f"Sparsity {recipe.prune.target_sparsity}, {recipe.cluster.num_clusters} "
             f"clusters, seed {recipe.seed}. ")
    budget = (point + f"Dense: {dense_epochs:g} epochs for both sides. "
              + ("Smoke budgets (experiment.smoke; TF 1 epoch per phase on the same "
                 "1,000-image slice)." if smoke else
                 (f"Shortened budget (--scale {scale:g}, dense {dense.epochs:g} epochs). "
                  if scaled else "")
                 + f"Compression: {total:g} epochs for every row ({EXPERIMENTS[model].name}: "
                 f"prune {e['prune']:g} + fine-tune {e['fine_tune']:g}, distill {e['distill']:g}, "
                 f"cluster {e['cluster']:g}, quantize {e['quantize']:g}; TF prune "
                 f"{tf_epochs['prune']}, cluster {tf_epochs['cluster']}, QAT {tf_epochs['qat']}; "
                 f"prune only: fine-tune {total - e['prune']:g}; Deep Compression: fine-tune "
                 f"{e['fine_tune'] + e['distill']:g}, cluster {e['cluster'] + e['quantize']:g})."))
    return Plan(model, EXPERIMENTS[model], dense_args, budget_rows, tf_args, budget, point)


# ---------------------------------------------------------------- running and measuring


def _write_atomic(path: pathlib.Path, payload: bytes) -> None:
    from ucpjax.run_folder import RunFolder

    RunFolder(path.parent).write_bytes(path.name, payload)


def relative(path) -> str:
    """``path`` relative to the repository root, as results record it (never absolute)."""
    return os.path.relpath(pathlib.Path(path).resolve(), ROOT)


def commands_with(earlier: dict, command: str) -> list[str]:
    """Every command whose rows a results file holds, oldest first, ``command`` last
    (files from before the list kept one ``"command"``)."""
    before = earlier.get("commands") or [c for c in [earlier.get("command")] if c]
    return list(dict.fromkeys([*before, command]))


def _relative_args(argv: list[str]) -> list[str]:
    """Command-line arguments with absolute paths (``/x`` or ``--opt=/x``) made relative."""
    out = []
    for arg in argv:
        flag, eq, value = arg.rpartition("=") if arg.startswith("-") else ("", "", arg)
        out.append(f"{flag}{eq}{relative(value)}" if os.path.isabs(value) else arg)
    return out


def run_child(command: list[str], log_path: pathlib.Path, env: dict | None = None) -> dict:
    """Runs one child process; returns its wall time and peak RSS (os.wait4, that child only).

    Raises:
      RuntimeError: the child failed (the tail of its log is in the message).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + " ".join(command), flush=True)
    start = time.perf_counter()
    with open(log_path, "wb") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                 env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})})
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{command[0]} exited {child.returncode}; {log_path}:\n{tail}")
    return {"process_seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024}


def write_npz(dataset, path: pathlib.Path) -> None:
    """The data the ucpjax rows use, for TensorFlow (atomic)."""
    import numpy as np

    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, x_train=dataset.x_train, y_train=dataset.y_train,
             x_test=dataset.x_test, y_test=dataset.y_test)
    os.replace(tmp, path)


def remeasure(tflite_path: pathlib.Path, dataset) -> dict:
    """One code path for every row's .tflite: LiteRT accuracy, bytes, zip bytes, latency.

    Every tool's file is measured as it would ship, without debug strings
    (``export.strip_strings``, as ucpjax writes its own), so sizes compare alike.
    """
    from ucpjax import export, measure

    model = export.strip_strings(tflite_path.read_bytes())
    return {"tflite_accuracy": export.evaluate(model, dataset.x_test, dataset.y_test)["accuracy"],
            "tflite_bytes": len(model), "tflite_zip_bytes": measure.zip_bytes(model),
            "latency_us": export.latency_us(model, repeats=200)}


def run_model(p: Plan, out: pathlib.Path, dataset, npz: pathlib.Path, *, smoke: bool,
              with_tf: bool, dense_dir: pathlib.Path | None = None) -> list[dict]:
    """Runs (or reuses, when finished) every row of one model; returns the table rows.

    Children run in the repository root and get paths relative to it, so what they
    record (``init_from``, tf_pcqat.json's ``args``) names no machine's folders.
    ``dense_dir`` (default ``out/<model>/dense``) holds the ucpjax rows' dense model;
    runs that share it share the dense model.
    """
    ucpjax = str(ROOT / ".venv" / "bin" / "ucpjax")
    base = out / p.model
    dense_dir = dense_dir or base / "dense"
    if _read(dense_dir / "metrics.json") is None:
        shutil.rmtree(dense_dir, ignore_errors=True)  # a killed run's partial folder
        measured = run_child([ucpjax, "train", *p.dense_args, "--out", relative(dense_dir)],
                             base / "logs" / "dense.log")
        _write_atomic(dense_dir / SIDECAR, json.dumps(measured).encode())
    metrics = _read(dense_dir / "metrics.json")
    rows = []
    for name, overrides in p.rows.items():
        # Numbered by table order, not by position in ``p.rows``: a plan with fewer
        # rows finds each row's own earlier run.
        index = UCPJAX_ROWS.index(name)
        run_dir = base / f"ucpjax_{index}"
        sidecar = _read(run_dir / SIDECAR)
        if sidecar is None or _read(run_dir / "report.json") is None:
            command = [ucpjax, "compress", "--config", relative(p.experiment),
                       "--out", relative(run_dir), *(["--smoke"] if smoke else []),
                       f"init_from={relative(dense_dir)}", *overrides]
            # Cold, as on a first run: each row compiles into an empty cache of its own.
            cache = base / "xla_cache" / f"ucpjax_{index}"
            shutil.rmtree(cache, ignore_errors=True)
            # A killed run's partial folder: rerun from scratch, so its time is whole.
            shutil.rmtree(run_dir, ignore_errors=True)
            sidecar = run_child(command, base / "logs" / f"ucpjax_{index}.log",
                                env={"UCPJAX_COMPILE_CACHE": str(cache)})
            if name == FULL:
                sidecar["warm_compress_seconds"] = rerun_warm(command, run_dir, cache)
            sidecar.update(dense_seconds=metrics["wall_seconds"],
                           dense_accuracy=metrics["test_accuracy"], overrides=overrides,
                           tflite=remeasure(run_dir / "model.tflite", dataset))
            _write_atomic(run_dir / SIDECAR, json.dumps(sidecar, indent=2).encode())
        else:
            print(f"reusing finished {run_dir}", flush=True)
        rows.append(row_from_run(run_dir, name))
    if with_tf:
        tf_dir = base / "tf_pcqat"
        if _read(tf_dir / SIDECAR) is None or _read(tf_dir / "tf_pcqat.json") is None:
            shutil.rmtree(tf_dir, ignore_errors=True)  # a killed run's partial folder
            command = [str(ROOT / ".venv-tf" / "bin" / "python"), relative(TF_DIR / "tf_pcqat.py"),
                       "--data", relative(npz), *p.tf_args, "--out", relative(tf_dir)]
            sidecar = run_child(command, base / "logs" / "tf_pcqat.log")
            sidecar["tflite"] = remeasure(tf_dir / "model.tflite", dataset)
            _write_atomic(tf_dir / SIDECAR, json.dumps(sidecar, indent=2).encode())
        else:
            print(f"reusing finished {tf_dir}", flush=True)
        rows.append(row_from_tf(tf_dir / "tf_pcqat.json"))
    return rows


def rerun_warm(command: list[str], run_dir: pathlib.Path, cache: pathlib.Path) -> float:
    """Compression seconds of ``command`` run again into a sibling folder with the first
    run's compilation cache, as a rerun, a resumed run or a search candidate finds it.

    Raises:
      RuntimeError: the rerun's .tflite differs from the first run's (a cached compile
        must not change a result).
    """
    warm_dir = run_dir.with_name(f"{run_dir.name}_rerun")
    shutil.rmtree(warm_dir, ignore_errors=True)
    out = command.index("--out") + 1
    run_child([*command[:out], relative(warm_dir), *command[out + 1:]],
              run_dir.parent / "logs" / f"{warm_dir.name}.log",
              env={"UCPJAX_COMPILE_CACHE": str(cache)})
    if (warm_dir / "model.tflite").read_bytes() != (run_dir / "model.tflite").read_bytes():
        raise RuntimeError(f"{warm_dir}/model.tflite differs from {run_dir}'s: the "
                           "compilation cache changed a result")
    return row_from_run(warm_dir)["compress_seconds"]


def machine() -> str:
    """CPU model, cores, memory and the ucpjax side's versions."""
    from ucpjax import experiment

    cpu = "unknown CPU"
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu}; {platform.platform()}; {experiment.machine()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="pcqat_mnist", choices=(*EXPERIMENTS, "all"))
    parser.add_argument("--smoke", action="store_true", help="tiny budgets: plumbing only")
    parser.add_argument("--out", default="runs/bench", help="folder for every row's run")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every compression stage's epochs (matched on both sides)")
    parser.add_argument("--dense-epochs", type=float, default=None,
                        help="dense training epochs for both sides (default: the experiment's)")
    parser.add_argument("--no-tf", action="store_true", help="skip the TensorFlow rows")
    parser.add_argument("--results-dir", default="results",
                        help="folder for bench_baselines[_smoke].{json,md}")
    args = parser.parse_args(argv)

    from ucpjax import data as data_lib

    out = (ROOT / args.out).resolve()
    models = list(EXPERIMENTS) if args.model == "all" else [args.model]
    plans = [plan(m, smoke=args.smoke, scale=args.scale, dense_epochs=args.dense_epochs)
             for m in models]  # fail on a bad mapping before running
    if not args.no_tf:
        subprocess.run(["bash", str(TF_DIR / "setup_tf_env.sh")], check=True, cwd=ROOT)
    dataset = data_lib.load("mnist")  # experiment.load_dataset's split: val_size=5000, seed 0
    if args.smoke:
        dataset = dataset.take(1000, 250)  # what experiment.smoke's subset=1000 uses
    npz = out / ("mnist_smoke.npz" if args.smoke else "mnist.npz")
    out.mkdir(parents=True, exist_ok=True)
    write_npz(dataset, npz)

    name = "bench_baselines_smoke" if args.smoke else "bench_baselines"
    json_path = (ROOT / args.results_dir).resolve() / f"{name}.json"
    results = _read(json_path) or {"models": {}}
    for p in plans:
        rows = run_model(p, out, dataset, npz, smoke=args.smoke, with_tf=not args.no_tf)
        results["models"][p.model] = {"budget": p.budget, "rows": rows,
                                      "out": relative(out / p.model)}
    tf_versions = next((r["versions"] for e in results["models"].values() for r in e["rows"]
                        if r.get("versions")), None)
    results.update(smoke=args.smoke, date=time.strftime("%Y-%m-%d %H:%M"), machine=machine(),
                   tf=json.dumps(tf_versions) if tf_versions else "not run",
                   command=" ".join([".venv/bin/python", "scripts/bench_baselines.py",
                                     *_relative_args(sys.argv[1:] if argv is None else argv)]))
    text = report_markdown(results)
    _write_atomic(json_path, json.dumps(results, indent=2).encode())
    _write_atomic(json_path.with_suffix(".md"), text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
