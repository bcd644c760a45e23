"""The repository root first on ``sys.path`` (the scripts run from a checkout whose package
is not installed, or use the checkout's package when another is), and ``HF_HUB_OFFLINE=1``
unless set: benchmarks fetch nothing (bitsandbytes with ``kernels`` would otherwise try to
download a CPU kernel at import, and wait on a closed network)."""
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent   # benchmarks/
ROOT = HERE.parent                        # the repository root

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
