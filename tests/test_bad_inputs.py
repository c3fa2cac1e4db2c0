"""Every bad input is refused up front in one line that names its culprit."""

import math

import flax.linen as nn
import jax
import numpy as np
import pytest

import ucpjax
from ucpjax import data, inputs, pipeline, train
from ucpjax.config import ConfigError
from ucpjax.experiment import Experiment
from ucpjax.prune import PruneConfig

RNG = np.random.default_rng(0)
X = RNG.random((12, 4, 4, 1), np.float32)
Y = np.arange(12) % 3
X_TEST = RNG.random((6, 4, 4, 1), np.float32)
Y_TEST = np.arange(6) % 3


def _one_line_error(exc_type, fn, *culprits):
    """Runs ``fn``, expecting ``exc_type`` with a one-line message naming ``culprits``."""
    with pytest.raises(exc_type) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message, message
    for culprit in culprits:
        assert culprit in message, message
    return message


def _with(x=X, y=Y, x_test=X_TEST, y_test=Y_TEST, **kwargs):
    return lambda: inputs.dataset_from_arrays((x, y), (x_test, y_test), **kwargs)


BAD_ARRAYS = {
    "train not a pair": (lambda: inputs.dataset_from_arrays(X, (X_TEST, Y_TEST)),
                         ["train:", "pair (x, y)"]),
    "train a triple": (lambda: inputs.dataset_from_arrays((X, Y, Y), (X_TEST, Y_TEST)),
                       ["train:", "pair (x, y)"]),
    "test not a pair": (lambda: inputs.dataset_from_arrays((X, Y), None), ["test:", "pair"]),
    "one value per example": (_with(x=X[:, 0, 0, 0]), ["train x", "(N, D) features"]),
    "zero-width images": (_with(x=X[:, :, :0]), ["train x", "(N, H, W, C) images"]),
    "channels-first images": (_with(x=np.zeros((12, 3, 8, 8)), x_test=np.zeros((4, 3, 8, 8))),
                              ["train x", "channels-first", "x.transpose(0, 2, 3, 1)"]),
    "labels from 1": (_with(y=Y + 1, y_test=Y_TEST + 1), ["train y", "not 0", "y - 1"]),
    "one-hot labels": (_with(y=np.eye(3)[Y]), ["train y", "use y.argmax(-1)"]),
    "column labels": (_with(y=Y[:, None]), ["train y", "y.reshape(-1)"]),
    "scalar labels": (_with(y=3), ["train y", "scalar"]),
    "lengths differ": (_with(y=Y[:-1]), ["train:", "12 examples", "11"]),
    "empty train": (_with(x=X[:0], y=Y[:0]), ["train:", "no examples"]),
    "empty test": (_with(x_test=X_TEST[:0], y_test=Y_TEST[:0]), ["test:", "no examples"]),
    "string images": (_with(x=np.full((12, 4, 4, 1), "a")), ["train x", "not numeric"]),
    "complex images": (_with(x=X.astype(np.complex64)), ["train x", "not numeric"]),
    "ragged images": (_with(x=[[1.0], [1.0, 2.0]] * 6), ["train x", "not an array"]),
    "string labels": (_with(y=Y.astype(str)), ["train y", "not numeric"]),
    "NaN pixel": (_with(x=np.where(np.arange(12)[:, None, None, None] == 7, np.nan, X)),
                  ["train x", "image 7"]),
    "Inf pixel in test": (_with(x_test=np.where(X_TEST > 0.5, np.inf, X_TEST)),
                          ["test x", "infinite"]),
    "fractional labels": (_with(y=Y + 0.5), ["train y", "0.5", "whole number"]),
    "NaN label": (_with(y=np.where(Y == 2, np.nan, Y)), ["train y", "whole number"]),
    "negative label": (_with(y=Y - 1), ["train y", "label -1", "0..K-1"]),
    "huge label": (_with(y=Y * 2.0**40), ["train y", "0..K-1"]),
    "test label not in train": (_with(y_test=Y_TEST + 1), ["test y", "label 3", "0..2"]),
    "val label not in train": (_with(val=(X_TEST, Y_TEST + 5)), ["val y", "label 7"]),
    "val not a pair": (_with(val=[X_TEST]), ["val:", "pair"]),
    "test images of another shape": (_with(x_test=X_TEST[:, :3]), ["test x", "(3, 4, 1)"]),
    "val images of another shape": (_with(val=(X_TEST[..., [0, 0]], Y_TEST)), ["val x"]),
    "test not scaled like train": (_with(x_test=X_TEST * 255), ["test x", "but train's span",
                                                                  "exactly like train"]),
    "uint8 images": (_with(x=(X * 255).astype(np.uint8)),
                     ["train x", "uint8 images: scale them as in training, "
                      "e.g. x.astype(np.float32) / 255"]),
    "int64 test images": (_with(x_test=(X_TEST * 255).astype(np.int64)),
                          ["test x", "int64 images"]),
}


@pytest.mark.parametrize("case", BAD_ARRAYS, ids=str)
def test_bad_arrays_are_refused(case):
    fn, culprits = BAD_ARRAYS[case]
    _one_line_error(ConfigError, fn, *culprits)


def test_good_arrays_are_cast_and_val_defaults_to_test():
    ds = inputs.dataset_from_arrays((X.astype(np.float64), Y.astype(np.float32)),
                                    (X_TEST, Y_TEST))
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    np.testing.assert_array_equal(ds.y_train, Y)
    assert ds.num_classes == 3 and ds.input_shape == (4, 4, 1)
    assert ds.x_val is ds.x_test and ds.y_val is ds.y_test


def test_sensitivity_scope_without_a_validation_split_is_refused():
    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            return nn.Dense(3)(x.reshape((x.shape[0], -1)))

    module = Tiny()
    variables = module.init(jax.random.key(0), X[:1])
    recipe = ucpjax.Recipe(prune=PruneConfig(scope="sensitivity"))
    _one_line_error(ConfigError, lambda: ucpjax.compress(
        module, variables, train=(X, Y), test=(X_TEST, Y_TEST), recipe=recipe),
        "val:", "test set", "val=(x, y)")


def test_sensitivity_scope_with_no_validation_split_is_refused():
    recipe = ucpjax.Recipe(prune=PruneConfig(scope="sensitivity"))
    _one_line_error(ConfigError, lambda: Experiment(val_size=0, recipe=recipe),
                    "val_size=0", "val_size=5000")


def test_batch_size_larger_than_the_training_set():
    message = _one_line_error(ConfigError, lambda: inputs.check_batch_size(600, 500,
                                                                          "prune.train.batch_size"))
    assert message == ("prune.train.batch_size=600: larger than the 500 training examples; "
                       "use a batch size <= 500")
    inputs.check_batch_size(500, 500, "prune.train.batch_size")  # equal is fine


BAD_TRAIN_CONFIGS = {
    "epochs inf": ({"epochs": 1e999}, "epochs=inf"),
    "epochs nan": ({"epochs": math.nan}, "epochs=nan"),
    "learning_rate inf": ({"learning_rate": math.inf}, "learning_rate=inf"),
    "learning_rate nan": ({"learning_rate": math.nan}, "learning_rate=nan"),
    "weight_decay nan": ({"weight_decay": math.nan}, "weight_decay=nan"),
    "epochs a string": ({"epochs": "10"}, "epochs='10'"),
    "batch_size a float": ({"batch_size": 64.0}, "batch_size=64.0"),
}


@pytest.mark.parametrize("case", BAD_TRAIN_CONFIGS, ids=str)
def test_bad_train_configs_are_refused(case):
    kwargs, culprit = BAD_TRAIN_CONFIGS[case]
    _one_line_error(ConfigError, lambda: train.TrainConfig(**kwargs), culprit)


def test_a_large_learning_rate_is_left_to_divergence_detection():
    assert train.TrainConfig(learning_rate=1e3).learning_rate == 1e3


# --- image folders ---------------------------------------------------------

def _write_folder(root, sizes=None, labels=("cat", "dog"), n=2):
    from PIL import Image

    for split in ("train", "test"):
        for label in labels:
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                size = (sizes or {}).get((split, label, i), 8)
                pixels = RNG.integers(0, 255, (size, size, 3), np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")
    return _write_folder(tmp_path / "imgs")


def test_folder_cache_sees_an_image_added_after_the_first_load(folder):
    assert len(data.load(str(folder), val_size=0).x_train) == 4
    _write_folder(folder, n=3)  # one more image per label, same names for the rest
    assert len(data.load(str(folder), val_size=0).x_train) == 6
    assert len(list(data.CACHE_DIR.glob("folder-*.npz"))) == 1  # the stale cache is gone


def test_empty_label_folder_is_named(folder):
    (folder / "train" / "bird").mkdir()
    (folder / "train" / "bird" / "notes.txt").write_text("not an image")
    _one_line_error(data.DatasetError, lambda: data.load(str(folder)),
                    str(folder / "train" / "bird"), "empty label folder")


def test_split_without_label_folders_is_named(folder):
    for path in (folder / "test").rglob("*.png"):
        path.unlink()
    for label in ("cat", "dog"):
        (folder / "test" / label).rmdir()
    _one_line_error(data.DatasetError, lambda: data.load(str(folder)),
                    str(folder / "test"), "no label folders")


def test_corrupt_image_is_named(folder):
    (folder / "train" / "dog" / "1.png").write_bytes(b"not a png at all")
    _one_line_error(data.DatasetError, lambda: data.load(str(folder)),
                    str(folder / "train" / "dog" / "1.png"), "not a readable image")


def test_image_of_another_size_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")
    root = _write_folder(tmp_path / "imgs", sizes={("test", "cat", 1): 6})
    _one_line_error(data.DatasetError, lambda: data.load(str(root)),
                    str(root / "test" / "cat" / "1.png"), "(6, 6, 3)", "resize")


# --- training ----------------------------------------------------------------

class _TinyMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        x = nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


def _learnable_data(n=500):
    """MNIST-shaped images: a fixed random template per class, plus noise."""
    rng = np.random.default_rng(1)
    y = np.arange(n, dtype=np.int32) % 10
    templates = rng.random((10, 28, 28, 1), np.float32)
    return 0.5 * templates[y] + 0.5 * rng.random((n, 28, 28, 1), np.float32), y


def _fit(learning_rate, epochs=2, batch_size=50, loss_fn=None, optimizer="adam"):
    """Trains ``_TinyMLP`` on 500 examples as the stage "prune"."""
    model = _TinyMLP()
    x, y = _learnable_data()
    params = model.init(jax.random.key(0), x[:1])["params"]
    cfg = train.TrainConfig(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                            optimizer=optimizer, schedule="constant")
    opt = train.make_optimizer(cfg, train.total_steps(cfg, len(x)))
    return train.fit(params, loss_fn or train.classification_loss(model), opt, x, y,
                     config=cfg, seed=0, desc="prune")


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_huge_learning_rate_stops_with_the_stage_named(optimizer):
    message = _one_line_error(train.DivergenceError, lambda: _fit(1e6, optimizer=optimizer),
                              "prune:", "lower the learning rate of this stage")
    assert "diverged" in message or "non-finite" in message


def test_accuracy_at_chance_past_half_the_steps_stops_the_run():
    model = _TinyMLP()

    def chance_loss(params, extra, x, y, key):
        loss, (extra, metrics) = train.classification_loss(model)(params, extra, x, y, key)
        return loss, (extra, {**metrics, "accuracy": 0.1 * (loss > -1)})

    _one_line_error(train.DivergenceError,
                    lambda: _fit(1e-3, epochs=2, batch_size=10, loss_fn=chance_loss),
                    "prune: training stuck at chance", "steps 51-100 of 100")


def test_a_normal_learning_rate_trains_without_complaint():
    # 100 steps in windows of 50: both windows pass through every check.
    _, history = _fit(1e-3, epochs=2, batch_size=10)
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["accuracy"] > 0.3


def test_a_batch_that_does_not_split_over_the_devices_is_refused_before_any_work(monkeypatch):
    """On accelerators or across hosts every device takes a share (on one CPU host
    any batch trains: ``devices.training_mesh`` takes the devices that divide it)."""
    from ucpjax import devices
    from ucpjax.recipe import Recipe

    monkeypatch.setattr(jax, "device_count", lambda: 3)
    monkeypatch.setattr(devices, "splits_freely", lambda: False)
    _one_line_error(ConfigError, lambda: Recipe().check_budgets(60_000),
                    "prune.train.batch_size=128", "3 JAX devices", "use 126 or 129")


def test_every_stage_batch_too_large_is_named_in_the_one_line():
    from ucpjax.recipe import Recipe

    fields = [f"{name}.batch_size=128" for name in ("prune.train", "prune.fine_tune",
                                                     "distill.train", "cluster.fine_tune",
                                                     "quantize.train")]
    _one_line_error(ConfigError, lambda: Recipe().check_budgets(50), *fields,
                    "use a batch size <= 50")


def test_fit_refuses_a_batch_larger_than_the_training_set():
    _one_line_error(ConfigError, lambda: _fit(1e-3, batch_size=600),
                    "batch_size=600", "500 training examples")


class _Softmaxed(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.softmax(_TinyMLP()(x))


class _NeedsMask(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
        return _TinyMLP()(x * mask)


class _Pooled(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(10)(x)  # per pixel: (N, 28, 28, 10), not logits


class _ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(4, (3, 3), strides=2)(x))
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


def _compress_module(module, variables=None, shape=None):
    x, y = _learnable_data(64)
    x = x if shape is None else x.reshape(len(x), *shape)
    variables = variables or dict(module.init(jax.random.key(0), x[:1]))
    return lambda: ucpjax.compress(module, variables, train=(x, y), test=(x, y))


BAD_MODULES = {
    "softmax output": (lambda: _compress_module(_Softmaxed()),
                       ["probabilities", "return the logits"]),
    "a required argument besides x": (lambda: _compress_module(_NeedsMask(), {"params": {}}),
                                      ["__call__(x, mask) needs mask", "train=..."]),
    "variables of another model": (
        lambda: _compress_module(_TinyMLP(), {"params": {"Dense_9": {}}}),
        ["module.apply(variables, x, train=False) fails"]),
    "not logits": (lambda: _compress_module(_Pooled()), ["(1, 28, 28, 10)", "expected logits"]),
    "flat images to a conv net": (
        lambda: _compress_module(_ConvNet(), _ConvNet().init(jax.random.key(0), X), (784,)),
        ["inputs of shape (1, 784)", "pass them as (N, H, W, C)"]),
    "images without a channel axis": (
        lambda: _compress_module(_ConvNet(), _ConvNet().init(jax.random.key(0), X), (28, 28)),
        ["(1, 28, 28)", "pass x[..., None]"]),
}


@pytest.mark.parametrize("case", BAD_MODULES, ids=str)
def test_a_module_that_cannot_classify_is_refused_before_any_work(case):
    make, culprits = BAD_MODULES[case]
    _one_line_error(ConfigError, make(), *culprits)


@pytest.mark.parametrize("shape", [(20,), (16, 2), (1, 1, 20), (1, 16, 8)])
def test_features_sequences_and_strips_are_taken_as_given(shape):
    x = RNG.random((12, *shape), np.float32)
    dataset = inputs.dataset_from_arrays((x, Y), (x[:6], Y_TEST))
    assert dataset.input_shape == shape


def test_a_given_model_at_chance_is_stopped_before_any_stage():
    # All-zero weights: equal logits, so always class 0 (10% of these labels).
    x, y = _learnable_data(500)
    variables = jax.tree.map(np.zeros_like, dict(_TinyMLP().init(jax.random.key(0), x[:1])))
    message = _one_line_error(
        ucpjax.AccuracyError,
        lambda: ucpjax.compress(_TinyMLP(), variables, train=(x, y), test=(x, y),
                                log=lambda line: None),
        "the given model scores test accuracy 0.100", "preprocessed as in its training",
        "check=False")
    assert "stage left" not in message


@pytest.mark.parametrize(("accuracy", "given", "stopped"), [
    (0.11, 0.95, "the prune stage left the model at test accuracy 0.110"),
    (0.16, 0.95, None),   # above 0.1 + 3 standard errors (0.1 + 0.040) on 500 labels
    (0.11, 0.12, None),   # the given model was no better: nothing was lost here
])
def test_a_stage_that_leaves_the_model_at_chance_stops_the_run(accuracy, given, stopped):
    y = np.arange(500) % 10
    check = lambda: pipeline._check_above_chance(  # noqa: E731
        {"stage": "prune", "accuracy": accuracy}, {"stage": "given", "accuracy": given}, y)
    if stopped is None:
        check()
    else:
        _one_line_error(ucpjax.AccuracyError, check, stopped, "at most 0.140", "it had 0.950",
                        "prune.target_sparsity")


def test_chance_is_the_commonest_class_share_plus_three_standard_errors():
    share, bound = pipeline.chance_bound(np.array([0] * 75 + [1] * 25))
    assert share == 0.75
    assert bound == pytest.approx(0.75 + 3 * math.sqrt(0.75 * 0.25 / 100))


def test_a_tf_data_dataset_is_refused_with_the_line_that_makes_arrays_of_it():
    from ucpjax.export import import_tensorflow

    tf = import_tensorflow()
    pairs = tf.data.Dataset.from_tensor_slices((X, Y))
    message = _one_line_error(ConfigError, lambda: inputs.dataset_from_arrays(
        pairs, (X_TEST, Y_TEST)), "train:", "tf.data", "as_numpy_iterator")
    fix = message.split("pass train=")[1].split(", images")[0]
    x, y = eval(fix, {"np": np, "ds": pairs})  # the advice, run as written
    np.testing.assert_array_equal(x, X)
    np.testing.assert_array_equal(y, Y)
