"""Fetch a job's data sources into a cache: Google Drive (gdown), http(s) URLs, local paths.

A download lands in a staging folder inside the cache, is checksummed there, and only then is
moved into place with one rename; a marker file written after that rename is the commit point.
So an interrupted or corrupt download never leaves anything that looks complete. One process
per cache directory downloads, under a file lock; the others wait for the lock, then find the
marker and check it. Put the cache on a shared filesystem to fetch once per cluster, or on
node-local disk to fetch once per node.

Layout: `<cache>/<name>/` (the file, or the extracted archive / Drive folder) and
`<cache>/.launcher/{<name>.json, <name>.lock, staging/, trash/}`.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import random
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from launcher.data import archive
from launcher.data.paths import (
    UnsafeName,
    check_name,
    safe_join,
    safe_parts,
    shown,
    url_filename,
)
from launcher.errors import DataError
from launcher.files import file_kind, fsync_dir, human_size, open_regular
from launcher.runs import atomic_write_json
from launcher.spec import DataSourceSpec, DataSpec

META = ".launcher"
MARKER_VERSION = 1
CHUNK = 1 << 20
# Small reads while downloading: when a connection drops, urllib3 discards the bytes of the
# read in progress, so this bounds what a resume has to fetch again.
NET_CHUNK = 64 << 10
MAX_BACKOFF_S = 60.0
# A source's name names files in the cache with suffixes (".json", ".lock"): room for them.
MAX_SOURCE_NAME_BYTES = 200
# Drive's quota page says "Too many users have viewed or downloaded this file recently".
QUOTA_TEXT = "too many users have viewed or downloaded"
QUOTA_MESSAGE = (
    "Google Drive refuses the download for now: too many users have viewed or downloaded "
    "this file recently (the quota resets within about 24 h); try again later, or put a copy "
    "elsewhere and use 'url:' or 'path:'"
)

T = TypeVar("T")
Update = Callable[[int, "int | None"], None]


class RetryableError(Exception):
    """A transient failure (connection dropped, timeout, HTTP 5xx/429): try again later."""


class FatalError(Exception):
    """A failure that another attempt will not fix (404, quota page, bad archive)."""


@dataclass(frozen=True)
class FetchResult:
    """What happened to one source: where it is and whether this call downloaded it."""

    name: str
    path: Path
    status: str  # "fetched", "cached" or "local"
    size: int
    seconds: float


@dataclass
class _Reporter:
    """Notes and progress bars on a rich console; silent when there is none."""

    console: Any = None

    def note(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, markup=False, highlight=False)

    @contextlib.contextmanager
    def transfer(self, label: str) -> Iterator[Update]:
        if self.console is None or not self.console.is_terminal:
            yield lambda done, total: None
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=self.console, transient=True) as progress:
            task = progress.add_task(label, total=None)
            yield lambda done, total: progress.update(task, completed=done, total=total)


# --- public entry points ----------------------------------------------------------------


def fetch_all(
    data: DataSpec, *, base_dir: Path | None = None, console: Any = None
) -> dict[str, Path]:
    """Fetch (or find in the cache) every source; name -> local path (file or folder)."""
    return {r.name: r.path for r in fetch_sources(data, base_dir=base_dir, console=console)}


def fetch_sources(
    data: DataSpec,
    *,
    base_dir: Path | None = None,
    console: Any = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[FetchResult]:
    """Like fetch_all, with what happened to each source (for the CLI's summary)."""
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    cache = _resolve(data.cache_dir, base)
    rep = _Reporter(console)
    return [
        _fetch_one(
            src, data, cache=cache, base=base, key=f"data.sources[{i}]", rep=rep, sleep=sleep
        )
        for i, src in enumerate(data.sources)
    ]


def data_env(paths: dict[str, Path]) -> dict[str, str]:
    """LAUNCHER_DATA_<NAME>=path for each source, so a script finds its data without config."""
    out = {}
    for name, path in paths.items():
        var = "".join(c if c.isalnum() else "_" for c in name).upper()
        out[f"LAUNCHER_DATA_{var}"] = str(path)
    return out


# --- one source ---------------------------------------------------------------------------


def _resolve(path: str, base: Path) -> Path:
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else (base / p).resolve()


def _origin(src: DataSourceSpec) -> tuple[str, str | None]:
    """('gdrive', id) or ('url', url): how a remote source is downloaded."""
    for value in (src.gdrive, src.url):
        if value:
            found = DataSourceSpec.drive_id(value)
            # A drive.google.com link under `url:` goes through gdown too (confirm pages).
            if found and (value is src.gdrive or "google.com/" in value):
                return "gdrive", found[0]
    return "url", src.url


def _describe(src: DataSourceSpec) -> str:
    if src.path:
        return src.path
    kind, ident = _origin(src)
    if kind == "gdrive":
        return f"Google Drive {'folder' if src.is_folder else 'file'} {ident}"
    return str(src.url)


def _fingerprint(src: DataSourceSpec, where: str) -> dict[str, Any]:
    """What the cached copy must have come from; any change means fetch again."""
    return {
        "source": where,
        "sha256": src.sha256.lower() if src.sha256 else None,
        "md5": src.md5.lower() if src.md5 else None,
        "extract": src.extract,
        "folder": src.is_folder,
        "filename": src.filename,
    }


def _check_source_name(src: DataSourceSpec, key: str) -> None:
    """The schema's pattern already holds for a config; this holds for any DataSourceSpec."""
    try:
        check_name(src.name, max_bytes=MAX_SOURCE_NAME_BYTES)
        if src.name.startswith("."):
            raise UnsafeName(f"it starts with '.' (the cache keeps its own {META} there)")
    except UnsafeName as exc:
        raise DataError(f"{key}.name: {shown(src.name)} cannot name a cache entry: {exc}") from None


def _join(folder: Path, name: str, key: str) -> Path:
    """paths.safe_join, refusing with a one-line DataError that names the config key."""
    try:
        return safe_join(folder, name)
    except UnsafeName as exc:
        raise DataError(f"{key}: unsafe file name {shown(name)}: {exc}") from None


def _meta_dir(cache: Path) -> Path:
    meta = cache / META
    try:
        meta.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"data.cache_dir: cannot create {meta}: {exc.strerror or exc}") from None
    return meta


def _fetch_one(
    src: DataSourceSpec,
    data: DataSpec,
    *,
    cache: Path,
    base: Path,
    key: str,
    rep: _Reporter,
    sleep: Callable[[float], None],
) -> FetchResult:
    start = time.monotonic()
    _check_source_name(src, key)
    label = f"{key} ({src.name})"
    if src.path:
        return _fetch_local(
            src, data, cache=cache, base=base, key=key, label=label, rep=rep, start=start
        )
    meta = _meta_dir(cache)
    kind, ident = _origin(src)
    fingerprint = _fingerprint(src, f"gdrive:{ident}" if kind == "gdrive" else str(ident))
    marker = _join(meta, f"{src.name}.json", f"{key}.name")
    with _locked(_join(meta, f"{src.name}.lock", f"{key}.name"), src.name, rep):
        hit = _valid_marker(marker, fingerprint, rehash=data.rehash)
        if hit is not None:
            rep.note(f"{src.name}: cached at {hit}")
            return FetchResult(src.name, hit, "cached", _size(hit), time.monotonic() - start)
        # Anything there now is stale or unverified: it goes before the download starts,
        # so a failure below leaves nothing behind that looks complete.
        marker.unlink(missing_ok=True)
        entry = _join(cache, src.name, f"{key}.name")
        _remove(entry, meta)
        staging = _join(meta / "staging", src.name, f"{key}.name")
        _remove(staging, meta)
        staging.mkdir(parents=True)
        try:
            what = _describe(src)
            rep.note(f"{src.name}: fetching {what}")
            digests: dict[str, str] = {}
            if src.is_folder:
                content = _download_drive_folder(
                    str(ident), staging / "entry", data, label, rep, sleep
                )
            else:
                downloads = staging / "download"
                downloads.mkdir()
                file = _download_file(src, kind, str(ident), downloads, data, label, rep, sleep)
                digests = _check_digests(file, src, label, what)
                content = staging / "entry"
                if src.extract:
                    archive.extract(file, content, label)
                    file.unlink()
                else:
                    content.mkdir()
                    file = file.rename(_join(content, file.name, label))
            fsync_dir(content)
            os.rename(content, entry)
            fsync_dir(cache)
            result = entry if (src.extract or src.is_folder) else entry / file.name
            _write_marker(marker, fingerprint, result, digests)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    size = _size(result)
    seconds = time.monotonic() - start
    rep.note(f"{src.name}: fetched {human_size(size)} in {seconds:.1f} s -> {result}")
    return FetchResult(src.name, result, "fetched", size, seconds)


def _fetch_local(
    src: DataSourceSpec,
    data: DataSpec,
    *,
    cache: Path,
    base: Path,
    key: str,
    label: str,
    rep: _Reporter,
    start: float,
) -> FetchResult:
    path = _resolve(str(src.path), base)
    if not path.exists():
        raise DataError(f"{label}.path: {path} does not exist")
    if not (src.sha256 or src.md5 or src.extract):
        return FetchResult(src.name, path, "local", _size(path), time.monotonic() - start)
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        # Never opened: a FIFO would block, a device like /dev/zero never ends.
        raise DataError(
            f"{label}.path: {path} is {file_kind(info.st_mode)}; a checksum or 'extract' "
            "needs a regular file"
        )
    fingerprint = _fingerprint(src, str(path)) | {
        "size": info.st_size,
        "mtime_ns": info.st_mtime_ns,
    }
    meta = _meta_dir(cache)
    marker = _join(meta, f"{src.name}.json", f"{key}.name")
    with _locked(_join(meta, f"{src.name}.lock", f"{key}.name"), src.name, rep):
        hit = _valid_marker(marker, fingerprint, rehash=data.rehash)
        if hit is not None:
            return FetchResult(src.name, hit, "cached", _size(hit), time.monotonic() - start)
        marker.unlink(missing_ok=True)
        entry = _join(cache, src.name, f"{key}.name")
        if src.extract:
            _remove(entry, meta)
        digests = _check_digests(path, src, label, str(path))
        result = path
        if src.extract:
            staging = _join(meta / "staging", src.name, f"{key}.name")
            _remove(staging, meta)
            try:
                archive.extract(path, staging, label)
                fsync_dir(staging)
                os.rename(staging, entry)
                fsync_dir(cache)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            result = entry
        _write_marker(marker, fingerprint, result, digests)
    status = "fetched" if src.extract else "local"
    return FetchResult(src.name, result, status, _size(result), time.monotonic() - start)


# --- cache markers and locks --------------------------------------------------------------


def _write_marker(
    marker: Path, fingerprint: dict[str, Any], result: Path, digests: dict[str, str]
) -> None:
    cache = marker.parent.parent
    # Inside the cache: stored relative, so a shared cache mounted at different paths on
    # different nodes still matches.
    inside = result.is_relative_to(cache)
    record: dict[str, Any] = {
        "version": MARKER_VERSION,
        "fingerprint": fingerprint,
        "result": str(result.relative_to(cache)) if inside else str(result),
        "kind": "file" if result.is_file() else "dir",
        "digests": digests,
        "fetched_at": time.time(),
    }
    if result.is_file():
        stat = result.stat()
        record |= {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    atomic_write_json(marker, record)


def _valid_marker(marker: Path, fingerprint: dict[str, Any], *, rehash: bool) -> Path | None:
    """The cached result if the marker matches this source and the files are untouched."""
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if record.get("version") != MARKER_VERSION or record.get("fingerprint") != fingerprint:
        return None
    raw = record.get("result")
    if not isinstance(raw, str):
        return None
    cache = marker.parent.parent
    if os.path.isabs(raw):  # a local source's own path
        result = Path(raw)
    else:
        try:
            result = safe_join(cache, *safe_parts(raw))
        except UnsafeName:
            return None  # a marker pointing out of the cache is not ours: fetch again
    if record.get("kind") == "dir":
        return result if result.is_dir() else None
    try:
        info = result.stat()
        if not stat.S_ISREG(info.st_mode):
            return None
        if info.st_size != record.get("size") or info.st_mtime_ns != record.get("mtime_ns"):
            return None
        want = record.get("digests") or {}
        if rehash and want and _hash_file(result, tuple(want)) != want:
            return None
    except OSError:
        return None
    return result


@contextlib.contextmanager
def _locked(path: Path, name: str, rep: _Reporter) -> Iterator[None]:
    """One fetcher per cache directory (flock; on NFS the kernel maps it to a POSIX lock)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        rep.note(f"{name}: another process is fetching it; waiting for {path}")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _remove(path: Path, meta: Path) -> None:
    """Move out of the way with one rename, then delete: never a half-deleted tree in place."""
    if not path.exists() and not path.is_symlink():
        return
    trash = meta / "trash" / f"{path.name[:64]}.{os.getpid()}.{time.time_ns()}"
    trash.parent.mkdir(parents=True, exist_ok=True)
    os.rename(path, trash)
    if trash.is_dir() and not trash.is_symlink():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(folder, name)).st_size
    return total


# --- checksums ----------------------------------------------------------------------------


def _hash_file(path: Path, algorithms: tuple[str, ...]) -> dict[str, str]:
    hashers = {a: hashlib.new(a) for a in algorithms}
    with open_regular(path.resolve()) as fh:
        while block := fh.read(CHUNK):
            for h in hashers.values():
                h.update(block)
    return {a: h.hexdigest() for a, h in hashers.items()}


def _check_digests(path: Path, src: DataSourceSpec, label: str, what: str) -> dict[str, str]:
    """sha256 (always, for the marker) and md5 if asked; DataError on a mismatch."""
    algorithms = ("sha256", "md5") if src.md5 else ("sha256",)
    got = _hash_file(path, algorithms)
    for algorithm in algorithms:
        expected = getattr(src, algorithm)
        if expected and got[algorithm] != expected.lower():
            raise DataError(
                f"{label}.{algorithm}: checksum mismatch for {what}: expected "
                f"{expected.lower()}, got {got[algorithm]}; nothing was kept (if the file "
                "changed upstream on purpose, update the checksum)"
            )
    return got


# --- downloads ----------------------------------------------------------------------------


def _with_retries(
    attempt_fn: Callable[[int, Update], T],
    *,
    data: DataSpec,
    label: str,
    what: str,
    rep: _Reporter,
    sleep: Callable[[float], None],
) -> T:
    """Run attempt_fn until it works; wait backoff_s, 2x, 4x ... (jittered) between tries."""
    last: Exception | None = None
    for attempt in range(data.retries + 1):
        if attempt:
            delay = min(data.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
            delay *= random.uniform(0.5, 1.0)
            rep.note(f"{what}: {last}; retry {attempt}/{data.retries} in {delay:.1f} s")
            sleep(delay)
        try:
            with rep.transfer(what[:40]) as update:
                return attempt_fn(attempt, update)
        except RetryableError as exc:
            last = exc
        except FatalError as exc:
            raise DataError(f"{label}: {what}: {exc}") from None
    raise DataError(f"{label}: {what}: download failed after {data.retries + 1} attempt(s): {last}")


def _download_file(
    src: DataSourceSpec,
    kind: str,
    ident: str,
    dest: Path,
    data: DataSpec,
    label: str,
    rep: _Reporter,
    sleep: Callable[[float], None],
) -> Path:
    what = _describe(src)
    if kind == "gdrive":
        output = _join(dest, src.filename, f"{label}.filename") if src.filename else dest

        def attempt(n: int, update: Update) -> Path:
            got = _gdrive_attempt(ident, output, data.timeout_s, resume=n > 0, update=update)
            return _drive_named(got, output, "; set 'filename:' to name the file")

    else:
        if src.filename:
            part = _join(dest, src.filename, f"{label}.filename")
        else:
            part = _join(dest, _url_name(ident, label), f"{label}.url")
        state = _HttpState()

        def attempt(n: int, update: Update) -> Path:
            return _http_attempt(ident, part, state, data.timeout_s, update)

    path = _with_retries(attempt, data=data, label=label, what=what, rep=rep, sleep=sleep)
    if _is_quota_page(path):
        raise DataError(f"{label}: {what}: {QUOTA_MESSAGE}")
    return path


def _url_name(url: str, label: str) -> str:
    """The URL's decoded last part, checked before anything is downloaded."""
    try:
        return url_filename(url)
    except UnsafeName as exc:
        raise DataError(
            f"{label}.url: the URL ends in an unsafe file name, {exc}; "
            "set 'filename:' to name the file"
        ) from None


def _drive_named(got: Path, output: Path, hint: str = "") -> Path:
    """gdown names a file from Drive's answer: hold it to one safe name inside output.

    gdown 6 sanitizes that name itself; this check is ours, so a gdown that stops doing so
    (or a name it misses) is refused rather than trusted.
    """
    if got == output:
        return got
    try:
        if got.parent != output:
            raise UnsafeName(f"it is not in {output}")
        return safe_join(output, got.name)
    except UnsafeName as exc:
        raise FatalError(f"Drive gave an unsafe file name {shown(got.name)}: {exc}{hint}") from None


def _is_quota_page(path: Path) -> bool:
    """Drive's quota page served where a file was expected (e.g. a usercontent link)."""
    if not path.is_file() or path.stat().st_size > (4 << 20):
        return False
    with open_regular(path) as fh:
        head = fh.read(1 << 20)
    if b"<html" not in head[:4096].lower() and b"<!doctype html" not in head[:4096].lower():
        return False
    text = " ".join(head.decode("utf-8", "replace").split()).lower()
    return QUOTA_TEXT in text


def _short(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _transport_errors(hint: str = "") -> Iterator[None]:
    """requests' exceptions, for both http and Drive, as RetryableError or FatalError.

    The one translator (httpx's map_httpcore_exceptions shape): a dropped connection, a
    timeout, a cut body or HTTP 5xx/429 is worth another try; anything else is not. hint
    follows a fatal HTTP error (what to check on Drive's side).
    """
    import requests

    try:
        yield
    except requests.exceptions.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else 0
        if code == 429 or code >= 500:
            raise RetryableError(_short(exc)) from None
        raise FatalError(_short(exc) + (f" ({hint})" if hint else "")) from None
    except (
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        requests.exceptions.ChunkedEncodingError,
    ) as exc:
        raise RetryableError(_short(exc)) from None
    except requests.exceptions.RequestException as exc:
        raise FatalError(_short(exc)) from None


@dataclass
class _HttpState:
    """What survives between attempts of one plain download, so a retry can resume."""

    received: int = 0
    total: int | None = None
    validator: str | None = None
    hashers: dict[str, Any] = field(default_factory=dict)


def _content_range(value: str | None) -> tuple[int, int | None] | None:
    """(first byte, total or None) from 'bytes a-b/total'."""
    if not value or not value.startswith("bytes "):
        return None
    span, _, total = value[6:].partition("/")
    first, _, _ = span.partition("-")
    try:
        return int(first), (int(total) if total.strip() != "*" else None)
    except ValueError:
        return None


def _http_attempt(
    url: str, part: Path, state: _HttpState, timeout_s: float, update: Update
) -> Path:
    """One GET (a Range GET after a dropped connection); raises Retryable/Fatal errors."""
    import requests

    headers = {"Accept-Encoding": "identity"}
    if state.received:
        headers["Range"] = f"bytes={state.received}-"
        if state.validator:
            # A file changed on the server must not be spliced onto the old bytes.
            headers["If-Range"] = state.validator
    try:
        with (
            _transport_errors(),
            requests.get(url, headers=headers, stream=True, timeout=timeout_s) as res,
        ):
            code = res.status_code
            if code == 429 or code >= 500:
                raise RetryableError(f"HTTP {code} {res.reason}")
            if code >= 400:
                raise FatalError(f"HTTP {code} {res.reason}")
            encoded = res.headers.get("Content-Encoding", "identity").lower() != "identity"
            span = _content_range(res.headers.get("Content-Range")) if code == 206 else None
            if state.received and span is not None and span[0] == state.received:
                mode = "ab"
                if span[1] is not None:
                    state.total = span[1]
            else:
                mode = "wb"
                state.received = 0
                state.hashers = {}
                length = res.headers.get("Content-Length")
                state.total = int(length) if length and length.isdigit() and not encoded else None
                etag = res.headers.get("ETag")
                strong = etag if etag and not etag.startswith("W/") else None
                state.validator = strong or res.headers.get("Last-Modified")
            with open(part, mode) as fh:
                for chunk in res.iter_content(NET_CHUNK):
                    fh.write(chunk)
                    state.received += len(chunk)
                    update(state.received, state.total)
                fh.flush()
                os.fsync(fh.fileno())
    except OSError as exc:  # requests' own errors are OSErrors too, but are translated above
        raise FatalError(f"cannot write {part}: {exc.strerror or exc}") from None
    if state.total is not None and state.received != state.total:
        if state.received > state.total:
            state.received = 0  # start over: the server sent more than it announced
        raise RetryableError(f"connection closed after {state.received} of {state.total} bytes")
    return part


def _gdown_kwargs(fn: Callable[..., Any], **wanted: Any) -> dict[str, Any]:
    """The keyword arguments this gdown version accepts (timeout/progress came in gdown 6)."""
    accepted = inspect.signature(fn).parameters
    return {k: v for k, v in wanted.items() if k in accepted}


def _gdown_errors(gdown: Any) -> tuple[type[Exception], type[Exception]]:
    """(Drive refused the file, the transfer failed): the second is gdown 6's DownloadError."""
    refused = gdown.exceptions.FileURLRetrievalError
    return refused, getattr(gdown.exceptions, "DownloadError", refused)


def _gdrive_attempt(
    file_id: str, output: Path, timeout_s: float, *, resume: bool, update: Update
) -> Path:
    """One gdown download of a Drive file; output is a folder (Drive names the file) or a file."""
    import gdown

    kwargs = _gdown_kwargs(
        gdown.download,
        quiet=True,
        use_cookies=False,  # session cookies suffice; do not write ~/.cache/gdown
        resume=resume,
        timeout=timeout_s,
        progress=update,
    )
    target = str(output) if not output.is_dir() else str(output) + os.sep
    refused, failed = _gdown_errors(gdown)
    hint = "is the id right and the file shared as 'Anyone with the link'?"
    with _transport_errors(hint):
        try:
            return Path(gdown.download(id=file_id, output=target, **kwargs))
        except refused as exc:
            text = _short(exc, 100_000)
            if QUOTA_TEXT in text.lower():
                raise FatalError(QUOTA_MESSAGE) from None
            raise FatalError(
                "Google Drive did not hand out the file (is it shared as 'Anyone with the "
                "link'?): " + _short(exc)
            ) from None
        except failed as exc:
            if "byte range" in str(exc):
                # The server would not resume: drop the partial file so the next try starts over.
                folder = output if output.is_dir() else output.parent
                for stale in folder.glob("*.part"):
                    stale.unlink(missing_ok=True)
            raise RetryableError(_short(exc)) from None


def _download_drive_folder(
    folder_id: str,
    root: Path,
    data: DataSpec,
    label: str,
    rep: _Reporter,
    sleep: Callable[[float], None],
) -> Path:
    """List the folder through gdown, then fetch file by file (each with its own retries)."""
    import gdown

    what = f"Google Drive folder {folder_id}"

    def listing(_: int, __: Update) -> list[Any]:
        kwargs = _gdown_kwargs(
            gdown.download_folder,
            quiet=True,
            use_cookies=False,
            skip_download=True,
            timeout=data.timeout_s,
        )
        refused, failed = _gdown_errors(gdown)
        with _transport_errors("is the folder shared as 'Anyone with the link'?"):
            try:
                return list(gdown.download_folder(id=folder_id, output=str(root), **kwargs) or [])
            except refused as exc:
                if QUOTA_TEXT in _short(exc, 100_000).lower():
                    raise FatalError(QUOTA_MESSAGE) from None
                raise FatalError(_short(exc)) from None
            except failed as exc:
                raise FatalError(
                    f"{_short(exc)} (is the folder shared as 'Anyone with the link'?)"
                ) from None

    items = _with_retries(listing, data=data, label=label, what=what, rep=rep, sleep=sleep)
    root.mkdir(parents=True, exist_ok=True)
    seen: set[Path] = set()
    for item in items:
        # Drive's names, not gdown's local_path: every component checked, the whole proved
        # to stay under root.
        try:
            target = safe_join(root, *safe_parts(str(item.path).replace(os.sep, "/")))
        except UnsafeName as exc:
            raise DataError(
                f"{label}: {what}: unsafe file name in the folder: {shown(str(item.path))}: {exc}"
            ) from None
        if target in seen:
            raise DataError(
                f"{label}: {what}: two files named {shown(str(item.path))} in the folder "
                "(rename one on Drive)"
            )
        seen.add(target)
        target.parent.mkdir(parents=True, exist_ok=True)

        def attempt(n: int, update: Update, item_id: str = item.id, out: Path = target) -> Path:
            got = _gdrive_attempt(item_id, out, data.timeout_s, resume=n > 0, update=update)
            return _drive_named(got, out)

        path = _with_retries(
            attempt, data=data, label=label, what=f"{what}: {item.path}", rep=rep, sleep=sleep
        )
        if _is_quota_page(path):
            raise DataError(f"{label}: {what}: {item.path}: {QUOTA_MESSAGE}")
    return root
