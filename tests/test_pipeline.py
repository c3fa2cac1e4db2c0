"""The whole pipeline through the CLI and the Python API, on slices of MNIST."""

import dataclasses
import json
import pathlib
import re
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import pytest

import ucpjax
from ucpjax import checkpoints, experiment, models, pipeline, train
from ucpjax.experiment import Experiment

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "experiments" / "lenet300_mnist.py"
FINAL_KEYS = {"jax_accuracy", "jax_int8_accuracy", "tflite_accuracy", "float32_bytes",
              "tflite_bytes", "tflite_zip_bytes", "packed_bytes", "compression_tflite_zip",
              "compression_packed", "sparsity", "macs_dense", "macs_nonzero",
              "latency_int8_us", "latency_float_us", "channels_reordered"}


def _cli(*args, check=True):
    cmd = [sys.executable, "-m", "ucpjax.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, check=check, cwd=ROOT)


def test_smoke_run_through_cli_ends_with_report_and_runnable_tflite(tmp_path):
    out = tmp_path / "run"
    result = _cli("compress", "--config", DEFAULT, "--out", out, "--smoke")
    assert "| quantize |" in result.stdout  # the summary table
    report = json.loads((out / "report.json").read_text())
    assert set(report["final"]) >= FINAL_KEYS
    final = report["final"]
    assert 0 <= final["tflite_accuracy"] <= 1 and 0 <= final["jax_accuracy"] <= 1
    assert final["macs_dense"] == 266_200 and final["macs_nonzero"] < 266_200 * 0.1
    assert final["weights_faithful"]
    for name in ("model.tflite", "model.ucpj", "report.md", "config.json",
                 "accuracy_vs_size.png", "weights.png"):
        assert (out / name).stat().st_size > 0, name

    from ucpjax import data, export

    test = data.load("mnist").take(1000, 250)
    tflite = (out / "model.tflite").read_bytes()
    assert export.evaluate(tflite, test.x_test, test.y_test)["accuracy"] == pytest.approx(
        final["tflite_accuracy"], abs=1e-9)

    again = _cli("compress", "--config", DEFAULT, "--out", out, "--smoke")
    assert "| quantize |" in again.stdout and "exporting" not in again.stdout

    # A failed faithfulness check fails the run: exit 3, one line naming the miss.
    original = (out / "report.json").read_text()
    bad = json.loads(original)
    bad["final"]["tflite_agreement"] = 0.9
    (out / "report.json").write_text(json.dumps(bad))
    failed = _cli("compress", "--config", DEFAULT, "--out", out, "--smoke", check=False)
    assert failed.returncode == 3 and "export.min_agreement" in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1 and "Traceback" not in failed.stderr

    # Final files lost after the run finished are rebuilt from the saved stages.
    (out / "report.json").write_text(original)
    for name in ("model.tflite", "weights.png"):
        (out / name).unlink()
    healed = _cli("compress", "--config", DEFAULT, "--out", out, "--smoke")
    assert "finished earlier, restored" in healed.stdout and "exporting" in healed.stdout
    assert (out / "model.tflite").read_bytes() == tflite and (out / "weights.png").exists()


@pytest.mark.parametrize("override, message", [
    ("prune.target_sparsty=0.9", "prune.target_sparsty"),
    ("prune.target_sparsity=1.5", "prune.target_sparsity=1.5"),
    ("cluster.num_clusters=1", "cluster.num_clusters=1"),
    ("quantize.weight_bits=9", "quantize.weight_bits=9"),
    ("stages=('prune','squash')", "stages"),
])
def test_bad_config_fails_at_start_naming_the_field(tmp_path, override, message):
    start = time.perf_counter()
    result = _cli("compress", "--config", DEFAULT, "--out", tmp_path / "r", "--smoke", override,
                  check=False)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()
    assert time.perf_counter() - start < 60


def _final_params(out):
    stages = sorted((out / "stages").glob("*_quantize"))
    return checkpoints.restore(stages[-1])["params"]


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    # A resume point at every epoch's end, and epochs enough to kill the prune stage
    # between two of them: it must go on with its masks and schedule where it was.
    monkeypatch.setenv("UCPJAX_RESUME_EVERY", "0")
    args = ["compress", "--config", DEFAULT, "--smoke", "export.enabled=False",
            "prune.train.epochs=20"]
    whole = tmp_path / "whole"
    _cli(*args, "--out", whole)

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ucpjax.cli", *map(str, args), "--out", str(killed)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "stages" / "01_prune.progress" / "01_prune.json"
    while not marker.exists():  # kill it inside the prune stage's training
        assert proc.poll() is None, "run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "stages" / "01_prune.json").exists(), "killed too late"
    # The killed process's time, planted far above this test's: the resumed stage's
    # seconds must start from it, not from the resumed process's start.
    point = json.loads(marker.read_text())
    assert point["seconds"] > 0
    marker.write_text(json.dumps({**point, "seconds": 1000.0}))

    refused = _cli(*args, "--out", killed, check=False)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = _cli(*args, "--out", killed, "--resume")
    assert "[0] dense: finished earlier" in resumed.stdout
    assert "prune: resumed after epoch" in resumed.stdout + resumed.stderr

    for a, b in zip(jax.tree.leaves(_final_params(whole)), jax.tree.leaves(_final_params(killed)),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    rows = lambda p: json.loads((p / "report.json").read_text())["rows"]
    assert [r["accuracy"] for r in rows(whole)] == [r["accuracy"] for r in rows(killed)]
    assert 1000 < rows(killed)[1]["seconds"] < 1000 + rows(whole)[1]["seconds"] * 10
    assert not list((killed / "stages").glob("*.progress"))  # finished stages keep none


class UserNet(nn.Module):
    """A model that is not one of ours: conv, BatchNorm, Dropout, dense."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), strides=2, use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = nn.Dropout(0.2, deterministic=not train)(x)
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(10)(x)


def test_sensitivity_after_a_stage_measures_the_model_that_stage_left(tmp_path):
    run, sens = tmp_path / "run", tmp_path / "sens"
    _cli("compress", "--config", DEFAULT, "--smoke", "stages=[prune]", "export.enabled=False",
         "--out", run)
    _cli("sensitivity", "--config", DEFAULT, "--smoke", "--after", run / "stages" / "01_prune",
         "--out", sens)
    table = json.loads((sens / "sensitivity.json").read_text())
    stage = json.loads((run / "stages" / "01_prune.json").read_text())
    assert table["val_accuracy"] == pytest.approx(stage["report"]["prune/val_accuracy"])
    # Every layer is sparser than 50% already: pruning it there changes nothing.
    assert all(layer["prune"]["0.5"] == 0 for layer in table["layers"].values())


def test_python_api_with_batchnorm_and_dropout(mnist):
    small = mnist.take(3000, 500)
    module = UserNet()
    variables = dict(module.init(jax.random.key(0), small.x_train[:1], train=False))
    cfg = train.TrainConfig(epochs=2, batch_size=100)
    state, _ = train.fit(variables["params"], train.classification_loss(module),
                         train.make_optimizer(cfg, 60), small.x_train, small.y_train,
                         config=cfg, seed=0, extra={"batch_stats": variables["batch_stats"]})
    trained = {"params": state.params, **state.extra}

    recipe = experiment.smoke(Experiment()).recipe
    result = ucpjax.compress(module, trained, train=(small.x_train, small.y_train),
                             test=(small.x_test, small.y_test), recipe=recipe)
    assert result.report["stages"]["fold/batchnorm_layers"] == 1
    final = result.report["final"]
    assert set(final) >= FINAL_KEYS and final["weights_faithful"]
    # BatchNorm folded, so the int8 file computes what the JAX model computes.
    assert final["tflite_agreement"] >= 0.97
    assert abs(final["tflite_accuracy"] - final["jax_int8_accuracy"]) <= 0.02
    assert isinstance(result.tflite, bytes) and len(result.tflite) == final["tflite_bytes"]
    kernel = np.asarray(result.variables["params"]["Dense_0"]["kernel"])
    assert np.mean(kernel == 0) >= 0.8
    assert len(np.unique(kernel[kernel != 0])) <= 16


def test_a_stage_after_qat_makes_the_export_post_training_quantization(mnist):
    """Ablation orders compose: a stage after QAT moves the weights off the int8 grid,
    so the .tflite is checked on accuracy, not on holding the params exactly."""
    small = mnist.take(1000, 200)
    module = models.create("lenet300")
    recipe = experiment.smoke(Experiment()).recipe
    recipe = dataclasses.replace(recipe, stages=("quantize", "cluster"),
                                 export=dataclasses.replace(recipe.export, latency_repeats=1))
    result = ucpjax.compress(module, models.init(module, small.input_shape),
                             train=(small.x_train, small.y_train),
                             test=(small.x_test, small.y_test), recipe=recipe,
                             log=lambda _: None, check=False)  # untrained: at chance
    final = result.report["final"]
    assert not final["weights_faithful"] and final["tflite_within_tolerance"]


class GeluNet(nn.Module):
    """A user's model with an activation QAT does not model (TFLite's int8 GELU)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.gelu(nn.Dense(64)(x.reshape((x.shape[0], -1))))
        return nn.Dense(10)(x)


def test_an_activation_qat_does_not_model_is_checked_before_and_between_the_stages(mnist):
    small = mnist.take(2000, 500)
    module = GeluNet()
    params = module.init(jax.random.key(0), small.x_train[:1])["params"]
    cfg = train.TrainConfig(epochs=2, batch_size=100)
    state, _ = train.fit(params, train.classification_loss(module),
                         train.make_optimizer(cfg, 40), small.x_train, small.y_train,
                         config=cfg, seed=0)
    lines = []
    result = ucpjax.compress(module, {"params": state.params},
                             train=(small.x_train, small.y_train),
                             test=(small.x_test, small.y_test),
                             recipe=experiment.smoke(Experiment()).recipe, log=lines.append)
    stages = result.report["stages"]
    assert stages["preflight/tflite_ops"] == ["GELU"]
    assert stages["preflight/tflite_agreement"] >= 0.995
    first_stage = next(i for i, line in enumerate(lines) if line.startswith("[1] prune"))
    assert any("int8 check before any compression passed" in line
               for line in lines[:first_stage])
    # ... and again after every stage but the last, whose export the final check measures.
    recipe = experiment.smoke(Experiment()).recipe
    for name in recipe.stages[:-1]:  # with the between-stage allowance
        assert stages[f"{name}/int8_agreement"] >= 1 - pipeline.STAGE_SLACK * 0.005
    assert f"{recipe.stages[-1]}/int8_agreement" not in stages
    assert result.report["final"]["tflite_within_tolerance"]


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.py")), ids=lambda p: p.stem)
def test_every_experiment_resolves_and_has_a_smoke_switch(path):
    from ucpjax import study

    variants, published = study.load_variants(path, smoke=True)
    assert variants
    for name, config in variants.items():
        assert isinstance(config, Experiment), name
        assert 0 < config.subset <= 1000, name  # smoke runs use a data slice
        assert config.dense.epochs <= 2 and config.recipe.prune.train.epochs <= 1, name
    full, _ = study.load_variants(path, smoke=False)
    assert set(full) == set(variants)
    assert all(row.get("name") for row in published)


def test_study_shares_finished_stages_between_variants(tmp_path):
    from ucpjax import study

    path = tmp_path / "two_variants.py"
    path.write_text(
        "import dataclasses\n"
        "import lenet300_mnist\n"
        "from ucpjax import experiment\n\n\n"
        "def get_variants(smoke=False):\n"
        "    base = experiment.smoke(lenet300_mnist.get_config())\n"
        "    recipe = dataclasses.replace(base.recipe, export=dataclasses.replace(\n"
        "        base.recipe.export, enabled=False))\n"
        "    def stages(*names):\n"
        "        return dataclasses.replace(base, recipe=dataclasses.replace(recipe,"
        " stages=names))\n"
        "    return {'pc': stages('prune', 'cluster'), 'pq': stages('prune', 'quantize')}\n")
    (tmp_path / "lenet300_mnist.py").write_text(DEFAULT.read_text())
    lines = []
    study.run(path, tmp_path / "study", log=lines.append)
    assert "[1] prune: same as in pc, shared" in lines
    assert not any("[2] cluster: same" in line or "[2] quantize: same" in line for line in lines)

    alone = experiment.run(experiment.load_module(path).get_variants()["pq"],
                           tmp_path / "alone", log=lambda _: None)
    shared = checkpoints.restore(tmp_path / "study" / "pq" / "stages" / "02_quantize")
    for a, b in zip(jax.tree.leaves(alone.variables), jax.tree.leaves(shared), strict=True):
        np.testing.assert_array_equal(a, b)


def test_study_states_the_seed_spread_of_variants_that_differ_only_in_seed():
    from ucpjax import study

    base = experiment.load(DEFAULT)
    seeded = lambda config, seed: dataclasses.replace(
        config, recipe=dataclasses.replace(config.recipe, seed=seed))
    other = dataclasses.replace(base, recipe=dataclasses.replace(
        base.recipe, prune=dataclasses.replace(base.recipe.prune, target_sparsity=0.9)))
    variants = {"a0": seeded(base, 0), "b0": seeded(other, 0), "a1": seeded(base, 1),
                "a2": seeded(base, 2)}
    rows = [{"name": n, "tflite_accuracy": acc, "tflite_zip_bytes": size}
            for n, acc, size in (("a0", 0.97, 4000), ("b0", 0.99, 9000), ("a1", 0.98, 4100),
                                 ("a2", 0.96, 3900))]
    [group] = study.seed_groups(variants, rows)  # b0 has no other seed: no group
    assert group["variants"] == ["a0", "a1", "a2"] and group["seeds"] == [0, 1, 2]
    assert group["tflite_accuracy_mean"] == pytest.approx(0.97)
    assert group["tflite_accuracy_sd"] == pytest.approx(0.01)
    assert group["tflite_zip_bytes_mean"] == pytest.approx(4000)
    assert "jax_accuracy_mean" not in group  # not measured: no made-up spread
    assert "0.9700 ± 0.0100" in study.seeds_markdown([group])


@pytest.mark.parametrize("body, message", [
    ("import no_such_module\n", "importing it failed (ModuleNotFoundError"),
    ("def get_config(smoke=False):\n    return {}\n", "returned dict"),
    ("def get_config():\n    return None\n", "get_config(smoke=False) failed (TypeError"),
    ("def get_config(smoke=False)\n", "syntax error on line 1"),
    ("x = 1\n", "defines neither get_config"),
])
def test_a_broken_experiment_file_is_one_line_naming_it(tmp_path, body, message):
    from ucpjax.config import ConfigError

    path = tmp_path / "broken.py"
    path.write_text(body)
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        experiment.load(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_dense_batch_larger_than_the_data_names_its_field(tmp_path):
    from ucpjax.config import ConfigError

    config = experiment.apply_overrides(experiment.load(DEFAULT, smoke=True),
                                        ["dense.batch_size=5000"])
    with pytest.raises(ConfigError, match=r"^dense\.batch_size=5000: larger than the 1000"):
        experiment.run(config, tmp_path / "r", log=lambda _: None)
    assert not (tmp_path / "r").exists()


def test_a_run_from_init_from_holds_out_the_dense_models_split_under_any_seed(tmp_path):
    tiny = dataclasses.replace(experiment.smoke(Experiment()),
                               dense=train.TrainConfig(epochs=0.1, batch_size=100))
    experiment.train_to_folder(tiny, tmp_path / "dense")  # seed 0
    seeded = dataclasses.replace(tiny, init_from=str(tmp_path / "dense"),
                                 recipe=dataclasses.replace(tiny.recipe, seed=1))
    held_out = experiment.load_dataset(tiny).x_val
    assert np.array_equal(experiment.load_dataset(seeded).x_val, held_out)
    assert not np.array_equal(experiment.load_dataset(  # without init_from, the seed draws it
        dataclasses.replace(seeded, init_from="")).x_val, held_out)
    assert experiment.setup(seeded)["split_seed"] == 0  # recorded in the run's config.json
    with pytest.raises(experiment.ConfigError, match=r"^val_size=4000: .*set val_size=5000$"):
        experiment.load_dataset(dataclasses.replace(seeded, val_size=4000))
