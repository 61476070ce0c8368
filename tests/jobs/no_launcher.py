"""Standard library only: proves its interpreter cannot import launcher, and records it."""

import importlib.util
import json
import os
import sys
from pathlib import Path

found = importlib.util.find_spec("launcher")
out = Path(os.environ["LAUNCHER_RUN_DIR"]) / f"no-launcher-rank{os.environ['RANK']}.json"
out.write_text(
    json.dumps({"executable": sys.executable, "launcher": None if found is None else found.origin})
)
print(f"rank {os.environ['RANK']}: python {sys.executable}, launcher importable: {bool(found)}")
sys.exit(0 if found is None else 5)
