"""Reading files that came from outside without being fooled by what they are.

A FIFO, device or socket planted where a log, record, manifest or data file should be must
not block a command or stream to the terminal forever: only a regular file is opened.
Standard library only; every layer may use it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words, for messages."""
    kinds = (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symlink"),
    )
    return next((text for test, text in kinds if test(mode)), "not a regular file")


class NotRegular(OSError):
    """open_regular found something other than a regular file (and did not read it).
    str() is the whole message with the path; `strerror` is the reason alone."""

    def __init__(self, path: str | os.PathLike[str], why: str) -> None:
        super().__init__(f"{os.fspath(path)} {why}")
        self.strerror = why
        self.filename = os.fspath(path)


def open_regular(path: str | os.PathLike[str], *, follow_symlinks: bool = False) -> BinaryIO:
    """Open a regular file for reading; NotRegular for anything else (and for a symlink,
    unless follow_symlinks).

    O_NONBLOCK: if a FIFO replaced the file since the caller looked, the open returns at once
    instead of waiting for a writer; fstat then refuses it before any read.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_symlinks:  # O_NOFOLLOW met a symlink
            raise NotRegular(path, "is a symlink") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = file_kind(mode)
            raise NotRegular(path, f"is {kind}, not a regular file")
        os.set_blocking(fd, True)
        return open(fd, "rb", closefd=True)
    except BaseException:
        os.close(fd)
        raise


def human_size(count: float) -> str:
    """A byte count for people: '512 bytes', '1016.0 KiB', '1.2 GiB' (one formatter for the
    build summary, data fetches and reports, checkpoints)."""
    if count < 1024:
        return f"{count:.0f} bytes"
    value, unit = count / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in `folder` durable (the directory entry, not just the file)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str | Path,
    write: Callable[[BinaryIO], object],
    *,
    prefix: str | None = None,
    suffix: str = ".tmp",
) -> None:
    """Write through `write(fh)` into a temp file in the same folder, fsync, rename, fsync
    the folder: a reader (or a crash) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix or f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
