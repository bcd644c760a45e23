"""Where the benchmarks live, and the repository root first on ``sys.path``.

Every benchmark script imports this module before ``lowrank_optim``, so the scripts run
from a checkout whose package is not installed (and use the checkout's package when
another version is). It imports nothing heavy: ``bench_peak.py``'s parent process,
which only spawns and watches the measured children, does not load torch.

It also sets ``HF_HUB_OFFLINE=1`` unless the caller set it: benchmarks never fetch
anything, and with the ``kernels`` package installed (transformers 5 brings it)
bitsandbytes otherwise tries, at import, to download a CPU kernel from the Hugging Face
Hub (it fails on a closed network and falls back, after a delay).
"""
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent   # benchmarks/
ROOT = HERE.parent                        # the repository root

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
