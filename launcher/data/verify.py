"""Integrity check of a dataset folder: every file readable, images decode, hashes match.

For data made by a generative model or copied in bulk, where a few truncated or empty files
hide among millions. Checks per file, in a process pool across the usable CPUs:
- zero-byte files;
- images (every format Pillow opens): `verify()` then a full decode of every frame;
- gzip/bz2/xz streams read to the end, zip members CRC-checked, tar members read, .npy
  sizes against their header, .json parsed: these catch truncation in those formats;
- with a manifest: sha256 against it, plus files missing from or not listed in it.

Only regular files are opened. A FIFO, socket or device, and a symlink that leads out of the
folder, is one BAD line and is never opened (a FIFO blocks the reader; /dev/zero never ends);
a symlink to a folder inside is skipped, its files being checked where they really are.

The manifest is sha256sum's format (`<sha256>  <path>`), so `sha256sum -c SHA256SUMS` in the
folder checks it too.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from launcher.data.paths import UnsafeName, safe_parts, shown
from launcher.errors import DataError
from launcher.files import NotRegular, file_kind, open_regular
from launcher.runs import atomic_write_text

MANIFEST_NAME = "SHA256SUMS"
CHUNK = 1 << 20
# A manifest line names a file that exists, so PATH_MAX is the only length rule.
MAX_MANIFEST_PATH_BYTES = 4096
# Loading EPS needs Ghostscript; a missing tool is not a corrupt file.
SKIP_IMAGE_FORMATS = {"EPS"}


@dataclass(frozen=True)
class FileCheck:
    """One file's outcome: its size, its sha256 (when asked) and what is wrong, if anything."""

    path: str  # relative to the folder, '/'-separated
    size: int
    sha256: str | None
    problem: str | None


@dataclass
class VerifyReport:
    """The whole folder's outcome; `bad` maps a relative path to what is wrong with it."""

    root: Path
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    jobs: int = 1
    manifest: Path | None = None
    bad: dict[str, list[str]] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.bad

    @property
    def files_per_s(self) -> float:
        return self.files / self.seconds if self.seconds > 0 else float("inf")


# --- manifest -----------------------------------------------------------------------------


def _escape(name: str) -> tuple[str, bool]:
    """GNU sha256sum escaping: a name with '\\', newline or CR gets a leading backslash."""
    if not any(c in name for c in "\\\n\r"):
        return name, False
    return name.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r"), True


def _unescape(name: str) -> str:
    out, i = [], 0
    while i < len(name):
        if name[i] == "\\" and i + 1 < len(name):
            out.append({"\\": "\\", "n": "\n", "r": "\r"}.get(name[i + 1], name[i + 1]))
            i += 2
        else:
            out.append(name[i])
            i += 1
    return "".join(out)


def format_manifest(hashes: dict[str, str]) -> str:
    lines = []
    for name in sorted(hashes):
        escaped, flagged = _escape(name)
        prefix = "\\" if flagged else ""
        lines.append(f"{prefix}{hashes[name]}  {escaped}")
    return "".join(line + "\n" for line in lines)


def write_manifest(path: Path, hashes: dict[str, str]) -> None:
    """Written atomically: a reader sees the old manifest or the new one, never half."""
    atomic_write_text(path, format_manifest(hashes))


def read_manifest(path: Path) -> dict[str, str]:
    """path -> sha256; names are normalized ('./a//b' is 'a/b') and kept inside the folder."""
    try:
        with open_regular(Path(path).resolve()) as fh:
            text = fh.read().decode("utf-8", errors="surrogateescape")
    except FileNotFoundError:
        raise DataError(f"{path}: manifest not found") from None
    except NotRegular as exc:
        raise DataError(f"{path}: the manifest must be a regular file: {exc}") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the manifest: {exc.strerror or exc}") from None
    out: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        flagged = line.startswith("\\")
        body = line[1:] if flagged else line
        digest, sep, name = body.partition(" ")
        # sha256sum writes "HASH  name" (text mode) or "HASH *name" (binary mode).
        if name[:1] in (" ", "*"):
            name = name[1:]
        digest = digest.lower()
        if not sep or not name or len(digest) != 64 or not _is_hex(digest):
            raise DataError(f"{path}:{lineno}: expected '<64 hex digits>  <path>', got {line!r}")
        name = _unescape(name) if flagged else name
        try:
            parts = safe_parts(name, posix=True, max_bytes=MAX_MANIFEST_PATH_BYTES)
        except UnsafeName as exc:
            raise DataError(
                f"{path}:{lineno}: expected a path inside the folder, got {shown(name)}: {exc}"
            ) from None
        out["/".join(parts)] = digest
    return out


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


# --- per-file checks (run in worker processes) --------------------------------------------


_IMAGE_EXTS: dict[str, str] | None = None


def _image_exts() -> dict[str, str]:
    """Extension -> Pillow format, for the formats Pillow can open (not only save)."""
    global _IMAGE_EXTS
    if _IMAGE_EXTS is None:
        from PIL import Image

        Image.init()
        _IMAGE_EXTS = {
            ext: fmt
            for ext, fmt in Image.registered_extensions().items()
            if fmt in Image.OPEN and fmt not in SKIP_IMAGE_FORMATS
        }
    return _IMAGE_EXTS


def _check_image(fh: BinaryIO) -> str | None:
    from PIL import Image, ImageSequence

    Image.MAX_IMAGE_PIXELS = None  # big generated images are data, not decompression bombs
    try:
        with Image.open(fh) as im:
            im.verify()
        fh.seek(0)
        with Image.open(fh) as im:
            for frame in ImageSequence.Iterator(im):
                frame.load()
    except Exception as exc:  # Pillow's decoders raise many types on bad input
        return f"image does not decode: {' '.join(str(exc).split()) or type(exc).__name__}"
    return None


def _read_to_end(opener: Callable[[BinaryIO], Any], fh: BinaryIO, kind: str) -> str | None:
    import lzma
    import zlib

    try:
        with opener(fh) as stream:
            while stream.read(CHUNK):
                pass
    except (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as exc:
        return f"{kind} stream is truncated or corrupt: {exc}"
    return None


def _check_zip(fh: BinaryIO) -> str | None:
    import zipfile
    import zlib

    try:
        with zipfile.ZipFile(fh) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError) as exc:
        return f"zip is truncated or corrupt: {exc}"
    return f"zip member fails its CRC: {bad}" if bad else None


def _check_tar(fh: BinaryIO) -> str | None:
    import tarfile

    try:
        with tarfile.open(fileobj=fh) as tf:
            for member in tf:
                if member.isfile():
                    data = tf.extractfile(member)
                    if data is not None:
                        while data.read(CHUNK):
                            pass
    except (tarfile.TarError, OSError, EOFError) as exc:
        return f"tar is truncated or corrupt: {exc}"
    return None


def _check_npy(fh: BinaryIO, size: int) -> str | None:
    import numpy as np

    try:
        version = np.lib.format.read_magic(fh)
        readers = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }
        if version not in readers:
            return None
        shape, _, dtype = readers[version](fh)
        header_end = fh.tell()
    except (ValueError, OSError, EOFError) as exc:
        return f"npy header is corrupt: {exc}"
    if dtype.hasobject:
        return None
    count = 1
    for dim in shape:
        count *= dim
    want = header_end + count * dtype.itemsize
    if size != want:
        return f"npy is {size} bytes, its header says {want}"
    return None


def _check_json(fh: BinaryIO) -> str | None:
    import json

    try:
        json.load(fh)
    except (ValueError, OSError) as exc:
        return f"json does not parse: {exc}"
    return None


def _check_format(name: str, fh: BinaryIO, size: int) -> str | None:
    """By the listed name's extension, on the file already open (never reopened by name)."""
    import bz2
    import gzip
    import lzma

    fh.seek(0)
    lower = name.lower()
    ext = os.path.splitext(lower)[1]
    if ext in _image_exts():
        return _check_image(fh)
    if lower.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        return _check_tar(fh)
    if ext in (".gz", ".bz2", ".xz"):
        openers: dict[str, Callable[[BinaryIO], Any]] = {
            ".gz": lambda f: gzip.GzipFile(fileobj=f, mode="rb"),
            ".bz2": lambda f: bz2.BZ2File(f),
            ".xz": lambda f: lzma.LZMAFile(f),
        }
        return _read_to_end(openers[ext], fh, ext[1:])
    if ext in (".zip", ".npz"):
        return _check_zip(fh)
    if ext == ".npy":
        return _check_npy(fh, size)
    if ext == ".json":
        return _check_json(fh)
    return None


def _inside(path: str, top: str) -> bool:
    return os.path.commonpath([path, top]) == top


def check_file(root: str, rel: str, want_hash: bool, top: str | None = None) -> FileCheck:
    """Check one file; never raises (an unreadable file is a finding, not a crash).

    Looks before it opens: only a regular file, or a symlink to one inside root (top is
    root's realpath), is opened, and open_regular holds to that if the file changes since.
    """
    path = os.path.join(root, rel)
    top = top or os.path.realpath(root)
    try:
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            real = os.path.realpath(path)
            if not _inside(real, top):
                return FileCheck(rel, 0, None, f"symlink to {real}, outside the folder: not opened")
            info = os.stat(path)
            path = real
        if not stat.S_ISREG(info.st_mode):
            kind = file_kind(info.st_mode)
            return FileCheck(rel, 0, None, f"{kind}, not a regular file: not opened")
    except FileNotFoundError:
        return FileCheck(rel, 0, None, "broken symlink or vanished during the check")
    except OSError as exc:
        return FileCheck(rel, 0, None, f"cannot stat: {exc.strerror or exc}")
    size = info.st_size
    digest = None
    try:
        with open_regular(path) as fh:
            if want_hash:
                h = hashlib.sha256()
                while block := fh.read(CHUNK):
                    h.update(block)
                digest = h.hexdigest()
            problem = "zero-byte file" if size == 0 else _check_format(rel, fh, size)
    except NotRegular as exc:
        digest, problem = None, f"changed during the check: {exc}: not read"
    except OSError as exc:
        problem = f"cannot read: {exc.strerror or exc}"
    return FileCheck(rel, size, digest, problem)


def check_batch(root: str, rels: list[str], want_hash: bool) -> list[FileCheck]:
    """A batch per task keeps the pool's per-task overhead small for tiny files."""
    top = os.path.realpath(root)
    return [check_file(root, rel, want_hash, top) for rel in rels]


# --- the folder ---------------------------------------------------------------------------


def list_files(root: Path, exclude: tuple[Path, ...] = ()) -> list[str]:
    """Every entry under root but folders, as sorted '/'-separated paths.

    Symlinks, FIFOs and devices are listed too, so that check_file reports each one; a
    symlink to a folder is listed only when it leads out of root (os.walk does not follow it;
    the files of one inside are listed where they are).
    """
    skip = {os.path.abspath(p) for p in exclude}
    top = os.path.realpath(root)
    out = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        names = list(files)
        for name in dirs:
            full = os.path.join(folder, name)
            if os.path.islink(full) and not _inside(os.path.realpath(full), top):
                names.append(name)
        for name in names:
            full = os.path.join(folder, name)
            if os.path.abspath(full) in skip:
                continue
            out.append(Path(os.path.relpath(full, root)).as_posix())
    out.sort()
    return out


def usable_cpus() -> int:
    from launcher.hardware import detect_cpus

    return detect_cpus(os.environ)[0]


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork when this process has one thread (fast: workers inherit Pillow, already loaded);
    otherwise forkserver, since forking a process with threads can deadlock a child."""
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def run_checks(
    root: Path,
    files: list[str],
    *,
    want_hash: bool,
    jobs: int,
    progress: Callable[[int], None] | None = None,
) -> list[FileCheck]:
    """Check files with `jobs` processes (1: in this process); progress(n) after each batch."""
    if not files:
        return []
    jobs = max(1, min(jobs, len(files)))
    size = max(1, min(256, len(files) // (jobs * 8)))
    batches = [files[i : i + size] for i in range(0, len(files), size)]
    results: list[FileCheck] = []
    if jobs == 1:
        for batch in batches:
            results.extend(check_batch(str(root), batch, want_hash))
            if progress:
                progress(len(batch))
        return results
    _image_exts()  # load Pillow's plugins once, before forking, not once per worker
    try:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=_pool_context()) as pool:
            futures = [pool.submit(check_batch, str(root), b, want_hash) for b in batches]
            for future in as_completed(futures):
                done = future.result()
                results.extend(done)
                if progress:
                    progress(len(done))
    except BrokenProcessPool:
        raise DataError(
            f"{root}: a checking process died (out of memory on a huge image?); "
            "run again with --jobs 1 to see which file"
        ) from None
    return results


def verify_tree(
    root: Path,
    *,
    manifest: Path | None = None,
    jobs: int | None = None,
    want_hashes: bool = False,
    exclude: tuple[Path, ...] = (),
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Check every file under root; with a manifest, compare sha256 and the file list.

    The manifest itself and `exclude` are not part of the data and are skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    expected = read_manifest(manifest) if manifest is not None else None
    if manifest is not None:
        exclude = (*exclude, manifest)
    files = list_files(root, exclude)
    if on_total:
        on_total(len(files))
    jobs = jobs or usable_cpus()
    want = want_hashes or expected is not None
    start = time.perf_counter()
    results = run_checks(root, files, want_hash=want, jobs=jobs, progress=progress)
    report = VerifyReport(
        root=root,
        files=len(results),
        bytes=sum(r.size for r in results),
        seconds=time.perf_counter() - start,
        jobs=max(1, min(jobs, len(files) or 1)),
        manifest=manifest,
    )
    for r in results:
        if r.problem:
            report.bad.setdefault(r.path, []).append(r.problem)
        if r.sha256 is not None:
            report.hashes[r.path] = r.sha256
    if expected is not None:
        for r in results:
            want_digest = expected.get(r.path)
            if want_digest is None:
                report.bad.setdefault(r.path, []).append("not in the manifest")
            elif r.sha256 is not None and r.sha256 != want_digest:
                report.bad.setdefault(r.path, []).append(
                    f"sha256 {r.sha256[:16]}... differs from the manifest's {want_digest[:16]}..."
                )
        for missing in sorted(expected.keys() - {r.path for r in results}):
            report.bad.setdefault(missing, []).append("missing (listed in the manifest)")
    report.bad = dict(sorted(report.bad.items()))
    return report
