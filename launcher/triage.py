"""Why a run failed: one cause, the rank and node where it started, and what to do.

Pure: it reads what the backends already collected (each rank's exit code, end time, node and
log tail; the backend's own state such as Slurm's OUT_OF_MEMORY or Docker's OOMKilled) and
imports nothing heavy, so `launcher status` can call it and the record can keep its answer.

The rules, in order:
1. The backend's own verdict where it has one (never started, cancelled, time limit, node
   failure, out of memory (also slurmstepd's oom-kill line in a rank log), preempted with no
   requeue left).
2. Otherwise the ranks: a rank that the launcher (or srun's kill-on-bad-exit) stopped, or
   whose collective broke because a peer was gone, is a *consequence*; the cause is taken from
   the first rank that failed on its own, by end time.
3. A failure no rule recognises is `unknown`, with the raw exit codes and states: never guessed.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

# kind -> one-line hint on what to do.
HINTS: dict[str, str] = {
    "python_exception": "fix the exception at the file and line shown (full traceback in the log)",
    "module_not_found": (
        "install the module in the job's interpreter or image (entrypoint.python / the image)"
    ),
    "file_not_found": "check the path: it is resolved from the job's working folder (workdir)",
    "host_oom": (
        "the host ran out of memory: raise resources.mem_gb, lower the batch size or "
        "loader.num_workers, or use fewer processes per node"
    ),
    "cuda_oom": (
        "the GPU ran out of memory: lower the micro batch, turn on activation checkpointing "
        "or bf16, or use more GPUs"
    ),
    "shm_full": (
        "/dev/shm is too small for the DataLoader workers: raise docker.shm_gb (or "
        "docker.ipc_host), lower loader.num_workers or prefetch_factor"
    ),
    "loader_worker_killed": (
        "a DataLoader worker was killed: often memory; lower loader.num_workers or raise "
        "resources.mem_gb"
    ),
    "collective_timeout": (
        "a collective timed out: a rank never reached it (a hang, a slow or dead rank, or "
        "ranks running different code paths); see the ranks that did not arrive"
    ),
    "native_crash": (
        "native code crashed (segfault/abort): often a library mismatch or a bug in an "
        "extension; run that rank alone with faulthandler (PYTHONFAULTHANDLER=1)"
    ),
    "time_limit": (
        "the time limit was reached: raise resources.time_min, or checkpoint and resume "
        "(the built-in trainer saves on the signal before the limit)"
    ),
    "preempted": (
        "preempted with no requeue left: raise slurm.max_requeue or use a partition "
        "that is not preempted"
    ),
    "node_failure": "a node failed: resubmit; tell the cluster admins if it repeats on one node",
    "cancelled": "cancelled on purpose; rerun the job to start it again",
    "never_started": "the job never started: fix what is named above and resubmit",
    "killed": "a rank was killed by a signal from outside (kill, the OOM killer, an admin)",
    "unknown": "no rule matched: read the failing rank's log; the raw exit codes are above",
}

_PREFIX = re.compile(r"^\[rank\d+\]:\s?", re.MULTILINE)
_FRAME = re.compile(r'^\s*File "([^"]+)", line (\d+), in (.+)$', re.MULTILINE)
_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Failure)):?\s?(.*)$")
_CUDA_OOM = re.compile(r"CUDA out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED")
_SHM = re.compile(
    # torch's words for each way a worker's batch does not fit: a bus error (the mmap'd file
    # could not grow), or ENOSPC when the tensor's shared storage is made ("(shm) ... (28)").
    r"insufficient shared memory|unexpected bus error|Bus error|"
    r"unable to allocate shared memory\(shm\)|"
    r"No space left on device.*shm|/dev/shm.*No space left|unable to (?:write to|mmap) .*torch_"
)
_WORKER_KILLED = re.compile(
    r"DataLoader worker \(pids?\(?s?\)? ?[\d, ]+\) (?:is killed by signal: (\w[\w ]*)|exited "
    r"unexpectedly)"
)
_TIMEOUT = re.compile(
    r"Timed out waiting \d+ms for (?:recv|send)|Watchdog caught collective operation timeout|"
    r"ran for \d+ milliseconds before timing out|DistStoreError: Timed out after|"
    r"Socket Timeout|wait timeout after \d+ms"
)
_JOINED = re.compile(r"(\d+)/(\d+) clients joined")
_PEER_GONE = re.compile(
    r"Connection closed by peer|Connection reset by peer|remote worker crashing|"
    r"NCCL communicator was aborted|ProcessGroupNCCL is aborted|Broken pipe"
)
# slurmstepd's words when the job's memory cgroup (task/cgroup, ConstrainRAMSpace) killed a
# process of the step. It lands in a rank log of the node (the step's first task there), not
# always the victim's, so it is a verdict on the run, not one rank's finding.
_STEP_OOM = re.compile(r"Detected \d+ oom-kill event\(s\) in StepId=\d+(?:_\d+)?(?:\.\w+)?")
_NO_MODULE = re.compile(r"ModuleNotFoundError: No module named '([^']+)'")
_NO_FILE = re.compile(r"FileNotFoundError: \[Errno 2\] No such file or directory: '([^']+)'")
_NO_SCRIPT = re.compile(r"can't open file '([^']+)': \[Errno 2\]")
_NATIVE = re.compile(
    r"Segmentation fault|Fatal Python error|terminate called|core dumped|double free|"
    r"\*\*\* stack smashing"
)
_LIBRARY = ("site-packages", "dist-packages", "/lib/python3", "<frozen ", "<string>")
CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGILL, signal.SIGFPE}


@dataclass(frozen=True)
class RankEnd:
    """How one rank ended, as the backend saw it."""

    rank: int
    # Popen convention: negative = killed by that signal; 128+N from a shell also means signal
    # N; None = the rank never reported an exit.
    exit_code: int | None
    node: str | None = None
    ended: float | None = None
    log_tail: str = ""
    # The launcher (or srun's kill-on-bad-exit) stopped it because another rank had failed.
    stopped_by_launcher: bool = False


@dataclass(frozen=True)
class BackendView:
    """What the backend itself says about the run (each field optional)."""

    slurm_state: str | None = None  # "OUT_OF_MEMORY", "CANCELLED by 1000", "TIMEOUT", ...
    slurm_exit: str | None = None  # "0:9"
    oom_killed: bool = False  # Docker's State.OOMKilled, or the cgroup's oom_kill count grew
    cancelled_by: str | None = None  # "launcher cancel", "SIGINT", "uid 1000"
    never_started: str | None = None  # why: "image not found", "interpreter missing"
    error: str | None = None  # the backend's own one-line error, shown when no rule matches
    requeues_left: int | None = None
    time_limit_min: float | None = None
    # Slurm: the launcher stopped the last attempt ahead of Slurm: "time_limit" (its USR2
    # before the limit, no requeue left) or "preempted"; the job then ends FAILED, not TIMEOUT.
    stopped_for: str | None = None
    stop_reason: str | None = None  # the attempt's words: "slurm.max_requeue=0 reached"


@dataclass(frozen=True)
class Cause:
    """The answer: kept in the run record under "cause" and shown by `launcher status`."""

    kind: str
    summary: str
    hint: str
    rank: int | None = None
    node: str | None = None
    time: float | None = None
    consequences: tuple[int, ...] = ()
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["consequences"] = list(self.consequences)
        return data


def signal_of(code: int | None) -> int | None:
    """The signal that ended a process, from Popen's -N or a shell's 128+N; else None."""
    if code is None:
        return None
    if code < 0:
        return -code
    if 128 < code < 128 + 65:
        return code - 128
    return None


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit reported"
    sig = signal_of(code)
    return f"killed by {_signal_name(sig)}" if sig else f"exit code {code}"


def clean_log(text: str) -> str:
    """A rank log without torch's `[rankN]: ` prefixes."""
    return _PREFIX.sub("", text)


def last_exception(log: str) -> tuple[str, str, str | None] | None:
    """(type, message, 'file:line' of the user's innermost frame) of the last traceback."""
    start = log.rfind("Traceback (most recent call last):")
    if start < 0:
        return None
    block = log[start:]
    frames = _FRAME.findall(block)
    exc_type, message = None, ""
    for line in block.splitlines()[1:]:
        if line.startswith((" ", "\t")) or not line.strip():
            continue
        match = _EXC_LINE.match(line.strip())
        if match:
            exc_type, message = match.group(1), match.group(2).strip()
            break
    if exc_type is None:
        return None
    where = None
    user = [f for f in frames if not any(lib in f[0] for lib in _LIBRARY)]
    chosen = (user or frames)[-1] if frames else None
    if chosen:
        where = f"{chosen[0]}:{chosen[1]}"
    return exc_type, message[:300], where


@dataclass(frozen=True)
class _Finding:
    kind: str
    summary: str
    detail: dict[str, Any]
    consequence: bool = False


def classify_rank(end: RankEnd) -> _Finding | None:
    """What one failed rank's own exit and log say (None for a clean exit)."""
    code = end.exit_code
    if code == 0:
        return None
    log = clean_log(end.log_tail)
    sig = signal_of(code)
    what = describe_exit(code)
    if code is None:
        return _Finding("never_started", "never reported an exit (did the task start?)", {})
    if _CUDA_OOM.search(log):
        return _Finding("cuda_oom", f"CUDA out of memory ({what})", _exc_detail(log))
    worker = _WORKER_KILLED.search(log)
    shm = _SHM.search(log)
    if shm or (worker and (worker.group(1) or "").startswith("Bus")):
        said = shm.group(0) if shm else "bus error"
        return _Finding(
            "shm_full", f"/dev/shm full in a DataLoader worker: {said} ({what})", {"message": said}
        )
    if worker:
        return _Finding("loader_worker_killed", f"a DataLoader worker died ({worker.group(0)})", {})
    timeout = _TIMEOUT.search(log)
    if timeout:
        detail: dict[str, Any] = {"message": timeout.group(0)}
        joined = _JOINED.search(log)
        if joined:
            detail["joined"] = f"{joined.group(1)}/{joined.group(2)}"
        return _Finding("collective_timeout", f"a collective timed out ({what})", detail)
    if _PEER_GONE.search(log):
        return _Finding("peer_gone", f"a peer rank went away ({what})", {}, consequence=True)
    missing = _NO_MODULE.search(log)
    if missing:
        return _Finding(
            "module_not_found", f"No module named '{missing.group(1)}'", _exc_detail(log)
        )
    script = _NO_SCRIPT.search(log)
    if script:
        return _Finding("file_not_found", f"script not found: {script.group(1)}", {})
    no_file = _NO_FILE.search(log)
    if no_file:
        return _Finding(
            "file_not_found", f"No such file or directory: {no_file.group(1)}", _exc_detail(log)
        )
    if (sig and sig in CRASH_SIGNALS) or _NATIVE.search(log):
        name = _signal_name(sig) if sig else "abort"
        return _Finding("native_crash", f"native crash ({name})", {"signal": name})
    exc = last_exception(log)
    if exc:
        exc_type, message, where = exc
        if exc_type in ("KeyboardInterrupt", "SystemExit") and end.stopped_by_launcher:
            return _Finding("stopped", what, {}, consequence=True)
        text = f"{exc_type}: {message}" if message else exc_type
        return _Finding(
            "python_exception",
            text + (f" at {where}" if where else ""),
            {"exception": exc_type, "message": message, "where": where},
        )
    if end.stopped_by_launcher:
        return _Finding("stopped", f"stopped by the launcher ({what})", {}, consequence=True)
    if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
        return _Finding("killed", f"{what} from outside", {"signal": _signal_name(sig)})
    # It failed on its own, for a reason no rule knows: still the first failure, shown as is.
    return _Finding("unknown", f"rank {end.rank}: {what}", {})


def _consequence(finding: _Finding | None) -> bool:
    return finding is not None and finding.consequence


def _kind(finding: _Finding | None) -> str | None:
    return finding.kind if finding else None


def _exc_detail(log: str) -> dict[str, Any]:
    exc = last_exception(log)
    if not exc:
        return {}
    return {"exception": exc[0], "message": exc[1], "where": exc[2]}


def _raw(ends: Iterable[RankEnd], view: BackendView) -> dict[str, Any]:
    raw: dict[str, Any] = {"exit_codes": {str(e.rank): e.exit_code for e in ends}}
    if view.slurm_state:
        raw["slurm_state"] = view.slurm_state
    if view.slurm_exit:
        raw["slurm_exit"] = view.slurm_exit
    return raw


def _make(kind: str, summary: str, **kw: Any) -> Cause:
    return Cause(kind=kind, summary=summary, hint=HINTS[kind], **kw)


_SLURM_VERDICTS = {
    "TIMEOUT": ("time_limit", "the job reached its time limit"),
    "DEADLINE": ("time_limit", "the job reached its deadline (--deadline)"),
    "NODE_FAIL": ("node_failure", "a node of the job failed"),
    "OUT_OF_MEMORY": ("host_oom", "Slurm killed the job: out of memory (OUT_OF_MEMORY)"),
    "BOOT_FAIL": ("never_started", "the nodes failed to boot (BOOT_FAIL)"),
    "PREEMPTED": ("preempted", "the job was preempted and not requeued"),
}


def diagnose(ends: list[RankEnd], view: BackendView | None = None) -> Cause:
    """The cause of a failed run (see the module docstring for the rules)."""
    view = view or BackendView()
    ordered = sorted(ends, key=lambda e: (e.ended is None, e.ended or 0.0, e.rank))
    findings = {e.rank: classify_rank(e) for e in ordered}
    failed = [e for e in ordered if findings[e.rank] is not None]
    primary_ranks = [e for e in failed if not _consequence(findings[e.rank])]
    candidates = primary_ranks or failed
    first = candidates[0] if candidates else None
    consequences = tuple(
        sorted(e.rank for e in failed if first is not None and e.rank != first.rank)
    )
    where: dict[str, Any] = {}
    if first is not None:
        where = {"rank": first.rank, "node": first.node, "time": first.ended}
    raw = _raw(ordered, view)

    if view.never_started:
        return _make("never_started", view.never_started, detail=raw, **where)
    because = f" ({view.stop_reason})" if view.stop_reason else ""
    if view.stopped_for == "preempted":
        # Before the cancellation: Slurm ends a preempted job that may not requeue CANCELLED.
        summary = "preempted with no requeue left" + because
        return _make("preempted", summary, detail=raw)
    state = (view.slurm_state or "").split()[0] if view.slurm_state else ""
    if view.cancelled_by or state == "CANCELLED":
        who = view.cancelled_by or " ".join((view.slurm_state or "").split()[1:])
        if who and not who.startswith("by "):
            who = f"by {who}"
        # Without Slurm's "by <uid>", the backend's own words, not a guess of who.
        summary = f"cancelled {who}" if who else (view.error or "cancelled")
        return _make("cancelled", summary, detail=raw)
    step_oom = next((m for e in ends if (m := _STEP_OOM.search(e.log_tail))), None)
    if view.oom_killed or step_oom:
        summary = "killed by the kernel's OOM killer (the memory limit was reached)"
        if step_oom and not view.oom_killed:
            summary = (
                f"killed by the OOM killer of the job's memory cgroup (slurmstepd: {step_oom[0]})"
            )
        return _make(
            "host_oom",
            summary,
            consequences=consequences,
            detail=raw,
            **where,
        )
    if view.stopped_for == "time_limit" and state not in _SLURM_VERDICTS:
        summary = "stopped at the time limit to save" + because
        if view.time_limit_min:
            summary = summary.replace("time limit", f"time limit ({view.time_limit_min:g} min)")
        # Every rank was stopped on purpose: none of them is the cause.
        return _make("time_limit", summary, detail=raw)
    if state in _SLURM_VERDICTS:
        kind, summary = _SLURM_VERDICTS[state]
        if kind == "time_limit" and view.time_limit_min:
            summary += f" ({view.time_limit_min:g} min)"
        return _make(kind, summary, consequences=consequences, detail=raw, **where)
    if first is None:
        if view.error and not any(e.exit_code is not None for e in ends):
            # Nothing of the ranks to go on: the backend's own words, never a guess.
            return _make("unknown", view.error, detail=raw)
        if ends and all(e.exit_code is None for e in ends):
            return _make(
                "never_started",
                "no rank reported an exit: the tasks did not start (the wrapper or the "
                "interpreter failed before the script)",
                detail=raw,
            )
        return _make("unknown", "failed, but no rank reported a failure", detail=raw)
    finding = findings[first.rank]
    assert finding is not None
    detail = {**finding.detail, **raw}
    kind = finding.kind
    if kind == "collective_timeout":
        late = [
            e.rank
            for e in ordered
            if e.rank != first.rank and _kind(findings[e.rank]) in (None, "stopped", "killed")
        ]
        if late:
            detail["did_not_arrive"] = late
        summary = finding.summary + (
            f"; rank(s) {', '.join(map(str, late))} did not arrive" if late else ""
        )
        return _make(kind, summary, consequences=consequences, detail=detail, **where)
    if kind in ("stopped", "peer_gone"):
        kind = "unknown"
    if kind not in HINTS:
        kind = "unknown"
    return _make(kind, finding.summary, consequences=consequences, detail=detail, **where)
