"""Several pipeline runs side by side: paper tables, ablations, baselines.

An experiment file defines ``get_variants(smoke=False) -> {name: Experiment}``
(and optionally ``PUBLISHED``: rows of published numbers, marked as such).
``ucpjax study --config FILE --out DIR`` runs each variant in ``DIR/<name>``
(each a resumable run folder) and writes ``DIR/study.json``, ``DIR/study.md``
and ``DIR/accuracy_vs_size.png``.

Variants share work: one dense model per distinct recipe, and the finished
stages of any earlier variant whose pipeline starts the same way (same
stages with the same settings, same seed). Stages are deterministic for a
seed, so a shared stage is the stage that would have been recomputed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import statistics
import time

from ucpjax import experiment as experiment_lib
from ucpjax import report
from ucpjax.config import ConfigError, to_dict
from ucpjax.experiment import Experiment
from ucpjax.run_folder import RunFolder

# Columns of the comparison: (key in a report's "final", header, format).
COLUMNS = (
    ("jax_accuracy", "JAX acc", "{:.4f}"),
    ("tflite_accuracy", "TFLite acc", "{:.4f}"),
    ("sparsity", "sparsity", "{:.3f}"),
    ("float32_bytes", "float32 B", "{:,}"),
    ("tflite_bytes", ".tflite B", "{:,}"),
    ("tflite_zip_bytes", "zipped B", "{:,}"),
    ("compression_tflite_zip", "zip rate", "{:.1f}x"),
    ("packed_bytes", "packed B", "{:,}"),
    ("compression_packed", "packed rate", "{:.1f}x"),
    ("macs_nonzero", "mults (nz)", "{:,}"),
    ("latency_int8_us", "int8 us", "{:.1f}"),
    ("wall_seconds", "time s", "{:.0f}"),
)


def load_variants(path, smoke: bool) -> tuple[dict, list[dict]]:
    """``({name: config}, published_rows)`` of an experiment file."""
    module = experiment_lib.load_module(path)
    if hasattr(module, "get_variants"):
        variants = experiment_lib.call(module.get_variants, smoke, f"{path}: get_variants")
        if not isinstance(variants, dict) or not variants:
            raise ConfigError(f"{path}: get_variants must return a non-empty "
                              "{name: Experiment} dict")
    else:
        variants = {pathlib.Path(path).stem: experiment_lib.call(
            module.get_config, smoke, f"{path}: get_config")}
    for name, variant in variants.items():
        experiment_lib.checked(variant, f"{path}: variant {name!r}")
    return variants, list(getattr(module, "PUBLISHED", []))


def run(path, out: pathlib.Path, *, smoke: bool = False, only: list[str] | None = None,
        log=print) -> dict:
    """Runs (or resumes) every variant and writes the comparison table."""
    variants, published = load_variants(path, smoke)
    unknown = sorted(set(only or ()) - set(variants))
    if unknown:
        raise ConfigError(f"--only {','.join(unknown)}: no such variant; the variants are "
                          f"{','.join(variants)}")
    RunFolder(out).claim({"study": str(path), "smoke": smoke})  # --out checked before work
    rows, finished_stages = [], {}
    for name, config in variants.items():
        if only and name not in only:
            continue
        log(f"=== {name}")
        start = time.perf_counter()
        config = shared_dense(config, out, log)
        reuse_stages(config, out / name, finished_stages, log)
        result = experiment_lib.run(config, out / name, resume=True, log=log)
        rows.append(row_of(name, result.report, time.perf_counter() - start))
        finished_stages.update(dict.fromkeys(prefix_keys(config), out / name))
    groups = seed_groups({name: variants[name] for name in (r["name"] for r in rows)}, rows)
    rows += [{**row, "published": True} for row in published]
    study = {"experiment": str(path), "smoke": smoke, "rows": rows, "seed_groups": groups,
             "date": time.strftime("%Y-%m-%d"), "machine": experiment_lib.machine()}
    text = markdown(rows) + (("\n" + seeds_markdown(groups)) if groups else "")
    folder = RunFolder(out)
    folder.write_json("study.json", study)
    folder.write_bytes("study.md", text.encode())
    from ucpjax import plots

    plots.accuracy_vs_size(
        [{"stage": r["name"], "accuracy": r.get("tflite_accuracy", r.get("jax_accuracy")),
          "bytes": r.get("tflite_zip_bytes", r.get("packed_bytes"))}
         for r in rows if not r.get("published")],
        out / "accuracy_vs_size.png")
    log(text)
    return study


def _setup_keys(config: Experiment) -> dict:
    """What determines the dense model: every run-setup field and the seed."""
    return {**experiment_lib.setup(config), "seed": config.seed}


def shared_dense(config: Experiment, out: pathlib.Path, log=print):
    """``config`` starting from a dense model trained once per distinct recipe.

    Variants that differ only after the dense stage would otherwise each train
    the same dense model (same seed, same data, same recipe: same weights).
    """
    if config.init_from:
        return config
    digest = hashlib.sha1(json.dumps(_setup_keys(config), sort_keys=True).encode())
    folder = out / "_dense" / f"{config.model}-{digest.hexdigest()[:10]}"
    if not (folder / "metrics.json").exists():
        log(f"training the shared dense model into {folder}")
        experiment_lib.train_to_folder(config, folder)
    return dataclasses.replace(config, init_from=str(folder))


def prefix_keys(config: Experiment) -> list[str]:
    """One key per stage position: what determines the model after that stage.

    Position 0 is the dense model; key ``i`` covers it and the first ``i``
    stages with their settings, so equal keys mean bit-equal stage outputs.
    """
    setup, recipe = _setup_keys(config), to_dict(config.recipe)
    keys = []
    for position in range(len(config.recipe.stages) + 1):
        stages = config.recipe.stages[:position]
        prefix = {**setup, "rules": recipe["rules"], "stages": stages,
                  **{stage: recipe[stage] for stage in stages}}
        keys.append(hashlib.sha1(json.dumps(prefix, sort_keys=True).encode()).hexdigest())
    return keys


def reuse_stages(config: Experiment, run: pathlib.Path, finished: dict, log=print) -> None:
    """Copies into ``run`` the longest prefix of stages another variant finished.

    ``finished`` maps prefix keys to run folders; the pipeline's resume then
    restores these stages instead of recomputing them.
    """
    names = ["dense", *config.recipe.stages]
    for position, key in enumerate(prefix_keys(config)):
        if key not in finished or not RunFolder(run).copy_stage(
                RunFolder(finished[key]), position, names[position]):
            return
        log(f"[{position}] {names[position]}: same as in {finished[key].name}, shared")


def row_of(name: str, report: dict, seconds: float) -> dict:
    """One table row from a run's report: its final measurements and the wall time.

    ``seconds`` is this call's time; a resumed or already finished run reports the
    sum of its stages' times instead, which is the compression's real cost.
    """
    stage_time = sum(r.get("seconds", 0.0) for r in report["rows"])
    return {"name": name, **report["final"], "wall_seconds": max(stage_time, 0.0) or seconds}


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table; a missing value prints as '-'."""
    body = [[row["name"] + (" (published)" if row.get("published") else ""),
             *(fmt.format(row[key]) if row.get(key) is not None else "-"
               for key, _, fmt in COLUMNS)] for row in rows]
    return report.table(["variant", *(title for _, title, _ in COLUMNS)], body) + "\n"


# Measurements a seed group averages: (key in a row, header, format of mean and spread).
SEED_COLUMNS = (
    ("tflite_accuracy", "TFLite acc", "{:.4f}"),
    ("jax_accuracy", "JAX acc", "{:.4f}"),
    ("tflite_zip_bytes", "zipped B", "{:,.0f}"),
    ("compression_tflite_zip", "zip rate", "{:.2f}x"),
    ("packed_bytes", "packed B", "{:,.0f}"),
)


def seed_groups(variants: dict[str, Experiment], rows: list[dict]) -> list[dict]:
    """Variants that differ only in their seed, with each measurement's mean and spread.

    A difference between two variants is a claim only beyond its seeds' spread, so
    the study states the spread wherever it ran a variant under several seeds.

    Returns:
      One ``{"variants", "seeds", "<key>_mean", "<key>_sd"}`` per group of two or more
      (sample standard deviation), in the order of the group's first variant.
    """
    groups: dict[str, list[str]] = {}
    for name, config in variants.items():
        unseeded = dataclasses.replace(config, recipe=dataclasses.replace(config.recipe, seed=0))
        groups.setdefault(json.dumps(to_dict(unseeded), sort_keys=True), []).append(name)
    by_name = {row["name"]: row for row in rows}
    out = []
    for names in (g for g in groups.values() if len(g) > 1):
        group = {"variants": names, "seeds": [variants[n].seed for n in names]}
        for key, _, _ in SEED_COLUMNS:
            values = [by_name[n][key] for n in names if by_name[n].get(key) is not None]
            if len(values) == len(names):
                group[f"{key}_mean"] = statistics.mean(values)
                group[f"{key}_sd"] = statistics.stdev(values)
        out.append(group)
    return out


def seeds_markdown(groups: list[dict]) -> str:
    """The seed groups as a markdown table: mean ± sample standard deviation."""
    def cell(group, key, fmt):
        if f"{key}_mean" not in group:
            return "-"
        return f"{fmt.format(group[key + '_mean'])} ± {fmt.format(group[key + '_sd'])}"

    body = [[", ".join(g["variants"]), ", ".join(map(str, g["seeds"])),
             *(cell(g, key, fmt) for key, _, fmt in SEED_COLUMNS)] for g in groups]
    return ("Variants that differ only in the seed (mean ± sample sd):\n\n"
            + report.table(["variants", "seeds", *(title for _, title, _ in SEED_COLUMNS)],
                           body) + "\n")
