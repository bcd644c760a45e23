"""Shared test configuration.

Device (select with ``LOWRANK_TEST_DEVICE=<torch device>``, default ``cpu``): e.g.
``LOWRANK_TEST_DEVICE=cuda python3 -m pytest -q`` runs the suite on the GPU. Tensors and
modules that the tests' own code (files in ``tests/``) creates without ``device=`` go to
that device; factory calls made by the package keep torch's default (the CPU), as in a
user's program, so a package function that forgets ``device=`` fails there instead of
being rescued by a global default (see :class:`_TestDevice`). Tests take their seeded
generators from ``registry.generator``, which follows the device; the ``device`` fixture
gives the ``torch.device``. Tests marked ``cpu_only`` (gloo process groups, CPU
subprocesses, the benchmark harness, the examples) are skipped on any other device. A
device that this machine does not have is a usage error (exit status 4), not a silent
CPU run; ``--collect-only`` alone is allowed, e.g. ``-m cpu_only --collect-only -q``
lists the tests that would be skipped.

Hypothesis profiles (select with ``HYPOTHESIS_PROFILE=<name>``):

* ``default``: 30 examples per property, no deadline (SVD timings vary on a shared
  2-core machine). The whole suite stays within a few minutes on two CPU cores.
* ``thorough``: 300 examples per property, for an occasional deeper run.

Nothing is downloaded: ``HF_HUB_OFFLINE=1`` is set (unless already set) before any test
imports ``huggingface_hub``, for the tests and the processes they start (the Hugging Face
``Trainer`` example; bitsandbytes, which with ``kernels`` installed otherwise asks the Hub
for a CPU kernel at import).

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
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # see the module docstring

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

import lowrank_optim

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow],
               print_blob=True)
settings.register_profile("default", max_examples=30, **_COMMON)
settings.register_profile("thorough", max_examples=300, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

DEVICE_VAR = "LOWRANK_TEST_DEVICE"
DEVICE = torch.device("cpu")  # set from the environment in pytest_configure


def _device_from_env(collect_only: bool) -> torch.device:
    name = os.environ.get(DEVICE_VAR, "").strip() or "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise pytest.UsageError(f"{DEVICE_VAR}={name!r} is not a torch device: {exc}")
    if device.type == "cpu" or collect_only:
        return device
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "is_available"):
        raise pytest.UsageError(f"{DEVICE_VAR}={name!r}: the tests do not run on "
                                f"{device.type!r} devices")
    if not backend.is_available():
        raise pytest.UsageError(
            f"{DEVICE_VAR}={name!r} but torch.{device.type}.is_available() is False "
            f"(torch {torch.__version__}); refusing to run the suite on the CPU instead")
    if device.index is not None and device.index >= backend.device_count():
        raise pytest.UsageError(f"{DEVICE_VAR}={name!r} but this machine has "
                                f"{backend.device_count()} {device.type} device(s)")
    return device


def pytest_configure(config):
    global DEVICE
    DEVICE = _device_from_env(config.getoption("collectonly"))


def pytest_report_header(config):
    return f"lowrank_optim test device: {DEVICE} ({DEVICE_VAR})"


def pytest_collection_modifyitems(config, items):
    if DEVICE.type == "cpu":
        return
    for item in items:
        mark = item.get_closest_marker("cpu_only")
        if mark is not None:
            why = mark.kwargs.get("reason") or (mark.args[0] if mark.args else "")
            item.add_marker(pytest.mark.skip(
                reason=f"CPU-only ({why}); {DEVICE_VAR}={DEVICE}" if why else
                f"CPU-only; {DEVICE_VAR}={DEVICE}"))


# ---------------------------------------------------------------------------------------
# the tests' default device


_HERE = os.path.abspath(__file__)
_TESTS = {os.path.dirname(p) + os.sep for p in (_HERE, os.path.realpath(_HERE))}
_PACKAGE = {os.path.dirname(p) + os.sep for p in (os.path.abspath(lowrank_optim.__file__),
                                                   os.path.realpath(lowrank_optim.__file__))}
_TESTS, _PACKAGE = tuple(_TESTS), tuple(_PACKAGE)
_CONFTEST = {_HERE, os.path.realpath(_HERE)}


def _called_from_tests() -> bool:
    """Whether the nearest caller that is in ``tests/`` or in the package is in ``tests/``
    (this file itself counts as neither)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(_PACKAGE):
            return False
        if name.startswith(_TESTS) and name not in _CONFTEST:
            return True
        frame = frame.f_back
    return False


class _TestDevice(TorchFunctionMode):
    """``torch.set_default_device(device)`` for the tests' own factory calls only.

    As torch's ``DeviceContext``, it gives ``device`` to factory functions called without
    one (``torch.zeros``, ``torch.randn``, the ``torch.empty`` in ``nn.Linear``, ...), but
    only when the call comes from a file in ``tests/`` and not, more recently on the
    stack, from the package (a test's ``nn.Linear(4, 4)`` lands on the device; the
    package's own ``torch.zeros(n)`` stays on the CPU, as it would in a user's program).
    """

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in _device_constructors() and kwargs.get("device") is None
                and _called_from_tests()):
            kwargs["device"] = self.device
        return func(*args, **kwargs)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The test device (``LOWRANK_TEST_DEVICE``, default ``cpu``)."""
    return DEVICE


@pytest.fixture(autouse=True)
def _test_device(device):
    if device.type == "cpu":
        yield
    else:
        with _TestDevice(device):
            yield


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
