"""The examples run (a few steps each).

The Hugging Face ``Trainer`` example needs transformers and accelerate: both are in the
``dev`` extra, which ``make test`` (CI) installs, so there it runs and a broken example
fails CI. It is skipped only where either is not installed at all; one that is installed
but fails to import fails the test. It trains a tiny Llama built from a config on the
stdlib's sources, offline (conftest.py sets ``HF_HUB_OFFLINE``): nothing is downloaded.
"""
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
    for name in ("transformers", "accelerate"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed (pip install -e '.[dev]')")
    monkeypatch.setattr(sys, "argv", ["hf_trainer.py"])
    loss = _load("hf_trainer").main(argv + ["--steps", "3", "--rank", "8"])
    assert math.isfinite(loss)



def test_fsdp2_example_runs_and_resumes(tmp_path, monkeypatch, capsys):
    """``examples/fsdp2.py`` as ``python`` runs it (a world of one: ``fully_shard`` on a
    1-rank mesh), then resumes from its DCP checkpoint in per-layer mode."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
                           WORLD_SIZE="1", LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", ["fsdp2.py", "--steps=2", f"--ckpt={tmp_path / 'ckpt'}"])
    monkeypatch.syspath_prepend(str(EXAMPLES))  # its _toy.py
    example = _load("fsdp2")
    example.main()
    example.resume, example.per_layer = 1, 1
    example.main()
    out = capsys.readouterr().out
    assert out.count("saved") == 2 and "per-layer stepping" in out
    assert "step    3" in out  # continued after the 2 saved steps
