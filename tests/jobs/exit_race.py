"""Runs a script unchanged (`exit_race.py SCRIPT ARGS...`), then touches HOLD_FLAG.<RANK>: the
script's main() has returned.

With tests/jobs/holdwork.c preloaded, the gloo worker that ran a chosen allreduce keeps that
work until this flag exists and is then descheduled just before it takes the GIL to drop it:
what CPU contention does now and then, made certain. A rank that finalizes the interpreter
meanwhile aborts ("terminate called without an active exception").
"""

import os
import runpy
import sys
from pathlib import Path

sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
Path(f"{os.environ['HOLD_FLAG']}.{os.environ['RANK']}").touch()
