"""Names from outside input, made into paths that provably stay inside their folder.

Everything in launcher.data that turns a name it did not choose into a place on disk goes
through here: a URL's last part, a source's `filename` and `name`, the names Drive gives (one
file, or every file of a folder listing), archive members and their link targets, manifest
lines. `check_name` vets one component, `safe_parts` a '/'-separated relative path, and
`safe_join` puts checked components under a folder and proves, with resolve() and
is_relative_to(), that the result lies inside it. A refusal is an UnsafeName whose text is a
short reason; the caller turns it into a one-line DataError naming the config key.

`open_regular` is the matching rule for reading: only a regular file is opened, a FIFO or a
device never (opening a FIFO blocks; /dev/zero never ends).
"""

from __future__ import annotations

import os
import unicodedata
import urllib.parse
from pathlib import Path

# NAME_MAX of ext4, xfs, btrfs, NFS and APFS, in bytes of the encoded name.
MAX_NAME_BYTES = 255
# A relative path (archive member, Drive folder entry): far below PATH_MAX (4096) minus the
# cache's own prefix, so no name can push a path past what the kernel resolves.
MAX_PATH_BYTES = 1024
# The URL's name when its path ends in '/'.
DEFAULT_URL_NAME = "download"


class UnsafeName(ValueError):
    """A name that cannot be used as a path; str() is the reason ("it contains '/'")."""


def check_name(name: str, *, max_bytes: int = MAX_NAME_BYTES, posix: bool = False) -> str:
    """name itself if it is one safe path component, else UnsafeName.

    posix: accept every name a POSIX filesystem holds, a newline or a backslash included; for
    a manifest, which lists files that exist rather than names to create.
    """
    if not name:
        raise UnsafeName("it is empty")
    if "\x00" in name:
        raise UnsafeName("it contains a NUL character")
    for sep in ("/",) if posix else ("/", "\\"):
        if sep in name:
            raise UnsafeName(f"it contains {sep!r}")
    if name in (".", ".."):
        raise UnsafeName(f"it is {name!r}")
    if not posix and any(unicodedata.category(c) == "Cc" for c in name):
        raise UnsafeName("it contains a control character")
    try:
        size = len(os.fsencode(name))
    except UnicodeError:
        raise UnsafeName("it cannot be encoded as a file name") from None
    if size > max_bytes:
        raise UnsafeName(f"it is {size} bytes long (at most {max_bytes})")
    return name


def safe_parts(
    rel: str, *, posix: bool = False, max_bytes: int = MAX_PATH_BYTES
) -> tuple[str, ...]:
    """A '/'-separated relative path as checked components ('' and '.' parts dropped)."""
    if rel.startswith("/"):
        raise UnsafeName("it is an absolute path")
    parts = tuple(p for p in rel.split("/") if p not in ("", "."))
    if not parts:
        raise UnsafeName("it names no file")
    for part in parts:
        if part == "..":
            raise UnsafeName("it contains '..'")
        check_name(part, posix=posix)
    size = len(os.fsencode("/".join(parts)))
    if size > max_bytes:
        raise UnsafeName(f"it is {size} bytes long (at most {max_bytes})")
    return parts


def safe_join(folder: Path, *parts: str, max_bytes: int = MAX_NAME_BYTES) -> Path:
    """folder/parts..., each part a checked name, proved to resolve inside folder."""
    for part in parts:
        check_name(part, max_bytes=max_bytes)
    path = folder.joinpath(*parts)
    top = folder.resolve()
    real = path.resolve()
    if real == top or not real.is_relative_to(top):
        raise UnsafeName(f"it leads outside {folder}")
    return path


def url_filename(url: str) -> str:
    """The decoded last part of a URL's path, as one safe name; UnsafeName otherwise.

    Split before decoding, so '..%2F..%2Fx' stays one part, decodes to '../../x' and is
    refused rather than followed.
    """
    last = urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1]
    if not last:
        return DEFAULT_URL_NAME
    name = urllib.parse.unquote(last, errors="replace")
    try:
        return check_name(name)
    except UnsafeName as exc:
        raise UnsafeName(f"{shown(name)}: {exc}") from None


def shown(name: str, limit: int = 80) -> str:
    """repr() cut to a readable length: error messages stay one short line."""
    text = repr(name)
    return text if len(text) <= limit else text[: limit - 4] + "...'"
