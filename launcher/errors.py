"""One family of user-facing errors, so the CLI can print one line and pick the exit code.

Every message says what was wrong, where (file and dotted key), and what is allowed.
"""

from __future__ import annotations


class LauncherError(Exception):
    """Base class: a problem the user can fix; printed as one line, never as a traceback."""

    exit_code = 1


class ConfigError(LauncherError):
    """Bad configuration: file, dotted key, what was expected, and the closest valid key."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        key: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.file = file
        self.key = key
        self.hint = hint
        where = file or "<config>"
        if key:
            where = f"{where}: {key}"
        text = f"{where}: {message}"
        if hint:
            text = f"{text} ({hint})"
        super().__init__(" ".join(text.split()))


class BackendError(LauncherError):
    """The backend (Slurm, Docker, local processes) refused or failed an action."""

    exit_code = 1


class RunNotFound(LauncherError):
    """A run id or name given on the command line matches no run directory."""

    exit_code = 2


class DamagedRecord(RunNotFound):
    """A run folder whose record.json cannot be used (unreadable, not JSON, wrong shape).

    A kind of RunNotFound: callers that want only usable runs (sweeps) skip it as they skip a
    missing record, while `launcher status` names it and goes on with the other runs.
    """

    def __init__(self, path: str, why: str) -> None:
        self.path = path
        self.why = why
        super().__init__(f"{path}: damaged run record: {why}")


class CheckpointError(LauncherError):
    """A checkpoint could not be written (disk full, quota); the previous one is kept."""

    exit_code = 1


class DataError(LauncherError):
    """Fetching or verifying data failed (checksum mismatch, quota page, corrupt file)."""

    exit_code = 1
