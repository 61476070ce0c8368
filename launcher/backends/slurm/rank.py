"""Runs on every rank, under srun: derive the torchrun-style variables, then run the entrypoint.

`srun ... LAUNCHER_PYTHON -m launcher.backends.slurm.rank --stop-signal=SIG -- ARGV...` runs
on every task, with launcher's own interpreter (the one the batch shell `exec`s; inside a
container the image's, which has launcher), never the job's: the job's `entrypoint.python`
needs only what the script imports. It imports the standard library and launcher.entrypoint
(standard library at import), never submitit or torch.

A `python script.py` child starts through the exit runner the local and Docker ranks use
(`entrypoint.rank_argv`): once the script is done it leaves by os._exit after atexit, so a
gloo thread cannot abort the rank in interpreter finalization.

It keeps all SLURM_* variables (a Lightning script with `Trainer(num_nodes=N)` works
unchanged), sets RANK/LOCAL_RANK/WORLD_SIZE/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT, picks
the loader settings from the hardware this task really got (when launcher is importable),
and writes the child's exit code to `<run_dir>/exits/rank<N>.json` so a failed run can name
its first failing rank. Those files are also the proof that a rank ran at all: srun exits 0
when it could not start the tasks (no run folder on the node), so a run is COMPLETED only
when every rank wrote its exit file, with 0, in the job's current attempt (`missing_ranks`).

Signals: whatever asks this task to stop (TERM from Slurm at preemption or an administrator's
requeue, the host task's stop file before the time limit and at preemption, INT, USR1)
reaches the child as ONE signal, `--stop-signal` (`entrypoint.stop_signal`: USR1 for
Lightning, TERM for plain scripts, USR2 for the built-in trainer), once per attempt. Slurm's
own TERM also reaches the script directly (Slurm signals every process of a step), so a
script must not die of TERM before it saved; repeats from here are dropped. A Lightning script
(`entrypoint.lightning_stop`: `--stop-ranks=first --block-term`) starts with TERM blocked and
only global rank 0 gets USR1: Lightning's handlers run collectives, and a rank out of step
would pair them with another rank's all-reduce. Its wrapper then watches for the new
hpc_ckpt_N.ckpt (in the run dir and the script's cwd) and, once it is there, writes the same
requeue request the shim would: Lightning's own comes after a barrier that never passes.
`<run_dir>/bin` goes first on the child's PATH: its `scontrol` turns a rank's
`scontrol requeue <this job>` (Lightning's auto-requeue) into a request that the host task
carries out, so the job has one requeuer.
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
from typing import NamedTuple

from launcher.entrypoint import rank_argv
from launcher.files import atomic_write_text

# Same value as launcher.runtime.REQUEUE_EXIT_CODE (EX_TEMPFAIL); not imported: no torch here.
REQUEUE_EXIT_CODE = 75
# What may ask a task to stop: Slurm's TERM (preemption, requeue, scancel), the USR2 the host
# task relays before the time limit, INT, USR1 (`scancel --signal`), HUP.
STOP_TRIGGERS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
# The signals a child may be asked to stop with (`entrypoint.stop_signal`).
STOP_SIGNALS = ("TERM", "USR1", "USR2", "INT")
# The folder in the run dir whose `scontrol` shim goes first on the ranks' PATH.
SHIM_DIR = "bin"
# Requests of `scontrol requeue` from ranks, one file per rank and attempt.
REQUEUE_DIR = "requeue"
# The host task's word to stop, one file per attempt (`stop-restart<N>`): a file, not a
# signal through srun, because Slurm delivers a step's signals to every process of it, the
# script included, and USR2 would kill a script that does not handle it.
STOP_FILE = "stop-restart{restart}"
# Lines of the rank's log kept in its exit file when it failed (the status shows them).
ERROR_TAIL_LINES = 3
# What Lightning's USR1 handler writes, atomically (an fsspec transaction), in its
# default_root_dir (the working directory unless set), before a barrier the other ranks,
# never signalled, do not join: its `scontrol requeue` after that barrier does not come.
HPC_CKPT = re.compile(r"hpc_ckpt_\d+\.ckpt")


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
    **extra: str,
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
    record.update(extra)
    atomic_write_text(exits / f"rank{rank}.json", json.dumps(record))


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


def _log_tail(path: Path, lines: int = ERROR_TAIL_LINES) -> str:
    """The last non-empty lines of this rank's log: why a child failed before it said more."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 8192))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join("".join(c if c.isprintable() else "?" for c in x)[:300] for x in kept)


class Options(NamedTuple):
    stop: str  # the signal's name, without SIG
    first_only: bool  # --stop-ranks=first: only global rank 0 gets it (Lightning)
    block_term: bool  # --block-term: the child starts with TERM blocked (Lightning)
    argv: list[str]


def _parse(argv: list[str]) -> Options | None:
    stop, first_only, block_term = "TERM", False, False
    while argv and argv[0] != "--":
        flag, _, value = argv[0].partition("=")
        if flag == "--stop-signal" and value in STOP_SIGNALS:
            stop = value
        elif flag == "--stop-ranks" and value in ("all", "first"):
            first_only = value == "first"
        elif argv[0] == "--block-term":
            block_term = True
        else:
            return None
        argv = argv[1:]
    if argv[:1] != ["--"] or not argv[1:]:
        return None
    return Options(stop, first_only, block_term, argv[1:])


def _start(argv: list[str], env: dict[str, str], block_term: bool) -> subprocess.Popen:
    """The child, with SIGTERM blocked when asked: a blocked signal stays blocked across exec
    and in every thread the child starts, and Lightning's `signal.signal` cannot undo it (it
    would undo SIG_IGN), so Slurm's TERM stays pending until SIGKILL ends the step."""
    if not block_term:
        return subprocess.Popen(argv, env=env)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        return subprocess.Popen(argv, env=env)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)  # a TERM meanwhile arrives now


def _hpc_checkpoints(folders: list[str]) -> set[tuple[str, int]]:
    """(path, mtime) of the Lightning HPC checkpoints in these folders."""
    found = set()
    for folder in dict.fromkeys(folders):
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if HPC_CKPT.fullmatch(entry.name):
                try:
                    found.add((entry.path, entry.stat().st_mtime_ns))
                except OSError:
                    pass
    return found


def request_requeue(run_dir: str | Path, rank: str, restart: str) -> None:
    """The request the `scontrol` shim writes for a rank (`<run_dir>/requeue/rank<N>-restart<R>`):
    the host task ends the grace and requeues once (or leaves it to Slurm)."""
    path = Path(run_dir) / REQUEUE_DIR / f"rank{rank}-restart{restart}"
    atomic_write_text(path, f"{int(time.time())}\n")


def _loader_picks(env: dict[str, str]) -> dict[str, str]:
    """Loader picks for this task's hardware; none when launcher cannot be imported here (a
    container's python: scripts choose their own loaders, the built-in trainer picks itself)."""
    try:
        from launcher.hardware import detect, pick_loader
        from launcher.spec import LoaderSpec
    except ImportError:
        return {}
    return pick_loader(detect(env), int(env["LOCAL_WORLD_SIZE"]), LoaderSpec()).as_env()


def main(argv: list[str] | None = None) -> int:
    opts = _parse(sys.argv[1:] if argv is None else argv)
    if opts is None:
        print(
            f"usage: rank.py [--stop-signal={'|'.join(STOP_SIGNALS)}] [--stop-ranks=all|first]"
            " [--block-term] -- COMMAND...",
            file=sys.stderr,
        )
        return 2
    stop_name, argv = opts.stop, opts.argv
    stop = getattr(signal, f"SIG{stop_name}")
    env = dict(os.environ)
    env.update(dist_env_from_slurm(env))
    if "LAUNCHER_NUM_WORKERS" not in env:
        env.update(_loader_picks(env))
    run_dir = env.get("LAUNCHER_RUN_DIR")
    if run_dir and (Path(run_dir) / SHIM_DIR / "scontrol").is_file():
        env["PATH"] = os.pathsep.join([str(Path(run_dir) / SHIM_DIR), env.get("PATH", "")])
    rank = env["RANK"]
    started = time.time()
    try:
        child = _start(rank_argv(argv), env, opts.block_term)
    except OSError as exc:
        # Reported like any exit, so the run names this rank and why instead of "never ran".
        print(f"launcher: cannot start {argv[0]}: {exc}", file=sys.stderr)
        if run_dir:
            write_exit(run_dir, env, 127, started, error=f"cannot start {argv[0]}: {exc}")
        return 127
    asked: list[str] = []
    # Lightning's rank 0, once asked: the HPC checkpoints there were before USR1, and where.
    hpc_before: set[tuple[str, int]] | None = None
    hpc_folders = [f for f in (run_dir, os.getcwd()) if f]

    def on_stop(signum: int, _frame: object) -> None:
        nonlocal hpc_before
        name = signal.Signals(signum).name
        if child.poll() is not None:
            return
        if asked:
            print(f"launcher: rank {rank}: {name} again; the stop was passed on", file=sys.stderr)
            return
        asked.append(name)
        if opts.first_only and rank != "0":
            print(
                f"launcher: rank {rank}: {name}: rank 0 saves; this rank works on until the end",
                file=sys.stderr,
            )
            return
        if opts.first_only:
            try:  # where the script is now: Lightning's default_root_dir by default
                hpc_folders.append(os.readlink(f"/proc/{child.pid}/cwd"))
            except OSError:
                pass
            hpc_before = _hpc_checkpoints(hpc_folders)
        print(f"launcher: rank {rank}: {name} -> SIG{stop_name} to the script", file=sys.stderr)
        child.send_signal(stop)

    def forward(signum: int, _frame: object) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    for sig in STOP_TRIGGERS:
        signal.signal(sig, on_stop)
    signal.signal(signal.SIGCONT, forward)
    stop_file = None
    if run_dir:
        restart = env.get("SLURM_RESTART_COUNT", "0")
        stop_file = Path(run_dir) / STOP_FILE.format(restart=restart)
    while (code := child.poll()) is None:
        if stop_file is not None and not asked and stop_file.exists():
            on_stop(signal.SIGUSR2, None)  # the host task relays a time limit or preemption
        if run_dir and hpc_before is not None:
            saved = sorted(_hpc_checkpoints(hpc_folders) - hpc_before)
            if saved:
                # Saved: Lightning would ask for the requeue now, had its barrier passed.
                hpc_before = None
                print(
                    f"launcher: rank {rank}: Lightning saved {saved[-1][0]}; "
                    "the host task need not wait out the grace",
                    file=sys.stderr,
                )
                request_requeue(run_dir, rank, env.get("SLURM_RESTART_COUNT", "0"))
        time.sleep(0.2)
    if run_dir:
        stopped = {"stop_signal": stop_name, "stopped_by": asked[0]} if asked else {}
        error = None
        if code not in (0, REQUEUE_EXIT_CODE) and not asked:
            error = _log_tail(Path(run_dir) / "logs" / f"rank{rank}.log") or None
        write_exit(run_dir, env, code, started, error=error, **stopped)
    if code == REQUEUE_EXIT_CODE or (asked and code in (0, -stop)):
        # Stopped for requeue (saved, or killed by a stop signal it does not handle): not a
        # failure, so srun's --kill-on-bad-exit must not kill the ranks that are still saving.
        return 0
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    raise SystemExit(main())
