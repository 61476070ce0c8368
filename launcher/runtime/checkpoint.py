"""Checkpoint files: written atomically, newest complete one found on resume, last K kept.

A checkpoint is one file `step-<step>.pt` in `$LAUNCHER_RUN_DIR/checkpoints/`. It is written
to a hidden temp file in the same folder, fsynced, renamed into place and the folder fsynced:
a crash or `kill -9` at any moment leaves either the old set of files or the new one, never
a half-written `step-*.pt`. Leftover temp files of a killed writer are removed on the next save.
A full disk (or quota) is one clear CheckpointError, with the previous checkpoint kept.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from launcher.errors import CheckpointError
from launcher.files import atomic_write, human_size

PATTERN = re.compile(r"step-(\d+)\.pt")
TMP_PREFIX = ".step-"
TMP_SUFFIX = ".tmp"
FORMAT = 1
NO_ROOM = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (file system or process file size limit)",
}


def path_for(folder: Path, step: int) -> Path:
    return Path(folder) / f"step-{step:09d}.pt"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the finished checkpoints, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = PATTERN.fullmatch(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete temp files left by a writer that was killed (only one writer per run)."""
    removed = []
    for path in Path(folder).glob(f"{TMP_PREFIX}*{TMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def save(folder: Path, step: int, state: dict[str, Any], *, keep_last: int) -> Path:
    """Write `state` as the checkpoint of `step` atomically, then prune to the newest K."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)
    final = path_for(folder, step)
    try:
        atomic_write(
            final,
            lambda fh: torch.save({"format": FORMAT, **state}, fh),
            prefix=f"{TMP_PREFIX}{step:09d}.",
            suffix=TMP_SUFFIX,
        )
    except (OSError, RuntimeError) as exc:
        code = _no_room_errno(exc)
        if code is None:
            raise
        raise CheckpointError(
            f"checkpoint not written: {NO_ROOM[code]} at {final} "
            f"({human_size(shutil.disk_usage(folder).free)} free); {_kept(folder)}"
        ) from exc
    prune(folder, keep_last)
    return final


def _no_room_errno(exc: BaseException) -> int | None:
    """The errno of a full disk behind `exc`: torch.save reports the OSError of the failed
    write as a RuntimeError ("unexpected pos ...") whose context is that OSError."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in NO_ROOM:
            return current.errno
        current = current.__cause__ or current.__context__
    return None


def _kept(folder: Path) -> str:
    done = list_checkpoints(folder)
    if not done:
        return "there is no earlier checkpoint"
    return f"the previous checkpoint is kept ({done[-1][1].name})"


def prune(folder: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints."""
    done = list_checkpoints(folder)
    doomed = [path for _, path in done[: max(0, len(done) - keep_last)]]
    for path in doomed:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return doomed


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read one checkpoint. weights_only: a checkpoint file can never run code on load."""
    return torch.load(path, map_location=map_location, weights_only=True)


def load_latest(
    folder: Path,
    map_location: str | torch.device = "cpu",
    logger: logging.Logger | None = None,
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads, skipping (and reporting) any that do not."""
    for _, path in reversed(list_checkpoints(folder)):
        try:
            return path, load(path, map_location)
        except Exception as exc:  # a torn or corrupt file: fall back to the one before
            if logger is not None:
                logger.warning("skipping unreadable checkpoint %s: %s", path, exc)
    return None
