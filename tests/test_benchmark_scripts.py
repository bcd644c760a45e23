"""Every benchmark script runs from a checkout whose package is not installed: it imports
``_paths`` (directly, or through ``common``) before anything from ``lowrank_optim``, and
its ``--help`` works."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if not p.name.startswith("_")
                 and p.name != "common.py")
pytestmark = pytest.mark.cpu_only(reason="benchmark scripts in CPU subprocesses")

PATH_SETTERS = {"_paths", "common", "bench_memory"}  # bench_memory imports _paths first


def _module_imports(tree: ast.Module) -> list[str]:
    names = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("script", SCRIPTS + [BENCH / "common.py"], ids=lambda p: p.name)
def test_sets_the_path_before_importing_the_package(script):
    names = _module_imports(ast.parse(script.read_text()))
    first_setter = min((i for i, n in enumerate(names) if n in PATH_SETTERS), default=None)
    uses = [i for i, n in enumerate(names) if n == "lowrank_optim"]
    if script.name == "common.py":
        assert names.index("_paths") < min(uses, default=len(names))
        return
    assert first_setter is not None, f"{script.name} never imports _paths or common"
    assert all(first_setter < i for i in uses), f"{script.name} imports lowrank_optim first"


def test_scripts_answer_help(tmp_path):
    """``--help`` of every script, run from another directory (imports and argparse)."""
    for script in SCRIPTS:
        res = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, f"{script.name}: {res.stderr[-2000:]}"
        assert res.stdout.strip(), script.name


def test_bench_svd_writes_both_reports(tmp_path):
    """bench_svd's synthetic (--quick) and real-gradient (--real) modes run end to end and
    write their tables; the real mode compares the exact SVD with each --niters value."""
    for args, rows in ((["--quick", "--ranks", "8", "--repeats", "1", "--warmup", "0"], 2),
                       (["--real", "micro", "--real-steps", "1", "--lag", "1", "--ranks", "4",
                         "--niters", "0,1"], 3)):
        out = tmp_path / "svd.md"
        res = subprocess.run([sys.executable, str(BENCH / "bench_svd.py"), *args, "--out",
                              str(out)], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        text = out.read_text()
        assert text.startswith("# bench_svd: ") and "- command: `" in text
        table = [line for line in text.splitlines() if line.startswith("|")]
        assert len(table) == 2 + rows, text  # header, rule, one row per shape or basis
