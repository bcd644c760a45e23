"""The test device machinery of conftest.py (``LOWRANK_TEST_DEVICE``), checked on the CPU
with the meta device standing in for an accelerator."""
import os

import pytest
import torch
from torch import nn

import conftest
import lowrank_optim


def test_only_the_tests_own_factory_calls_follow_the_device(device):
    package_file = os.path.join(os.path.dirname(lowrank_optim.__file__), "_example.py")
    in_package = compile("torch.zeros(2)", package_file, "eval")
    with conftest._TestDevice(torch.device("meta")):
        assert torch.zeros(2).device.type == "meta"
        assert nn.Linear(2, 3).weight.device.type == "meta"  # torch.empty inside nn.Linear
        assert torch.zeros(2, device="cpu").device.type == "cpu"  # explicit device wins
        assert eval(in_package).device.type == "cpu"  # the package keeps torch's default
    # outside the mode, the test's device again (the CPU, or LOWRANK_TEST_DEVICE's device,
    # whose own _TestDevice the autouse fixture has put around this test)
    assert torch.zeros(2).device.type == device.type


@pytest.mark.parametrize("name", ["meta", "no-such-device"])
def test_unusable_device_is_a_usage_error(monkeypatch, name):
    monkeypatch.setenv(conftest.DEVICE_VAR, name)
    with pytest.raises(pytest.UsageError, match=conftest.DEVICE_VAR):
        conftest._device_from_env(collect_only=False)


def test_missing_cuda_is_a_usage_error_unless_collecting(monkeypatch):
    monkeypatch.setenv(conftest.DEVICE_VAR, "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(pytest.UsageError, match="is_available"):
        conftest._device_from_env(collect_only=False)
    assert conftest._device_from_env(collect_only=True) == torch.device("cuda")
    monkeypatch.setenv(conftest.DEVICE_VAR, "")
    assert conftest._device_from_env(collect_only=False) == torch.device("cpu")
