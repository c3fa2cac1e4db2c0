"""The recipe: which stages run, in which order, with which settings and per-layer rules.

A recipe is everything ``ucpjax.compress`` needs besides the model and the data;
how a dense model is trained and which data it sees is the run setup
(``ucpjax.experiment``). ``STAGES`` is the stage table: name -> function, each
called as ``stage(params, recipe, shared) -> (params, report)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ucpjax import cluster, distill, inputs, prune, quantize, sensitivity
from ucpjax import data as data_lib
from ucpjax import export as export_lib
from ucpjax import rules as rules_lib
from ucpjax import train as train_lib
from ucpjax.config import check
from ucpjax.model import Model


@dataclasses.dataclass(frozen=True)
class StageInputs:
    """What every stage may use besides the params and its own config."""

    apply_fn: train_lib.ApplyFn
    data: data_lib.Dataset
    seed: int
    rules: rules_lib.Rules
    teacher: Model


def _prune(params, recipe, shared: StageInputs):
    curves = None
    if recipe.prune.scope == "sensitivity":
        table = sensitivity.measure(params, apply_fn=shared.apply_fn, data=shared.data,
                                    rules=shared.rules, clusters=(),
                                    min_per_channel=recipe.prune.min_per_channel,
                                    criterion=recipe.prune.criterion,
                                    seed=shared.seed, progress=lambda name: print(
                                        f"prune: measuring the sensitivity of {name} ...",
                                        flush=True))
        curves = {name: {float(s): drop for s, drop in entry["prune"].items()}
                  for name, entry in table["layers"].items()}
    return prune.prune(params, recipe.prune, apply_fn=shared.apply_fn, data=shared.data,
                       seed=shared.seed, rules=shared.rules, curves=curves,
                       teacher=_teacher(shared))


def _distill(params, recipe, shared: StageInputs):
    return distill.distill(params, recipe.distill, apply_fn=shared.apply_fn, data=shared.data,
                           seed=shared.seed, rules=shared.rules,
                           teacher_apply_fn=shared.teacher.apply_fn(),
                           teacher_params=shared.teacher.params)


def _cluster(params, recipe, shared: StageInputs):
    return cluster.cluster(params, recipe.cluster, apply_fn=shared.apply_fn, data=shared.data,
                           seed=shared.seed, rules=shared.rules, teacher=_teacher(shared))


def _teacher(shared: StageInputs):
    """``(apply_fn, params)`` of the recipe's teacher for a stage's own loss, or None."""
    return (shared.teacher.apply_fn(), shared.teacher.params) if shared.teacher else None


def _quantize(params, recipe, shared: StageInputs):
    representative_x = shared.data.x_train[:recipe.export.representative_samples]
    return quantize.quantize(params, recipe.quantize, apply_fn=shared.apply_fn,
                             data=shared.data, seed=shared.seed, rules=shared.rules,
                             representative_x=representative_x)


# name -> stage: ``stage(params, recipe, shared) -> (params, report)``.
STAGES: dict[str, Callable[..., tuple[Any, dict]]] = {
    "prune": _prune, "distill": _distill, "cluster": _cluster, "quantize": _quantize}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    """How to compress a model: the stages, their settings and the per-layer rules."""

    seed: int = 0
    stages: tuple[str, ...] = tuple(STAGES)
    rules: tuple[rules_lib.LayerRule, ...] = rules_lib.DEFAULT_RULES
    prune: prune.PruneConfig = dataclasses.field(default_factory=prune.PruneConfig)
    distill: distill.DistillConfig = dataclasses.field(default_factory=distill.DistillConfig)
    cluster: cluster.ClusterConfig = dataclasses.field(default_factory=cluster.ClusterConfig)
    quantize: quantize.QuantizeConfig = dataclasses.field(
        default_factory=quantize.QuantizeConfig)
    export: export_lib.ExportConfig = dataclasses.field(default_factory=export_lib.ExportConfig)

    def __post_init__(self):
        for stage in self.stages:
            check(stage in STAGES, "stages", self.stages, f"each stage must be one of "
                  f"{tuple(STAGES)}")
        for rule in self.rules:
            check(isinstance(rule, rules_lib.LayerRule), "rules", rule,
                  "each rule must be a ucpjax.rules.LayerRule")
        bits = [self.quantize.weight_bits, *(r.bits for r in self.rules if r.bits)]
        # The int8 .tflite cannot hold a coarser grid exactly: refuse, not export a lie.
        check(not self.export.enabled or "quantize" not in self.stages or min(bits) == 8,
              "quantize.weight_bits", min(bits), "the int8 .tflite holds 8-bit weights: use 8 "
              "here and in every LayerRule.bits, or set export.enabled=False to measure "
              "fewer bits in JAX and the packed file")

    def check_budgets(self, num_examples: int) -> None:
        """Refuses stage batches larger than the training set, naming every field
        with that batch size in one line, so one fix covers them all."""
        fields_by_size: dict[int, list[str]] = {}
        for stage in self.stages:
            config = getattr(self, stage)
            for field in dataclasses.fields(config):
                budget = getattr(config, field.name)
                if isinstance(budget, train_lib.TrainConfig):
                    fields_by_size.setdefault(budget.batch_size, []).append(
                        f"{stage}.{field.name}.batch_size")
        for batch_size, fields in fields_by_size.items():
            # "a.batch_size=100, b.batch_size" + "=100" as check_batch_size ends it.
            inputs.check_batch_size(batch_size, num_examples, f"={batch_size}, ".join(fields))
