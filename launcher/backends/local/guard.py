"""One rank's guard, and what the launcher knows about processes on this machine.

Why a process between the supervisor and each rank: PDEATHSIG reaches only a direct child,
so a SIGKILLed supervisor used to leave the ranks' own children (DataLoader workers, a
subprocess the script started, a daemon that called setsid) running under PID 1. The guard is
a child subreaper, so everything the rank starts stays below it whatever it does with
sessions and groups; it holds the read end of a pipe whose write end only the supervisor
holds. EOF there (the supervisor is gone, however it died) or SIGTERM/SIGINT/SIGHUP (a stop:
cancel, Ctrl-C, the time limit, another rank's failure) send the job's stop signal
(`entrypoint.stop_signal`, given on the command line) to the rank alone, once, with SIGCONT so
a stopped rank handles it: it saves and exits in its own way, and its DataLoader workers are
its own business. Whatever of the tree still runs after the grace period gets SIGKILL. When
the rank exits by itself, what it left running gets SIGTERM, then SIGKILL after the grace. The
guard exits with the rank's status, so the supervisor reads the rank's exit code from it. A
rank that cannot even be started (no such interpreter) gets the reason in its log, which is
the guard's output.

Identities: a pid alone names a different process once it is reused, so records keep the
pid with its start time (/proc/<pid>/stat field 22), the boot id and the PID namespace, and
nothing is signalled whose identity does not match.

Standard library only: the supervisor runs this file by path (`python -I -S guard.py`),
inside containers too, and imports it for the helpers.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from typing import Any, NoReturn

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
KILL_TIMEOUT_S = 10.0
# How mismatch() words a process that simply ended (nothing to say about it to the user).
EXITED = "has exited"

try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - no C library to ask (not Linux)
    _LIBC = None


def prctl(option: int, value: int) -> bool:
    """Linux prctl(2); False where it is not available or refused."""
    if _LIBC is None:
        return False
    try:
        return _LIBC.prctl(option, value, 0, 0, 0) == 0
    except AttributeError:  # pragma: no cover - not Linux
        return False


def set_subreaper(on: bool = True) -> bool:
    """Orphans below this process become its children instead of PID 1's."""
    return prctl(PR_SET_CHILD_SUBREAPER, 1 if on else 0)


# --- process identity --------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (the command name may hold spaces and parentheses)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            text = fh.read().decode(errors="replace")
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def proc_state(pid: int) -> str | None:
    """The state letter (R, S, D, T, t, Z, ...) or None when there is no such process."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def _start_ticks(fields: list[str]) -> int:
    return int(fields[19])  # field 22: start time in clock ticks after boot


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def identity(pid: int) -> dict[str, Any] | None:
    """What names this process and no later one with the same pid; None if it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return {
        "pid": pid,
        "start_ticks": _start_ticks(fields),
        "boot_id": boot_id(),
        "pid_ns": pid_namespace(),
    }


def mismatch(ident: Any) -> str | None:
    """None if the recorded process runs now; else why it does not (or cannot be told)."""
    if not isinstance(ident, dict) or not {"pid", "start_ticks", "boot_id"} <= ident.keys():
        return "no process identity recorded (an older launcher wrote this record)"
    pid = int(ident["pid"])
    if ident["boot_id"] != boot_id():
        return f"pid {pid} was recorded before the machine last booted"
    if ident.get("pid_ns", pid_namespace()) != pid_namespace():
        return f"pid {pid} was recorded in another PID namespace (a container)"
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return f"pid {pid} {EXITED}"
    if _start_ticks(fields) != int(ident["start_ticks"]):
        return f"pid {pid} now belongs to another process (it started at a different time)"
    return None


def same_process(ident: Any) -> bool:
    return mismatch(ident) is None


def signal_verified(ident: Any, sig: int, *, group: bool = False) -> str | None:
    """Send `sig` to the recorded process (or the group it leads) only if it is that
    process; returns why not, or None once sent. A pidfd taken before the check pins the
    process, so the pid cannot change hands between the check and the signal."""
    why = mismatch(ident)
    if why is not None:
        return why
    pid = int(ident["pid"])
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = -1  # no pidfds (before Linux 5.3): the check above is all there is
    try:
        why = mismatch(ident)  # again, now that the pidfd pins the process
        if why is not None:
            return why
        if group:
            os.killpg(pid, sig)
        elif pidfd >= 0:
            signal.pidfd_send_signal(pidfd, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError) as exc:
        return f"pid {pid}: {exc.strerror}"
    finally:
        if pidfd >= 0:
            os.close(pidfd)
    return None


# --- process trees -----------------------------------------------------------------------


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process this PID namespace shows."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            found[int(entry.name)] = int(fields[1])
    return found


def all_pids() -> list[int]:
    return sorted(_parents())


def descendants(root: int) -> list[int]:
    """Every process below `root` (zombies included), parents before children."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        children.setdefault(ppid, []).append(pid)
    found: list[int] = []
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop(0)
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def environ_has(pid: int, entry: str) -> bool:
    """True if `entry` ("NAME=value") is in the environment the process started with."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return entry.encode() in fh.read().split(b"\0")
    except OSError:
        return False


def signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def reap() -> dict[int, int]:
    """Collect every exited child without blocking: pid -> wait status."""
    done: dict[int, int] = {}
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return done
        if pid == 0:
            return done
        done[pid] = status


def stop_tree(root: int, grace_s: float, *, reaped: dict[int, int] | None = None) -> list[int]:
    """SIGTERM (+SIGCONT) everything below `root`, SIGKILL what is left after `grace_s`.

    `root` must be this process and a subreaper: the processes whose parents die become its
    children, so they are reaped here and the loop ends. Reaped statuses go into `reaped`.
    Returns the pids that were signalled.
    """
    reaped = {} if reaped is None else reaped
    targets = descendants(root)
    signal_all(targets, signal.SIGTERM)
    signal_all(targets, signal.SIGCONT)
    deadline = time.monotonic() + grace_s
    left = targets
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        reaped.update(reap())
        left = descendants(root)
    if left:
        kill_tree(root, reaped=reaped)
    return targets


def kill_tree(root: int, *, reaped: dict[int, int]) -> None:
    """SIGKILL everything below `root` (a subreaper: this process) until nothing is left."""
    deadline = time.monotonic() + KILL_TIMEOUT_S
    left = descendants(root)
    while left and time.monotonic() < deadline:
        signal_all(left, signal.SIGKILL)
        time.sleep(0.01)
        reaped.update(reap())
        left = descendants(root)


def stop_rank(root: int, child: int, sig: int, grace_s: float, *, reaped: dict[int, int]) -> None:
    """The rank (`child`, unreaped, so its pid is its own) gets `sig` and SIGCONT, and
    `grace_s` to exit. If it does, what it left gets SIGTERM and the rest of the grace;
    if not, everything below `root` gets SIGKILL."""
    deadline = time.monotonic() + grace_s
    signal_all([child], sig)
    signal_all([child], signal.SIGCONT)
    while child not in reaped and time.monotonic() < deadline:
        time.sleep(0.02)
        reaped.update(reap())
    if child in reaped:
        if descendants(root):
            stop_tree(root, max(0.0, deadline - time.monotonic()), reaped=reaped)
        return
    kill_tree(root, reaped=reaped)


# --- the guard ---------------------------------------------------------------------------


def _child_setup(guard_pid: int) -> None:
    """In the rank, before exec: die with the guard; the guard may have died already."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != guard_pid:
        os._exit(1)


def _report(fd: int, message: str) -> None:
    os.write(fd, (message.replace("\n", " ") + "\n").encode(errors="replace"))
    os.close(fd)


def _say(text: str) -> None:
    print(f"launcher guard: {text}", file=sys.stderr, flush=True)


def _exit_like(status: int | None) -> NoReturn:
    """Exit as the rank did: its code, or death by its signal (without a core file)."""
    sys.stdout.flush()
    sys.stderr.flush()
    code = 137 if status is None else os.waitstatus_to_exitcode(status)
    if code >= 0:
        os._exit(code)
    sig = -code
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        signal.set_wakeup_fd(-1)
        signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
    except (OSError, ValueError):
        pass
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)


def signal_number(name: str) -> int:
    """A signal's name ("TERM", "SIGUSR2") or number ("15") -> its number."""
    if name.isdigit():
        return int(name)
    return int(signal.Signals["SIG" + name.upper().removeprefix("SIG")])


def run_guard(
    grace_s: float, lifeline: int, report: int, argv: list[str], stop_sig: int = signal.SIGTERM
) -> NoReturn:
    """Start argv below this process, watch it and the lifeline, stop the rank with
    `stop_sig` (SIGKILL after the grace), exit alike."""
    me = os.getpid()
    set_subreaper()
    stop: list[str] = []
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _f: stop.append(signal.Signals(signum).name))
    signal.signal(signal.SIGCHLD, lambda _s, _f: None)  # wakes select through wake_r
    try:
        child = subprocess.Popen(
            argv, start_new_session=True, preexec_fn=lambda: _child_setup(me), close_fds=True
        )
    except (OSError, ValueError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        reason = f"{detail}: {argv[0] if argv else ''}"
        _say(f"cannot start the rank: {reason}")  # into the rank's log: `status` shows it
        _report(report, "error " + json.dumps(reason))
        os._exit(127)
    # The rank is not reaped yet, so its /proc entry is there even if it exited already.
    _report(report, "started " + json.dumps(identity(child.pid)))
    reaped: dict[int, int] = {}
    parent_gone = False
    while child.pid not in reaped and not stop and not parent_gone:
        ready, _, _ = select.select([lifeline, wake_r], [], [], 1.0)
        if lifeline in ready and os.read(lifeline, 4096) == b"":
            parent_gone = True
        if wake_r in ready:
            while True:
                try:
                    if not os.read(wake_r, 4096):
                        break
                except BlockingIOError:
                    break
        reaped.update(reap())
    if child.pid not in reaped:
        why = "the supervisor is gone" if parent_gone else f"got {stop[0]}"
        _say(
            f"{why}: sending {signal.Signals(stop_sig).name} to the rank (pid {child.pid}); "
            f"SIGKILL to it and every process below it after {grace_s:g} s"
        )
        stop_rank(me, child.pid, stop_sig, grace_s, reaped=reaped)
    else:
        left = descendants(me)
        if left:
            _say(
                f"the rank exited; stopping {len(left)} process(es) it left running "
                f"(pids {' '.join(map(str, left))})"
            )
            stop_tree(me, grace_s, reaped=reaped)
    _exit_like(reaped.get(child.pid))


def main(args: list[str]) -> NoReturn:
    """`guard.py GRACE_S LIFELINE_FD REPORT_FD [STOP_SIGNAL] -- ARGV...` (only the supervisor
    calls it; STOP_SIGNAL is a name like TERM or USR2, TERM when absent)."""
    sep = args.index("--")
    grace_s, lifeline, report = float(args[0]), int(args[1]), int(args[2])
    stop_sig = signal_number(args[3]) if sep > 3 else signal.SIGTERM
    run_guard(grace_s, lifeline, report, args[sep + 1 :], stop_sig)


if __name__ == "__main__":
    main(sys.argv[1:])
