import jax
import jax.numpy as jnp
import pytest

from ucpjax import models


@pytest.mark.parametrize("name, shape, count", [
    ("lenet300", (28, 28, 1), 266_610),
    ("lenet5", (28, 28, 1), 431_080),
    ("pcqat_mnist", (28, 28, 1), 20_410),
])
def test_parameter_counts(name, shape, count):
    variables = models.init(models.create(name), shape)
    assert models.param_count(variables["params"]) == count


def test_cifar_cnn_has_batchnorm():
    variables = models.init(models.create("cifar_cnn"), (32, 32, 3))
    assert "batch_stats" in variables


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'lenet'.*lenet300"):
        models.create("lenet")


def test_resnet8_is_mlperf_tiny_sized():
    # MLPerf Tiny's ResNet-8 has about 78K parameters (ours: no conv biases, two
    # more BatchNorms on the shortcuts).
    variables = models.init(models.create("resnet8"), (32, 32, 3))
    assert abs(models.param_count(variables["params"]) - 78_000) <= 7_800


@pytest.mark.parametrize("name", ["resnet8", "mobilenet_cifar"])
def test_cifar_models_train_mode_updates_batch_stats(name):
    model = models.create(name)
    variables = models.init(model, (32, 32, 3))
    x = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
    logits, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.shape == (3, 10)
    assert bool(jnp.all(jnp.isfinite(logits)))
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), updated["batch_stats"],
                           variables["batch_stats"])
    assert all(jax.tree.leaves(changed))
    assert model.apply(variables, x, train=False).shape == (3, 10)


def test_every_batchnorm_follows_a_conv():
    # Foldability: fold.find_batchnorm_pairs must pair every BatchNorm with its conv.
    from ucpjax.fold import find_batchnorm_pairs

    for name, convs in (("resnet8", 9), ("mobilenet_cifar", 13)):
        model = models.create(name)
        variables = models.init(model, (32, 32, 3))
        pairs = find_batchnorm_pairs(model, variables, (32, 32, 3))
        assert len(pairs) == convs == len(variables["batch_stats"])


def test_mobilenet_cifar_uses_depthwise_convs():
    kernels = {path: leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(
        models.init(models.create("mobilenet_cifar"), (32, 32, 3))["params"])}
    depthwise = [s for s in kernels.values() if len(s) == 4 and s[:3] == (3, 3, 1)]
    assert len(depthwise) == 6
