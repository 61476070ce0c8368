"""Each rank leaves processes behind in every way a script can: a child in its own process
group, one in a new session (setsid), and a double-forked daemon that its parent abandons
(so it is reparented). Writes their pids, then sleeps, or exits 0 with `exit` as argument."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

rank = os.environ["RANK"]
run_dir = Path(os.environ["LAUNCHER_RUN_DIR"])
in_group = subprocess.Popen(["sleep", "1000"])
new_session = subprocess.Popen(["sleep", "1000"], start_new_session=True)

read_end, write_end = os.pipe()
middle = os.fork()
if middle == 0:
    os.setsid()
    daemon = os.fork()
    if daemon == 0:
        os.execvp("sleep", ["sleep", "1000"])
    os.write(write_end, str(daemon).encode())
    os._exit(0)
os.waitpid(middle, 0)
daemon_pid = int(os.read(read_end, 64))

pids = {"rank": os.getpid(), "group": in_group.pid, "setsid": new_session.pid, "daemon": daemon_pid}
tmp = run_dir / f".spawned-rank{rank}.json"
tmp.write_text(json.dumps(pids))
tmp.rename(run_dir / f"spawned-rank{rank}.json")
print("spawned", pids, flush=True)
if sys.argv[1:] == ["exit"]:
    sys.exit(0)
time.sleep(300)
