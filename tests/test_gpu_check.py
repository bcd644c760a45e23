"""``benchmarks/gpu_check.sh --dry-run``: every step of the GPU check runs at toy size on the
CPU and writes its report, so that GPU time is never spent debugging the script."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.cpu_only(reason="runs the GPU check's CPU dry run in subprocesses"),
              pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                 reason="needs bash and coreutils' timeout")]

REPORTS = ("summary.md", "tests.md", "step.md", "peak.md", "quality.md", "log.txt")


def test_dry_run_writes_every_report(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run",
                          str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=400)
    out = tmp_path / "out"
    log = (out / "log.txt").read_text()[-4000:] if (out / "log.txt").exists() else ""
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:] + log
    assert sorted(p.name for p in out.iterdir()) == sorted(REPORTS)  # <= 8 files come back
    summary = (out / "summary.md").read_text()
    for name in ("tests", "step_time", "peak_memory", "quality"):
        assert f"| {name} | ok |" in summary, summary
    assert "passed" in (out / "tests.md").read_text()
    assert "QGaLoreAdamW8bit" in (out / "step.md").read_text()
    assert "`qapollo_mini:micro:32:ckpt`" in (out / "peak.md").read_text()
    quality = (out / "quality.md").read_text()
    for method in ("adamw", "galore", "qgalore", "loqt"):
        assert f"| {method} |" in quality


def test_unknown_option_is_refused(tmp_path):
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--fast"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "--fast" in res.stderr
