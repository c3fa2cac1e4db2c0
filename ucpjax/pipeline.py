"""The compression pipeline: a model -> the recipe's stages in order -> int8 TFLite.

The pipeline only orchestrates: it runs the stages of ``STAGES`` (pure
functions, params in, params and a flat report out) in the recipe's order,
checkpoints each into a ``RunFolder``, then packs, exports and checks the
result (``export.verify``, ``export.check``). Position 0 is the starting model
(trained dense by ``ucpjax.experiment``, or a user's model as given); each
later stage's seed is derived from the run seed and its position, so a resumed
run ends exactly where an uninterrupted one does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import nnx

from ucpjax import channel_order, channels, cluster, distill, from_nnx, inputs, measure, packing
from ucpjax import data as data_lib
from ucpjax import export as export_lib
from ucpjax import report as report_lib
from ucpjax import rules as rules_lib
from ucpjax import train as train_lib
from ucpjax.checkpoints import Clock
from ucpjax.config import ConfigError, to_dict
from ucpjax.model import TRAIN_SWITCHES, Model, check_model, check_quantizable, with_train_argument
from ucpjax.recipe import STAGES, Recipe, StageInputs
from ucpjax.run_folder import RunFolder


@dataclasses.dataclass(frozen=True)
class Result:
    """What ``compress`` returns: compressed variables, the .tflite bytes, the report."""

    variables: dict
    tflite: bytes | None
    report: dict
    module: Any = None  # what applies ``variables``: a ``channels.Slimmed`` once shrunk


Start = Callable[[Model], tuple[Model, dict]]
# Between stages the int8 check allows this many times the final check's
# disagreement and accuracy gap: QAT, still to come, recovers small misses (a
# LayerNorm MLP: agreement 0.9949 after distillation, 0.9990 after QAT).
STAGE_SLACK = 4.0
FINAL_FILES = ("model.ucpj", "report.md", "accuracy_vs_size.png", "weights.png")


def run(model: Model, dataset: data_lib.Dataset, recipe: Recipe, out=None, *,
        start: tuple[str, Start] = ("given", lambda m: (m, {})), setup: dict | None = None,
        resume: bool = False, check_export: bool = True,
        log: Callable[[str], None] = print) -> Result:
    """Runs the pipeline; with ``out`` every stage is checkpointed there.

    Args:
      model: the module and its variables (trained, or initialised for ``start``).
      dataset: train/val/test data, already checked.
      recipe: the stages and their settings.
      out: run folder, or None to keep everything in memory.
      start: ``(name, fn)`` of stage 0: ``fn(model) -> (model, report)`` (a dense
        training, or the model as given).
      setup: how the model and data were made, recorded in ``config.json`` beside
        the recipe (a folder holding another setup or recipe is refused).
      resume: continue a run in ``out`` from its last finished stage.
      check_export: raise ``export.ToleranceError`` when the .tflite is not faithful.
      log: where progress lines go.

    Returns:
      A Result with the final variables, the .tflite bytes and the report.
    """
    recipe.check_budgets(len(dataset.x_train))
    _note_unselected(model, recipe, log)
    unmodeled = []
    if _qat(recipe) and recipe.export.enabled:
        unmodeled = check_quantizable(model, dataset.input_shape)
    # Another model that teaches is read (and checked) before any work.
    teacher = distill.teacher_model(recipe.distill, dataset) if "distill" in recipe.stages else None
    folder = None if out is None else RunFolder(out)
    if folder is None:
        return _run(model, dataset, recipe, None, start, teacher, check_export, unmodeled, log)
    with folder.lock():  # first: a second writer must not touch config.json either
        folder.claim({"recipe": to_dict(recipe), "setup": setup or {}})
        if not resume and (folder.root / "stages").exists() and not (
                folder.root / "report.json").exists():
            raise ConfigError(f"{folder.root} holds an unfinished run: pass --resume "
                              "or choose a new --out")
        return _run(model, dataset, recipe, folder, start, teacher, check_export, unmodeled,
                    log)


def _note_unselected(model: Model, recipe: Recipe, log) -> None:
    """Names the weight matrices no rule selects, which would stay uncompressed
    without a word (a user's ``self.param("w", ...)``)."""
    left = rules_lib.unselected_matrices(model.params, recipe.rules)
    if left:
        share = sum(left.values()) / sum(x.size for x in jax.tree.leaves(model.params))
        log(f"note: no rule selects {', '.join(left)} ({sum(left.values()):,} weights, "
            f"{share:.0%} of the params), so no stage compresses them; to compress "
            "them, add a LayerRule whose pattern matches them to recipe.rules")


def _run(model, dataset, recipe, folder, start, teacher, check_export, unmodeled,
         log) -> Result:
    finished = _finished_report(folder, log) if folder else None
    if finished is not None and _final_files_present(folder, recipe):
        log("\n" + report_lib.markdown(finished))  # a finished run only prints its report
        if check_export and recipe.export.enabled:
            export_lib.check(finished["final"], recipe.export, qat=_on_int8_grid(recipe))
        return Result(model.variables, _read(folder.root / "model.tflite"), finished,
                      model.module)
    rows, reports, before_cluster = [], {}, None
    for position, name in enumerate([start[0], *recipe.stages]):
        if name == "cluster":
            before_cluster = model
        model, done = _stage(position, name, model, dataset, recipe, folder, start, teacher, log)
        if check_export:
            _check_above_chance(done["row"], rows[0] if rows else None, dataset.y_test)
        if unmodeled and check_export and position < len(recipe.stages):
            # Compression moves the ranges inside those ops: a stage that breaks the
            # int8 export stops the run there, not after the remaining stages.
            reports.update(_preflight(model, dataset, recipe, unmodeled, log,
                                      after=name if position else None))
        elif position == 0 and recipe.export.enabled:
            _check_converts(model, dataset, recipe, log)
        teacher = teacher or model  # by default the dense model teaches
        rows.append(done["row"])
        reports.update(done["report"])
    model = model.folded(dataset.input_shape)  # what ships (a no-op after QAT, which folds)
    model, ordering = _reordered(model, dataset, recipe, log)
    model, slimming = _slimmed(model, dataset, recipe, log)
    final, tflite = _finish(model, dataset, recipe, rows[-1], folder, log)
    final.update(ordering, **slimming)
    report = {"rows": rows, "stages": reports, "final": final, "recipe": to_dict(recipe)}
    if folder:
        _write_report(folder, report, before_cluster or model, recipe)
    log("\n" + report_lib.markdown(report))
    if check_export and recipe.export.enabled:
        export_lib.check(final, recipe.export, qat=_on_int8_grid(recipe))
    return Result(model.variables, tflite, report, model.module)


class AccuracyError(export_lib.ToleranceError):
    """A model at chance accuracy: the one given, or one a stage left (see
    ``_check_above_chance``)."""


# Test sets smaller than this do not tell chance from skill well enough to stop a run.
CHANCE_MIN_EXAMPLES = 50


def chance_bound(y: np.ndarray) -> tuple[float, float]:
    """``(share of the commonest class, 3 standard errors above it)``: always guessing
    that class scores the share; an accuracy at or below the bound is chance."""
    share = float(np.bincount(y).max() / len(y))
    return share, share + 3 * math.sqrt(share * (1 - share) / len(y))


def _check_above_chance(row: dict, given: dict | None, y: np.ndarray) -> None:
    """Stops the run at a model no better than chance on the test set: a given model
    there was preprocessed unlike its training data (or is untrained), so all
    compression would follow a wrong input; a stage that leaves a model there
    destroyed what it had learned, which the faithfulness checks cannot see."""
    share, bound = chance_bound(y)
    if len(y) < CHANCE_MIN_EXAMPLES or row["accuracy"] > bound:
        return
    seen = (f"test accuracy {row['accuracy']:.3f}, no better than chance (at most "
            f"{bound:.3f}: always the commonest class scores {share:.3f}, plus 3 standard "
            f"errors on {len(y)} images)")
    if given is None and row["stage"] == "given":
        raise AccuracyError(
            f"the given model scores {seen}: were the images preprocessed as in its "
            "training (scale, channel order)? Pass check=False to compress it anyway")
    if given is None:
        raise AccuracyError(f"the {row['stage']} model scores {seen}: its training did not "
                            "learn; train it for more epochs or at a lower learning rate")
    if given["accuracy"] > bound:
        raise AccuracyError(
            f"the {row['stage']} stage left the model at {seen}; it had "
            f"{given['accuracy']:.3f}: compress less in that stage (e.g. a lower "
            "prune.target_sparsity, more cluster.num_clusters) or train it for more epochs")


def _check_converts(model: Model, dataset, recipe: Recipe, log) -> None:
    """Refuses, before any stage, a model the TFLite converter refuses (a 1-D pool,
    an op without an int8 kernel), which would otherwise fail after the last one."""
    folded = model.folded(dataset.input_shape)
    export_lib.int8_tflite(folded.apply_fn(), folded.params, dataset, config=recipe.export,
                           quantize_config=recipe.quantize, rules=recipe.rules)
    log("int8 conversion before any compression passed")


def _preflight(model: Model, dataset, recipe: Recipe, unmodeled: list[str], log,
               after: str | None = None) -> dict:
    """The model's int8 export checked (``export.preflight``) when it has operations
    QAT does not model: before the stages (``after`` None), then after each stage
    but the last (whose export the final check measures), so a model that would
    fail the final check fails as soon as it can. Returns the report's entries
    (``preflight/*``, then ``<stage>/int8_*``)."""
    when = "before any compression" if after is None else f"after the {after} stage"
    if after is None:
        log(f"int8 preflight: the model applies {', '.join(unmodeled)} to activations; "
            "checking its int8 .tflite before compressing ...")
    folded = model.folded(dataset.input_shape)
    measured = export_lib.preflight(folded.apply_fn(), folded.params, dataset,
                                    config=recipe.export, quantize_config=recipe.quantize,
                                    rules=recipe.rules, reason=", ".join(unmodeled), when=when,
                                    slack=1.0 if after is None else STAGE_SLACK)
    log(f"int8 check {when} passed: argmax agreement {measured['tflite_agreement']:.4f}, "
        f"TFLite ops QAT does not model: {', '.join(measured['tflite_ops']) or 'none'}")
    if after is None:
        return {f"preflight/{key}": measured[key] for key in
                ("tflite_agreement", "tflite_accuracy_gap", "tflite_ops")}
    return {f"{after}/int8_{key}": measured[f"tflite_{key}"] for key in
            ("agreement", "accuracy_gap")}


def _reordered(model: Model, dataset, recipe: Recipe, log) -> tuple[Model, dict]:
    """The model with its hidden channels reordered to zip smaller
    (``channel_order``), and the report's ``channels_reordered``; it must compute
    the same logits."""
    if recipe.export.channel_order == "model" or not recipe.export.enabled:
        return model, {"channels_reordered": False}
    groups = channels.find_groups(model.apply_fn(), model.params, dataset.input_shape)
    ordered = dataclasses.replace(model, variables=channel_order.similar_first(
        model.variables, groups))
    before, after = (channel_order.kernel_zip_bytes(m.params) for m in (model, ordered))
    if after >= before:
        log(f"channel order kept: reordered kernels zip to {after:,} B, as built {before:,} B")
        return model, {"channels_reordered": False}
    error, scale = _logit_error(model, ordered, dataset.x_test[:512])
    if not error <= 1e-4 * scale:
        raise export_lib.ToleranceError(
            f"the model with its channels reordered differs from it by {error:.3g} in the "
            "logits (a layer the channel tracer does not understand); set "
            "export.channel_order=model")
    log(f"channels reordered to zip smaller: {groups.count} channel groups in "
        f"{len(groups.families())} families, kernels {before:,} -> {after:,} B zipped")
    return ordered, {"channels_reordered": True}


def _logit_error(model: Model, other: Model, x) -> tuple[float, float]:
    """``(max |logit difference|, max(max |logit|, 1))`` of two models on ``x``."""
    reference = train_lib.predict(model.apply_fn(), model.params, x)
    error = np.max(np.abs(reference - train_lib.predict(other.apply_fn(), other.params, x)))
    return float(error), max(float(np.max(np.abs(reference))), 1.0)


def _slimmed(model: Model, dataset, recipe: Recipe, log) -> tuple[Model, dict]:
    """The model with its removed channels cut out (``channels``), when the recipe
    prunes channels; it must compute the masked model's logits."""
    if "prune" not in recipe.stages or not recipe.prune.channel_sparsity:
        return model, {}
    groups = channels.find_groups(model.apply_fn(), model.params, dataset.input_shape)
    removed = channels.removed_groups(model.variables, groups)
    slim = Model(channels.Slimmed(model.module),
                 channels.shrink(model.variables, groups, removed), model.frozen,
                 folded_bn=model.folded_bn)
    try:
        error, scale = _logit_error(model, slim, dataset.x_test[:512])
    except Exception as err:  # any failure of the user's code at the new widths
        raise export_lib.ToleranceError(
            f"the model with {int(removed.sum())} channels cut out does not run "
            f"({type(err).__name__}: {str(err).splitlines()[0]}); build the layers from "
            "fixed widths, not from x.shape, or set prune.channel_sparsity=0") from err
    if not error <= 1e-4 * scale:
        raise export_lib.ToleranceError(
            f"the model with {int(removed.sum())} channels cut out differs from the masked "
            f"model by {error:.3g} in the logits (a layer the channel tracer does not "
            "understand); set prune.channel_sparsity=0")
    macs = measure.macs(slim.apply_fn(), slim.params, dataset.input_shape)["total"]["dense"]
    log(f"slimmed: {int(removed.sum())} of {groups.count} channel groups cut out, "
        f"{macs:,} multiplications")
    return slim, {"channel_groups_removed": int(removed.sum()), "macs_slimmed": macs}


def _stage(position, name, model, dataset, recipe, folder, start, teacher, log):
    """Restores stage ``position`` from ``folder`` or runs it; returns ``(model, done)``."""
    fold_report = {}
    if name == "quantize" and model.live_bn:
        # Folding with frozen statistics (Jacob et al. 2018): QAT trains the folded
        # kernels on TFLite's int8 grid, so what it constrains is what ships.
        model = model.folded(dataset.input_shape)
        fold_report["fold/batchnorm_layers"] = len(model.frozen)
    loaded = folder.load_stage(position, name, model.variables, log) if folder else None
    if loaded is not None:
        log(f"[{position}] {name}: finished earlier, restored")
        return dataclasses.replace(model, variables=loaded[0]), loaded[1]
    timed = (folder.training_stage(position, name) if folder
             else contextlib.nullcontext(Clock()))
    with timed as clock:
        if position == 0:
            model, report = start[1](model)
        else:
            shared = StageInputs(model.apply_fn(), dataset, seed=recipe.seed * 1000 + position,
                                 rules=recipe.rules, teacher=teacher)
            params, report = STAGES[name](model.params, recipe, shared)
            # Live BatchNorm: running statistics re-estimated for the new weights.
            model = model.with_params(params).settled(dataset.x_train)
    row = stage_row(name, model, dataset, recipe.rules, clock.seconds())
    done = {"row": row, "report": {**report, **fold_report}}
    if folder:
        folder.save_stage(position, name, model.variables, done)
    log(f"[{position}] {name}: test accuracy {row['accuracy']:.4f}, "
        f"sparsity {row['sparsity']:.3f}, packed {row['packed_bytes']:,} B")
    return model, done


def stage_row(name: str, model: Model, dataset: data_lib.Dataset, rules: rules_lib.Rules,
              seconds: float) -> dict:
    """The measurements of one stage's model, for the summary table."""
    params = jax.tree.map(np.asarray, model.params)
    macs = measure.macs(model.apply_fn(), model.params, dataset.input_shape)
    chosen = jax.tree.leaves(rules_lib.selected(params, rules))
    kernels = [w for w, sel in zip(jax.tree.leaves(params), chosen, strict=True) if sel]
    return {
        "stage": name,
        "accuracy": train_lib.accuracy(model.apply_fn(), model.params,
                                       dataset.x_test, dataset.y_test),
        "sparsity": measure.sparsity(params, rules),
        "max_distinct": max((len(np.unique(w[w != 0])) for w in kernels), default=0),
        "float32_bytes": measure.float32_bytes(params),
        "packed_bytes": len(packing.encode(params, rules=rules)),
        "macs_dense": macs["total"]["dense"],
        "macs_nonzero": macs["total"]["nonzero"],
        "seconds": seconds,
    }


def _finish(model: Model, dataset, recipe: Recipe, last_row: dict,
            folder: RunFolder | None, log) -> tuple[dict, bytes | None]:
    """Packs (checked to decode bit-exact), exports and measures the final model."""
    params = jax.tree.map(np.asarray, model.params)
    packed = packing.encode(params, rules=recipe.rules)
    decoded = packing.decode(packed)
    if not all(np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(params), jax.tree.leaves(decoded), strict=True)):
        raise AssertionError("the packed file did not decode to the encoded params")
    final = {
        "jax_accuracy": last_row["accuracy"],
        "packed_accuracy": train_lib.accuracy(model.apply_fn(), decoded,
                                              dataset.x_test, dataset.y_test),
        "float32_bytes": last_row["float32_bytes"],
        "packed_bytes": len(packed),
        "compression_packed": last_row["float32_bytes"] / len(packed),
        **{key: last_row[key] for key in ("sparsity", "macs_dense", "macs_nonzero")},
    }
    if folder:
        folder.write_bytes("model.ucpj", packed)
    if not recipe.export.enabled:
        return final, None
    log("exporting int8 TFLite ...")
    measured, tflite = export_lib.verify(model.apply_fn(), model.params, dataset,
                                         config=recipe.export,
                                         quantize_config=recipe.quantize, rules=recipe.rules)
    final.update(measured)
    final["compression_tflite_zip"] = final["float32_bytes"] / final["tflite_zip_bytes"]
    if folder:
        folder.write_bytes("model.tflite", tflite)
    return final, tflite


def _write_report(folder: RunFolder, report: dict, before_cluster: Model, recipe: Recipe):
    from ucpjax import plots

    folder.write_bytes("report.md", report_lib.markdown(report).encode())
    plots.accuracy_vs_size(report["rows"], folder.root / "accuracy_vs_size.png",
                           size_key="packed_bytes")
    weights_plot(before_cluster, recipe, folder.root / "weights.png")
    folder.write_json("report.json", report)  # last: marks the run finished


def _finished_report(folder: RunFolder, log) -> dict | None:
    try:
        return folder.read_json("report.json")
    except ConfigError as err:
        log(f"{err}; rebuilding it from the saved stages")
        return None


def _final_files_present(folder: RunFolder, recipe: Recipe) -> bool:
    names = [*FINAL_FILES, *(("model.tflite",) if recipe.export.enabled else ())]
    return all((folder.root / name).exists() for name in names)


def _qat(recipe: Recipe) -> bool:
    return "quantize" in recipe.stages


def _on_int8_grid(recipe: Recipe) -> bool:
    """Whether the final weights sit on the int8 grid the .tflite holds: QAT is the
    last stage. A stage after it (an ablation order) moves them off the grid, so the
    export is post-training quantization and only its accuracy is checked."""
    return bool(recipe.stages) and recipe.stages[-1] == "quantize"


def _read(path: pathlib.Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


def weights_plot(model: Model, recipe: Recipe, path: pathlib.Path) -> None:
    """Each clustered layer's weights, with every initialisation's centroids at its k."""
    from ucpjax import plots

    key = jax.random.key(recipe.seed)
    shown = {}
    for path_, w in jax.tree_util.tree_leaves_with_path(model.params):
        name = rules_lib.path_name(path_)
        k = cluster.layer_k(name, recipe.cluster, recipe.rules)
        if k and np.count_nonzero(w) >= k:
            shown[name] = (w, k)
    padded_size = cluster.common_padded_size(w for w, _ in shown.values())
    centroids = {name: cluster.centroids_by_init(w, k, key, 0, padded_size)
                 for name, (w, k) in shown.items()}
    plots.weight_histograms(model.params, centroids, path)


def _linen(module, variables) -> tuple[nn.Module, dict]:
    """``(module, variables)`` as linen: an NNX model lifted, a linen one checked."""
    if isinstance(module, nnx.Module):
        if variables is not None:
            raise ConfigError("variables: an nnx model carries its own state; pass "
                              "compress(model, train=..., test=...) without variables")
        return from_nnx.lift(module)
    if not isinstance(module, nn.Module):
        raise ConfigError(f"module is a {type(module).__name__}: pass a flax.linen Module "
                          "(with its variables) or a flax.nnx Module")
    if not isinstance(variables, Mapping):
        raise ConfigError(f"variables is {type(variables).__name__}: pass the linen module's "
                          "trained variables dict ({'params': ..., 'batch_stats': ...})")
    return module, variables


def compress(module: nn.Module | nnx.Module, variables=None, *, train, test,
             recipe: Recipe | None = None,
             val=None, out: str | os.PathLike | None = None, resume: bool = False,
             check: bool = True, log: Callable[[str], None] = print) -> Result:
    """Compresses a user's trained Flax model. The Python entry point.

    Args:
      module: a ``flax.linen`` Module called as ``module.apply(variables, x, train=bool)``
        (BatchNorm with ``use_running_average=not train`` and Dropout are fine); a
        switch named otherwise, or none, is adapted (``model.with_train_argument``).
        A Flax NNX model (``nnx.Module``, trained, its state inside) is lifted to
        linen (``from_nnx.lift``): its layers are named by attribute path
        (``blocks.0.conv/kernel``) in rules, reports and ``Result.variables``.
      variables: the linen module's trained variables (``params``, and
        ``batch_stats`` with BatchNorm); None for an NNX model.
      train: ``(x, y)`` numpy arrays: float inputs (NHWC images, ``(N, D)`` features,
        ``(N, L, C)`` sequences), integer labels.
      test: ``(x, y)`` for reporting.
      recipe: the stages and their settings. Default: the paper's order.
      val: optional ``(x, y)`` for the stages' validation accuracy (default: test).
      out: optional run folder for checkpoints, reports and the .tflite.
      resume: continue a run in ``out``.
      check: raise ``export.ToleranceError`` when the .tflite is not faithful
        (False: the report's ``tflite_within_tolerance`` says so instead). A model
        with operations QAT does not model (a sigmoid, GELU, LayerNorm) is also
        exported once before the stages and checked the same way (``export.preflight``).
      log: where progress lines go.

    Returns:
      ``Result(variables, tflite, report)``.
    """
    recipe = recipe or Recipe()
    if val is None and "prune" in recipe.stages and recipe.prune.scope == "sensitivity":
        raise ConfigError("val: prune.scope='sensitivity' chooses per-layer sparsities on "
                          "the validation split, and without val= that is the test set; "
                          "pass val=(x, y) held out from train")
    dataset = inputs.dataset_from_arrays(train, test, val)
    module, variables = _linen(module, variables)
    adapted, switch = with_train_argument(module)
    if adapted is not module:
        log(f"{type(module).__name__}.__call__ has no `train` argument: ucpjax calls it "
            + (f"with {switch}={'train' if TRAIN_SWITCHES[switch] else 'not train'}"
               if switch else "with the images alone (no training mode)"))
    model = Model(adapted, dict(variables))
    check_model(model, dataset.input_shape, dataset.num_classes, sample=dataset.x_train[:16])
    return run(model, dataset, recipe, out, resume=resume, check_export=check,
               log=log)
