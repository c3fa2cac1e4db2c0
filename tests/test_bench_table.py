"""The side-by-side benchmark's table code (scripts/bench_baselines.py), without TensorFlow's PCQAT.

A smoke pipeline run in-process makes a real ucpjax run folder; the table must read every
column from it, and a tf_pcqat.json-shaped file, with sane values.
"""

import argparse
import importlib.util
import json
import pathlib
import sys

import pytest

from ucpjax import experiment

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_baselines", ROOT / "scripts" / "bench_baselines.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _bench()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished smoke run of the pcqat_mnist experiment (~20 s on 2 cores)."""
    config = experiment.load(bench.EXPERIMENTS["pcqat_mnist"], smoke=True)
    config = experiment.apply_overrides(config, ["export.latency_repeats=5"])
    out = tmp_path_factory.mktemp("bench") / "ucpjax_0"
    experiment.run(config, out, log=lambda _: None)
    return out


def _tf_json(path: pathlib.Path) -> pathlib.Path:
    """A minimal file with tf_pcqat.py's output keys."""
    path.mkdir(parents=True, exist_ok=True)
    payload = {
        "accuracy": {"baseline": 0.95, "tflite": 0.94},
        "tflite_bytes": 23_480, "tflite_zip_bytes": 3_600, "float32_bytes": 81_640,
        "tflite_sparsity": 0.9, "peak_rss_mb": 1500.0,
        "wall_s": {"baseline_train": 47.0, "compression": 193.0, "phase/prune": 60.0,
                   "phase/cluster": 70.0, "phase/qat": 55.0, "phase/convert": 8.0},
        "args": {"epochs_prune": 2, "epochs_cluster": 2, "epochs_qat": 2},
        "versions": {"tensorflow": "2.21.0"},
    }
    (path / "tf_pcqat.json").write_text(json.dumps(payload))
    return path / "tf_pcqat.json"


def test_row_from_run_has_every_column(run_dir):
    row = bench.row_from_run(run_dir, bench.FULL)
    keys = [key for key, _, _ in bench.COLUMNS]
    assert set(keys) <= set(row)
    assert 0.0 <= row["tflite_accuracy"] <= 1.0
    assert 0.0 <= row["dense_accuracy"] <= 1.0
    assert row["sparsity"] == pytest.approx(0.9, abs=0.02)
    assert row["float32_bytes"] == 20_410 * 4  # the pcqat_mnist model's parameters
    assert row["tflite_zip_bytes"] < row["tflite_bytes"] < row["float32_bytes"]
    assert 0 < row["packed_bytes"] < row["tflite_zip_bytes"]
    assert row["compression_zip"] == pytest.approx(row["float32_bytes"] / row["tflite_zip_bytes"])
    assert row["compression_packed"] > row["compression_zip"] > 1
    assert row["compress_epochs"] == pytest.approx(0.5 * 5)  # smoke: half an epoch per phase
    assert row["compress_seconds"] > 0 and row["dense_seconds"] > 0
    assert row["latency_us"] > 0
    # Measured by the orchestrator only: absent without its bench.json.
    assert row["peak_rss_mb"] is None and row["process_seconds"] is None
    # The .tflite on disk is the one the report measured.
    assert (run_dir / "model.tflite").stat().st_size == row["tflite_bytes"]


def test_sidecar_overrides_and_markdown(run_dir, tmp_path):
    sidecar = {"process_seconds": 12.5, "peak_rss_mb": 900.0, "dense_seconds": 30.0,
               "warm_compress_seconds": 37.0,
               "tflite": {"tflite_accuracy": 0.5, "tflite_zip_bytes": 4_000}}
    (run_dir / bench.SIDECAR).write_text(json.dumps(sidecar))
    try:
        ours = bench.row_from_run(run_dir, bench.FULL)
    finally:
        (run_dir / bench.SIDECAR).unlink()
    assert ours["peak_rss_mb"] == 900.0 and ours["process_seconds"] == 12.5
    assert ours["tflite_accuracy"] == 0.5 and ours["tool_tflite_accuracy"] != 0.5
    assert ours["compression_zip"] == pytest.approx(ours["float32_bytes"] / 4_000)

    theirs = bench.row_from_tf(_tf_json(tmp_path / "tf"))
    assert theirs["packed_bytes"] is None and theirs["compression_packed"] is None
    assert theirs["compress_seconds"] == pytest.approx(185.0)  # phases, convert apart
    assert theirs["convert_seconds"] == 8.0 and theirs["compress_epochs"] == 6
    assert theirs["compression_zip"] == pytest.approx(81_640 / 3_600)

    table = bench.markdown([ours, theirs])
    lines = table.strip().splitlines()
    assert len(lines) == 4
    assert all(line.count("|") == len(bench.COLUMNS) + 2 for line in lines)
    assert "| - |" in lines[3]  # PCQAT has no packed size
    assert "900" in lines[2] and "4,000" in lines[2]
    assert "NOT MET" in bench.verdict([ours, theirs])  # 0.5 < 0.94
    assert "a rerun with its compiles cached 0.20x (37 s)" in bench.verdict([ours, theirs])


def test_plan_matches_budgets():
    p = bench.plan("pcqat_mnist")
    tf = dict(zip(p.tf_args[::2], p.tf_args[1::2]))
    tf_total = sum(int(tf[f"--epochs-{k}"]) for k in ("prune", "cluster", "qat"))
    assert tf["--epochs-train"] == "10" and tf_total == 16
    assert tf["--sparsity"] == "0.9" and tf["--clusters"] == "16"
    assert "stages=('prune',)" in p.rows[bench.PRUNE_ONLY]


def _frontier_module():
    spec = importlib.util.spec_from_file_location(
        "bench_frontier", ROOT / "scripts" / "bench_frontier.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _point(tool, accuracy, zip_bytes, spread=None):
    return {"tool": tool, "sparsity": 0.9, "clusters": 8, "seeds": [0], "accuracy": accuracy,
            "spread": spread, "zip_bytes": zip_bytes}


def test_frontier_keeps_only_undominated_points():
    frontier = _frontier_module().frontier
    points = [_point("t", 97.0, 4000), _point("t", 96.0, 4500), _point("t", 97.5, 5000),
              _point("t", 95.0, 3000), _point("t", 97.5, 6000)]
    kept = [(p["accuracy"], p["zip_bytes"]) for p in frontier(points)]
    assert kept == [(95.0, 3000), (97.0, 4000), (97.5, 5000)]


def test_comparison_calls_differences_only_beyond_the_noise():
    module = _frontier_module()
    theirs = [_point(bench.PCQAT, 96.0, 3000), _point(bench.PCQAT, 97.0, 4000),
              _point(bench.PCQAT, 97.5, 6000)]
    ours = [_point(bench.FULL, 96.1, 3500), _point(bench.FULL, 97.9, 5900)]
    verdicts = [c["verdict"] for c in module.compare(ours, theirs, noise=0.2)]
    # 3000 B: nothing of ours fits; 4000 B: 96.1 vs 97.0; 6000 B: 97.9 vs 97.5.
    assert verdicts == ["no ucpjax point this small", "PCQAT ahead", "ucpjax ahead"]
    # With seeds, the larger spread is the margin.
    spread = [_point(bench.FULL, 97.9, 5900, spread=0.5)]
    last = module.compare(spread, [_point(bench.PCQAT, 97.5, 6000, spread=0.1)], noise=0.2)
    assert last[0]["verdict"] == "within noise"
    # A measured spread counts even when the other point ran once.
    one_seeded = module.compare(spread, [_point(bench.PCQAT, 97.5, 6000)], noise=0.2)
    assert one_seeded[0]["margin"] == 0.5 and one_seeded[0]["verdict"] == "within noise"


def test_grid_plan_runs_only_the_chosen_tools_at_the_point():
    module = _frontier_module()
    p = module.grid_plan(bench.plan("pcqat_mnist"), 0.8, 4, 2, {bench.FULL})
    assert list(p.rows) == [bench.FULL]
    assert "prune.target_sparsity=0.8" in p.rows[bench.FULL] and "seed=2" in p.rows[bench.FULL]
    tf = dict(zip(p.tf_args[::2], p.tf_args[1::2]))
    assert (tf["--sparsity"], tf["--clusters"], tf["--seed"]) == ("0.8", "4", "2")
    # Run folders are numbered by table order, so a subset finds each row's own runs.
    assert bench.UCPJAX_ROWS.index(bench.DEEP_COMPRESSION) == 2


def test_tools_flag_refuses_unknown_names():
    module = _frontier_module()
    assert module._tools("ucpjax,pcqat") == {bench.FULL, bench.PCQAT}
    with pytest.raises(argparse.ArgumentTypeError, match="expected some of"):
        module._tools("ucpjax,tfmot")


def test_results_keep_every_command_that_made_their_rows():
    old = {"command": "bench_frontier.py --out a"}  # a file from before `commands`
    commands = bench.commands_with(old, "bench_frontier.py --seeds 1,2")
    assert commands == ["bench_frontier.py --out a", "bench_frontier.py --seeds 1,2"]
    assert bench.commands_with({"commands": commands}, commands[1]) == commands
