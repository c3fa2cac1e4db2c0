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
