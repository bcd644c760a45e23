"""The examples run (a few steps each); the Hugging Face one is skipped without transformers."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.usefixtures("single_thread"),  # see conftest.py
              pytest.mark.cpu_only(reason="the example trains with use_cpu=True")]

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv", [["--method", "galore"], ["--method", "loqt", "--per-layer"],
                                  ["--method", "qgalore"]], ids=lambda a: "-".join(a[1:]))
def test_hf_trainer_example(argv, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    monkeypatch.setattr(sys, "argv", ["hf_trainer.py"])
    loss = _load("hf_trainer").main(argv + ["--steps", "3", "--rank", "8"])
    assert math.isfinite(loss)
