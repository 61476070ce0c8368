"""The backend interface: `plan()` is pure data, `submit()` is the only side effect.

`--dry-run` prints `Plan.render()` and stops, so planning must never contact a daemon
or a cluster, and must never mutate the spec it is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from launcher.spec import JobSpec


@dataclass(frozen=True)
class Plan:
    """What a backend would start: printed by --dry-run, executed by submit()."""

    backend: str
    spec: JobSpec
    run_id: str
    run_dir: Path
    # Human-readable, complete description (commands, env, sbatch script, container spec).
    text: str
    # Backend-specific pure data that submit() executes.
    payload: Any = None
    config_file: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def render(self) -> str:
        return self.text


class Backend(Protocol):
    """One per module in launcher/backends/, exported as module-level `BACKEND`."""

    name: str

    def plan(self, spec: JobSpec, *, run_id: str, run_dir: Path, config_file: str | None) -> Plan:
        """Pure: build what would be started. No processes, no daemons, no cluster calls."""
        ...

    def submit(self, plan: Plan, *, foreground: bool = True) -> int:
        """Start the plan; writes the run dir and record. Returns a process exit code."""
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
