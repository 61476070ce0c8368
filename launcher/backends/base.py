"""The backend interface: `plan()` is pure data, `submit()` is the only side effect.

`--dry-run` prints `Plan.render()` and stops, so planning must never contact a daemon
or a cluster, and must never mutate the spec it is given. Callers (the CLI, sweeps) use only
what this Protocol declares and never test a backend's name; a backend that can run many
points as one queued array offers the optional `array` capability.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypedDict, TypeVar

# Re-exported: backends build their preflight results from it.
from launcher.preflight import Check
from launcher.spec import JobSpec

if TYPE_CHECKING:
    from launcher.hardware import Hardware

P = TypeVar("P")


class ProcEntry(TypedDict):
    """One rank the supervisor starts (plan.json): what `--dry-run` shows, verbatim."""

    rank: int
    argv: list[str]
    env: dict[str, str]
    cwd: str
    log: str


class SupervisorPayload(TypedDict, total=False):
    """What the local supervisor runs (also inside a Docker container): plan.json."""

    procs: list[ProcEntry]
    # The signal every rank gets first on cancel, Ctrl-C, the time limit or another rank's
    # failure (`entrypoint.stop_signal` resolved: "TERM", "USR1", ...), SIGKILL after the grace.
    stop_signal: str
    stop_grace_s: float
    # resources.time_min in seconds; None: no limit (time_min not set in the config).
    time_limit_s: float | None
    container: dict[str, Any]


@dataclass(frozen=True)
class SlurmPayload:
    """What the Slurm backend submits: submitit's parameters, folder and the exact script."""

    params: dict[str, Any]
    folder: str
    env: dict[str, str]
    # The srun step the batch shell starts (scripts, built-in trainer); None for callables.
    step: list[str] | None
    script: str


@dataclass(frozen=True)
class Plan(Generic[P]):
    """What a backend would start: printed by --dry-run, executed by submit()."""

    backend: str
    spec: JobSpec
    run_id: str
    run_dir: Path
    # Human-readable, complete description (commands, env, sbatch script, container spec).
    text: str
    # Backend-specific pure data that submit() executes.
    payload: P
    config_file: str | None = None

    def render(self) -> str:
        return self.text


class Backend(Protocol):
    """One per package or module in launcher/backends/, exported as `BACKEND`."""

    name: str
    # Set when the backend can queue many sweep points as one array (Slurm); else None.
    array: ArrayBackend | None

    def plan(
        self,
        spec: JobSpec,
        *,
        run_id: str,
        run_dir: Path,
        config_file: str | None,
        hardware: Hardware | None = None,
    ) -> Plan[Any]:
        """Pure: build what would be started. No processes, no daemons, no cluster calls.
        `hardware`: this machine's, detected once by a caller planning many points."""
        ...

    def submit(self, plan: Plan[Any], *, foreground: bool = True, echo: bool = True) -> int:
        """Start the plan; writes the run dir and record. Returns a process exit code.
        `echo`: copy the ranks' output to this terminal (where the backend can)."""
        ...

    def preflight(self, plan: Plan[Any], *, points: int = 1) -> list[Check]:
        """Quick checks before submit() (`launcher.preflight.job_checks` plus this backend's
        own: the cluster's policy, the engine, the image), a few calls at most whatever
        `points` is (how many sweep points this plan stands for). Writes nothing."""
        ...

    def refresh(self, run_dirs: list[Path]) -> None:
        """Bring the records of these runs up to date with ONE batched backend query."""
        ...

    def cancel(self, run_dir: Path) -> None:
        """Stop the run; its record ends CANCELLED."""
        ...

    def log_files(self, run_dir: Path) -> dict[int, Path]:
        """rank -> log file of that rank."""
        ...

    def default_parallelism(self, spec: JobSpec) -> int | None:
        """How many sweep points to run at once when the sweep does not say (None: no limit,
        the queue decides)."""
        ...

    def needs_hardware(self) -> bool:
        """True when plan() looks at this machine's hardware (so a caller planning many
        points should detect it once and pass it in)."""
        ...


class ArrayBackend(Protocol):
    """Optional: many sweep points as one queued array per chunk (Slurm job arrays).

    The sweep hands over points as `{"id", "index", "run_id", "overrides"}` plus the base
    raw config: each array task builds, checks and plans its own point where it runs, so
    submitting writes no run directory per point. Its files go under the sweep folder.
    """

    def check_points(
        self,
        specs: Sequence[JobSpec],
        config_file: str | None,
        describe: Callable[[int], str] | None = None,
    ) -> dict[str, Any]:
        """Pure: every point can share one array script; returns its parameters.
        `describe(i)` names point i in the error (index and swept values)."""
        ...

    def max_array_size(self, spec: JobSpec, *, ask: bool = True) -> int:
        """Points per array: the configured limit, else the cluster's (`ask=False`: the
        scheduler's default, with no query, for a dry-run)."""
        ...

    def render(
        self,
        sweep_dir: Path,
        ids: Sequence[str],
        *,
        spec: JobSpec,
        params: dict[str, Any],
        parallelism: int | None,
    ) -> str:
        """Pure: the dry-run text for queueing these points: how they split into arrays,
        and each array's script as submit() would write it."""
        ...

    def render_task(self, plan: Plan[Any]) -> str:
        """Pure: what each array task runs for its point, shown with one point's plan."""
        ...

    def submit(
        self,
        sweep_dir: Path,
        points: Sequence[Mapping[str, Any]],
        *,
        base: dict[str, Any],
        config_file: str | None,
        spec: JobSpec,
        params: dict[str, Any],
        parallelism: int | None,
        on_submitted: Callable[[str, list[str]], None],
        hold: bool = False,
        test_only: bool = False,
    ) -> list[str]:
        """Queue the points, one array per chunk of at most max_array_size(spec), with at most
        `parallelism` tasks running (None: no limit). `on_submitted(array_id, point_ids)` runs
        after each array (task i is point_ids[i], job id `array_id_i`). `hold`: queued held,
        `test_only`: checked by the scheduler, nothing created (benchmarks). Returns the ids."""
        ...

    def task_states(self, task_ids: list[str]) -> dict[str, str]:
        """Launcher states of array tasks that have no run record yet (one query)."""
        ...
