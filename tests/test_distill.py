"""Distillation: the loss against hand computations, the stage's invariants."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ucpjax import constraints, data, distill, models, train
from ucpjax.config import ConfigError
from ucpjax.train import TrainConfig


def _logits(seed, shape=(6, 10), scale=3.0):
    return scale * jax.random.normal(jax.random.key(seed), shape)


def _np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_kl(teacher, student, t):
    log_p, log_q = _np_log_softmax(teacher / t), _np_log_softmax(student / t)
    return np.mean(np.sum(np.exp(log_p) * (log_p - log_q), -1))


def _loss(alpha, t):
    return jax.jit(lambda s, te, y: distill.distillation_loss(s, te, y, temperature=t,
                                                             alpha=alpha))


@pytest.mark.parametrize("t", [1.0, 4.0, 20.0])
def test_loss_zero_for_equal_logits_with_alpha_one(t):
    z = _logits(0)
    labels = jnp.arange(6) % 10
    assert abs(float(_loss(1.0, t)(z, z, labels))) < 1e-5


def test_alpha_zero_is_cross_entropy():
    s, te = _logits(0), _logits(1)
    labels = jnp.array([0, 3, 9, 2, 2, 7])
    ce = -np.mean(_np_log_softmax(s)[np.arange(6), np.asarray(labels)])
    for t in (1.0, 4.0):
        assert float(_loss(0.0, t)(s, te, labels)) == pytest.approx(ce, rel=1e-5)


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0, 8.0])
def test_soft_term_is_t_squared_times_kl(t):
    s, te = _logits(0), _logits(1)
    labels = jnp.zeros(6, jnp.int32)
    expected = t ** 2 * _np_kl(te, s, t)
    assert float(_loss(1.0, t)(s, te, labels)) == pytest.approx(expected, rel=1e-4)
    # Mixed: exactly the weighted sum of both hand-computed terms.
    ce = -np.mean(_np_log_softmax(s)[:, 0])
    mixed = 0.7 * expected + 0.3 * ce
    assert float(_loss(0.7, t)(s, te, labels)) == pytest.approx(mixed, rel=1e-4)


def test_soft_gradient_is_scaled_by_t():
    # d/ds of T**2 KL(p_t || p_s) is T (p_s - p_t) per example: the T**2 keeps it O(1/T).
    s, te = _logits(0), _logits(1)
    labels = jnp.zeros(6, jnp.int32)
    t = 4.0
    grad = jax.jit(jax.grad(lambda z: distill.distillation_loss(z, te, labels, temperature=t,
                                                                alpha=1.0)))(s)
    expected = t * (jax.nn.softmax(s / t) - jax.nn.softmax(te / t)) / 6
    np.testing.assert_allclose(grad, expected, atol=1e-6)


# --- the stage ---------------------------------------------------------------------------

class WideMlp(nn.Module):
    """A teacher twice LeNet-300-100's size (784-600-200-10), another architecture."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(600)(x))
        x = nn.relu(nn.Dense(200)(x))
        return nn.Dense(10)(x)


@pytest.fixture(scope="module")
def mnist():
    return data.load("mnist").take(1024, 256)


def _student(k=8):
    """A lenet300 with Dense_0 80% pruned and Dense_1 weight-shared with k values."""
    model = models.create("lenet300")
    params = models.init(model, (28, 28, 1), seed=1)["params"]
    w0 = np.asarray(params["Dense_0"]["kernel"])
    w0 = np.where(np.abs(w0) > np.quantile(np.abs(w0), 0.8), w0, 0.0)
    w1 = np.asarray(params["Dense_1"]["kernel"])
    centroids = np.linspace(w1.min(), w1.max(), k).astype(np.float32)
    w1 = centroids[np.abs(w1[..., None] - centroids).argmin(-1)]
    params = {**params, "Dense_0": {**params["Dense_0"], "kernel": jnp.asarray(w0)},
              "Dense_1": {**params["Dense_1"], "kernel": jnp.asarray(w1)}}
    return params, train.inference_fn(model, {})


def test_distill_keeps_constraints_and_teacher_and_lowers_loss(mnist):
    student, apply_fn = _student(k=8)
    # The teacher is a different, larger model with its own params.
    teacher_model = WideMlp()
    teacher_params = models.init(teacher_model, (28, 28, 1), seed=2)["params"]
    teacher_apply = train.inference_fn(teacher_model, {})
    teacher_copy = jax.tree.map(np.array, teacher_params)
    config = distill.DistillConfig(
        temperature=4.0, alpha=0.5,
        train=TrainConfig(epochs=2, batch_size=128, learning_rate=2e-3))
    x, y = mnist.x_train[:256], mnist.y_train[:256]

    def loss_on_batch(params):
        return float(distill.distillation_loss(
            apply_fn(params, x), teacher_apply(teacher_params, x), y,
            temperature=config.temperature, alpha=config.alpha))

    before = loss_on_batch(student)
    out, report = distill.distill(student, config, apply_fn=apply_fn, data=mnist, seed=0,
                                  teacher_apply_fn=teacher_apply, teacher_params=teacher_params)
    assert loss_on_batch(out) < 0.9 * before

    # Teacher untouched.
    jax.tree.map(np.testing.assert_array_equal, teacher_params, teacher_copy)
    assert report["distill/teacher_val_accuracy"] == train.accuracy(
        teacher_apply, teacher_params, mnist.x_val, mnist.y_val)
    assert report["distill/val_accuracy"] == train.accuracy(apply_fn, out, mnist.x_val,
                                                            mnist.y_val)
    assert np.isfinite(report["distill/loss"])

    # Every zero stays in place; the shared leaf keeps at most k distinct values.
    w0_before, w0 = np.asarray(student["Dense_0"]["kernel"]), np.asarray(out["Dense_0"]["kernel"])
    assert np.array_equal(w0 == 0, w0_before == 0)
    assert not np.array_equal(w0, w0_before)
    w1 = np.asarray(out["Dense_1"]["kernel"])
    assert len(np.unique(w1[w1 != 0])) <= 8
    assert constraints.codebook(w1) is not None


def test_distill_from_same_architecture_teacher(mnist):
    # The pipeline's default: the dense model teaches its own compressed copy;
    # the student may even start from the teacher's very arrays.
    student, apply_fn = _student()
    dense = models.init(models.create("lenet300"), (28, 28, 1), seed=1)["params"]
    config = distill.DistillConfig(train=TrainConfig(epochs=0.25, batch_size=128))
    out, report = distill.distill(
        {**dense, "Dense_0": student["Dense_0"]}, config, apply_fn=apply_fn, data=mnist,
        seed=0, teacher_apply_fn=apply_fn, teacher_params=dense)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(dense))
    assert np.array_equal(np.asarray(out["Dense_0"]["kernel"]) == 0,
                          np.asarray(student["Dense_0"]["kernel"]) == 0)
    assert 0.0 <= report["distill/val_accuracy"] <= 1.0


@pytest.mark.parametrize("field, kwargs", [
    ("temperature", {"temperature": 0.0}),
    ("temperature", {"temperature": -1.0}),
    ("alpha", {"alpha": 1.5}),
    ("alpha", {"alpha": -0.1}),
])
def test_invalid_config_names_field(field, kwargs):
    with pytest.raises(ConfigError, match=rf"^{field}="):
        distill.DistillConfig(**kwargs)


def test_config_replace_validates():
    config = distill.DistillConfig()
    with pytest.raises(ConfigError, match="^alpha="):
        dataclasses.replace(config, alpha=2.0)


def test_teacher_from_must_be_a_train_folder(mnist, tmp_path):
    config = distill.DistillConfig(teacher_from=str(tmp_path))  # experiment files load ...
    with pytest.raises(ConfigError, match=r"^distill.teacher_from=.*no metrics.json"):
        distill.teacher_model(config, mnist)  # ... and the run refuses it before any work


def test_a_teacher_that_trained_on_the_validation_split_is_refused(mnist, tmp_path):
    from ucpjax.run_folder import RunFolder

    RunFolder(tmp_path).write_json("metrics.json", {"model": "lenet300", "data": "mnist",
                                                    "val_size": 5000, "seed": 1})
    with pytest.raises(ConfigError, match=r"^distill.teacher_from=.*with seed 1.*--seed"):
        distill.teacher_model(_teacher_recipe(tmp_path).distill, mnist)


def _student_model(dataset):
    from ucpjax.model import Model

    module = models.create("lenet300")
    return Model(module, models.init(module, dataset.input_shape, seed=1))


def _teacher_recipe(folder):
    from ucpjax.recipe import Recipe

    recipe = Recipe(stages=("distill",), distill=distill.DistillConfig(
        teacher_from=str(folder), train=TrainConfig(epochs=0.25, batch_size=128)))
    return dataclasses.replace(recipe, export=dataclasses.replace(recipe.export, enabled=False))


def test_a_teacher_of_another_architecture_teaches(mnist, tmp_path):
    from ucpjax import experiment, pipeline

    setup = experiment.Experiment(model="pcqat_mnist", data="mnist",
                                  dense=TrainConfig(epochs=0.05, batch_size=128))
    experiment.train_to_folder(setup, tmp_path / "teacher")
    teacher = distill.teacher_model(_teacher_recipe(tmp_path / "teacher").distill, mnist)
    assert type(teacher.module).__name__ != type(_student_model(mnist).module).__name__
    result = pipeline.run(_student_model(mnist), mnist, _teacher_recipe(tmp_path / "teacher"),
                          log=lambda _: None, check_export=False)  # an untrained student
    assert result.report["stages"]["distill/teacher_val_accuracy"] == train.accuracy(
        teacher.apply_fn(), teacher.params, mnist.x_val, mnist.y_val)


def test_a_teacher_trained_on_other_data_is_refused_before_any_work(mnist, tmp_path):
    from ucpjax import pipeline
    from ucpjax.run_folder import RunFolder

    RunFolder(tmp_path).write_json("metrics.json", {"model": "lenet300", "data": "fashion_mnist"})

    def never(model):
        raise AssertionError("a stage ran before the teacher was checked")
    with pytest.raises(ConfigError, match=r"^distill.teacher_from=.*'fashion_mnist'"):
        pipeline.run(_student_model(mnist), mnist, _teacher_recipe(tmp_path),
                     start=("given", never), log=lambda _: None)
