"""Accuracy-budget search: per-layer sparsity and k for the smallest file within a drop.

``ucpjax search --config X --max-drop D --out DIR`` (or ``search(...)``) chooses a
``LayerRule`` (sparsity and clusters) for every compressible leaf of an
experiment, so that the final model loses at most ``D`` points of *validation*
accuracy against its dense model, and its zipped ``.tflite`` (``objective="zip"``)
or packed file (``"packed"``) is as small as the search finds. Bits stay as the
recipe has them: the int8 ``.tflite`` holds 8-bit weights only, and k already
sets how many bits an index takes.

The rule, stated once:

1. *Predict.* ``ucpjax.sensitivity`` measures each leaf pruned and clustered alone
   (one shot, no fine-tuning) on a fine grid. A leaf's predicted cost is its
   pruning drop plus its clustering drop (each made non-decreasing along its
   grid, so noise is no saving), and its predicted size is
   ``size * (H(s) + (1 - s) * log2 k) / 8`` bytes (the zero mask's entropy and
   one k-ary index per non-zero).
2. *Order.* From every leaf dense at the grid's largest k, a greedy path takes
   one grid step at a time (one leaf one sparsity up or one k down), always the
   step with the least predicted cost per predicted byte saved: the cheapest
   layers are pushed first, the costliest last. A candidate is the first point
   of the path whose predicted size is at most a target size.
3. *Start.* The first target is the predicted size of the experiment's own
   recipe (its ``target_sparsity`` and ``num_clusters`` on every leaf): the same
   size, spent where sensitivity says it is cheapest.
4. *Refine* (at most ``refinements`` times). Each candidate runs the real
   pipeline (sharing the dense model like ``ucpjax study``) and its final JAX
   model's validation drop is measured. Under budget: the next target is
   ``1/STEP`` of the smallest within-budget size (push the path further, i.e.
   compress the cheapest layers harder); over budget: ``STEP`` times the largest
   over-budget size (back off the last, costliest steps). Once a size within
   budget and a smaller one over it are known, the next target is their
   geometric mean. The search stops early when no untried point is left between.
5. *Re-plan* from every candidate within budget. One-shot drops measured on the
   dense model rank the steps badly far from it: pruning LeNet-300-100's first
   layer from 96 to 97% adds 12.6 points to its drop from the dense model but
   0.5 from a candidate's weights fine-tuned at 96%, while halving the second
   layer's k costs 2.2 and 1.9 (RESULTS.md). So the sensitivity is measured
   again on that candidate's weights before clustering (each leaf pruned or
   clustered alone beyond its own sparsity and k, no fine-tuning), and the path
   is rebuilt on those local drops from the candidate's sparsities at the largest
   k, so that a layer's k can come back up where that is cheap in bytes; the
   refinement goes on along the new path, its last point at least as large as the
   candidate standing in for it as the within-budget start.
6. *Choose.* The smallest candidate by the objective's measured bytes whose
   validation drop is within ``D``; the pipeline has already exported it and
   measured its ``.tflite`` on the test set. ``DIR/best_experiment.py`` holds its
   rules as an experiment file, checked to load to the same config.

With ``seeds`` > 1, a candidate within budget on its first seed runs again under
``seeds - 1`` more, and its validation drop is their mean from then on, for the
refinement and for the choice: near the budget two candidates differ by a few
validation images, less than one seed's spread, so one seed cannot rank them.
The seeds vary the compression only (batches, k-means starts); every run holds
out the dense model's validation split. The chosen rules' test drop is stated as
mean and spread.

Each candidate is a run folder ``DIR/<name>`` named by its rules, so rerunning
with the same arguments restores finished candidates instead of redoing them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import re
import statistics

from ucpjax import experiment as experiment_lib
from ucpjax import rules as rules_lib
from ucpjax import sensitivity, study, train
from ucpjax.config import ConfigError
from ucpjax.experiment import Experiment
from ucpjax.rules import LayerRule
from ucpjax.run_folder import RunFolder

# The grids the search chooses from: finer than ``ucpjax sensitivity``'s near the top,
# where the final models live.
SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.85, 0.86, 0.88, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98,
              0.99)
CLUSTERS = (2, 4, 8, 16, 32)
# objective -> the report's measured bytes it minimises.
OBJECTIVES = {"zip": "tflite_zip_bytes", "packed": "packed_bytes"}
# Size ratio of one push or back-off before the budget is bracketed.
STEP = 1.3


def within(val_drop: float, max_drop: float) -> bool:
    """Whether a drop keeps the budget; a drop equal to it does, float error aside
    (accuracies are multiples of 1/n, so 0.3 points can come out as 0.30000000000000027)."""
    return val_drop <= max_drop + 1e-9


def check_arguments(max_drop, objective: str, refinements, seeds=1) -> None:
    """Refuses, in one line naming the argument, what the search cannot use."""
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not (
            math.isfinite(max_drop) and max_drop > 0):
        raise ConfigError(f"--max-drop {max_drop!r}: must be a finite number of accuracy "
                          "points > 0")
    if objective not in OBJECTIVES:
        raise ConfigError(f"--objective {objective!r}: must be one of {', '.join(OBJECTIVES)}")
    if isinstance(refinements, bool) or not isinstance(refinements, int) or refinements < 1:
        raise ConfigError(f"--refinements {refinements!r}: must be an integer >= 1")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--seeds {seeds!r}: must be an integer >= 1")


# ---------------------------------------------------------------- prediction


def _monotone(curve: dict) -> list[tuple[float, float]]:
    """``(grid value, drop)`` sorted from least to most compressed, drops non-decreasing
    and non-negative (a noisy dip is not a free step)."""
    points, worst = [], 0.0
    for value, drop in curve:
        worst = max(worst, float(drop))
        points.append((value, worst))
    return points


def layer_curves(table: dict) -> dict[str, dict]:
    """Per leaf: its size, its sparsity curve (from 0) and its k curve (from the largest)."""
    curves = {}
    for name, entry in table["layers"].items():
        prune = sorted((float(s), d) for s, d in entry["prune"].items())
        ks = sorted(((int(k), d) for k, d in entry["cluster"].items()), reverse=True)
        curves[name] = {"size": entry["size"], "prune": _monotone([(0.0, 0.0), *prune]),
                        "cluster": _monotone(ks)}
    return curves


def predicted_bytes(size: int, sparsity: float, clusters: int) -> float:
    """Bytes of a leaf with this sparsity and k: the zero mask's entropy, one index per
    non-zero."""
    dense = 1.0 - sparsity
    mask = 0.0 if sparsity == 0 else -(sparsity * math.log2(sparsity)
                                       + dense * math.log2(dense))
    return size * (mask + dense * math.log2(clusters)) / 8


def _point(curves: dict, state: dict) -> dict:
    """An allocation ``{leaf: (sparsity, k)}`` with its predicted cost and size."""
    allocation, cost, size = {}, 0.0, 0.0
    for name, (i, j) in state.items():
        curve = curves[name]
        (s, prune_drop), (k, cluster_drop) = curve["prune"][i], curve["cluster"][j]
        allocation[name] = (s, k)
        cost += prune_drop + cluster_drop
        size += predicted_bytes(curve["size"], s, k)
    return {"allocation": allocation, "predicted_drop": cost, "predicted_bytes": size}


def greedy_path(table: dict, start: dict | None = None) -> list[dict]:
    """Allocations from ``start`` (default: every leaf dense at the largest k) to the
    most compressed grid point, one grid step apart (``_next_steps``), each step the
    least predicted cost per byte saved.

    Args:
      table: a sensitivity table (``sensitivity.measure``) on the search's grids.
      start: ``{leaf: (sparsity, k)}`` on those grids, e.g. a candidate's allocation.

    Returns:
      A list of ``{"allocation": {leaf: (sparsity, k)}, "predicted_drop",
      "predicted_bytes"}``, sizes non-increasing.
    """
    curves = layer_curves(table)
    state = dict.fromkeys(curves, (0, 0))
    if start is not None:
        state = {name: _grid_index(curves[name], *start[name]) for name in curves}
    path = [_point(curves, state)]
    while True:
        here, best = path[-1], None
        for name in state:
            for step in _next_steps(curves, state, name, here["predicted_bytes"]):
                there = _point(curves, {**state, name: step})
                saved = here["predicted_bytes"] - there["predicted_bytes"]
                price = (there["predicted_drop"] - here["predicted_drop"]) / saved
                if best is None or price < best[0]:
                    best = (price, name, step, there)
        if best is None:
            return path
        state = {**state, best[1]: best[2]}
        path.append(best[3])


def _grid_index(curve: dict, sparsity: float, clusters: int) -> tuple[int, int]:
    """The indices of ``sparsity`` and ``clusters`` in a leaf's curves."""
    i = next(i for i, (s, _) in enumerate(curve["prune"]) if math.isclose(s, sparsity))
    j = next(j for j, (k, _) in enumerate(curve["cluster"]) if k == clusters)
    return i, j


def _next_steps(curves: dict, state: dict, name: str, size: float) -> list[tuple[int, int]]:
    """A leaf's nearest sparsity and nearest k that make the allocation smaller.

    Usually the next grid point; one further when the next saves nothing (at small
    k, the zero mask of a half-pruned leaf costs what its zeros save).
    """
    i, j = state[name]
    steps = []
    for axis, length in ((0, len(curves[name]["prune"])), (1, len(curves[name]["cluster"]))):
        step = [i, j]
        for step[axis] in range((i, j)[axis] + 1, length):
            if _point(curves, {**state, name: tuple(step)})["predicted_bytes"] < size:
                steps.append(tuple(step))
                break
    return steps


def index_for(path: list[dict], target_bytes: float) -> int:
    """The first point of ``path`` whose predicted size is at most ``target_bytes``."""
    return next((i for i, p in enumerate(path) if p["predicted_bytes"] <= target_bytes),
                len(path) - 1)


def start_target(table: dict, config: Experiment) -> float:
    """The predicted size of the experiment's own recipe: its sparsity and k on every leaf."""
    s, k = config.recipe.prune.target_sparsity, max(config.recipe.cluster.num_clusters, 2)
    return sum(predicted_bytes(entry["size"], s, k) for entry in table["layers"].values())


def next_index(path: list[dict], tried: list[dict], max_drop: float) -> int | None:
    """The path index of the next candidate by the refinement rule, or None when done.

    ``tried`` holds rows with ``index`` and ``val_drop``; see the module docstring.
    """
    done = {row["index"] for row in tried}
    ok = [row["index"] for row in tried if within(row["val_drop"], max_drop)]
    # Over-budget candidates smaller than the smallest within budget bound it below.
    over = [row["index"] for row in tried if not within(row["val_drop"], max_drop)
            and (not ok or row["index"] > max(ok))]
    size = [p["predicted_bytes"] for p in path]
    if ok and over:
        low, high = max(ok), min(over)  # path indices: later is smaller
        index = index_for(path, math.sqrt(size[low] * size[high]))
        between = [i for i in range(low + 1, high) if i not in done]
        if not between:
            return None
        return index if index in between else between[len(between) // 2]
    if ok:
        index, direction = index_for(path, size[max(ok)] / STEP), 1
    else:
        index = _index_at_least(path, size[min(over)] * STEP)
        direction = -1
    while index in done:
        index += direction
    return index if 0 <= index < len(path) else None


def _index_at_least(path: list[dict], target_bytes: float) -> int:
    """The last point of ``path`` whose predicted size is at least ``target_bytes``."""
    return max((i for i, p in enumerate(path) if p["predicted_bytes"] >= target_bytes),
               default=0)


# ---------------------------------------------------------------- candidates


def rules_for(allocation: dict, old_rules) -> tuple[LayerRule, ...]:
    """One exact-path ``LayerRule`` per leaf; bits kept from the rule that matched it."""
    return tuple(
        LayerRule(pattern=f"^{re.escape(name)}$", sparsity=float(s), clusters=int(k),
                  bits=rules_lib.rule_for(name, old_rules).bits)
        for name, (s, k) in allocation.items())


def with_rules(config: Experiment, rules) -> Experiment:
    return dataclasses.replace(config, recipe=dataclasses.replace(config.recipe,
                                                                  rules=tuple(rules)))


def candidate_name(rules) -> str:
    """A run folder name determined by the rules alone, so a rerun finds it again."""
    text = json.dumps([dataclasses.asdict(r) for r in rules], sort_keys=True)
    return "cand-" + hashlib.sha1(text.encode()).hexdigest()[:10]


def stage_model(run: pathlib.Path, config: Experiment, dense, dataset, *,
                before_sharing: bool = False):
    """A finished run's last stage as a ``Model``, BatchNorm live unless that stage
    folded it; ``before_sharing``: the last stage before the first cluster or quantize
    stage (the weights before any are shared or put on a grid)."""
    names = ["dense", *config.recipe.stages]
    if before_sharing:
        shared = [i for i, n in enumerate(names) if n in ("cluster", "quantize")]
        names = names[:shared[0]] if shared else names
    # Quantization-aware training folds BatchNorm first, so its checkpoint is folded.
    like = dense.folded(dataset.input_shape) if names[-1] == "quantize" else dense
    loaded = RunFolder(run).load_stage(len(names) - 1, names[-1], like.variables)
    if loaded is None:
        raise ConfigError(f"{run}: its {names[-1]} stage does not load; delete the folder "
                          "and rerun")
    return dataclasses.replace(like, variables=loaded[0])


def validation_accuracy(run: pathlib.Path, config: Experiment, dense, dataset) -> float:
    """The JAX validation accuracy of a finished run's last stage, BatchNorm folded as
    it ships."""
    final = stage_model(run, config, dense, dataset).folded(dataset.input_shape)
    return train.accuracy(final.apply_fn(), final.params, dataset.x_val, dataset.y_val)


def run_candidate(config: Experiment, out: pathlib.Path, point: dict, context: dict,
                  log=print) -> dict:
    """Runs (or restores) one candidate's pipeline; returns its table row."""
    rules = rules_for(point["allocation"], config.recipe.rules)
    name = candidate_name(rules)
    candidate = with_rules(config, rules)
    study.reuse_stages(candidate, out / name, context["finished"], log)
    row = measured_run(candidate, out / name, context, log)
    context["finished"].update(dict.fromkeys(study.prefix_keys(candidate), out / name))
    return {"name": name, "run": str(out / name),
            "rules": [dataclasses.asdict(r) for r in rules],
            "predicted_drop": point["predicted_drop"],
            "predicted_bytes": point["predicted_bytes"], **row}


def measured_run(config: Experiment, run: pathlib.Path, context: dict, log) -> dict:
    """Runs (or restores) one pipeline; its validation and test drops and its sizes."""
    result = experiment_lib.run(config, run, resume=True, log=log)
    final, dense_row = result.report["final"], result.report["rows"][0]
    val = validation_accuracy(run, config, context["dense"], context["dataset"])
    test = final.get("tflite_accuracy", final["jax_accuracy"])
    return {"val_accuracy": val, "val_drop": 100 * (context["dense_val"] - val),
            "test_accuracy": test, "test_drop": 100 * (dense_row["accuracy"] - test),
            **{key: final.get(key) for key in ("tflite_zip_bytes", "packed_bytes",
                                                "compression_tflite_zip",
                                                "compression_packed", "sparsity")}}


# ---------------------------------------------------------------- the search


def search(config_path, out, *, max_drop: float, objective: str = "zip",
           refinements: int = 4, seeds: int = 1, smoke: bool = False, overrides=(),
           log=print) -> dict:
    """Searches per-layer rules for the smallest file within a validation-drop budget.

    Args:
      config_path: an experiment file (``get_config(smoke)``).
      out: folder for the candidates' run folders, ``search.json``, ``search.md``,
        ``accuracy_vs_size.png`` and ``best_experiment.py``; rerunning continues.
      max_drop: validation accuracy points the result may lose against the dense model.
      objective: ``"zip"`` (the zipped int8 ``.tflite``) or ``"packed"``.
      refinements: candidates after the first, at most.
      seeds: seeds a candidate within budget runs under in all (the search's own
        and ``seeds - 1`` more, ``DIR/<name>-seed<N>``); it is judged by their mean
        validation drop.
      smoke: run the experiment's seconds-long smoke version.
      overrides: ``field=value`` strings, as ``ucpjax compress`` takes them.
      log: where progress lines go.

    Returns:
      ``{"rows": [...], "chosen": name or None, "closest": name, "seeds": {...} or
      None, ...}`` as written to ``search.json``; a row per candidate in the order
      tried, and the chosen candidate's seed runs when ``seeds > 1``.
    """
    check_arguments(max_drop, objective, refinements, seeds)
    out = pathlib.Path(out)
    config = experiment_lib.apply_overrides(experiment_lib.load(config_path, smoke=smoke),
                                            list(overrides))
    if objective == "zip" and not config.recipe.export.enabled:
        raise ConfigError("--objective zip: this recipe has export.enabled=False, so there "
                          "is no .tflite to zip; use --objective packed")
    folder = RunFolder(out)
    folder.claim({"search": {"config": str(config_path), "smoke": smoke,
                             "overrides": list(overrides)}})
    def write(rows: list[dict]) -> dict:
        return _write_outputs(rows, config_path, config, out, max_drop=max_drop,
                              objective=objective, smoke=smoke, overrides=list(overrides))

    with folder.lock():
        summary = write(_candidates(config, out, max_drop, refinements, seeds, write, log))
    log("\n" + markdown(summary))  # ends with the summary line
    return summary


def _candidates(config: Experiment, out: pathlib.Path, max_drop: float, refinements: int,
                seeds: int, write, log) -> list[dict]:
    """Runs the first candidate and up to ``refinements`` more: their rows in order.

    ``write(rows)`` is called after each candidate, so an interrupted search leaves
    its table so far.
    """
    from tqdm.auto import tqdm

    config = study.shared_dense(config, out, log)
    dense, dataset = experiment_lib.dense_model(config)
    table = _sensitivity(out, config, dense, dataset, log)
    path = greedy_path(table)
    context = {"finished": {}, "dense": dense, "dataset": dataset,
               "dense_val": table["val_accuracy"]}
    rows, on_path, index = [], [], index_for(path, start_target(table, config))
    bar = tqdm(total=refinements + 1, desc="search", unit="candidate")
    while index is not None and len(rows) <= refinements:
        name = candidate_name(rules_for(path[index]["allocation"], config.recipe.rules))
        row = next((r for r in rows if r["name"] == name), None)
        fresh = row is None  # a re-planned path can lead back to a candidate already run
        if fresh:
            log(f"=== candidate {len(rows)}: path point {index} of {len(path) - 1}, "
                f"predicted {path[index]['predicted_bytes']:,.0f} B")
            row = {"candidate": len(rows), **run_candidate(config, out, path[index],
                                                           context, log)}
            if seeds > 1 and within(row["val_drop"], max_drop):
                row = with_seeds(row, config, out, seeds, context, log)
            rows.append(row)
            write(rows)
            bar.update()
            bar.set_postfix(val_drop=f"{row['val_drop']:.2f}")
        on_path.append({**row, "index": index})
        if fresh and within(row["val_drop"], max_drop) and len(rows) <= refinements:
            # From its sparsities at the largest k: a layer's k may then come back up
            # where that is cheap in bytes (the new path need not pass through it).
            anchor = path[index]
            path = greedy_path(_local_sensitivity(row, config, context, log), start={
                leaf: (s, max(CLUSTERS)) for leaf, (s, _) in anchor["allocation"].items()})
            on_path = [{**row, "index": _index_at_least(path, anchor["predicted_bytes"])}]
        index = next_index(path, on_path, max_drop)
    bar.close()
    return rows


def _local_sensitivity(row: dict, config: Experiment, context: dict, log) -> dict:
    """The sensitivity table of a candidate's weights on the search's grids (module
    docstring, step 5), measured once and kept in its run folder. The weights are
    those before clustering (and before QAT folds BatchNorm): clustered weights have
    lost the slack that lets a pruned net recover, so from them one more sparsity
    step looks 5x dearer than from the weights the candidate's rules cluster."""
    folder = RunFolder(row["run"])
    table = folder.read_json("local_sensitivity.json")
    if (table is None or _grid(table) != (SPARSITIES, CLUSTERS)
            or table.get("weights") != "before sharing"):
        final = stage_model(pathlib.Path(row["run"]), config, context["dense"],
                            context["dataset"], before_sharing=True)
        log(f"measuring the sensitivity of {row['name']}'s weights to re-plan from it ...")
        table = sensitivity.measure(
            final.params, apply_fn=final.apply_fn(), data=context["dataset"],
            rules=rules_of(row), sparsities=SPARSITIES, clusters=CLUSTERS,
            min_per_channel=config.recipe.prune.min_per_channel,
            criterion=config.recipe.prune.criterion, seed=config.seed)
        table["weights"] = "before sharing"
        folder.write_json("local_sensitivity.json", table)
    return table


# A seeded row's per-seed measurements, averaged into the row.
_SEEDED = ("val_drop", "test_drop", "tflite_zip_bytes", "packed_bytes")


def with_seeds(row: dict, config: Experiment, out: pathlib.Path, seeds: int, context: dict,
               log) -> dict:
    """``row`` judged over ``seeds`` seeds: its rules run under ``seeds - 1`` more, and
    ``val_drop`` becomes the mean; ``row["seed_runs"]`` keeps each seed's figures and
    their mean and sample spread.

    The dense model and its validation split stay the shared ones, so the spread is
    the compression's own.
    """
    runs = [row]
    for offset in range(1, seeds):
        seed = config.seed + offset
        seeded = dataclasses.replace(config, recipe=dataclasses.replace(
            config.recipe, rules=rules_of(row), seed=seed))
        log(f"=== {row['name']} under seed {seed}")
        runs.append(measured_run(seeded, out / f"{row['name']}-seed{seed}", context, log))
    spread = {"seeds": [config.seed + i for i in range(seeds)]}
    for key in _SEEDED:
        values = [r[key] for r in runs if r.get(key) is not None]
        if len(values) == seeds:
            spread.update({key: values, f"{key}_mean": statistics.mean(values),
                           f"{key}_sd": statistics.stdev(values)})
    return {**row, "first_val_drop": row["val_drop"], "val_drop": spread["val_drop_mean"],
            "seed_runs": spread}


def _sensitivity(out: pathlib.Path, config: Experiment, dense, dataset, log) -> dict:
    """The per-leaf sensitivity table on the search grids, measured once per folder."""
    folder = RunFolder(out)
    table = folder.read_json("sensitivity.json")
    if table is None or _grid(table) != (SPARSITIES, CLUSTERS):
        table = sensitivity.measure(
            dense.params, apply_fn=dense.apply_fn(), data=dataset, rules=config.recipe.rules,
            sparsities=SPARSITIES, clusters=CLUSTERS,
            min_per_channel=config.recipe.prune.min_per_channel,
            criterion=config.recipe.prune.criterion, seed=config.seed,
            progress=lambda name: log(f"measuring the sensitivity of {name} ..."))
        folder.write_json("sensitivity.json", table)
    return table


def _grid(table: dict) -> tuple[tuple, tuple]:
    """The sparsity and k grids a sensitivity table was measured on."""
    entry = next(iter(table["layers"].values()), {"prune": {}, "cluster": {}})
    return (tuple(float(s) for s in entry["prune"]), tuple(int(k) for k in entry["cluster"]))


# ---------------------------------------------------------------- outputs


def choose(rows: list[dict], max_drop: float, objective: str) -> tuple[dict | None, dict]:
    """``(chosen, closest)``: the smallest row within the budget (None if none is) and
    the row of least validation drop (the smallest such)."""
    key = OBJECTIVES[objective]
    kept = [r for r in rows if within(r["val_drop"], max_drop) and r.get(key) is not None]
    chosen = min(kept, key=lambda r: r[key], default=None)
    closest = min(rows, key=lambda r: (r["val_drop"], r.get(key) or math.inf))
    return chosen, closest


def _write_outputs(rows, config_path, config, out: pathlib.Path, *, max_drop, objective,
                   smoke, overrides) -> dict:
    from ucpjax import plots

    chosen, closest = choose(rows, max_drop, objective)
    folder = RunFolder(out)
    best = out / "best_experiment.py"
    if chosen is not None:
        folder.write_bytes("best_experiment.py", best_experiment_source(
            config_path, best, chosen, smoke=smoke, overrides=overrides,
            max_drop=max_drop, objective=objective).encode())
        _check_reproduces(best, smoke, with_rules(config, rules_of(chosen)))
    else:
        best.unlink(missing_ok=True)  # a stale one from another budget would mislead
    summary = {"experiment": str(config_path), "smoke": smoke, "overrides": overrides,
               "max_drop": max_drop, "objective": objective,
               "chosen": chosen and chosen["name"], "closest": closest["name"],
               "rows": rows, "seeds": chosen and chosen.get("seed_runs"),
               "machine": experiment_lib.machine()}
    folder.write_json("search.json", summary)
    folder.write_bytes("search.md", markdown(summary).encode())
    key = OBJECTIVES[objective]
    plots.accuracy_vs_size(
        [{"stage": f"c{r['candidate']}" + (" (chosen)" if r is chosen else ""),
          "accuracy": r["test_accuracy"], "bytes": r[key]}
         for r in sorted(rows, key=lambda r: r[key])], out / "accuracy_vs_size.png")
    return summary


def rules_of(row: dict) -> tuple[LayerRule, ...]:
    """A table row's rules as ``LayerRule``s."""
    return tuple(LayerRule(**rule) for rule in row["rules"])


def summary_line(summary: dict) -> str:
    """One line: the chosen candidate, or that the budget cannot be met and the closest."""
    rows = {r["name"]: r for r in summary["rows"]}
    key = OBJECTIVES[summary["objective"]]
    if summary["chosen"] is None:
        r = rows[summary["closest"]]
        return (f"cannot meet --max-drop {summary['max_drop']:g}: the closest candidate "
                f"{r['name']} loses {r['val_drop']:.2f} points on validation at "
                f"{r[key]:,} B")
    r = rows[summary["chosen"]]
    rate = r["compression_tflite_zip" if key == "tflite_zip_bytes" else "compression_packed"]
    seeds = len(r["seed_runs"]["seeds"]) if "seed_runs" in r else 1
    return (f"chosen {r['name']}: validation drop {r['val_drop']:.2f} points"
            f"{f' (mean of {seeds} seeds)' if seeds > 1 else ''} (budget "
            f"{summary['max_drop']:g}), test drop {r['test_drop']:.2f} points (its first "
            f"seed), {r[key]:,} B ({rate:.1f}x); rules in best_experiment.py")


_COLUMNS = (("candidate", "#", "{}"), ("name", "run", "{}"),
            ("predicted_bytes", "predicted B", "{:,.0f}"),
            ("val_drop", "val drop", "{:.2f}"), ("test_drop", "test drop", "{:.2f}"),
            ("test_accuracy", "test acc", "{:.4f}"), ("sparsity", "sparsity", "{:.3f}"),
            ("tflite_zip_bytes", "zipped B", "{:,.0f}"),
            ("compression_tflite_zip", "zip rate", "{:.1f}x"),
            ("packed_bytes", "packed B", "{:,.0f}"),
            ("compression_packed", "packed rate", "{:.1f}x"))


def markdown(summary: dict) -> str:
    """The candidates as a markdown table, each one's rules, and the summary line."""
    from ucpjax import report

    body = [[_cell(row, key, fmt) for key, _, fmt in _COLUMNS] for row in summary["rows"]]
    rules = [f"- {row['name']}: " + ", ".join(f"`{r['pattern']}` s={r['sparsity']:g} "
                                              f"k={r['clusters']}" for r in row["rules"])
             for row in summary["rows"]]
    return (f"search within {summary['max_drop']:g} validation points, objective "
            f"{summary['objective']} ({summary['experiment']}"
            f"{', smoke' if summary['smoke'] else ''}); drops in accuracy points against "
            "the dense model, test columns from the int8 .tflite; a candidate within "
            "budget on its first seed is judged by the mean ± sd of its seeds\n\n"
            + report.table([title for _, title, _ in _COLUMNS], body) + "\n\n"
            + "\n".join(rules) + "\n\n" + summary_line(summary) + "\n"
            + (seeds_line(summary) + "\n" if summary.get("seeds") else ""))


def _cell(row: dict, key: str, fmt: str) -> str:
    """One table cell: the value, or its seeds' mean ± sd where the row has seeds."""
    seeded = row.get("seed_runs", {})
    if f"{key}_mean" in seeded:
        return (f"{fmt.format(seeded[f'{key}_mean'])} ± {fmt.format(seeded[f'{key}_sd'])} "
                f"({len(seeded['seeds'])} seeds)")
    return fmt.format(row[key]) if row.get(key) is not None else "-"


def seeds_line(summary: dict) -> str:
    """The chosen rules under each seed: test drop and bytes, mean ± sample spread."""
    r, key = summary["seeds"], OBJECTIVES[summary["objective"]]
    drops = ", ".join(f"{d:.2f}" for d in r["test_drop"])
    return (f"chosen rules under seeds {', '.join(map(str, r['seeds']))}: test drop "
            f"{r['test_drop_mean']:.2f} ± {r['test_drop_sd']:.2f} points ({drops}), "
            f"{r[f'{key}_mean']:,.0f} ± {r[f'{key}_sd']:,.0f} B")


def best_experiment_source(config_path, best: pathlib.Path, row: dict, *, smoke: bool,
                           overrides, max_drop: float, objective: str) -> str:
    """An experiment file: the searched experiment with the chosen rules in its recipe.

    It names the original file relative to itself, so it keeps working wherever
    the repository lies.
    """
    relative = os.path.relpath(pathlib.Path(config_path), best.parent)
    flag = " --smoke" if smoke else ""
    rules = "\n".join(f"    {rule!r}," for rule in rules_of(row))
    return f'''"""The rules `ucpjax search` chose for {config_path}.

    .venv/bin/ucpjax compress --config {best.as_posix()} --out runs/best{flag}

Found by `ucpjax search --config {config_path} --max-drop {max_drop:g}
--objective {objective}`: candidate {row['name']}, validation drop
{row['val_drop']:.2f} points, test drop {row['test_drop']:.2f} points. Everything but the
per-layer rules is the original experiment's.
"""

import dataclasses
import pathlib

from ucpjax import experiment
from ucpjax.rules import LayerRule

EXPERIMENT = pathlib.Path(__file__).parent / {relative!r}
OVERRIDES = {list(overrides)!r}
RULES = (
{rules}
)


def get_config(smoke: bool = False) -> experiment.Experiment:
    base = experiment.apply_overrides(experiment.load(EXPERIMENT, smoke=smoke), OVERRIDES)
    return dataclasses.replace(base, recipe=dataclasses.replace(base.recipe, rules=RULES))
'''


def _check_reproduces(best: pathlib.Path, smoke: bool, expected: Experiment) -> None:
    """Refuses a ``best_experiment.py`` whose config is not the chosen candidate's."""
    loaded = experiment_lib.load(best, smoke=smoke)
    if study.prefix_keys(loaded) != study.prefix_keys(
            dataclasses.replace(expected, init_from=loaded.init_from)):
        raise AssertionError(f"{best} does not load to the chosen candidate's config")
