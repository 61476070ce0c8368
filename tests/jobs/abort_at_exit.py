"""Rank 0 does its work, says so, waits for the other ranks to exit 0, then dies at
interpreter exit the way a C++ thread left running does: std::terminate ("terminate called
without an active exception"), SIGABRT. Standard library only (libstdc++ through ctypes)."""

import atexit
import ctypes
import ctypes.util
import os
import time
from pathlib import Path

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
run_dir = Path(os.environ["LAUNCHER_RUN_DIR"])
(run_dir / f"done-rank{rank}").write_text(str(os.getpid()))
print(f"rank {rank}: work done", flush=True)


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


def _terminate_after_the_others() -> None:
    deadline = time.monotonic() + 60
    for other in range(1, world):
        done = run_dir / f"done-rank{other}"
        while time.monotonic() < deadline and not (
            done.is_file() and done.read_text() and _gone(int(done.read_text()))
        ):
            time.sleep(0.02)
    time.sleep(0.3)  # the supervisor sees their exits first
    libstdcxx = ctypes.CDLL(ctypes.util.find_library("stdc++") or "libstdc++.so.6")
    libstdcxx._ZSt9terminatev()  # std::terminate()


if rank == 0:
    atexit.register(_terminate_after_the_others)
