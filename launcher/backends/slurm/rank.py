"""Runs on every rank, under srun: derive the torchrun-style variables, then run the entrypoint.

`srun ... python -m launcher.backends.slurm.rank -- ARGV...` runs on every task (also inside a
pyxis container), so it is pure standard library plus `launcher.hardware`. It keeps all
SLURM_* variables (a Lightning script with `Trainer(num_nodes=N)` works unchanged), sets
RANK/LOCAL_RANK/WORLD_SIZE/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT, picks the loader
settings from the hardware this task really got, forwards signals to the child, and
writes the child's exit code to `<run_dir>/exits/rank<N>.json` so a failed run can name
its first failing rank.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

# Same value as launcher.runtime.REQUEUE_EXIT_CODE (EX_TEMPFAIL); not imported: no torch here.
REQUEUE_EXIT_CODE = 75
FORWARDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGCONT)


def expand_nodelist(nodelist: str) -> list[str]:
    """'node[1-3,7],gpu01' -> ['node1', 'node2', 'node3', 'node7', 'gpu01'] (Slurm syntax)."""
    hosts: list[str] = []
    for group in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", group)
        if not match:
            hosts.append(group)
            continue
        prefix, ranges, suffix = match.groups()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(f"{prefix}{lo}{suffix}")
                continue
            for i in range(int(lo), int(hi) + 1):
                hosts.append(f"{prefix}{str(i).zfill(len(lo))}{suffix}")
    return hosts


def tasks_on_node(tasks_per_node: str, node_index: int) -> int:
    """SLURM_TASKS_PER_NODE like '2(x3),1' -> how many tasks node `node_index` runs."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match:
            counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[node_index] if node_index < len(counts) else (counts[-1] if counts else 1)


def dist_env_from_slurm(environ: Mapping[str, str]) -> dict[str, str]:
    """torchrun-style variables for this task, from the SLURM_* ones."""
    nodes = expand_nodelist(environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST", ""))
    node_id = int(environ.get("SLURM_NODEID", "0"))
    local_world = tasks_on_node(
        environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE", "1"),
        node_id,
    )
    job_id = int(re.sub(r"\D", "", environ.get("SLURM_JOB_ID", "0")) or 0)
    return {
        "RANK": environ.get("SLURM_PROCID", "0"),
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS", "1"),
        "LOCAL_WORLD_SIZE": str(local_world),
        # The host side sets these (a free port on the first node); else derive them.
        "MASTER_ADDR": environ.get("MASTER_ADDR") or (nodes[0] if nodes else "127.0.0.1"),
        "MASTER_PORT": environ.get("MASTER_PORT") or str(20000 + job_id % 20000),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m launcher.backends.slurm.rank -- COMMAND...", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env.update(dist_env_from_slurm(env))
    if "LAUNCHER_NUM_WORKERS" not in env:
        from launcher.hardware import detect, pick_loader
        from launcher.spec import LoaderSpec

        picks = pick_loader(detect(env), int(env["LOCAL_WORLD_SIZE"]), LoaderSpec())
        env.update(picks.as_env())
    child = subprocess.Popen(argv, env=env)

    def forward(signum: int, _frame: object) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    started = time.time()
    code = child.wait()
    run_dir = env.get("LAUNCHER_RUN_DIR")
    if run_dir:
        exits = Path(run_dir) / "exits"
        exits.mkdir(parents=True, exist_ok=True)
        record = {
            "rank": int(env["RANK"]),
            "node": env.get("SLURMD_NODENAME", ""),
            "exit_code": code,
            "started": started,
            "ended": time.time(),
            "restart": int(env.get("SLURM_RESTART_COUNT", "0")),
        }
        tmp = exits / f".rank{env['RANK']}.json.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, exits / f"rank{env['RANK']}.json")
    if code == REQUEUE_EXIT_CODE:
        # The rank saved a checkpoint and stopped for requeue: not a failure, so srun's
        # --kill-on-bad-exit must not kill the ranks that are still saving.
        return 0
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    raise SystemExit(main())
