"""Fetching data against a real HTTP server on 127.0.0.1 (and Drive through a TLS proxy).

Plain URLs go through launcher's own requests path. Google Drive goes through the real
gdown: the test server is also an HTTPS proxy (CONNECT + TLS with a test CA) that answers
for drive.google.com, the way a corporate proxy would, so gdown talks to "Drive" unchanged.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tarfile
import threading
import time
import urllib.parse
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from launcher import schema
from launcher.data import fetch_all, fetch_sources
from launcher.errors import ConfigError, DataError
from launcher.spec import DataSpec, JobSpec
from tests.conftest import launcher_cmd, need

QUOTA_PAGE = (
    "<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded</title></head><body>\n"
    '<div class="uc-main"><div id="uc-text">'
    '<p class="uc-error-caption">Sorry, you can&#39;t view or download this file at this '
    "time.</p>\n"
    '<p class="uc-error-subcaption">Too many users have viewed or downloaded this file '
    "recently. Please try accessing the file again later. If the file you are trying to "
    "access is particularly large or is shared with many people, it may take up to 24 hours "
    "to be able to view or download the file.</p>\n"
    "</div></div></body></html>\n"
)
DRIVE_FILE_ID = "1drivefileAAAAAAAAAAAAAAAAAAAAAA"
DRIVE_QUOTA_ID = "1drivequotaBBBBBBBBBBBBBBBBBBBBB"
DRIVE_FLAKY_ID = "1driveflakyCCCCCCCCCCCCCCCCCCCCC"
DRIVE_FOLDER_ID = "1drivefolderDDDDDDDDDDDDDDDDDDDD"
FOLDER_FILES = {
    "1folderfileoneEEEEEEEEEEEEEEEEEE": ("labels.csv", b"id,label\n1,cat\n2,dog\n"),
    "1folderfiletwoFFFFFFFFFFFFFFFFFF": ("weights.bin", bytes(range(256)) * 40),
}


@dataclass
class Route:
    body: bytes
    content_type: str = "application/octet-stream"
    # Connections to cut after half the body, before the server behaves.
    drops: int = 0
    ranges: bool = True
    # Seconds to spread the body over (so concurrent fetchers really overlap).
    slow_s: float = 0.0
    filename: str | None = None  # Content-Disposition (what Drive sends)


@dataclass
class Hits:
    """Every request the server saw: (path, Range header)."""

    log: list[tuple[str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, path: str) -> int:
        with self.lock:
            return sum(1 for p, _ in self.log if p == path)

    def ranges(self, path: str) -> list[str | None]:
        with self.lock:
            return [r for p, r in self.log if p == path]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server: DataServer

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def do_CONNECT(self) -> None:  # noqa: N802 - http.server's naming
        """Be an HTTPS proxy for Drive: accept the tunnel, then speak TLS as drive.google.com."""
        self.send_response(200, "Connection established")
        self.end_headers()
        self.wfile.flush()
        tls = self.server.tls.wrap_socket(self.connection, server_side=True)
        self.connection = tls
        self.rfile = tls.makefile("rb")
        self.wfile = tls.makefile("wb")
        self.tunnel = True
        self.close_connection = False

    def do_GET(self) -> None:  # noqa: N802
        parsed = urllib.parse.urlsplit(self.path)
        key = parsed.path
        if getattr(self, "tunnel", False):
            query = urllib.parse.parse_qs(parsed.query)
            key = f"drive:{parsed.path}?id={query.get('id', [''])[0]}"
        with self.server.hits.lock:
            self.server.hits.log.append((key, self.headers.get("Range")))
        route = self.server.routes.get(key)
        if route is None:
            self.send_error(404)
            return
        body, start = route.body, 0
        rng = self.headers.get("Range")
        if rng and route.ranges and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", route.content_type)
        self.send_header("Content-Length", str(len(body) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        if route.filename:
            self.send_header("Content-Disposition", f'attachment; filename="{route.filename}"')
        self.end_headers()
        payload = body[start:]
        try:
            if route.drops > 0:
                route.drops -= 1
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            pieces = 20 if route.slow_s else 1
            step = max(1, -(-len(payload) // pieces))
            for i in range(0, len(payload), step):
                self.wfile.write(payload[i : i + step])
                self.wfile.flush()
                if route.slow_s:
                    time.sleep(route.slow_s / pieces)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            self.close_connection = True


class DataServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    tls: ssl.SSLContext

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.routes: dict[str, Route] = {}
        self.hits = Hits()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@pytest.fixture
def server():
    srv = DataServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def no_outside_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loopback must not go through a proxy set in the environment running the tests."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def data_spec(cache: Path, *sources: dict, **kw: object) -> DataSpec:
    raw = {"cache_dir": str(cache), "backoff_s": 0.01, "timeout_s": 10, **kw}
    raw["sources"] = list(sources)
    return schema.build(DataSpec, raw, file="test.yaml", prefix="data.")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(cache: Path) -> list[str]:
    """Files anywhere under the cache other than locks: what a failed fetch left behind."""
    out = []
    for folder, _, files in os.walk(cache):
        for name in files:
            if not name.endswith(".lock"):
                out.append(os.path.relpath(os.path.join(folder, name), cache))
    return sorted(out)


# --- plain http(s) ------------------------------------------------------------------------


def test_good_file_is_fetched_once_and_then_served_from_the_cache(server, tmp_path):
    body = os.urandom(300_000)
    server.routes["/sets/train.bin"] = Route(body)
    src = {
        "name": "train",
        "url": server.url("/sets/train.bin"),
        "sha256": sha256(body),
        "md5": hashlib.md5(body).hexdigest(),
    }
    spec = data_spec(tmp_path / "cache", src)
    first = fetch_sources(spec)
    assert first[0].status == "fetched"
    path = first[0].path
    assert path == tmp_path / "cache" / "train" / "train.bin"
    assert path.read_bytes() == body

    second = fetch_sources(spec)
    assert (second[0].status, second[0].path) == ("cached", path)
    assert server.hits.count("/sets/train.bin") == 1

    # A cached copy changed behind our back is fetched again, not trusted.
    with open(path, "ab") as fh:
        fh.write(b"x")
    assert fetch_all(spec) == {"train": path}
    assert path.read_bytes() == body
    assert server.hits.count("/sets/train.bin") == 2
    assert leftovers(tmp_path / "cache") == [".launcher/train.json", "train/train.bin"]


def test_cache_seen_under_another_mount_path_is_still_valid(server, tmp_path):
    """A shared cache mounted at different paths on different nodes: no second download."""
    body = b"shared" * 1000
    server.routes["/s.bin"] = Route(body)
    src = {"name": "s", "url": server.url("/s.bin"), "sha256": sha256(body)}
    fetch_all(data_spec(tmp_path / "node1", src))
    (tmp_path / "node1").rename(tmp_path / "node2")
    [result] = fetch_sources(data_spec(tmp_path / "node2", src))
    assert (result.status, result.path) == ("cached", tmp_path / "node2" / "s" / "s.bin")
    assert server.hits.count("/s.bin") == 1


def test_checksum_mismatch_names_both_hashes_and_keeps_nothing(server, tmp_path):
    body = b"the real bytes" * 1000
    server.routes["/x.bin"] = Route(body)
    wrong = "0" * 64
    spec = data_spec(
        tmp_path / "cache", {"name": "x", "url": server.url("/x.bin"), "sha256": wrong}
    )
    with pytest.raises(DataError) as info:
        fetch_all(spec)
    message = str(info.value)
    assert "data.sources[0] (x).sha256: checksum mismatch" in message
    assert f"expected {wrong}, got {sha256(body)}" in message
    assert "\n" not in message
    assert leftovers(tmp_path / "cache") == []
    assert not (tmp_path / "cache" / "x").exists()


def test_connection_dropped_half_way_resumes_with_a_range_request(server, tmp_path):
    body = os.urandom(200_000)
    server.routes["/big.bin"] = Route(body, drops=1)
    spec = data_spec(
        tmp_path / "cache", {"name": "big", "url": server.url("/big.bin"), "sha256": sha256(body)}
    )
    path = fetch_all(spec)["big"]
    assert path.read_bytes() == body
    first, second = server.hits.ranges("/big.bin")
    # The second request asks only for what is missing (minus at most one read in flight).
    assert first is None and second is not None
    offset = int(second.removeprefix("bytes=").removesuffix("-"))
    assert 0 < offset <= len(body) // 2


def test_server_that_always_drops_gives_a_clear_error_and_nothing_half_written(server, tmp_path):
    body = os.urandom(100_000)
    server.routes["/bad.bin"] = Route(body, drops=99, ranges=False)
    spec = data_spec(tmp_path / "cache", {"name": "bad", "url": server.url("/bad.bin")}, retries=2)
    with pytest.raises(DataError) as info:
        fetch_all(spec)
    assert "download failed after 3 attempt(s)" in str(info.value)
    assert "bytes" in str(info.value)
    assert server.hits.count("/bad.bin") == 3
    assert leftovers(tmp_path / "cache") == []


def test_http_404_is_not_retried(server, tmp_path):
    spec = data_spec(tmp_path / "cache", {"name": "nope", "url": server.url("/missing.bin")})
    with pytest.raises(DataError, match=r"data.sources\[0\] \(nope\): .*HTTP 404"):
        fetch_all(spec)
    assert server.hits.count("/missing.bin") == 1


def test_quota_page_served_in_place_of_a_file_is_a_clear_error(server, tmp_path):
    server.routes["/uc"] = Route(QUOTA_PAGE.encode(), content_type="text/html; charset=utf-8")
    spec = data_spec(tmp_path / "cache", {"name": "q", "url": server.url("/uc")})
    with pytest.raises(DataError, match="too many users have viewed or downloaded"):
        fetch_all(spec)
    assert leftovers(tmp_path / "cache") == []


def _worker_script() -> str:
    return """
import json, sys, time
from pathlib import Path
from launcher import schema
from launcher.data import fetch_sources
from launcher.spec import DataSpec
raw, go = json.loads(sys.argv[1]), Path(sys.argv[2])
spec = schema.build(DataSpec, raw)
while not go.exists():
    time.sleep(0.005)
r = fetch_sources(spec)[0]
print(json.dumps({"status": r.status, "path": str(r.path), "bytes": r.path.stat().st_size}))
"""


def test_four_processes_fetching_at_once_download_once(server, tmp_path):
    body = os.urandom(400_000)
    server.routes["/shared.bin"] = Route(body, slow_s=1.0)
    raw = {
        "cache_dir": str(tmp_path / "cache"),
        "sources": [{"name": "shared", "url": server.url("/shared.bin"), "sha256": sha256(body)}],
    }
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _worker_script(), json.dumps(raw), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    time.sleep(0.3)
    go.touch()
    results = []
    for proc in procs:
        out, errs = proc.communicate(timeout=60)
        assert proc.returncode == 0, errs
        results.append(json.loads(out))
    assert server.hits.count("/shared.bin") == 1
    assert sorted(r["status"] for r in results) == ["cached", "cached", "cached", "fetched"]
    assert {r["path"] for r in results} == {str(tmp_path / "cache" / "shared" / "shared.bin")}
    assert all(r["bytes"] == len(body) for r in results)


# --- archives and local paths -------------------------------------------------------------


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_archives_are_checked_then_extracted(server, tmp_path):
    members = {"set/a.txt": b"alpha", "set/sub/b.txt": b"beta"}
    tgz, zp = _tar_gz(members), _zip(members)
    server.routes["/set.tar.gz"] = Route(tgz)
    server.routes["/set.zip"] = Route(zp)
    spec = data_spec(
        tmp_path / "cache",
        {"name": "t", "url": server.url("/set.tar.gz"), "sha256": sha256(tgz), "extract": True},
        {"name": "z", "url": server.url("/set.zip"), "sha256": sha256(zp), "extract": True},
    )
    paths = fetch_all(spec)
    for name in ("t", "z"):
        assert paths[name] == tmp_path / "cache" / name
        assert (paths[name] / "set" / "sub" / "b.txt").read_bytes() == b"beta"
        assert not list(paths[name].glob("*.tar.gz")) and not list(paths[name].glob("*.zip"))
    assert [r.status for r in fetch_sources(spec)] == ["cached", "cached"]


def test_archive_reaching_outside_its_folder_is_refused(server, tmp_path):
    server.routes["/evil.tar.gz"] = Route(_tar_gz({"../../evil.txt": b"pwned"}))
    spec = data_spec(
        tmp_path / "cache", {"name": "e", "url": server.url("/evil.tar.gz"), "extract": True}
    )
    with pytest.raises(DataError, match=r"data.sources\[0\] \(e\).extract"):
        fetch_all(spec)
    assert not list(tmp_path.rglob("evil.txt"))
    assert leftovers(tmp_path / "cache") == []


def test_local_path_is_checksummed_and_extracted(tmp_path):
    local = tmp_path / "in" / "set.zip"
    local.parent.mkdir()
    data = _zip({"x.txt": b"x"})
    local.write_bytes(data)
    plain = {"name": "plain", "path": "in/set.zip", "sha256": sha256(data)}
    unpacked = {"name": "unpacked", "path": "in/set.zip", "extract": True}
    spec = data_spec(tmp_path / "cache", plain, unpacked)
    paths = fetch_all(spec, base_dir=tmp_path)
    assert paths["plain"] == local
    assert (paths["unpacked"] / "x.txt").read_bytes() == b"x"

    bad = data_spec(tmp_path / "cache", {**plain, "sha256": "f" * 64})
    with pytest.raises(DataError, match="expected f{64}, got " + sha256(data)):
        fetch_all(bad, base_dir=tmp_path)
    missing = data_spec(tmp_path / "cache", {"name": "m", "path": "nowhere.bin"})
    with pytest.raises(DataError, match=r"data.sources\[0\] \(m\).path: .*nowhere.bin"):
        fetch_all(missing, base_dir=tmp_path)


# --- Google Drive through the real gdown --------------------------------------------------


def _make_tls(folder: Path) -> tuple[Path, ssl.SSLContext]:
    """A throwaway CA and a drive.google.com certificate it signed (openssl CLI)."""
    openssl = shutil.which("openssl")
    need(openssl is not None, "the openssl command (it makes the fake Drive's certificate)")
    assert openssl is not None
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *a: subprocess.run([openssl, *a], cwd=folder, check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=launcher test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    run("req", *ec, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=drive.google.com")
    (folder / "ext.cnf").write_text(
        "subjectAltName=DNS:drive.google.com,DNS:docs.google.com\n"
        "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
    )
    run("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "leaf.pem", "-days", "2", "-extfile", "ext.cnf")  # fmt: skip
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(folder / "leaf.pem", folder / "leaf.key")
    return folder / "ca.pem", ctx


@pytest.fixture
def drive(server, tmp_path, monkeypatch):
    """The test server, also acting as Drive behind an HTTPS proxy that requests honours."""
    certs = tmp_path / "certs"
    certs.mkdir()
    ca, server.tls = _make_tls(certs)
    monkeypatch.setenv("HTTPS_PROXY", server.url(""))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca))
    return server


def test_drive_file_through_gdown(drive, tmp_path):
    body = os.urandom(150_000)
    drive.routes[f"drive:/uc?id={DRIVE_FILE_ID}"] = Route(body, filename="images.tar")
    link = f"https://drive.google.com/file/d/{DRIVE_FILE_ID}/view?usp=sharing"
    spec = data_spec(tmp_path / "cache", {"name": "d", "gdrive": link, "sha256": sha256(body)})
    path = fetch_all(spec)["d"]
    # The file keeps the name Drive gives it.
    assert path == tmp_path / "cache" / "d" / "images.tar"
    assert path.read_bytes() == body
    assert drive.hits.count(f"drive:/uc?id={DRIVE_FILE_ID}") == 1


def test_drive_quota_page_through_gdown_is_a_clear_error(drive, tmp_path):
    drive.routes[f"drive:/uc?id={DRIVE_QUOTA_ID}"] = Route(
        QUOTA_PAGE.encode(), content_type="text/html; charset=utf-8"
    )
    spec = data_spec(tmp_path / "cache", {"name": "q", "gdrive": DRIVE_QUOTA_ID})
    with pytest.raises(DataError) as info:
        fetch_all(spec)
    message = str(info.value)
    assert message.startswith(f"data.sources[0] (q): Google Drive file {DRIVE_QUOTA_ID}: ")
    assert "too many users have viewed or downloaded" in message
    assert "\n" not in message
    # Quota lasts hours: no retries hammering Drive.
    assert drive.hits.count(f"drive:/uc?id={DRIVE_QUOTA_ID}") == 1
    assert leftovers(tmp_path / "cache") == []


def test_drive_download_dropped_half_way_is_resumed_by_gdown(drive, tmp_path):
    # Big enough that gdown's 512 KB reads keep something of the first, dropped transfer.
    body = os.urandom(3_000_000)
    drive.routes[f"drive:/uc?id={DRIVE_FLAKY_ID}"] = Route(body, drops=1, filename="f.bin")
    spec = data_spec(
        tmp_path / "cache", {"name": "f", "gdrive": DRIVE_FLAKY_ID, "sha256": sha256(body)}
    )
    path = fetch_all(spec)["f"]
    assert path.read_bytes() == body
    assert any(drive.hits.ranges(f"drive:/uc?id={DRIVE_FLAKY_ID}"))  # resumed with a Range


def test_drive_folder_through_gdown(drive, tmp_path):
    links = "".join(
        f'<a href="https://drive.google.com/file/d/{fid}/view?usp=drive_web">{name}</a>'
        for fid, (name, _) in FOLDER_FILES.items()
    )
    page = f"<html><head><title>my-set</title></head><body>{links}</body></html>"
    drive.routes[f"drive:/embeddedfolderview?id={DRIVE_FOLDER_ID}"] = Route(
        page.encode(), content_type="text/html"
    )
    for fid, (name, data) in FOLDER_FILES.items():
        drive.routes[f"drive:/uc?id={fid}"] = Route(data, filename=name)
    link = f"https://drive.google.com/drive/folders/{DRIVE_FOLDER_ID}"
    spec = data_spec(tmp_path / "cache", {"name": "folder", "gdrive": link})
    path = fetch_all(spec)["folder"]
    assert path == tmp_path / "cache" / "folder"
    got = {p.name: p.read_bytes() for p in path.iterdir()}
    assert got == {name: data for name, data in FOLDER_FILES.values()}


def test_names_drive_gives_stay_inside_the_cache(drive, tmp_path):
    """Drive's names are outside input too: gdown 6 turns '/' into '_', and launcher's own
    check refuses what gdown lets through on Linux (a control character)."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"mine")
    climb = "..%2F" * 5 + "victim"  # gdown percent-decodes Content-Disposition
    drive.routes[f"drive:/uc?id={DRIVE_FILE_ID}"] = Route(b"from drive", filename=climb)
    spec = data_spec(tmp_path / "cache", {"name": "d", "gdrive": DRIVE_FILE_ID})
    path = fetch_all(spec)["d"]
    assert path == tmp_path / "cache" / "d" / ".._.._.._.._.._victim"
    assert path.read_bytes() == b"from drive" and victim.read_bytes() == b"mine"

    drive.routes[f"drive:/uc?id={DRIVE_FLAKY_ID}"] = Route(b"x", filename="red%1B[31m.bin")
    spec = data_spec(tmp_path / "cache", {"name": "e", "gdrive": DRIVE_FLAKY_ID})
    with pytest.raises(DataError) as info:
        fetch_all(spec)
    assert str(info.value) == (
        f"data.sources[0] (e): Google Drive file {DRIVE_FLAKY_ID}: Drive gave an unsafe file "
        "name 'red\\x1b[31m.bin': it contains a control character; set 'filename:' to name "
        "the file"
    )
    assert leftovers(tmp_path / "cache") == [".launcher/d.json", "d/.._.._.._.._.._victim"]


def test_drive_folder_entry_with_a_control_character_is_refused(drive, tmp_path):
    fid = next(iter(FOLDER_FILES))
    page = (
        "<html><head><title>my-set</title></head><body>"
        f'<a href="https://drive.google.com/file/d/{fid}/view?usp=drive_web">bad\x1b[2Jname</a>'
        "</body></html>"
    )
    drive.routes[f"drive:/embeddedfolderview?id={DRIVE_FOLDER_ID}"] = Route(
        page.encode(), content_type="text/html"
    )
    link = f"https://drive.google.com/drive/folders/{DRIVE_FOLDER_ID}"
    with pytest.raises(DataError) as info:
        fetch_all(data_spec(tmp_path / "cache", {"name": "folder", "gdrive": link}))
    assert str(info.value) == (
        f"data.sources[0] (folder): Google Drive folder {DRIVE_FOLDER_ID}: unsafe file name "
        "in the folder: 'bad\\x1b[2Jname': it contains a control character"
    )
    assert drive.hits.count(f"drive:/uc?id={fid}") == 0  # refused before any download
    assert leftovers(tmp_path / "cache") == []


# --- config validation and the CLI --------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "key", "text"),
    [
        ({"name": "a", "url": "https://x/a", "path": "a"}, "gdrive", "exactly one of"),
        ({"name": "a", "gdrive": "not a drive link!"}, "gdrive", "Google Drive id"),
        ({"name": "a", "url": "ftp://x/a"}, "url", "http(s)"),
        ({"name": "a", "url": "https://x/a", "sha256": "abc"}, "sha256", "64 hex"),
        ({"name": "a/b", "url": "https://x/a"}, "name", "letters"),
        (
            {
                "name": "a",
                "gdrive": f"https://drive.google.com/drive/folders/{DRIVE_FOLDER_ID}",
                "sha256": "a" * 64,
            },
            "sha256",
            "not a Drive folder",
        ),  # fmt: skip
    ],
)
def test_bad_sources_name_the_dotted_key(source, key, text):
    with pytest.raises(ConfigError) as info:
        schema.build(JobSpec, {"name": "j", "data": {"sources": [source]}}, file="job.yaml")
    assert f"job.yaml: data.sources[0].{key}: " in str(info.value)
    assert text in str(info.value)


def test_duplicate_source_names_are_refused():
    raw = {"sources": [{"name": "a", "url": "https://x/1"}, {"name": "a", "url": "https://x/2"}]}
    with pytest.raises(ConfigError, match=r"data.sources\[1\].name: duplicate"):
        schema.build(DataSpec, raw, file="job.yaml", prefix="data.")


def test_cli_data_fetch(server, tmp_path):
    body = b"payload" * 500
    server.routes["/p.bin"] = Route(body)

    def config(name: str, digest: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        source = f"{{name: p, url: '{server.url('/p.bin')}', sha256: '{digest}'}}"
        path.write_text(f"name: j\ndata:\n  cache_dir: {tmp_path / name}\n  sources: [{source}]\n")
        return path

    ok = launcher_cmd("data", "fetch", str(config("good", sha256(body))), timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert str(tmp_path / "good" / "p" / "p.bin") in ok.stdout
    wrong = launcher_cmd("data", "fetch", str(config("wrong", "e" * 64)), timeout=60)
    assert wrong.returncode == 1
    errors = [line for line in wrong.stderr.splitlines() if "error" in line]
    assert errors == [
        f"launcher: error: data.sources[0] (p).sha256: checksum mismatch for "
        f"{server.url('/p.bin')}: expected {'e' * 64}, got {sha256(body)}; nothing was kept "
        "(if the file changed upstream on purpose, update the checksum)"
    ]
    assert "Traceback" not in wrong.stderr
