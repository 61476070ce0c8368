"""Rank 1 fails at once with a message; the other ranks would run for a long time."""

import os
import sys
import time

if os.environ["RANK"] == "1":
    print("about to fail: simulated CUDA error in rank 1", flush=True)
    sys.exit(3)
time.sleep(120)
