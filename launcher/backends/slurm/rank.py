"""Runs on every rank, under srun: derive the torchrun-style variables, then run the entrypoint.

`srun ... python -m launcher.backends.slurm.rank -- ARGV...` runs on every task (also inside a
pyxis container), so it is pure standard library plus `launcher.hardware`. It keeps all
SLURM_* variables (a Lightning script with `Trainer(num_nodes=N)` works unchanged), sets
RANK/LOCAL_RANK/WORLD_SIZE/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT, picks the loader
settings from the hardware this task really got, forwards signals to the child, and
writes the child's exit code to `<run_dir>/exits/rank<N>.json` so a failed run can name
its first failing rank. Those files are also the proof that a rank ran at all: srun exits 0
when it could not start the tasks (no run folder on the node), so a run is COMPLETED only
when every rank wrote its exit file, with 0, in the job's current attempt (`missing_ranks`).
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


def write_exit(
    run_dir: str | Path,
    environ: Mapping[str, str],
    code: int,
    started: float,
    error: str | None = None,
) -> None:
    """exits/rank<N>.json for this task and attempt (SLURM_RESTART_COUNT), atomically."""
    exits = Path(run_dir) / "exits"
    exits.mkdir(parents=True, exist_ok=True)
    rank = environ.get("RANK") or environ.get("SLURM_PROCID", "0")
    record = {
        "rank": int(rank),
        "node": environ.get("SLURMD_NODENAME", ""),
        "exit_code": code,
        "started": started,
        "ended": time.time(),
        "restart": int(environ.get("SLURM_RESTART_COUNT", "0")),
        "job_id": environ.get("SLURM_JOB_ID", ""),
    }
    if error:
        record["error"] = error
    tmp = exits / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, exits / f"rank{rank}.json")


def read_exits(run_dir: str | Path, restart: int | None = None) -> dict[int, dict]:
    """rank -> its exit file, only those of attempt `restart` when given (older ones are
    from before a requeue); unreadable files count as not written."""
    found: dict[int, dict] = {}
    for path in (Path(run_dir) / "exits").glob("rank*.json"):
        try:
            data = json.loads(path.read_text())
            rank = int(data["rank"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if restart is None or data.get("restart", 0) == restart:
            found[rank] = data
    return found


def missing_ranks(run_dir: str | Path, world_size: int, restart: int | None = None) -> list[int]:
    """Ranks of 0..world_size-1 without an exit file for this attempt: they never ran."""
    seen = read_exits(run_dir, restart)
    return [r for r in range(world_size) if r not in seen]


def never_reported(ranks: list[int]) -> str:
    """The one-line cause for ranks that wrote no exit file."""
    shown = ",".join(str(r) for r in ranks[:16]) + (
        f",... ({len(ranks)} ranks)" if len(ranks) > 16 else ""
    )
    return (
        f"rank(s) {shown} never reported an exit: the tasks did not start "
        "(is the run folder visible on every node?)"
    )


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
    run_dir = env.get("LAUNCHER_RUN_DIR")
    started = time.time()
    try:
        child = subprocess.Popen(argv, env=env)
    except OSError as exc:
        # Reported like any exit, so the run names this rank and why instead of "never ran".
        print(f"launcher: cannot start {argv[0]}: {exc}", file=sys.stderr)
        if run_dir:
            write_exit(run_dir, env, 127, started, error=f"cannot start {argv[0]}: {exc}")
        return 127

    def forward(signum: int, _frame: object) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    code = child.wait()
    if run_dir:
        write_exit(run_dir, env, code, started)
    if code == REQUEUE_EXIT_CODE:
        # The rank saved a checkpoint and stopped for requeue: not a failure, so srun's
        # --kill-on-bad-exit must not kill the ranks that are still saving.
        return 0
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    raise SystemExit(main())
