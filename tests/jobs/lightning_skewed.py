"""examples/lightning_train.py with one rank slower than the other (SLOW_RANK, default 1:
--step-s times 4 there, a tenth elsewhere), so the fast rank is nearly always waiting in the
gradient all-reduce when a stop signal comes: the case in which a Lightning handler that runs
a collective on the slow rank hangs both ranks before rank 0 saved.

It names Lightning's Trainer itself, so launcher picks the Lightning stop for it, as for
any Trainer script.
"""

import os
import runpy
import sys
from pathlib import Path

from lightning.pytorch import Trainer  # noqa: F401  (what launcher's auto stop looks for)

args = sys.argv[1:]
if "--step-s" in args:
    at = args.index("--step-s") + 1
    slow = os.environ.get("RANK", "0") == os.environ.get("SLOW_RANK", "1")
    args[at] = str(float(args[at]) * (4.0 if slow else 0.1))
script = Path(__file__).resolve().parents[2] / "examples" / "lightning_train.py"
sys.argv = [str(script), *args]
runpy.run_path(str(script), run_name="__main__")
