"""The run setup around a recipe: which model, which data, how the dense model is made.

An experiment file defines ``get_config(smoke=False) -> Experiment`` (or, for
``ucpjax study``, ``get_variants(smoke=False) -> {name: Experiment}``). The
``Experiment`` names a model of ``ucpjax.models`` and a dataset of
``ucpjax.data``, how the dense model is trained (or ``init_from`` a ``ucpjax
train`` folder), and the ``Recipe`` that compresses it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import platform
import sys

import jax

from ucpjax import checkpoints, inputs, pipeline
from ucpjax import data as data_lib
from ucpjax import models as models_lib
from ucpjax import train as train_lib
from ucpjax.config import ConfigError, check, override, to_dict
from ucpjax.model import Model
from ucpjax.recipe import Recipe
from ucpjax.run_folder import RunFolder


@dataclasses.dataclass(frozen=True, kw_only=True)
class Experiment:
    """A model and data to compress, and the recipe; ``ucpjax compress --help`` lists them."""

    model: str = "lenet300"
    data: str = "mnist"
    val_size: int = 5000
    # Smoke runs use this many training/test examples (0: all of them).
    subset: int = 0
    # A `ucpjax train` output folder to start from instead of training `dense`.
    init_from: str = ""
    dense: train_lib.TrainConfig = dataclasses.field(
        default_factory=lambda: train_lib.TrainConfig(epochs=10))
    recipe: Recipe = dataclasses.field(default_factory=Recipe)

    def __post_init__(self):
        check(self.val_size >= 0, "val_size", self.val_size, "must be >= 0")
        check(self.subset >= 0, "subset", self.subset, "must be >= 0")
        check(isinstance(self.recipe, Recipe), "recipe", type(self.recipe).__name__,
              "must be a ucpjax.recipe.Recipe")
        check(self.val_size > 0 or self.recipe.prune.scope != "sensitivity", "val_size",
              self.val_size, "prune.scope='sensitivity' chooses per-layer sparsities on the "
              "validation split: hold some out (e.g. val_size=5000)")

    @property
    def seed(self) -> int:
        return self.recipe.seed


def apply_overrides(experiment: Experiment, assignments) -> Experiment:
    """``field=value`` overrides; recipe fields need no ``recipe.`` prefix."""
    own = {f.name for f in dataclasses.fields(Experiment)}
    routed = [a if a.partition(".")[0].partition("=")[0].strip() in own else f"recipe.{a}"
              for a in assignments]
    return override(experiment, routed)


def load_module(path: str | os.PathLike):
    """Imports an experiment file (it defines ``get_config`` or ``get_variants``)."""
    path = pathlib.Path(path)
    if not path.is_file() or path.suffix != ".py":
        raise ConfigError(f"--config {path}: expected an experiment .py file, e.g. "
                          "experiments/lenet300_mnist.py")
    spec = importlib.util.spec_from_file_location(f"ucpjax_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    # Experiments may import their siblings (e.g. a study built on the default).
    sys.path.insert(0, str(path.resolve().parent))
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:
        raise ConfigError(f"--config {path}: syntax error on line {err.lineno}: "
                          f"{err.msg}") from None
    except Exception as err:  # whatever the user's file raises on import
        raise ConfigError(f"--config {path}: importing it failed "
                          f"({_first_line(err)})") from None
    finally:
        sys.path.remove(str(path.resolve().parent))
    if not hasattr(module, "get_config") and not hasattr(module, "get_variants"):
        raise ConfigError(f"{path} defines neither get_config(smoke) nor get_variants(smoke)")
    return module


def load(path, smoke: bool = False) -> Experiment:
    """The ``Experiment`` of a file defining ``get_config(smoke)``."""
    module = load_module(path)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} is a study (get_variants): run `ucpjax study`")
    return checked(call(module.get_config, smoke, f"{path}: get_config"), f"{path}: get_config")


def call(get, smoke: bool, where: str):
    """``get(smoke=smoke)`` of an experiment file; its failure as one line naming the file."""
    try:
        return get(smoke=smoke)
    except ConfigError:
        raise  # a config value refused by its own check: already one line naming the field
    except Exception as err:  # whatever the user's function raises
        raise ConfigError(f"{where}(smoke={smoke}) failed ({_first_line(err)})") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def checked(experiment, where: str) -> Experiment:
    """``experiment`` if it is an Experiment, else a ConfigError naming ``where``."""
    if not isinstance(experiment, Experiment):
        raise ConfigError(f"{where} returned {type(experiment).__name__}: it must return "
                          "ucpjax.experiment.Experiment(...)")
    return experiment


def smoke(experiment: Experiment) -> Experiment:
    """The same run shrunk to seconds: 1,000 examples, half an epoch per stage."""
    tiny = train_lib.TrainConfig(epochs=0.5, batch_size=100, learning_rate=1e-3)
    recipe = experiment.recipe
    replace = dataclasses.replace
    return replace(
        experiment, subset=1000,
        dense=replace(experiment.dense, epochs=2, batch_size=100),
        recipe=replace(
            recipe,
            prune=replace(recipe.prune, frequency=1, train=tiny, fine_tune=tiny),
            distill=replace(recipe.distill, train=tiny),
            cluster=replace(recipe.cluster, iterations=5, fine_tune=tiny),
            quantize=replace(recipe.quantize, train=tiny),
            export=replace(recipe.export, representative_samples=50, latency_repeats=20)))


def machine() -> str:
    """The machine and versions, for reports."""
    import flax

    devices = jax.devices()
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, {len(devices)} JAX "
            f"device(s) ({devices[0].device_kind}), Python {platform.python_version()}, "
            f"jax {jax.__version__}, flax {flax.__version__}")


def load_dataset(experiment: Experiment) -> data_lib.Dataset:
    dataset = data_lib.load(experiment.data, val_size=experiment.val_size,
                            seed=split_seed(experiment))
    if experiment.subset:
        dataset = dataset.take(experiment.subset, max(experiment.subset // 4, 100))
    return dataset


def initial_model(experiment: Experiment, dataset: data_lib.Dataset) -> Model:
    module = models_lib.create(experiment.model, dataset.num_classes)
    return Model(module, models_lib.init(module, dataset.input_shape, experiment.seed))


def split_seed(experiment: Experiment) -> int:
    """The seed that holds out the validation split: the dense model's own.

    A dense model read from ``init_from`` held its validation examples out with its
    own seed. A run under another seed must hold out the same ones, or the dense
    model's validation accuracy is measured on examples it trained on and the
    compressed model trains on examples it is validated on; the run's seed then
    varies only the compression (batches, k-means starts).
    """
    if not experiment.init_from:
        return experiment.seed
    metrics = _dense_metrics(experiment)
    same_data = metrics.get("data", experiment.data) == experiment.data
    held_out = metrics.get("val_size", experiment.val_size)
    if same_data and held_out != experiment.val_size:
        raise ConfigError(f"val_size={experiment.val_size}: the dense model in init_from="
                          f"{experiment.init_from!r} held out {held_out} examples; "
                          f"set val_size={held_out}")
    return int(metrics.get("seed", experiment.seed))


def _dense_metrics(experiment: Experiment) -> dict:
    """The ``metrics.json`` of the ``ucpjax train`` folder an experiment starts from."""
    path = pathlib.Path(experiment.init_from) / "metrics.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"init_from={experiment.init_from!r}: not a finished `ucpjax "
                          "train` folder (no readable metrics.json)") from None


def setup(experiment: Experiment) -> dict:
    """The run-setup fields (all but the recipe), as recorded in a run's ``config.json``;
    with the validation split's seed where it is not the run's own."""
    fields = {k: v for k, v in to_dict(experiment).items() if k != "recipe"}
    split = split_seed(experiment)
    return {**fields, "split_seed": split} if split != experiment.seed else fields


def run(experiment: Experiment, out: pathlib.Path | None, *, resume: bool = False,
        log=print) -> pipeline.Result:
    """Loads the data and model an experiment names, and runs the pipeline on them."""
    dataset = load_dataset(experiment)
    if not experiment.init_from:
        inputs.check_batch_size(experiment.dense.batch_size, len(dataset.x_train),
                                "dense.batch_size")
    model = initial_model(experiment, dataset)
    return pipeline.run(model, dataset, experiment.recipe, out,
                        start=("dense", _start(experiment, dataset, model)),
                        setup=setup(experiment), resume=resume, log=log)


def _start(experiment: Experiment, dataset: data_lib.Dataset, model: Model):
    """Stage 0 of an experiment: the dense model, trained or read from ``init_from``.

    An ``init_from`` checkpoint is read here, before any run folder is touched,
    so a bad one is refused up front.
    """
    if not experiment.init_from:
        return lambda m: train_dense(m, experiment.dense, dataset, experiment.seed)
    checkpoint = pathlib.Path(experiment.init_from) / "checkpoint"
    _dense_metrics(experiment)
    try:
        variables = checkpoints.restore(checkpoint, model.variables)
    except Exception as err:  # orbax raises many types for a damaged or foreign file
        raise ConfigError(f"init_from={experiment.init_from!r}: its checkpoint does not "
                          f"load as a {experiment.model} model ({type(err).__name__}); "
                          "retrain it with `ucpjax train`") from None
    loaded = Model(model.module, variables)
    return lambda m: (loaded, {"dense/init_from": str(checkpoint)})


def dense_model(experiment: Experiment) -> tuple[Model, data_lib.Dataset]:
    """The experiment's starting model, trained or read from ``init_from`` (BatchNorm
    live, as prune, distill and cluster see it), and its data."""
    dataset = load_dataset(experiment)
    model = initial_model(experiment, dataset)
    return _start(experiment, dataset, model)(model)[0], dataset


def check_stage(experiment: Experiment, stage: pathlib.Path) -> None:
    """Refuses ``stage`` unless it is a finished stage of a compress run with the
    experiment's setup (``runs/x/stages/01_prune``), so the validation split measured
    on is one that run held out too."""
    run = stage.parent.parent
    if not ((stage.parent / f"{stage.name}.json").is_file()
            and (run / "config.json").is_file()):
        raise ConfigError(f"--after {stage}: not a finished stage of a compress run "
                          "(expected RUN/stages/NN_name with its NN_name.json)")
    ours = json.loads(json.dumps(setup(experiment)))  # as config.json holds it
    if json.loads((run / "config.json").read_text()).get("setup") != ours:
        raise ConfigError(f"--after {stage}: {run} was run with another setup (model, "
                          "data, split or init_from); pass the overrides it was run with")


def after_stage(experiment: Experiment,
                stage: pathlib.Path) -> tuple[Model, data_lib.Dataset]:
    """The model a finished stage saved, read without touching its run (nor training
    the dense model it replaces), and the experiment's data. A stage after QAT's
    BatchNorm fold does not fit the dense model's variables and is refused."""
    dataset = load_dataset(experiment)
    model = initial_model(experiment, dataset)
    try:
        variables = checkpoints.restore(stage, model.variables)
    except Exception as err:  # orbax raises many types for a tree that does not fit
        raise ConfigError(f"--after {stage}: does not load onto the experiment's dense "
                          f"model ({type(err).__name__}); a stage after QAT's fold cannot "
                          "be measured") from None
    return dataclasses.replace(model, variables=variables), dataset


def train_dense(model: Model, config: train_lib.TrainConfig, dataset: data_lib.Dataset,
                seed: int) -> tuple[Model, dict]:
    """Trains the dense reference model; BatchNorm statistics are then re-estimated
    for the final weights (``Model.settled``), free of the moving average's lag."""
    steps = train_lib.total_steps(config, len(dataset.x_train))
    state, history = train_lib.fit(
        model.params, train_lib.classification_loss(model.module),
        train_lib.make_optimizer(config, steps), dataset.x_train, dataset.y_train,
        config=config, seed=seed, extra=model.extra, desc="dense")
    trained = Model(model.module, {"params": state.params, **state.extra})
    return trained.settled(dataset.x_train), {"dense/train_loss": history[-1]["loss"]}


def train_to_folder(experiment: Experiment, out: pathlib.Path) -> dict:
    """Trains the experiment's dense model into ``out`` (``checkpoint/``, ``metrics.json``).

    The folder is what ``init_from`` reads; ``ucpjax train`` writes the same. A
    killed training run again into the same folder goes on from its last saved
    epoch (``progress/``, removed at the end; ``checkpoints``); a finished one
    returns its metrics and trains nothing.
    """
    folder, claimed = RunFolder(out), {"train": setup(experiment)}
    folder.check_claim(claimed)  # --out, then the data, before anything is written
    finished = folder.read_json("metrics.json")
    if finished is not None and (folder.root / "checkpoint").is_dir():
        return finished
    dataset = load_dataset(experiment)
    inputs.check_batch_size(experiment.dense.batch_size, len(dataset.x_train),
                            "dense.batch_size")
    folder.claim(claimed)
    with checkpoints.kept_in(folder.root / "progress") as clock:  # a killed training goes on
        model, _ = train_dense(initial_model(experiment, dataset), experiment.dense, dataset,
                               experiment.seed)
    seconds = clock.seconds()  # a resumed training's earlier processes included
    apply_fn = model.apply_fn()
    metrics = {
        "model": experiment.model, "data": experiment.data, "seed": experiment.seed,
        "val_size": experiment.val_size, "parameters": models_lib.param_count(model.params),
        **to_dict(experiment.dense),
        "val_accuracy": train_lib.accuracy(apply_fn, model.params, dataset.x_val,
                                           dataset.y_val),
        "test_accuracy": train_lib.accuracy(apply_fn, model.params, dataset.x_test,
                                            dataset.y_test),
        "wall_seconds": seconds, "machine": machine(),
    }
    checkpoints.save(folder.root / "checkpoint", model.variables)
    folder.write_json("metrics.json", metrics)  # written last: marks the folder complete
    checkpoints.clear(folder.root / "progress")
    return metrics
