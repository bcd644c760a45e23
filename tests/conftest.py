"""Shared test configuration.

Hypothesis profiles (select with ``HYPOTHESIS_PROFILE=<name>``):

* ``default``: 30 examples per property, no deadline (SVD timings vary on a shared
  2-core machine). The whole suite stays within a few minutes on two CPU cores.
* ``thorough``: 300 examples per property, for an occasional deeper run.

Every test starts from the same torch RNG state (``torch.manual_seed(0)``) so that
tests that draw random tensors without an explicit generator are reproducible and
independent of the order in which they run.

``single_thread`` (module scope, opt-in with
``pytestmark = pytest.mark.usefixtures("single_thread")``) runs a module's tests with one
intra-op thread and restores the previous count afterwards. The projection tests do
thousands of tiny SVDs/QRs; on a 2-core machine under any other load, MKL's 2-thread
LAPACK calls on 64x256 matrices were measured at 0.3-1.3 s each against ~1 ms with one
thread.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow],
               print_blob=True)
settings.register_profile("default", max_examples=30, **_COMMON)
settings.register_profile("thorough", max_examples=300, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
