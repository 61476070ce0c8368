"""Unpack a zip or tar archive into a new folder without trusting the archive.

Every member is checked before anything is written, then written by this module, one by
one, with O_EXCL|O_NOFOLLOW. tarfile's `filter="data"` is not the guard: it resolves link
targets with os.path.realpath, which gives up on a path longer than PATH_MAX, so a chain of
long-named symlinks lets a link point anywhere (CVE-2025-4517; fixed in CPython 3.11.13,
3.12.11, 3.13.4, but 3.11.7 is still in use). Here link targets are resolved lexically,
against the member's own folder and the archive's own member list, never against the disk;
the data filter still runs on tar members afterwards, as a second opinion.

Refused (the whole archive, before a byte is written):
- member names that are absolute, contain '..', '\\', NUL or control characters, or are
  longer than paths.MAX_PATH_BYTES;
- a symlink whose target is absolute, leaves the folder, or goes through another symlink;
- a hardlink to anything but a regular file earlier in the archive;
- a member under a symlink or under a file; a name given twice (other than a folder);
- devices, FIFOs and other special members;
- more than Limits.members members, more than Limits.bytes unpacked, or more than the
  folder's filesystem has free (zip bombs).
"""

from __future__ import annotations

import contextlib
import lzma
import os
import shutil
import stat
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from launcher.data.paths import MAX_PATH_BYTES, UnsafeName, check_name, safe_parts
from launcher.data.paths import shown as _shown
from launcher.errors import DataError
from launcher.files import file_kind

CHUNK = 1 << 20
# A zip stores a symlink's target as the member's content.
MAX_LINK_BYTES = 4096


@dataclass(frozen=True)
class Limits:
    """Caps against archive bombs: far above real datasets (ImageNet's train tar: 1.28 M
    files, 147 GB), far below what a bomb claims (42.zip: 4.5 PB)."""

    members: int = 10_000_000
    bytes: int = 2 << 40  # 2 TiB
    # A member's path or a link's target, in bytes: far from PATH_MAX, whatever dest is.
    path_bytes: int = MAX_PATH_BYTES


LIMITS = Limits()


class _Refused(Exception):
    """The archive breaks a rule; str() is the reason."""


@dataclass
class _Member:
    name: str  # as the archive spells it, for messages
    kind: str  # "file", "dir", "symlink" or "hardlink"
    ref: Any  # the TarInfo or ZipInfo
    size: int = 0
    mode: int = 0o644
    mtime: float | None = None
    link: str = ""  # a symlink's or hardlink's target, as the archive spells it
    parts: tuple[str, ...] = ()
    target: tuple[str, ...] = ()  # a hardlink's checked target


class _Budget:
    """Counts members and declared bytes while the member list is read, so a bomb stops at
    its first header past the limit instead of after the whole archive."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.members = 0
        self.bytes = 0

    def add(self, size: int) -> None:
        self.members += 1
        self.bytes += max(size, 0)
        if self.members > self.limits.members:
            raise _Refused(f"it has more than {self.limits.members:,} members (the limit)")
        if self.bytes > self.limits.bytes:
            raise _Refused(
                f"it unpacks to more than {self.limits.bytes:,} bytes (the limit; a zip bomb?)"
            )


def extract(archive: Path, dest: Path, label: str, *, limits: Limits = LIMITS) -> None:
    """Unpack a zip or tar(.gz/.bz2/.xz) into dest, a new folder; DataError on any refusal.

    On an error dest may hold part of the archive: the caller unpacks into staging and
    removes it.
    """
    dest.mkdir(parents=True)
    budget = _Budget(limits)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                members = _check(_zip_members(zf, budget), limits)
                _check_space(dest, budget.bytes)
                _unpack(members, dest, lambda m: zf.open(m.ref))
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                members = _check(_tar_members(tf, budget), limits)
                _data_filter_agrees(members, dest)
                _check_space(dest, budget.bytes)
                _unpack(members, dest, lambda m: tf.extractfile(m.ref))
        else:
            raise DataError(
                f"{label}.extract: {archive.name} is not a zip or tar archive "
                "(set extract: false to keep the file as it is)"
            )
    except _Refused as exc:
        raise DataError(f"{label}.extract: {archive.name}: refused: {exc}") from None
    except (
        tarfile.TarError,
        zipfile.BadZipFile,
        EOFError,
        zlib.error,
        lzma.LZMAError,
        OSError,
        RuntimeError,  # zipfile: an encrypted member
        NotImplementedError,  # zipfile: an unknown compression method
    ) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"{label}.extract: cannot unpack {archive.name}: {text[:240]}") from None


# --- reading the member list ----------------------------------------------------------------


def _tar_members(tf: tarfile.TarFile, budget: _Budget) -> list[_Member]:
    out = []
    for info in tf:  # one header at a time: the budget stops a bomb early
        budget.add(info.size if info.isreg() else 0)
        if info.isreg():
            kind = "file"
        elif info.isdir():
            kind = "dir"
        elif info.issym():
            kind = "symlink"
        elif info.islnk():
            kind = "hardlink"
        else:
            if info.isfifo():
                what = "a FIFO"
            elif info.ischr() or info.isblk():
                what = "a device"
            else:
                what = f"of tar type {info.type!r}"
            raise _Refused(
                f"member {_shown(info.name)} is {what}; only files, folders and links unpack"
            )
        out.append(
            _Member(
                info.name,
                kind,
                info,
                size=info.size if kind == "file" else 0,
                mode=info.mode,
                mtime=info.mtime,
                link=info.linkname,
            )
        )
    return out


def _zip_members(zf: zipfile.ZipFile, budget: _Budget) -> list[_Member]:
    out = []
    for info in zf.infolist():
        budget.add(info.file_size)
        mode = info.external_attr >> 16  # Unix mode bits, when a Unix tool made the zip
        fmt = stat.S_IFMT(mode)
        try:
            mtime: float | None = time.mktime((*info.date_time, 0, 0, -1))
        except (OverflowError, ValueError):
            mtime = None
        member = _Member(info.filename, "file", info, size=info.file_size, mtime=mtime)
        if info.filename.endswith("/") or fmt == stat.S_IFDIR:  # is_dir() fails on ""
            member.kind, member.size = "dir", 0
        elif fmt == stat.S_IFLNK:
            if info.file_size > MAX_LINK_BYTES:
                raise _Refused(f"member {_shown(info.filename)} is a symlink with a huge target")
            with zf.open(info) as fh:
                member.link = os.fsdecode(fh.read(MAX_LINK_BYTES + 1))
            member.kind, member.size = "symlink", 0
        elif fmt not in (0, stat.S_IFREG):
            raise _Refused(
                f"member {_shown(info.filename)} is {file_kind(mode)}; "
                "only files, folders and links unpack"
            )
        elif mode:
            member.mode = stat.S_IMODE(mode)
        out.append(member)
    return out


# --- the rules --------------------------------------------------------------------------------


def _check(members: list[_Member], limits: Limits) -> list[_Member]:
    """Every rule that keeps writes, and links, inside the folder; _Refused on the first break.

    Returns the members to write: all of them but the folder itself ('./', as `tar -C dir .`
    stores it).
    """
    members = [m for m in members if not (m.kind == "dir" and _is_top(m.name))]
    for m in members:
        try:
            m.parts = safe_parts(m.name, max_bytes=limits.path_bytes)
        except UnsafeName as exc:
            raise _Refused(f"member {_shown(m.name)}: {exc}") from None
    symlinks = {m.parts for m in members if m.kind == "symlink"}
    seen: dict[tuple[str, ...], str] = {}  # parts -> "dir", "file" or "symlink"
    for m in members:
        what = f"member {_shown(m.name)}"
        for i in range(1, len(m.parts)):
            prefix = m.parts[:i]
            if prefix in symlinks:
                raise _Refused(f"{what} lies under the symlink {_shown('/'.join(prefix))}")
            if seen.setdefault(prefix, "dir") != "dir":
                raise _Refused(f"{what} lies under the file {_shown('/'.join(prefix))}")
        if m.parts in seen and (seen[m.parts], m.kind) != ("dir", "dir"):
            raise _Refused(f"{what} clashes with an earlier member of the same name")
        if m.kind == "symlink":
            _check_symlink(m, symlinks, limits.path_bytes)
        elif m.kind == "hardlink":
            try:
                m.target = safe_parts(m.link, max_bytes=limits.path_bytes)
            except UnsafeName as exc:
                raise _Refused(f"{what} is a hardlink to {_shown(m.link)}: {exc}") from None
            if seen.get(m.target) != "file":
                raise _Refused(
                    f"{what} is a hardlink to {_shown(m.link)}, which is not a file "
                    "earlier in the archive"
                )
        seen[m.parts] = "file" if m.kind == "hardlink" else m.kind
    return members


def _is_top(name: str) -> bool:
    return not name.startswith("/") and all(p in ("", ".") for p in name.split("/"))


def _check_symlink(m: _Member, symlinks: set[tuple[str, ...]], max_bytes: int) -> None:
    """The target, walked from the link's own folder, stays inside and crosses no symlink.

    Lexical walking is exact here: the folder starts empty, and every component that a later
    '..' or name steps out of is a real folder of this archive, never a symlink.
    """
    text = m.link
    what = f"member {_shown(m.name)} is a symlink to {_shown(text)}"
    if not text:
        raise _Refused(f"member {_shown(m.name)} is a symlink with an empty target")
    if text.startswith("/"):
        raise _Refused(f"{what}, an absolute path")
    stack = list(m.parts[:-1])
    steps = [c for c in text.split("/") if c not in ("", ".")]
    for i, step in enumerate(steps):
        if step == "..":
            if not stack:
                raise _Refused(f"{what}, outside the folder")
            stack.pop()
            continue
        try:
            check_name(step)
        except UnsafeName as exc:
            raise _Refused(f"{what}: {exc}") from None
        stack.append(step)
        if i < len(steps) - 1 and tuple(stack) in symlinks:
            raise _Refused(f"{what}, through the symlink {_shown('/'.join(stack))}")
    if len(os.fsencode(text)) > max_bytes:  # every step encoded above, so this cannot fail
        raise _Refused(f"{what}, longer than {max_bytes} bytes")


def _data_filter_agrees(members: list[_Member], dest: Path) -> None:
    """tarfile's own data filter, where this Python has it: a second layer, not the guard."""
    data_filter = getattr(tarfile, "data_filter", None)
    if data_filter is None:  # pragma: no cover - Python before 3.11.4
        return
    for m in members:
        try:
            data_filter(m.ref, str(dest))
        except tarfile.FilterError as exc:
            raise _Refused(f"member {_shown(m.name)}: {exc} (tarfile's data filter)") from None


def _check_space(dest: Path, total: int) -> None:
    free = shutil.disk_usage(dest).free
    if total > free:
        raise _Refused(f"it unpacks to {total:,} bytes; {dest} has {free:,} bytes free")


# --- writing ----------------------------------------------------------------------------------


def _unpack(
    members: list[_Member], dest: Path, open_member: Callable[[_Member], IO[bytes] | None]
) -> None:
    for m in members:
        path = dest.joinpath(*m.parts)
        _make_dirs(dest, m.parts if m.kind == "dir" else m.parts[:-1])
        if m.kind == "symlink":
            os.symlink(m.link, path)
        elif m.kind == "hardlink":
            source = dest.joinpath(*m.target)
            try:
                os.link(source, path, follow_symlinks=False)
            except OSError:  # a filesystem without hardlinks: a copy reads the same
                shutil.copyfile(source, path, follow_symlinks=False)
        elif m.kind == "file":
            src = open_member(m)
            if src is None:  # pragma: no cover - tarfile gives a reader for every file
                raise _Refused(f"member {_shown(m.name)} has no data")
            _write_file(path, src, m)


def _make_dirs(dest: Path, parts: tuple[str, ...]) -> None:
    current = dest
    for part in parts:
        current = current / part
        try:
            os.mkdir(current)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(current).st_mode):  # pragma: no cover - _check
                raise _Refused(f"{current} is in the way") from None


def _write_file(path: Path, src: IO[bytes], m: _Member) -> None:
    """O_EXCL|O_NOFOLLOW: never through a link, never over something already there."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    written = 0
    with open(fd, "wb") as out, src:
        while block := src.read(CHUNK):
            written += len(block)
            if written > m.size:  # the header lied about the size
                raise _Refused(f"member {_shown(m.name)} holds more than its {m.size:,} bytes")
            out.write(block)
    # The data filter's modes: no setuid/setgid/sticky, no group/other write, owner rw.
    os.chmod(path, (m.mode & 0o755) | 0o600)
    if m.mtime is not None:
        with contextlib.suppress(OverflowError, ValueError):  # a date no filesystem holds
            os.utime(path, (m.mtime, m.mtime))
