"""The process supervisor: runs on this machine, or as the main process of a Docker container.

It starts every rank under its own guard (`guard.py`), watches them, and stops all ranks
promptly when one fails, when it is cancelled (`launcher cancel`, Ctrl-C), when the time
limit (`resources.time_min`, only when the config sets it) is reached, or (in a container run
in the foreground) when the launcher that started it goes away. A stop gives every rank the
job's stop signal first (`stop_signal` in the plan: `entrypoint.stop_signal` resolved), so a
script can save, and SIGKILL after `stop_grace_s`. The guards stop everything below them when
the supervisor dies, even by SIGKILL, so no rank, DataLoader worker or process a rank started
is left behind. The final state comes from the ranks' exits: a stop that arrives after every
rank exited 0 is COMPLETED; a rank that dies by a signal fails the run, also when that
happens at interpreter exit after its work was done.

It imports launcher and the standard library, never the job's code: inside a container it
runs with the image's own python, and only the ranks run `entrypoint.python`, which needs no
launcher.
`python -m launcher.backends.local RUN_DIR` runs it detached (`--detach`) or in a container;
the plan it runs is `plan.json` in the run dir.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from launcher import config, runs
from launcher.backends.base import Plan, ProcEntry, SupervisorPayload
from launcher.backends.local import guard
from launcher.entrypoint import dist_env, job_env, rank_argv, stop_grace_s, stop_signal
from launcher.errors import BackendError, ConfigError
from launcher.hardware import LoaderPicks, detect_cpus
from launcher.ports import free_port
from launcher.spec import JobSpec

PLAN_FILE = "plan.json"
PORT_AT_START = "<free port picked at start>"
POLL_S = 0.05
# How often the ranks' process states are read (a stopped rank is reported).
STATE_CHECK_S = 1.0
# A guard gets this long after the ranks' grace period before it is SIGKILLed.
GUARD_MARGIN_S = 5.0
REPORT_TIMEOUT_S = 60.0
GUARD = Path(guard.__file__).resolve()
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Signals a crashing process dies by (not a kill from outside).
CRASH_SIGNALS = (signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE)
# How a crash announces itself in a log: C++ std::terminate, CPython, glibc, the shell.
CRASH_MARKERS = (
    "terminate called",
    "Fatal Python error",
    "Segmentation fault",
    "double free",
    "corrupted",
    "core dumped",
)


def alive(pid: int) -> bool:
    """True if pid runs and is not a zombie (PID 1 here may reap late). Only for records
    an older launcher wrote, which hold bare pids: newer ones hold identities."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return guard.proc_state(pid) not in ("Z", "X")


def run_marker(payload: dict[str, Any], run_dir: Path) -> str:
    """The environment entry every process of the run inherits: it names what is left of a
    run after its supervisor and a guard were both SIGKILLed. As the plan spells the run dir
    (a relative runs_dir stays relative), not as a later command line does."""
    procs = payload.get("procs") or [{}]
    return f"LAUNCHER_RUN_DIR={procs[0].get('env', {}).get('LAUNCHER_RUN_DIR', run_dir)}"


def rank_logs(run_dir: Path) -> dict[int, Path]:
    """Every rank's log path (local and Docker alike), also before the rank has written."""
    world = int(runs.read_record(run_dir).get("world_size") or 0)
    return {rank: run_dir / "logs" / f"rank{rank}.log" for rank in range(world)}


def points_at_once(spec: JobSpec) -> int:
    """Sweep points to run at once on this machine: as many as its CPUs hold, at the
    point's processes each (the local and Docker backends' default parallelism)."""
    cpus, _ = detect_cpus(os.environ)
    return max(1, int(cpus) // spec.resources.tasks_per_node)


def require_one_node(spec: JobSpec, config_file: str | None, backend: str, hint: str) -> None:
    """Backends on this machine run one node; say which key to change otherwise."""
    if spec.resources.nodes != 1:
        raise ConfigError(
            f"the {backend} backend runs on this machine, got nodes={spec.resources.nodes} "
            f"({hint})",
            file=config_file,
            key="resources.nodes",
        )


def stop_settings(spec: JobSpec) -> SupervisorPayload:
    """The plan's stop signal, grace and time limit for the local and Docker backends. The
    limit applies only when the config sets resources.time_min (null: none here)."""
    minutes = spec.resources.time_min
    return {
        "stop_signal": stop_signal(spec),  # no Slurm variables here: TERM for Lightning too
        "stop_grace_s": stop_grace_s(spec, spec.local.stop_grace_s),
        "time_limit_s": None if minutes is None else float(minutes * 60),
    }


def stop_lines(payload: SupervisorPayload) -> list[str]:
    """What the dry-run says about stopping: the time limit and the stop signal."""
    limit = payload.get("time_limit_s")
    grace = payload.get("stop_grace_s", 5.0)
    sig = payload.get("stop_signal", "TERM")
    shown = "none (resources.time_min not set)" if limit is None else f"{limit / 60:g} min"
    return [
        f"time limit: {shown}",
        f"stop:       SIG{sig} to every rank on cancel, Ctrl-C, the time limit or a failed "
        f"rank; SIGKILL {grace:g} s later (entrypoint.stop_signal / stop_grace_s)",
    ]


def process_table(
    spec: JobSpec,
    *,
    run_dir: Path,
    picks: LoaderPicks,
    argv: list[str],
    cwd: str,
    master_addr: str,
    master_port: int | str,
    config_file: str | None = None,
) -> list[ProcEntry]:
    """One entry per rank on this machine (or in one container): argv, env, cwd, log file."""
    nprocs = spec.resources.tasks_per_node
    base_env = job_env(spec, run_dir=run_dir, picks=picks)
    procs: list[ProcEntry] = []
    for rank in range(nprocs):
        env = dict(base_env)
        env.update(
            dist_env(
                rank=rank,
                local_rank=rank,
                world_size=nprocs,
                local_world_size=nprocs,
                master_addr=master_addr,
                master_port=master_port,
            )
        )
        log = str(run_dir / "logs" / f"rank{rank}.log")
        procs.append({"rank": rank, "argv": argv, "env": env, "cwd": cwd, "log": log})
    _refuse_nul(spec, procs, config_file)
    return procs


def _refuse_nul(spec: JobSpec, procs: list[ProcEntry], config_file: str | None) -> None:
    """No argument, variable or folder can carry a NUL byte (exec would refuse it after the
    run was recorded): say which key holds one before anything is written."""
    ep = spec.entrypoint

    def fail(key: str) -> NoReturn:
        raise ConfigError(
            "holds a NUL byte (\\0), which no process argument, variable or path can carry",
            file=config_file,
            key=key,
        )

    proc = procs[0]
    for arg in proc["argv"]:
        if "\0" in arg:
            if arg in ep.args:
                fail(f"entrypoint.args[{ep.args.index(arg)}]")
            fail(
                {ep.script: "entrypoint.script", ep.python: "entrypoint.python"}.get(
                    arg, "entrypoint"
                )
            )
    for name, value in proc["env"].items():
        if "\0" in name or "\0" in value:
            if name in spec.env:
                fail(f"env.{name}")
            fail(
                {"LAUNCHER_JOB_NAME": "name"}.get(
                    name, "runs_dir" if "LAUNCHER_" in name else "env"
                )
            )
    if "\0" in proc["cwd"]:
        fail("workdir")


def prepare_run_dir(plan: Plan, backend: str = "local") -> None:
    """Write config, plan and the PENDING record: what `status` and the supervisor read.

    The record names the submitting process (its identity), so `status` can tell a
    submission in progress from one whose launcher died before anything started."""
    run_dir = plan.run_dir
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    runs.atomic_write_text(run_dir / runs.CONFIG, config.dump(plan.spec))
    payload = dict(plan.payload)
    procs: list[ProcEntry] = payload["procs"]
    if any(p["env"]["MASTER_PORT"] == PORT_AT_START for p in procs):
        # The docker backend shares the host network here, so a free host port works there too.
        port = str(free_port(procs[0]["env"]["MASTER_ADDR"]))
        payload["procs"] = [{**p, "env": {**p["env"], "MASTER_PORT": port}} for p in procs]
    runs.atomic_write_json(run_dir / PLAN_FILE, payload)
    record = runs.new_record(
        run_id=plan.run_id,
        name=plan.spec.name,
        backend=backend,
        world_size=len(procs),
        config_file=plan.config_file,
    )
    runs.write_record(run_dir, {**record, "submitter": guard.identity(os.getpid())})


class _Echo:
    """Copies new complete lines of every rank log to stdout, prefixed with the rank."""

    def __init__(self, logs: dict[int, Path], enabled: bool) -> None:
        self.logs = logs
        self.enabled = enabled
        self.offsets = dict.fromkeys(logs, 0)
        self.partial = dict.fromkeys(logs, b"")

    def pump(self, final: bool = False) -> None:
        if not self.enabled:
            return
        for rank, path in self.logs.items():
            try:
                with open(path, "rb") as fh:
                    fh.seek(self.offsets[rank])
                    data = fh.read()
            except FileNotFoundError:
                continue
            self.offsets[rank] += len(data)
            buf = self.partial[rank] + data
            *lines, rest = buf.split(b"\n")
            if final and rest:
                lines, rest = [*lines, rest], b""
            self.partial[rank] = rest
            for line in lines:
                text = runs.printable(line.decode(errors="replace"), keep_lines=True)
                sys.stdout.write(f"[rank {rank}] {text}\n")
        sys.stdout.flush()


@dataclass
class _Rank:
    """One started rank: its guard (our child) and the rank's own identity."""

    rank: int
    guard: subprocess.Popen
    ident: dict[str, Any]
    log: Path
    code: int | None = None
    ended: float | None = None  # time.time() when its exit was seen
    stopped_by_launcher: bool = False  # still running when the supervisor stopped every rank


@dataclass(frozen=True)
class _Stop:
    """Why the supervisor stopped ranks that were still running."""

    state: str
    error: str
    exit_code: int


class _StartError(Exception):
    pass


def supervise(
    run_dir: Path, *, echo: bool = True, wait_stdin: bool = False, lifeline_stdin: bool = False
) -> int:
    """Start every rank, watch them, stop all of them at the first failure, on
    SIGINT/SIGTERM/SIGHUP, at the time limit, or (`lifeline_stdin`) when stdin closes.

    `wait_stdin`: start only once stdin is closed, i.e. once the launcher that spawned this
    detached supervisor has recorded it (so the two never write the record at once)."""
    if wait_stdin:
        _read_until_eof(0)
    stops: list[str] = []

    def on_signal(signum: int, _frame: Any) -> None:
        stops.append(signal.Signals(signum).name)

    old = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    lifeline_r, lifeline_w = os.pipe()  # the guards read; EOF when this process is gone
    sup = _Supervisor(run_dir, stops, lifeline_r, echo, lifeline_stdin)
    try:
        return sup.run()
    finally:
        sup.close_lifeline()
        os.close(lifeline_w)
        for sig, handler in old.items():
            signal.signal(sig, handler)


class _Supervisor:
    def __init__(
        self, run_dir: Path, stops: list[str], lifeline_r: int, echo: bool, lifeline_stdin: bool
    ) -> None:
        self.run_dir = run_dir
        self.stops = stops
        self.lifeline_r = lifeline_r
        self.lifeline_stdin = lifeline_stdin
        self.payload = json.loads((run_dir / PLAN_FILE).read_text())
        self.grace = float(self.payload.get("stop_grace_s", 5.0))
        self.stop_signal = str(self.payload.get("stop_signal") or "TERM")
        self.limit_s = self.payload.get("time_limit_s")
        self.procs: list[ProcEntry] = self.payload["procs"]
        self.logs = {p["rank"]: Path(p["log"]) for p in self.procs}
        self.echo = _Echo(self.logs, echo)
        self.ranks: dict[int, _Rank] = {}
        self.stopped: dict[int, str] = {}  # rank -> what was seen when it was found stopped
        self.oom_at_start = _oom_kills()

    def close_lifeline(self) -> None:
        """Once every guard holds its copy; closed exactly once (fd numbers are reused)."""
        if self.lifeline_r >= 0:
            os.close(self.lifeline_r)
            self.lifeline_r = -1

    def run(self) -> int:
        record = runs.read_record(self.run_dir)
        if record["state"] in runs.FINAL_STATES:
            # Cancelled (or failed) between the submission and this start: start nothing.
            print(
                f"launcher: run {record['run_id']} already ended ({record['state']}) "
                "before its supervisor started; nothing was started",
                file=sys.stderr,
            )
            return 130 if record["state"] == "CANCELLED" else 1
        info = dict(record.get("backend_info") or {})
        info.update(supervisor=guard.identity(os.getpid()), supervisor_pid=os.getpid())
        runs.update_record(self.run_dir, backend_info=info)
        reaper = guard.set_subreaper()
        try:
            self._start_all()
            return self._watch()
        finally:
            if reaper:
                guard.set_subreaper(False)

    def _start_all(self) -> None:
        for proc in self.procs:
            if self.stops:
                break
            try:
                self.ranks[proc["rank"]] = self._start(proc)
            except _StartError as exc:
                self._stop_all()
                error = f"cannot start rank {proc['rank']}: {exc}"
                runs.update_record(
                    self.run_dir,
                    state="FAILED",
                    ended_at=runs.now(),
                    failed_rank=proc["rank"],
                    error=error,
                )
                raise BackendError(error) from None
        self.close_lifeline()  # only the guards hold it now
        info = dict(runs.read_record(self.run_dir).get("backend_info") or {})
        info.update(
            rank_pids={str(r.rank): r.ident["pid"] for r in self.ranks.values()},
            ranks={str(r.rank): r.ident for r in self.ranks.values()},
            guards={str(r.rank): guard.identity(r.guard.pid) for r in self.ranks.values()},
        )
        runs.update_record(self.run_dir, state="RUNNING", started_at=runs.now(), backend_info=info)

    def _start(self, proc: ProcEntry) -> _Rank:
        report_r, report_w = os.pipe()
        argv = [sys.executable, "-I", "-S", str(GUARD)]
        argv += [str(self.grace), str(self.lifeline_r), str(report_w), self.stop_signal]
        argv += ["--", *rank_argv(proc["argv"])]
        try:
            with open(proc["log"], "ab") as log:
                popen = subprocess.Popen(
                    argv,
                    cwd=proc["cwd"],
                    env={**os.environ, **proc["env"]},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    pass_fds=(self.lifeline_r, report_w),
                )
        except OSError as exc:
            os.close(report_r)
            raise _StartError(f"{exc.strerror}: {exc.filename or proc['argv'][0]}") from None
        except ValueError as exc:  # a NUL byte in argv or env; plan() refuses those first
            os.close(report_r)
            raise _StartError(f"{exc} in its arguments or environment") from None
        finally:
            os.close(report_w)
        line = _read_line(report_r, REPORT_TIMEOUT_S)
        os.close(report_r)
        kind, _, rest = line.partition(" ")
        if kind == "started":
            return _Rank(proc["rank"], popen, json.loads(rest), Path(proc["log"]))
        if popen.poll() is None:
            popen.kill()
        popen.wait()
        if kind == "error":
            raise _StartError(json.loads(rest))
        raise _StartError(f"its guard exited with code {popen.returncode} before starting it")

    def _watch(self) -> int:
        started = time.monotonic()
        next_check = started
        failed: int | None = None
        stop: _Stop | None = None
        expected = len(self.procs)
        while True:
            self.echo.pump()
            # Exits first: ranks that ended before a stop was noticed decide the outcome.
            for r in self.ranks.values():
                if r.code is None and (code := r.guard.poll()) is not None:
                    r.code, r.ended = code, time.time()
                    if code != 0 and failed is None:
                        failed = r.rank
            done = len(self.ranks) == expected and all(
                r.code is not None for r in self.ranks.values()
            )
            if done or failed is not None:
                break
            if self.stops:
                stop = _Stop("CANCELLED", f"stopped by {self.stops[0]}", 130)
                break
            if self.lifeline_stdin and _closed(0):
                stop = _Stop(
                    "FAILED",
                    "the launcher that ran this in the foreground went away (killed?); "
                    "all ranks were stopped",
                    1,
                )
                break
            now = time.monotonic()
            if self.limit_s and now - started >= self.limit_s:
                stop = _Stop("FAILED", self._time_limit_error(), 1)
                break
            if now >= next_check:
                self._check_stopped()
                next_check = now + STATE_CHECK_S
            time.sleep(POLL_S)
        if stop is not None:
            self._announce_stop(stop.error.partition(";")[0])
        elif failed is not None:
            self._announce_stop(f"rank {failed} failed")
        self._stop_all()
        self.echo.pump(final=True)
        return self._finish(stop, failed)

    def _finish(self, stop: _Stop | None, failed: int | None) -> int:
        codes = {str(r): self.ranks[r].code for r in sorted(self.ranks)}
        # What launcher/triage.py needs to tell the first failure from its consequences.
        ends = {
            str(r.rank): {
                "code": r.code,
                "ended": r.ended,
                "stopped_by_launcher": r.stopped_by_launcher,
            }
            for r in sorted(self.ranks.values(), key=lambda r: r.rank)
        }
        oom = max(0, _oom_kills() - self.oom_at_start)
        runs.update_record(self.run_dir, rank_ends=ends, oom_kills=oom)
        if stop is not None:
            runs.update_record(
                self.run_dir,
                state=stop.state,
                ended_at=runs.now(),
                exit_codes=codes,
                error=stop.error,
            )
            if stop.state == "CANCELLED":
                print(
                    f"launcher: run cancelled ({self.stops[0]}); all ranks stopped", file=sys.stderr
                )
            else:
                print(f"launcher: run FAILED: {stop.error}", file=sys.stderr)
            return stop.exit_code
        if failed is not None:
            log = self.logs[failed]
            error = f"{self._exit_text(failed)} (log: {log})"
            runs.update_record(
                self.run_dir,
                state="FAILED",
                ended_at=runs.now(),
                exit_codes=codes,
                failed_rank=failed,
                error=error,
            )
            print(
                f"launcher: run FAILED: {error}\n--- last lines of rank {failed} ---\n"
                f"{runs.tail(log, 15)}",
                file=sys.stderr,
            )
            return 1
        runs.update_record(self.run_dir, state="COMPLETED", ended_at=runs.now(), exit_codes=codes)
        return 0

    def _exit_text(self, rank: int) -> str:
        """Why this rank failed, in words: its exit code or signal, and for a crash the
        C++/Python abort line of its log and whether every other rank had exited 0 (a
        crash at interpreter exit, after the work was done, is a failure all the same)."""
        code = self.ranks[rank].code
        text = _exit_text(rank, code)
        if code is None or -code not in CRASH_SIGNALS:
            return text
        line = _crash_line(self.logs[rank])
        if line:
            text += f"; its log says {line!r}"
        others = [r for r in self.ranks.values() if r.rank != rank]
        if others and all(r.code == 0 for r in others):
            text += "; every other rank exited 0"
        return text

    def _announce_stop(self, why: str) -> None:
        running = [r.rank for r in self.ranks.values() if r.code is None]
        if running:
            print(
                f"launcher: {why}: rank(s) {', '.join(map(str, running))} get SIG"
                f"{self.stop_signal} to save and exit, SIGKILL after {self.grace:g} s",
                file=sys.stderr,
                flush=True,
            )

    def _time_limit_error(self) -> str:
        limit = float(self.limit_s)
        text = f"{limit / 60:g} min" if limit % 60 == 0 else f"{limit:g} s"
        error = (
            f"time limit of {text} reached (resources.time_min); every rank got "
            f"SIG{self.stop_signal} and {self.grace:g} s to save, then was stopped"
        )
        if self.stopped:
            error += "; " + "; ".join(self.stopped[r] for r in sorted(self.stopped))
        return error

    def _check_stopped(self) -> None:
        """Say so when a rank is stopped (state T or t): it would otherwise hang silently."""
        changed = False
        for r in self.ranks.values():
            if r.code is not None:
                continue
            state = guard.proc_state(r.ident["pid"]) if guard.same_process(r.ident) else None
            if state in ("T", "t") and r.rank not in self.stopped:
                how = "by a debugger (state t)" if state == "t" else "by a signal (state T)"
                since = dt.datetime.now().strftime("%H:%M:%S")
                self.stopped[r.rank] = (
                    f"rank {r.rank} (pid {r.ident['pid']}) was stopped {how} since {since}"
                )
                print(
                    f"launcher: rank {r.rank} (pid {r.ident['pid']}) is stopped {how}: it makes "
                    "no progress until it gets SIGCONT",
                    file=sys.stderr,
                    flush=True,
                )
                changed = True
            elif state not in ("T", "t") and r.rank in self.stopped:
                del self.stopped[r.rank]
                print(f"launcher: rank {r.rank} runs again", file=sys.stderr, flush=True)
                changed = True
        if changed:
            record = runs.read_record(self.run_dir)
            info = dict(record.get("backend_info") or {})
            info["stopped_ranks"] = {str(r): text for r, text in sorted(self.stopped.items())}
            warning = "; ".join(self.stopped.values()) or None
            runs.update_record(self.run_dir, backend_info=info, warning=warning)

    def _stop_all(self) -> None:
        """SIGTERM every running guard (it sends its rank the stop signal and stops the
        rank's whole tree within the grace period), SIGKILL a guard that outlives that,
        then kill what the run left below us."""
        running = [r for r in self.ranks.values() if r.guard.poll() is None]
        for r in running:
            r.stopped_by_launcher = True
            r.guard.send_signal(signal.SIGTERM)  # our unreaped child: the pid is still its own
        deadline = time.monotonic() + self.grace + GUARD_MARGIN_S
        for r in running:
            try:
                r.guard.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for r in running:
            if r.guard.poll() is None:
                r.guard.kill()  # the rank dies by PDEATHSIG; its children come to us
                r.guard.wait()
        for r in self.ranks.values():
            if r.code is None:
                r.code, r.ended = r.guard.returncode, time.time()
        # Only after a guard was SIGKILLed can anything be left; it carries the run's marker.
        marker = run_marker(self.payload, self.run_dir)
        left = [p for p in guard.descendants(os.getpid()) if guard.environ_has(p, marker)]
        if left:
            guard.signal_all(left, signal.SIGKILL)
            for pid in left:
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass


def _exit_text(rank: int, code: int | None) -> str:
    if code is not None and code < 0:
        name = _signal_name(-code)
        if -code == signal.SIGABRT:
            return f"rank {rank} aborted ({name})"
        if -code in CRASH_SIGNALS:
            return f"rank {rank} crashed ({name})"
        hint = " (the kernel's out-of-memory killer sends SIGKILL)" if -code == 9 else ""
        return f"rank {rank} was killed by {name}{hint}"
    return f"rank {rank} exited with code {code}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _crash_line(log: Path) -> str | None:
    """The last line of the log that says how the process died (std::terminate, a fatal
    Python error, a segfault), if there is one in its last lines."""
    lines = runs.tail(log, 30).splitlines()
    for line in reversed(lines):
        if any(marker in line for marker in CRASH_MARKERS):
            return runs.printable(line.strip())[:200]
    return None


def _oom_kills() -> int:
    """The kernel's count of OOM kills in this process's memory cgroup (v2 memory.events,
    v1 memory.oom_control), 0 when it cannot be read. Inside a container it is the
    container's cgroup, so a memory limit's kill is counted even when the rank's guard
    reports only SIGKILL."""
    try:
        with open("/proc/self/cgroup") as fh:
            entries = [line.rstrip("\n").split(":", 2) for line in fh]
    except OSError:
        return 0
    candidates = []
    for _, controllers, where in (e for e in entries if len(e) == 3):
        if controllers == "":
            candidates.append(Path("/sys/fs/cgroup") / where.lstrip("/") / "memory.events")
        elif "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory")
            candidates.append(base / where.lstrip("/") / "memory.oom_control")
            candidates.append(base / "memory.oom_control")  # a container's own view
    for path in candidates:
        try:
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and value.strip().isdigit():
                    return int(value)
        except OSError:
            continue
    return 0


def _closed(fd: int) -> bool:
    """True once the other end of `fd` is closed (anything written to it is ignored)."""
    ready, _, _ = select.select([fd], [], [], 0)
    if not ready:
        return False
    try:
        return os.read(fd, 4096) == b""
    except OSError:
        return True


def _read_until_eof(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except OSError:
        pass


def _read_line(fd: int, timeout_s: float) -> str:
    """One line from a guard's report pipe; empty if it closed (or took too long)."""
    data = b""
    deadline = time.monotonic() + timeout_s
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").partition("\n")[0]
