"""Tests of ucpjax.search: the greedy path, the refinement rule, and a tiny real search."""

import json
import math
import pathlib

import pytest

from ucpjax import cli, experiment, recipe, search
from ucpjax.config import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
PCQAT = ROOT / "experiments" / "table2_pcqat.py"
# Seconds per candidate: one short pruning stage, no export (its TF start is slow).
TINY = ['stages=("prune",)', "export.enabled=False", "prune.fine_tune=None", "subset=400"]

TABLE = {"val_accuracy": 0.9, "layers": {
    "big/kernel": {"size": 1000, "prune": {"0.5": 0.1, "0.9": 1.0},
                   "cluster": {"4": 0.5, "16": 0.0}},
    "small/kernel": {"size": 10, "prune": {"0.5": 3.0, "0.9": 2.0},  # a noisy dip
                     "cluster": {"4": 0.2, "16": 0.1}}}}


def test_the_path_prices_each_step_by_cost_per_byte_and_only_shrinks():
    path = search.greedy_path(TABLE)
    sizes = [p["predicted_bytes"] for p in path]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    assert path[0]["allocation"] == {"big/kernel": (0.0, 16), "small/kernel": (0.0, 16)}
    assert path[-1]["allocation"] == {"big/kernel": (0.9, 4), "small/kernel": (0.9, 4)}
    # The big leaf's three steps are cheaper per byte than any of the small leaf's.
    assert [p["allocation"]["small/kernel"] for p in path[:4]] == [(0.0, 16)] * 4
    # The small leaf at k=4 saves nothing at 0.5 (mask bits = zero bits): it jumps to 0.9.
    assert [p["allocation"]["small/kernel"] for p in path[4:]] == [(0.0, 4), (0.9, 4)]
    # The dip (2.0 after 3.0) is no saving: costs never fall along the path.
    costs = [p["predicted_drop"] for p in path]
    assert costs == sorted(costs) and costs[-1] == pytest.approx(1.0 + 0.5 + 3.0 + 0.2)
    assert search.predicted_bytes(1000, 0.0, 16) == 500
    assert search.predicted_bytes(1000, 0.5, 4) == pytest.approx(1000 * (1 + 0.5 * 2) / 8)


def test_a_path_from_a_candidate_starts_at_its_allocation_and_steps_beyond_it():
    start = {"big/kernel": (0.5, 16), "small/kernel": (0.0, 4)}
    path = search.greedy_path(TABLE, start=start)
    assert path[0]["allocation"] == start and path[0]["predicted_drop"] == pytest.approx(0.3)
    for before, after in zip(path, path[1:]):  # one leaf moves, never back
        moved = [n for n in start if before["allocation"][n] != after["allocation"][n]]
        assert len(moved) == 1
        (s0, k0), (s1, k1) = before["allocation"][moved[0]], after["allocation"][moved[0]]
        assert s1 >= s0 and k1 <= k0
    assert path[-1]["allocation"] == {"big/kernel": (0.9, 4), "small/kernel": (0.9, 4)}


def test_refinement_pushes_when_under_backs_off_when_over_and_bisects():
    path = [{"predicted_bytes": 2.0 ** -i} for i in range(12)]
    assert search.index_for(path, 0.3) == 2 and search.index_for(path, 1e-9) == 11

    def rows(*tried):
        return [{"index": i, "val_drop": d} for i, d in tried]

    assert search.next_index(path, rows((4, 0.1)), max_drop=0.5) == 5  # push: smaller
    assert search.next_index(path, rows((4, 0.9)), max_drop=0.5) == 3  # back off: bigger
    assert search.next_index(path, rows((2, 0.1), (8, 0.9)), max_drop=0.5) == 5  # middle
    assert search.next_index(path, rows((2, 0.1), (3, 0.9)), max_drop=0.5) is None
    assert search.next_index(path, rows((11, 0.1)), max_drop=0.5) is None  # path's end
    assert search.next_index(path, rows((0, 0.9)), max_drop=0.5) is None


def test_choice_is_the_smallest_within_budget_else_the_closest_is_named():
    rows = [{"name": "a", "val_drop": 0.4, "packed_bytes": 900, "compression_packed": 9.0,
             "test_drop": 0.3},
            {"name": "b", "val_drop": 0.2, "packed_bytes": 1000, "compression_packed": 8.0,
             "test_drop": 0.1},
            {"name": "c", "val_drop": 0.9, "packed_bytes": 500, "compression_packed": 16.0,
             "test_drop": 0.8}]
    chosen, closest = search.choose(rows, 0.5, "packed")
    assert (chosen["name"], closest["name"]) == ("a", "b")
    rows[0]["val_drop"] = 100 * (0.9868 - 0.9838)  # 0.30000000000000027: on the budget
    assert search.choose(rows, 0.3, "packed")[0]["name"] == "a"
    chosen, closest = search.choose(rows, 0.1, "packed")
    assert chosen is None and closest["name"] == "b"
    line = search.summary_line({"rows": rows, "objective": "packed", "max_drop": 0.1,
                                "chosen": None, "closest": "b"})
    assert line.startswith("cannot meet --max-drop 0.1") and "b loses 0.20" in line


@pytest.mark.parametrize("args, culprit", [
    (["--max-drop", "0"], "--max-drop"),
    (["--max-drop", "nan"], "--max-drop"),
    (["--max-drop", "inf"], "--max-drop"),
    (["--max-drop", "half"], "--max-drop"),
    (["--max-drop", "1", "--objective", "gzip"], "--objective"),
    (["--max-drop", "1", "--refinements", "0"], "--refinements"),
    (["--max-drop", "1", "--refinements", "2.5"], "--refinements"),
    (["--max-drop", "1", "--seeds", "0"], "--seeds"),
])
def test_bad_arguments_exit_2_with_one_line_naming_them(args, culprit, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["search", "--config", str(PCQAT), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and culprit in err, err
    assert not out.exists()  # refused before any compute


def test_a_config_that_does_not_load_is_refused_before_compute(tmp_path, capsys):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('no')\n")
    for config in (broken, tmp_path / "missing.py"):
        code = cli.main(["search", "--config", str(config), "--out", str(tmp_path / "o"),
                         "--max-drop", "1"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err and "--config" in err, err
    with pytest.raises(ConfigError, match="--objective zip"):
        search.search(PCQAT, tmp_path / "o", max_drop=1.0, smoke=True, overrides=TINY)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    summary = search.search(PCQAT, out, max_drop=2.0, objective="packed", refinements=2,
                            smoke=True, overrides=TINY, log=lambda line: None)
    return out, summary


def test_every_candidate_is_a_row_and_the_choice_keeps_the_budget(searched):
    out, summary = searched
    rows = summary["rows"]
    assert [r["candidate"] for r in rows] == list(range(len(rows))) and 1 <= len(rows) <= 3
    assert json.loads((out / "search.json").read_text())["rows"] == rows
    table = (out / "search.md").read_text()
    assert all(f"| {r['name']} |" in table for r in rows)
    assert (out / "accuracy_vs_size.png").stat().st_size > 0
    for row in rows:  # each row's numbers are its run's
        report = json.loads((out / row["name"] / "report.json").read_text())
        assert row["packed_bytes"] == report["final"]["packed_bytes"]
        assert math.isfinite(row["val_drop"])
    # Each candidate within budget but the last re-planned the path from its weights.
    for row in rows[:-1]:
        replanned = (out / row["name"] / "local_sensitivity.json").exists()
        assert replanned == (row["val_drop"] <= 2.0)
    if summary["chosen"] is None:
        assert summary["closest"] in {r["name"] for r in rows}
        assert not (out / "best_experiment.py").exists()
    else:
        chosen = next(r for r in rows if r["name"] == summary["chosen"])
        assert chosen["val_drop"] <= 2.0
        assert all(r["packed_bytes"] >= chosen["packed_bytes"] for r in rows
                   if r["val_drop"] <= 2.0)


def test_best_experiment_loads_to_the_chosen_rules(searched, tmp_path):
    out, summary = searched
    row = summary["rows"][0]
    best = tmp_path / "best_experiment.py"
    best.write_text(search.best_experiment_source(
        PCQAT, best, row, smoke=True, overrides=TINY, max_drop=2.0, objective="packed"))
    config = experiment.load(best, smoke=True)
    assert config.recipe.rules == search.rules_of(row)
    assert config.recipe.stages == ("prune",) and not config.recipe.export.enabled
    assert config.recipe.rules[0].pattern == "^Conv_0/kernel$"
    if summary["chosen"] is not None:  # the search's own file, checked as it was written
        assert experiment.load(out / "best_experiment.py", smoke=True).recipe.rules == \
            search.rules_of(next(r for r in summary["rows"] if r["name"] == summary["chosen"]))


def test_rerunning_restores_finished_candidates(searched, monkeypatch):
    out, summary = searched

    def refuse(*args):
        raise AssertionError("a finished candidate's stage ran again")

    for name in recipe.STAGES:
        monkeypatch.setitem(recipe.STAGES, name, refuse)
    again = search.search(PCQAT, out, max_drop=2.0, objective="packed", refinements=2,
                          smoke=True, overrides=TINY, log=lambda line: None)
    assert again["rows"] == summary["rows"]


def test_seeds_judge_candidates_by_their_mean_and_state_the_spread(searched):
    out, _ = searched
    summary = search.search(PCQAT, out, max_drop=100.0, objective="packed", refinements=1,
                            seeds=2, smoke=True, overrides=TINY, log=lambda line: None)
    chosen, repeats = summary["chosen"], summary["seeds"]
    assert chosen is not None and repeats["seeds"] == [0, 1]
    report = json.loads((out / f"{chosen}-seed1" / "report.json").read_text())
    assert report["recipe"]["seed"] == 1
    # The seed run holds out the dense model's validation split, not its own seed's.
    setup = json.loads((out / f"{chosen}-seed1" / "config.json").read_text())["setup"]
    assert setup["split_seed"] == 0
    assert repeats["packed_bytes"][1] == report["final"]["packed_bytes"]
    for row in summary["rows"]:  # every candidate is within this budget
        runs = row["seed_runs"]
        assert runs["val_drop"][0] == row["first_val_drop"]
        assert row["val_drop"] == pytest.approx(sum(runs["val_drop"]) / 2)
    row = next(r for r in summary["rows"] if r["name"] == chosen)
    assert repeats["test_drop"][0] == row["test_drop"]
    text = (out / "search.md").read_text()
    assert "chosen rules under seeds 0, 1: test drop" in text and "(2 seeds)" in text


@pytest.mark.parametrize(
    "path", sorted((ROOT / "results" / "search").glob("*/best_experiment.py")),
    ids=lambda p: p.parent.name)
def test_every_published_best_experiment_loads(path):
    config = experiment.load(path, smoke=True)  # finds its experiment wherever it lies
    assert config.recipe.rules and all(r.pattern.startswith("^") for r in config.recipe.rules)
