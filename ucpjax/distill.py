"""Knowledge distillation (Hinton, Vinyals & Dean 2015) that keeps earlier constraints.

The student learns from the teacher's softened outputs and the labels:
``alpha * T**2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)``.
The ``T**2`` factor keeps the soft term's gradients on the scale of the hard
term's as ``T`` changes. The teacher (any apply function and params: the dense
model, or a larger one) runs inside the jitted step on each batch; its params
travel in the loss's ``extra`` state, outside the trained tree, and its logits
are under ``stop_gradient``, so it is never trained. The student trains with
``constraints.fit_preserving``: its zeros and weight sharing survive.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ucpjax import batchnorm, checkpoints, constraints, models, train
from ucpjax.config import ConfigError, check
from ucpjax.model import Model
from ucpjax.rules import DEFAULT_RULES, Rules
from ucpjax.train import ApplyFn, TrainConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """Distillation of a (compressed) student from a teacher.

    Attributes:
      temperature: softmax temperature ``T`` of both models' logits in the soft term.
      alpha: weight of the soft (teacher) term; ``1 - alpha`` weights the labels.
      train: the training budget.
      teacher_from: a ``ucpjax train`` folder whose model (any registered
        architecture, trained on the same data) teaches; None: the dense model
        the run starts from, the teacher aligned with the student.
    """

    temperature: float = 4.0
    alpha: float = 0.9
    train: TrainConfig = dataclasses.field(
        default_factory=lambda: TrainConfig(epochs=3, learning_rate=1e-4))
    teacher_from: str | None = None

    def __post_init__(self):
        check(self.temperature > 0, "temperature", self.temperature, "must be > 0")
        check(0 <= self.alpha <= 1, "alpha", self.alpha, "must be in [0, 1]")
        check(self.teacher_from is None or isinstance(self.teacher_from, str),
              "teacher_from", self.teacher_from, "a `ucpjax train` folder, or None")


def teacher_model(config: DistillConfig, dataset) -> Model | None:
    """The model ``config.teacher_from`` holds, checked against ``dataset``; None
    when the run's own dense model teaches. Called before any training."""
    if config.teacher_from is None:
        return None
    folder, field = pathlib.Path(config.teacher_from), "distill.teacher_from"
    check((folder / "metrics.json").is_file(), field, config.teacher_from,
          "not a finished `ucpjax train` folder (no metrics.json); train the teacher "
          "with `ucpjax train --model ... --data ... --out ...`")
    trained = json.loads((folder / "metrics.json").read_text())
    check(trained.get("data") == dataset.name, field, config.teacher_from,
          f"was trained on {trained.get('data')!r}, this run's data is {dataset.name!r}; "
          "train the teacher on the same data")
    held_out = (trained.get("val_size"), trained.get("seed"))
    if dataset.split is not None and None not in held_out and held_out != dataset.split:
        raise ConfigError(
            f"{field}={config.teacher_from!r}: held out {held_out[0]} validation examples "
            f"with seed {held_out[1]}, this run {dataset.split[0]} with seed "
            f"{dataset.split[1]}, so the teacher trained on this run's validation "
            "examples; train it with `ucpjax train --seed "
            f"{dataset.split[1]} --val-size {dataset.split[0]}`")
    check(trained.get("model") in models.names(), field, config.teacher_from,
          f"its model {trained.get('model')!r} is not one of {models.names()}")
    module = models.create(trained["model"], dataset.num_classes)
    try:
        variables = checkpoints.restore(
            folder / "checkpoint", models.init(module, dataset.input_shape))
    except Exception as err:  # orbax raises many types for a damaged or foreign file
        raise ConfigError(f"{field}={config.teacher_from!r}: its checkpoint does not load "
                          f"as a {trained['model']} model ({type(err).__name__}); retrain "
                          "it with `ucpjax train`") from None
    return Model(module, variables)


def distillation_loss(student_logits, teacher_logits, labels, *, temperature: float,
                      alpha: float) -> jax.Array:
    """Mean over the batch of Hinton et al.'s distillation loss.

    Args:
      student_logits, teacher_logits: ``(batch, classes)``.
      labels: int ``(batch,)``.
      temperature: ``T`` > 0.
      alpha: weight of the soft term, in [0, 1].

    Returns:
      ``alpha * T**2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(student, labels)``.
    """
    log_p_student = jax.nn.log_softmax(student_logits / temperature)
    log_p_teacher = jax.nn.log_softmax(teacher_logits / temperature)
    kl = optax.losses.kl_divergence_with_log_targets(log_p_student, log_p_teacher)
    ce = optax.softmax_cross_entropy_with_integer_labels(student_logits, labels)
    return jnp.mean(alpha * temperature ** 2 * kl + (1 - alpha) * ce)


def make_distill_loss(apply_fn: ApplyFn, teacher_apply_fn: ApplyFn, *, temperature: float,
                      alpha: float):
    """``make_loss(materialize) -> loss_fn`` for ``constraints.fit_preserving``.

    The loss reads the teacher's params from ``extra["teacher"]`` and returns
    ``extra`` unchanged.
    """
    forward = batchnorm.training(apply_fn)  # a live BatchNorm student trains in training mode

    def make_loss(materialize):
        def loss_fn(trainable, extra, x, y, key):
            del key
            teacher_logits = jax.lax.stop_gradient(teacher_apply_fn(extra["teacher"], x))
            logits = forward(materialize(trainable), x)
            loss = distillation_loss(logits, teacher_logits, y, temperature=temperature,
                                     alpha=alpha)
            metrics = {"loss": loss, "accuracy": jnp.mean(logits.argmax(-1) == y),
                       "agreement": jnp.mean(logits.argmax(-1) == teacher_logits.argmax(-1))}
            return loss, (extra, metrics)
        return loss_fn
    return make_loss


def teacher_loss(apply_fn: ApplyFn, teacher, *, alpha: float | None,
                 temperature: float | None, stage: str):
    """``(make_loss, extra)`` for ``constraints.fit_preserving`` in another stage's
    training: the labels alone when ``alpha`` is None or 0, else Hinton's loss
    against ``teacher`` (``(apply_fn, params)``) with weight ``alpha`` on its
    softened logits at ``temperature`` (None: ``DistillConfig``'s)."""
    if not alpha:
        return constraints.cross_entropy(apply_fn), None
    if teacher is None:
        raise ValueError(f"{stage}.teacher_alpha > 0 needs a teacher: pass teacher=(apply_fn, "
                         "params)")
    teacher_apply_fn, teacher_params = teacher
    make_loss = make_distill_loss(apply_fn, teacher_apply_fn,
                                  temperature=temperature or DistillConfig.temperature,
                                  alpha=alpha)
    return make_loss, {"teacher": teacher_params}


def distill(params, config: DistillConfig, *, apply_fn: ApplyFn, data, seed: int,
            teacher_apply_fn: ApplyFn, teacher_params,
            rules: Rules = DEFAULT_RULES) -> tuple[Any, dict]:
    """Trains the student ``params`` towards the teacher, keeping every constraint.

    Args:
      params: the student's Flax params (zeros and weight sharing are kept).
      config: a ``DistillConfig``.
      apply_fn: the student's ``apply_fn(params, x) -> logits``.
      data: a ``ucpjax.data.Dataset``.
      seed: training seed.
      teacher_apply_fn: the teacher's ``apply_fn(params, x) -> logits``.
      teacher_params: the teacher's params; never changed.
      rules: the constrained leaves, whose zeros and sharing are kept.

    Returns:
      ``(params, report)`` with ``distill/val_accuracy``,
      ``distill/teacher_val_accuracy``, ``distill/loss`` (last epoch's mean) and
      ``distill/agreement`` (last epoch's top-1 agreement with the teacher).
    """
    make_loss = make_distill_loss(apply_fn, teacher_apply_fn, temperature=config.temperature,
                                  alpha=config.alpha)
    student, _, history = constraints.fit_preserving(
        params, make_loss, x=data.x_train, y=data.y_train, config=config.train,
        seed=seed, rules=rules, extra={"teacher": teacher_params}, desc="distill")
    return student, {
        "distill/val_accuracy": train.accuracy(
            batchnorm.settled(apply_fn, student, data.x_train), student,
            data.x_val, data.y_val),
        "distill/teacher_val_accuracy": train.accuracy(
            teacher_apply_fn, teacher_params, data.x_val, data.y_val),
        "distill/loss": history[-1]["loss"],
        "distill/agreement": history[-1]["agreement"],
    }
