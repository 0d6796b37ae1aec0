import os
import time

import numpy as np
import pytest

import hybrit


@pytest.fixture
def rng():
    # Fresh inputs every run; the seed is in the test id's output on failure.
    seed = time.time_ns() % (2**32)
    print(f"seed {seed}")
    return np.random.default_rng(seed)


def cpu_backends():
    return ["c", "tbb"]


@pytest.fixture(params=["c", "tbb", "cuda"])
def dispatcher(request):
    backends = hybrit.Dispatcher(use_environment=False).backends
    if backends[request.param] is None:
        pytest.skip(f"the {request.param} backend is not available here")
    return hybrit.Dispatcher(backend=request.param, use_environment=False)


@pytest.fixture(scope="session")
def cli():
    path = os.environ.get("HYBRIT_CLI")
    if not path:
        pytest.skip("HYBRIT_CLI is not set (ctest sets it to the built hybrit binary)")
    return path
