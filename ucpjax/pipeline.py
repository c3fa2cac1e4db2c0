"""The whole compression pipeline: dense model -> stages in configured order -> int8 TFLite.

The pipeline does all reading and writing; stages stay pure. A run folder holds

    config.json              the resolved config
    stages/NN_<name>/        orbax checkpoint of the params after that stage
    stages/NN_<name>.json    that stage's report; written last, so it marks the
                             stage finished (a killed stage is simply redone)
    model.tflite, model.ucpj the int8 TFLite model and the packed file
    report.json, report.md   per-stage rows and the "final" measurements
    weights.png, accuracy_vs_size.png

``--resume`` skips every stage whose report exists. Each stage's seed is
derived from the run seed and the stage's position, so a resumed run ends
exactly where an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from ucpjax import cluster, constraints, distill, fold, measure, packing, prune, quant
from ucpjax import data as data_lib
from ucpjax import models as models_lib
from ucpjax import report as report_lib
from ucpjax import train as train_lib
from ucpjax.config import ConfigError, check, to_dict

STAGES = ("prune", "distill", "cluster", "quantize")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """How the final model is exported and measured."""

    enabled: bool = True
    sparse: bool = False  # TFLite EXPERIMENTAL_SPARSITY weight storage
    representative_samples: int = 300  # converter calibration (and simulated_int8)
    latency_repeats: int = 200
    accuracy_tolerance: float = 0.001  # |tflite - jax_int8| accuracy, as a fraction
    min_agreement: float = 0.995  # argmax agreement of .tflite and JAX int8 model

    def __post_init__(self):
        check(self.representative_samples >= 1, "representative_samples",
              self.representative_samples, "must be >= 1")
        check(self.latency_repeats >= 1, "latency_repeats", self.latency_repeats, "must be >= 1")
        check(0 <= self.accuracy_tolerance < 1, "accuracy_tolerance", self.accuracy_tolerance,
              "must be in [0, 1)")
        check(0 <= self.min_agreement <= 1, "min_agreement", self.min_agreement,
              "must be in [0, 1]")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """Everything a compression run needs; ``ucpjax compress --help`` lists the fields."""

    model: str = "lenet300"
    data: str = "mnist"
    seed: int = 0
    val_size: int = 5000
    # Smoke runs use this many training/test examples (0: all of them).
    subset: int = 0
    # A `ucpjax train` output folder to start from instead of training `dense`.
    init_from: str = ""
    stages: tuple[str, ...] = STAGES
    dense: train_lib.TrainConfig = dataclasses.field(
        default_factory=lambda: train_lib.TrainConfig(epochs=10))
    prune: prune.PruneConfig = dataclasses.field(default_factory=prune.PruneConfig)
    distill: distill.DistillConfig = dataclasses.field(default_factory=distill.DistillConfig)
    cluster: cluster.ClusterConfig = dataclasses.field(default_factory=cluster.ClusterConfig)
    quantize: quant.QuantConfig = dataclasses.field(default_factory=quant.QuantConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)

    def __post_init__(self):
        for stage in self.stages:
            check(stage in STAGES, "stages", self.stages, f"each stage must be one of {STAGES}")
        check(self.val_size >= 0, "val_size", self.val_size, "must be >= 0")
        check(self.subset >= 0, "subset", self.subset, "must be >= 0")


@dataclasses.dataclass(frozen=True)
class Model:
    """A Flax module with its variables, as the pipeline sees it.

    ``frozen`` names params held fixed (folded BatchNorm scales): stages see
    ``params`` without them, and ``apply_fn`` puts them back.
    """

    module: nn.Module
    variables: dict
    frozen: tuple[tuple[str, ...], ...] = ()

    @property
    def params(self):
        return _split(self.variables["params"], self.frozen)[0]

    @property
    def extra(self) -> dict:
        return {k: v for k, v in self.variables.items() if k != "params"}

    def apply_fn(self) -> train_lib.ApplyFn:
        fixed, extra = _split(self.variables["params"], self.frozen)[1], self.extra
        return lambda params, x: self.module.apply(
            {"params": _merge(params, fixed), **extra}, x, train=False)

    def with_params(self, params) -> Model:
        fixed = _split(self.variables["params"], self.frozen)[1]
        return Model(self.module, {**self.variables, "params": _merge(params, fixed)},
                     self.frozen)


def _split(params: dict, paths) -> tuple[dict, dict]:
    """``(params without paths, {path: value})``."""
    if not paths:
        return params, {}
    free = jax.tree.map(lambda x: x, params)  # a copy of the dict structure
    fixed = {}
    for path in paths:
        node = free
        for name in path[:-1]:
            node = node[name]
        fixed[path] = node.pop(path[-1])
    return free, fixed


def _merge(params: dict, fixed: dict) -> dict:
    if not fixed:
        return params
    merged = jax.tree.map(lambda x: x, params)
    for path, value in fixed.items():
        node = merged
        for name in path[:-1]:
            node = node[name]
        node[path[-1]] = value
    return merged


@dataclasses.dataclass(frozen=True)
class Result:
    """What ``compress`` returns: compressed variables, the .tflite bytes, the report."""

    variables: dict
    tflite: bytes | None
    report: dict


def stage_seed(seed: int, position: int) -> int:
    return seed * 1000 + position


def run_stage(name: str, model: Model, config: PipelineConfig, dataset: data_lib.Dataset,
              seed: int, teacher: Model) -> tuple[Any, dict]:
    """Runs one compression stage on ``model``; returns ``(params, report)``."""
    common = {"apply_fn": model.apply_fn(), "data": dataset, "seed": seed}
    if name == "prune":
        return prune.prune(model.params, config.prune, **common)
    if name == "distill":
        return distill.distill(model.params, config.distill, teacher_apply_fn=teacher.apply_fn(),
                               teacher_params=teacher.params, **common)
    if name == "cluster":
        return cluster.cluster(model.params, config.cluster, **common)
    return quant.quantize(model.params, config.quantize, **common)


def train_dense(model: Model, config: train_lib.TrainConfig, dataset: data_lib.Dataset,
                seed: int) -> tuple[Model, dict]:
    """Trains the dense reference model (BatchNorm statistics updated as it goes)."""
    steps = train_lib.total_steps(config, len(dataset.x_train))
    state, history = train_lib.fit(
        model.params, train_lib.classification_loss(model.module),
        train_lib.make_optimizer(config, steps), dataset.x_train, dataset.y_train,
        config=config, seed=seed, extra=model.extra, desc="dense")
    trained = Model(model.module, {"params": state.params, **state.extra})
    return trained, {"dense/train_loss": history[-1]["loss"]}


def stage_row(name: str, model: Model, dataset: data_lib.Dataset, input_shape,
              seconds: float) -> dict:
    """The measurements of one stage's model, for the summary table."""
    params = jax.tree.map(np.asarray, model.params)
    macs = measure.macs(model.apply_fn(), model.params, input_shape)
    kernels = [w for w in jax.tree.leaves(params) if w.ndim > 1]
    return {
        "stage": name,
        "accuracy": train_lib.accuracy(model.apply_fn(), model.params,
                                       dataset.x_test, dataset.y_test),
        "sparsity": measure.sparsity(params),
        "max_distinct": max(len(np.unique(w[w != 0])) for w in kernels),
        "float32_bytes": measure.float32_bytes(params),
        "packed_bytes": len(packing.encode(params)),
        "macs_dense": macs["total"]["dense"],
        "macs_nonzero": macs["total"]["nonzero"],
        "seconds": seconds,
    }


class RunFolder:
    """Atomic reads and writes of one run's files."""

    def __init__(self, root: pathlib.Path):
        self.root = pathlib.Path(root)

    def write_bytes(self, name: str, payload: bytes) -> pathlib.Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    def write_json(self, name: str, obj) -> pathlib.Path:
        return self.write_bytes(name, json.dumps(obj, indent=2, default=_json_default).encode())

    def read_json(self, name: str):
        path = self.root / name
        return json.loads(path.read_text()) if path.exists() else None

    def stage_name(self, position: int, name: str) -> str:
        return f"stages/{position:02d}_{name}"

    def save_stage(self, position: int, name: str, model: Model, row: dict, report: dict):
        base = self.stage_name(position, name)
        train_lib.save_checkpoint(self.root / base, model.variables)
        self.write_json(f"{base}.json", {"row": row, "report": report})  # the "done" mark

    def load_stage(self, position: int, name: str, like: Model) -> tuple[Model, dict] | None:
        base = self.stage_name(position, name)
        done = self.read_json(f"{base}.json")
        if done is None:
            return None
        variables = train_lib.restore_checkpoint(self.root / base, like.variables)
        return Model(like.module, variables, like.frozen), done


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if hasattr(obj, "__float__"):
        return float(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def _check_same_config(folder: RunFolder, config: PipelineConfig) -> None:
    saved = folder.read_json("config.json")
    resolved = json.loads(json.dumps(to_dict(config), default=_json_default))
    if saved is not None and saved != resolved:
        changed = sorted(k for k in resolved if saved.get(k) != resolved.get(k))
        raise ConfigError(f"{folder.root} holds a run with a different config "
                          f"(fields {changed} differ): use a new --out or the same config")
    folder.write_json("config.json", resolved)


def compress_model(
    model: Model, dataset: data_lib.Dataset, config: PipelineConfig, out: pathlib.Path | None,
    *, resume: bool = False, train_dense_model: bool = True,
    log: Callable[[str], None] = print,
) -> Result:
    """Runs the pipeline; with ``out`` every stage is checkpointed there.

    Args:
      model: the Flax module and its (trained or freshly initialised) variables.
      dataset: train/val/test data.
      config: the resolved PipelineConfig.
      out: run folder, or None to keep everything in memory.
      resume: continue a run in ``out`` from its last finished stage.
      train_dense_model: train the dense reference first (False: use as given).
      log: where progress lines go.

    Returns:
      A Result with the final variables, the .tflite bytes and the report.
    """
    folder = RunFolder(out) if out is not None else None
    if folder is not None:
        _check_same_config(folder, config)
        finished = folder.read_json("report.json")
        if finished is not None:  # a finished run only prints its report
            log("\n" + report_lib.markdown(finished))
            tflite = folder.root / "model.tflite"
            return Result(model.variables, tflite.read_bytes() if tflite.exists() else None,
                          finished)
        if not resume and (folder.root / "stages").exists():
            raise ConfigError(f"{folder.root} holds an unfinished run: pass --resume "
                              "or choose a new --out")

    input_shape = dataset.input_shape
    rows, reports = [], {}
    plan = (["dense"] if train_dense_model else ["given"]) + list(config.stages)
    teacher = before_cluster = None
    for position, name in enumerate(plan):
        if name == "cluster":
            before_cluster = model
        loaded = folder.load_stage(position, name, model) if folder else None
        if loaded is not None:
            model, done = loaded
            if position == 0:
                model = _folded(model, input_shape)  # idempotent: recovers `frozen`
            log(f"[{position}] {name}: finished earlier, restored")
        else:
            start = time.perf_counter()
            if name == "dense" and config.init_from:
                checkpoint = pathlib.Path(config.init_from).resolve() / "checkpoint"
                if not checkpoint.exists():
                    raise ConfigError(f"init_from={config.init_from!r}: no {checkpoint}")
                model = Model(model.module,
                              train_lib.restore_checkpoint(checkpoint, model.variables))
                report = {"dense/init_from": str(checkpoint)}
            elif name == "dense":
                model, report = train_dense(model, config.dense, dataset, config.seed)
            elif name == "given":
                report = {}
            else:
                params, report = run_stage(name, model, config, dataset,
                                           stage_seed(config.seed, position), teacher)
                model = model.with_params(params)
            if position == 0:
                # Fold BatchNorm before any stage, so what they constrain is what ships.
                model = _folded(model, input_shape)
                report["fold/batchnorm_layers"] = len(model.frozen)
            row = stage_row(name, model, dataset, input_shape, time.perf_counter() - start)
            done = {"row": row, "report": report}
            if folder:
                folder.save_stage(position, name, model, row, report)
            log(f"[{position}] {name}: test accuracy {row['accuracy']:.4f}, "
                f"sparsity {row['sparsity']:.3f}, packed {row['packed_bytes']:,} B")
        if position == 0:
            teacher = model
        rows.append(done["row"])
        reports.update(done["report"])

    final, tflite = finish(model, dataset, config, rows[-1], folder, log)
    report = {"rows": rows, "stages": reports, "final": final, "config": to_dict(config)}
    if folder:
        from ucpjax import plots

        folder.write_json("report.json", report)
        folder.write_bytes("report.md", report_lib.markdown(report).encode())
        plots.accuracy_vs_size(rows, folder.root / "accuracy_vs_size.png",
                               size_key="packed_bytes")
        weights_plot(before_cluster or model, config, folder.root / "weights.png")
    log("\n" + report_lib.markdown(report))
    return Result(model.variables, tflite, report)


def _folded(model: Model, input_shape) -> Model:
    variables, frozen = fold.fold_batchnorm(model.module, model.variables, input_shape)
    return Model(model.module, variables, frozen)


def weights_plot(model: Model, config: PipelineConfig, path: pathlib.Path) -> None:
    """Each layer's weights before clustering, with every initialisation's centroids."""
    from ucpjax import plots

    key = jax.random.key(config.seed)
    names = {constraints.path_name(p): w for p, w in
             jax.tree_util.tree_leaves_with_path(model.params) if w.ndim > 1}
    centroids = {name: cluster.centroids_by_init(w, config.cluster.num_clusters, key, 0)
                 for name, w in names.items()}
    plots.weight_histograms(model.params, centroids, path)


def finish(model: Model, dataset: data_lib.Dataset, pipeline_config: PipelineConfig,
           last_row: dict, folder: RunFolder | None, log) -> tuple[dict, bytes | None]:
    """Packs, exports and measures the final model; returns ``(final, tflite)``."""
    config = pipeline_config.export
    params = jax.tree.map(np.asarray, model.params)
    packed = packing.encode(params)
    decoded = packing.decode(packed)
    if not all(np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(params), jax.tree.leaves(decoded), strict=True)):
        raise AssertionError("the packed file did not decode to the encoded params")
    decoded_acc = train_lib.accuracy(model.apply_fn(), decoded, dataset.x_test, dataset.y_test)
    final = {
        "jax_accuracy": last_row["accuracy"],
        "packed_accuracy": decoded_acc,
        "float32_bytes": last_row["float32_bytes"],
        "packed_bytes": len(packed),
        "compression_packed": last_row["float32_bytes"] / len(packed),
        "sparsity": last_row["sparsity"],
        "macs_dense": last_row["macs_dense"],
        "macs_nonzero": last_row["macs_nonzero"],
    }
    if folder:
        folder.write_bytes("model.ucpj", packed)
    if not config.enabled:
        return final, None
    from ucpjax import export  # TensorFlow: only here

    log("exporting int8 TFLite ...")
    apply_fn = model.apply_fn()
    rep = dataset.x_train[:config.representative_samples]
    per_tensor = quant.dense_per_tensor(model.params, pipeline_config.quantize)
    tflite = export.to_tflite(apply_fn, model.params, dataset.input_shape, rep,
                              per_tensor_dense=per_tensor, sparse=config.sparse)
    float_tflite = export.to_tflite(apply_fn, model.params, dataset.input_shape, rep, int8=False)
    evaluation = export.evaluate(tflite, dataset.x_test, dataset.y_test,
                                 use_xnnpack=not config.sparse)
    # The .tflite is checked against the JAX model with its int8 activations.
    int8_weights = quant.quantize_weights(
        model.params, dataclasses.replace(pipeline_config.quantize, weight_bits=8,
                                          per_channel=not per_tensor))
    jax_pred = train_lib.predict(export.simulated_int8(apply_fn, int8_weights, rep),
                                 int8_weights, dataset.x_test).argmax(-1)
    jax_int8_accuracy = float(np.mean(jax_pred == dataset.y_test))
    agreement = float(np.mean(evaluation["predictions"] == jax_pred))
    final.update({
        "jax_int8_accuracy": jax_int8_accuracy,
        "tflite_accuracy": evaluation["accuracy"],
        "tflite_agreement": agreement,
        "tflite_bytes": len(tflite),
        "tflite_zip_bytes": measure.zip_bytes(tflite),
        "latency_int8_us": export.latency_us(tflite, repeats=config.latency_repeats,
                                             use_xnnpack=not config.sparse),
        "latency_float_us": export.latency_us(float_tflite, repeats=config.latency_repeats),
        "weights_faithful": bool(export.weights_check(tflite, model.params)["faithful"]),
    })
    final["compression_tflite_zip"] = final["float32_bytes"] / final["tflite_zip_bytes"]
    gap = abs(final["tflite_accuracy"] - jax_int8_accuracy)
    final["tflite_within_tolerance"] = bool(
        gap <= config.accuracy_tolerance and agreement >= config.min_agreement)
    if not final["tflite_within_tolerance"]:
        log(f"!! TFLITE CHECK FAILED: accuracy gap {gap:.4f} (tolerance "
            f"{config.accuracy_tolerance}), agreement {agreement:.4f} (min {config.min_agreement})")
    if folder:
        folder.write_bytes("model.tflite", tflite)
    return final, tflite


def compress(module: nn.Module, variables, *, train, test, config: PipelineConfig | None = None,
             val=None, out: str | os.PathLike | None = None, resume: bool = False) -> Result:
    """Compresses a user's trained Flax model. The Python entry point.

    Args:
      module: a ``flax.linen`` Module called as ``module.apply(variables, x, train=bool)``
        (BatchNorm with ``use_running_average=not train`` and Dropout are fine).
      variables: its trained variables (``params``, and ``batch_stats`` with BatchNorm).
      train: ``(x, y)`` numpy arrays, NHWC float32 images and int labels.
      test: ``(x, y)`` for reporting.
      config: stage settings (``model``/``data``/``dense`` fields are ignored: the
        model is used as given). Default: the paper's order with default settings.
      val: optional ``(x, y)`` for the stages' validation accuracy (default: test).
      out: optional run folder for checkpoints, reports and the .tflite.
      resume: continue a run in ``out``.

    Returns:
      ``Result(variables, tflite, report)``.
    """
    config = config or PipelineConfig()
    x, y = (np.asarray(a) for a in train)
    x_test, y_test = (np.asarray(a) for a in test)
    x_val, y_val = (np.asarray(a) for a in (val or test))
    dataset = data_lib.Dataset(
        name="user", x_train=x.astype(np.float32), y_train=y.astype(np.int32),
        x_val=x_val.astype(np.float32), y_val=y_val.astype(np.int32),
        x_test=x_test.astype(np.float32), y_test=y_test.astype(np.int32),
        num_classes=int(max(y.max(), y_test.max())) + 1)
    return compress_model(Model(module, dict(variables)), dataset, config,
                          None if out is None else pathlib.Path(out), resume=resume,
                          train_dense_model=False)


def load_module(path: str | os.PathLike):
    """Imports an experiment file (it defines ``get_config`` or ``get_variants``)."""
    import importlib.util

    path = pathlib.Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"ucpjax_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    # Experiments may import their siblings (e.g. a study built on the default).
    sys.path.insert(0, str(path.resolve().parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.resolve().parent))
    if not hasattr(module, "get_config") and not hasattr(module, "get_variants"):
        raise ConfigError(f"{path} defines neither get_config(smoke) nor get_variants(smoke)")
    return module


def machine() -> str:
    """The machine and versions, for reports."""
    import platform

    import flax

    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, {len(jax.devices())} JAX "
            f"device(s), Python {platform.python_version()}, jax {jax.__version__}, "
            f"flax {flax.__version__}")


def smoke(config: PipelineConfig) -> PipelineConfig:
    """The same run shrunk to seconds: 1,000 examples, half an epoch per stage."""
    tiny = train_lib.TrainConfig(epochs=0.5, batch_size=100, learning_rate=1e-3)
    return dataclasses.replace(
        config, subset=1000, dense=dataclasses.replace(config.dense, epochs=2, batch_size=100),
        prune=dataclasses.replace(config.prune, frequency=1, train=tiny, fine_tune=tiny),
        distill=dataclasses.replace(config.distill, train=tiny),
        cluster=dataclasses.replace(config.cluster, iterations=5, train=tiny),
        quantize=dataclasses.replace(config.quantize, train=tiny),
        export=dataclasses.replace(config.export, representative_samples=50,
                                   latency_repeats=20),
    )


def load_dataset(config: PipelineConfig) -> data_lib.Dataset:
    dataset = data_lib.load(config.data, val_size=config.val_size, seed=config.seed)
    if config.subset:
        dataset = dataset.take(config.subset, max(config.subset // 4, 100))
    return dataset


def initial_model(config: PipelineConfig, dataset: data_lib.Dataset) -> Model:
    module = models_lib.create(config.model, dataset.num_classes)
    return Model(module, models_lib.init(module, dataset.input_shape, config.seed))


def run_config(config: PipelineConfig, out: pathlib.Path | None, *, resume: bool = False,
               log=print) -> Result:
    """Loads data and model named by ``config`` and runs the pipeline."""
    dataset = load_dataset(config)
    return compress_model(initial_model(config, dataset), dataset, config, out, resume=resume,
                          log=log)


def train_to_folder(config: PipelineConfig, out: pathlib.Path) -> dict:
    """Trains ``config``'s dense model into ``out`` (``checkpoint/``, ``metrics.json``).

    The folder is what ``init_from`` reads; ``ucpjax train`` writes the same.
    """
    dataset = load_dataset(config)
    start = time.perf_counter()
    model, _ = train_dense(initial_model(config, dataset), config.dense, dataset, config.seed)
    seconds = time.perf_counter() - start
    apply_fn = model.apply_fn()
    metrics = {
        "model": config.model, "data": config.data, "seed": config.seed,
        "parameters": models_lib.param_count(model.params),
        **to_dict(config.dense),
        "val_accuracy": train_lib.accuracy(apply_fn, model.params, dataset.x_val, dataset.y_val),
        "test_accuracy": train_lib.accuracy(apply_fn, model.params, dataset.x_test,
                                            dataset.y_test),
        "wall_seconds": seconds, "machine": machine(),
    }
    folder = RunFolder(out)
    train_lib.save_checkpoint(folder.root / "checkpoint", model.variables)
    folder.write_json("metrics.json", metrics)  # written last: marks the folder complete
    return metrics
