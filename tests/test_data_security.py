"""Hostile input to launcher.data, for real: a loopback server, archives built here, FIFOs.

Each test plants a victim file outside the cache (or the dataset folder) and proves it
untouched and that nothing else appeared outside. The property tests (hypothesis) state the
two rules the fixes rest on: an archive never creates anything outside its folder, and a URL
gives one safe file name or an error.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import shutil
import socket
import stat
import tarfile
import tempfile
import threading
import urllib.parse
import warnings
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from launcher import schema
from launcher.data import MANIFEST_NAME, archive, fetch_all, run_manifest_command, verify_tree
from launcher.data.paths import MAX_NAME_BYTES, UnsafeName, check_name, safe_join, url_filename
from launcher.data.verify import format_manifest, read_manifest
from launcher.errors import DataError
from launcher.spec import DataSourceSpec, DataSpec
from tests.conftest import launcher_cmd

VICTIM_TEXT = b"the victim's own bytes\n"
URL_EXAMPLES = 3000
ARCHIVE_EXAMPLES = 400


# --- helpers ------------------------------------------------------------------------------


class AnyPath(http.server.BaseHTTPRequestHandler):
    """Serves the same body for every path, and logs the raw paths it was asked for."""

    server: Loopback

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.paths.append(self.path)
        body = self.server.body
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Loopback(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, body: bytes) -> None:
        super().__init__(("127.0.0.1", 0), AnyPath)
        self.body = body
        self.paths: list[str] = []

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@pytest.fixture
def loopback(monkeypatch: pytest.MonkeyPatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    srv = Loopback(b"attacker's bytes\n")
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def spec(cache: Path, *sources: dict) -> DataSpec:
    raw = {"cache_dir": str(cache), "backoff_s": 0.01, "timeout_s": 10, "retries": 0}
    return schema.build(DataSpec, {**raw, "sources": list(sources)}, file="t.yaml", prefix="data.")


def snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple]:
    """Every entry under root (not following links): kind, size, mtime, content hash."""
    out: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root):
        if skip is not None and Path(folder) == skip:
            dirs[:] = []
            continue
        for name in dirs + files:
            full = os.path.join(folder, name)
            if skip is not None and Path(full) == skip:
                continue
            info = os.lstat(full)
            kind = stat.S_IFMT(info.st_mode)
            key = os.path.relpath(full, root)
            if stat.S_ISREG(info.st_mode):
                digest = hashlib.sha256(Path(full).read_bytes()).hexdigest()
                out[key] = (kind, info.st_size, info.st_mtime_ns, digest)
            elif stat.S_ISLNK(info.st_mode):
                out[key] = (kind, os.readlink(full))
            else:  # a folder's mtime moves whenever an entry comes or goes: not compared
                out[key] = (kind,)
    return out


def leftovers(cache: Path) -> list[str]:
    out = []
    for folder, dirs, files in os.walk(cache):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            if not name.endswith(".lock"):
                out.append(os.path.relpath(os.path.join(folder, name), cache))
    return sorted(out)


def one_line(exc: pytest.ExceptionInfo[DataError]) -> str:
    text = str(exc.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# --- 1. file names from URLs, configs and source names ---------------------------------------


def test_url_with_encoded_dotdot_cannot_write_outside_the_cache(loopback, tmp_path):
    """The reported bug: '/f/..%2F..%2F..%2F..%2F..%2Fvictim' was split before decoding and
    written to <tmp>/victim, five folders up from the staging folder."""
    victim = tmp_path / "victim"
    victim.write_bytes(VICTIM_TEXT)
    cache = tmp_path / "cache"
    url = loopback.url("/f/" + "..%2F" * 5 + "victim")
    body = loopback.body
    before = snapshot(tmp_path)
    with_sum = {"name": "x", "url": url, "sha256": hashlib.sha256(body).hexdigest()}
    for source in (with_sum, {"name": "x", "url": url}):
        with pytest.raises(DataError) as info:
            fetch_all(spec(cache, source))
        text = one_line(info)
        assert text.startswith("data.sources[0] (x).url: the URL ends in an unsafe file name, ")
        assert "'../../../../../victim': it contains '/'" in text
        assert "set 'filename:'" in text
    assert victim.read_bytes() == VICTIM_TEXT
    assert snapshot(tmp_path, skip=cache) == before
    assert leftovers(cache) == []
    assert loopback.paths == []  # refused before a single request

    # The same URL with a name of the user's choosing downloads into the cache as it should.
    got = fetch_all(spec(cache, {**with_sum, "filename": "victim"}))["x"]
    assert got == cache / "x" / "victim" and got.read_bytes() == body
    assert victim.read_bytes() == VICTIM_TEXT


@pytest.mark.parametrize(
    ("path", "stored"),
    [
        ("/sets/my%20data.bin", "my data.bin"),
        ("/sets/caf%C3%A9.bin", "café.bin"),
        ("/sets/", "download"),
        ("/get?file=../../x", "get"),
    ],
)
def test_ordinary_urls_keep_their_decoded_names(loopback, tmp_path, path, stored):
    got = fetch_all(spec(tmp_path / "cache", {"name": "s", "url": loopback.url(path)}))["s"]
    assert got == tmp_path / "cache" / "s" / stored


@pytest.mark.parametrize(
    ("url_path", "reason"),
    [
        ("/a%2Fb.bin", "it contains '/'"),
        ("/a%5Cb.bin", "it contains '\\\\'"),
        ("/%2E%2E", "it is '..'"),
        ("/.", "it is '.'"),
        ("/a%00b", "it contains a NUL character"),
        ("/a%0Ab", "it contains a control character"),
        ("/" + "n" * 300, "it is 300 bytes long (at most 255)"),
    ],
)
def test_unsafe_url_names_are_refused_before_any_request(loopback, tmp_path, url_path, reason):
    with pytest.raises(DataError) as info:
        fetch_all(spec(tmp_path / "cache", {"name": "u", "url": loopback.url(url_path)}))
    assert reason in one_line(info)
    assert one_line(info).startswith("data.sources[0] (u).url: ")
    assert loopback.paths == []


@pytest.mark.parametrize(
    ("filename", "reason"),
    [
        ("..", "it is '..'"),
        (".", "it is '.'"),
        ("a\x1bb", "it contains a control character"),
        ("f" * 256, "it is 256 bytes long (at most 255)"),
    ],
)
def test_unsafe_filename_is_refused_by_the_fetch_itself(loopback, tmp_path, filename, reason):
    """The schema refuses some of these; a DataSourceSpec made in code skips the schema."""
    source = DataSourceSpec(name="f", url=loopback.url("/ok.bin"), filename=filename)
    with pytest.raises(DataError) as info:
        fetch_all(DataSpec(sources=(source,), cache_dir=str(tmp_path / "cache"), retries=0))
    text = one_line(info)
    assert text.startswith("data.sources[0] (f).filename: unsafe file name ")
    assert reason in text
    assert loopback.paths == []


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../evil", "it contains '/'"),
        (".launcher", "it starts with '.'"),
        ("..", "it is '..'"),
        ("n" * 201, "it is 201 bytes long (at most 200)"),
    ],
)
def test_source_names_built_in_code_are_held_to_the_same_rule(tmp_path, name, reason):
    """DataSourceSpec made in Python skips the schema's name pattern; fetch checks it again."""
    victim = tmp_path / "evil"
    source = DataSourceSpec(name=name, url="http://127.0.0.1:9/x")
    with pytest.raises(DataError) as info:
        fetch_all(DataSpec(sources=(source,), cache_dir=str(tmp_path / "cache")))
    text = one_line(info)
    assert text.startswith("data.sources[0].name: ") and reason in text
    assert not victim.exists()


# --- 2. archives --------------------------------------------------------------------------


def tar_bytes(members: list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for item in members:
            info, data = item if isinstance(item, tuple) else (item, b"")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def ti(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info


def zip_bytes(members: list[tuple[str, bytes, int]]) -> bytes:
    """(name, content, unix mode incl. file type, 0 for none)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data, mode in members:
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.create_system = 3
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = mode << 16
            zf.writestr(info, data)
    return buf.getvalue()


def cve_2025_4517_tar(dest: Path, up: int, victim: str) -> bytes:
    """The public PoC shape (CPython gh-135034 test): 16 dirs with long names, each reached by a
    one-letter symlink, so `a/b/.../p` expands near PATH_MAX; a link at its end that
    os.path.realpath cannot expand any more points back at dest; through it, a symlink
    `escape` to dest/../.. (up levels) passes tarfile's check, and a hardlink through
    `escape` plus a regular member of the same name overwrites the victim."""
    steps = "abcdefghijklmnop"
    path_max = os.pathconf("/", "PC_PATH_MAX")
    comp = "d" * ((path_max - len(str(dest)) - 1) // (len(steps) + 1))
    members: list = []
    path = ""
    for step in steps:
        members.append(ti(os.path.join(path, comp), tarfile.DIRTYPE))
        members.append(ti(os.path.join(path, step), tarfile.SYMTYPE, comp))
        path = os.path.join(path, comp)
    linkpath = os.path.join(*steps, "l" * 254)
    members.append(ti(linkpath, tarfile.SYMTYPE, os.path.join(*[".."] * len(steps))))
    members.append(ti("escape", tarfile.SYMTYPE, linkpath + "/.." * up))
    members.append(ti("flaglink", tarfile.LNKTYPE, f"escape/{victim}"))
    members.append((ti("flaglink"), b"overwritten through CVE-2025-4517\n"))
    return tar_bytes(members)


def test_cve_2025_4517_archive_is_a_working_exploit_against_tarfiles_own_filter(tmp_path):
    """Proof that the archive below is hostile for real: on an unpatched Python (3.11.7 here)
    filter='data' lets it overwrite a file outside dest; a patched one refuses it."""
    victim = tmp_path / "victim"
    victim.write_bytes(VICTIM_TEXT)
    dest = tmp_path / "box" / "dest"
    dest.parent.mkdir()
    data = cve_2025_4517_tar(dest, up=2, victim="victim")
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        if hasattr(os.path, "ALLOW_MISSING"):  # the fix (gh-135034) added it
            with pytest.raises(tarfile.FilterError):
                tf.extractall(dest, filter="data")
            assert victim.read_bytes() == VICTIM_TEXT
        else:
            tf.extractall(dest, filter="data")
            assert victim.read_bytes() == b"overwritten through CVE-2025-4517\n"


def fetch_archive(tmp_path: Path, data: bytes, suffix: str) -> pytest.ExceptionInfo[DataError]:
    """Extract data as a checksummed local source, expecting a refusal; returns it.

    dest is <tmp>/cache/.launcher/staging/e: four levels below <tmp>, where the victim is.
    """
    local = tmp_path / f"in{suffix}"
    local.write_bytes(data)
    cache = tmp_path / "cache"
    source = {
        "name": "e",
        "path": str(local),
        "sha256": hashlib.sha256(data).hexdigest(),
        "extract": True,
    }
    before = snapshot(tmp_path, skip=cache)
    with pytest.raises(DataError) as info:
        fetch_all(spec(cache, source))
    assert (tmp_path / "victim").read_bytes() == VICTIM_TEXT
    assert snapshot(tmp_path, skip=cache) == before
    assert leftovers(cache) == []
    assert one_line(info).startswith("data.sources[0] (e).extract: ")
    return info


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"
    path.write_bytes(VICTIM_TEXT)
    return path


def test_cve_2025_4517_archive_is_refused_before_anything_is_written(tmp_path, victim):
    dest = tmp_path / "cache" / ".launcher" / "staging" / "e"
    data = cve_2025_4517_tar(dest, up=4, victim="victim")
    info = fetch_archive(tmp_path, data, ".tar")
    assert "refused: member 'dddd" in str(info.value)  # the length cap is the first to trip


def test_cve_2025_4517_chain_is_refused_by_the_link_rules_alone(tmp_path, victim):
    """With the path-length cap out of the way, the symlink rules still refuse the chain."""
    dest = tmp_path / "box" / "dest"
    dest.parent.mkdir()
    local = tmp_path / "poc.tar"
    local.write_bytes(cve_2025_4517_tar(dest, up=2, victim="victim"))
    before = snapshot(tmp_path)
    roomy = archive.Limits(path_bytes=1 << 14)
    with pytest.raises(DataError, match=r"lies under the symlink 'a'"):
        archive.extract(local, dest, "data.sources[0] (e)", limits=roomy)
    assert victim.read_bytes() == VICTIM_TEXT
    assert snapshot(tmp_path, skip=dest) == before
    assert list(dest.iterdir()) == []  # refused before a byte was written


OUT = "../../../../victim"  # from dest, the victim at <tmp>/victim


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        pytest.param([(ti(OUT), b"x")], "it contains '..'", id="dotdot"),
        pytest.param([(ti("/abs/victim"), b"x")], "it is an absolute path", id="absolute"),
        pytest.param(
            [ti("link", tarfile.SYMTYPE, OUT), (ti("link2"), b"x")],
            "is a symlink to '../../../../victim', outside the folder",
            id="symlink-out",
        ),
        pytest.param(
            [ti("link", tarfile.SYMTYPE, "/tmp")], "an absolute path", id="symlink-absolute"
        ),
        pytest.param(
            [ti("dir", tarfile.SYMTYPE, "../../../.."), (ti("dir/victim"), b"x")],
            "outside the folder",
            id="symlink-dir-out",
        ),
        pytest.param(
            [ti("hl", tarfile.LNKTYPE, OUT), (ti("hl"), b"x")],
            "is a hardlink to '../../../../victim': it contains '..'",
            id="hardlink-out",
        ),
        pytest.param(
            [ti("hl", tarfile.LNKTYPE, "ABSOLUTE")],
            "is a hardlink to",
            id="hardlink-absolute",
        ),
        pytest.param(
            [ti("sub", tarfile.DIRTYPE), ti("s", tarfile.SYMTYPE, "sub"), (ti("s/x"), b"x")],
            "member 's/x' lies under the symlink 's'",
            id="through-symlink",
        ),
        pytest.param(
            # Lexically 'a', really <dest>/.. : s is a/b/c/s -> ../.. (that is, a).
            [
                ti("a/b/c", tarfile.DIRTYPE),
                ti("a/b/c/s", tarfile.SYMTYPE, "../.."),
                ti("t", tarfile.SYMTYPE, "a/b/c/s/../../.."),
            ],
            "through the symlink 'a/b/c/s'",
            id="symlink-lexical-bypass",
        ),
        pytest.param(
            [(ti("f"), b"x"), ti("t", tarfile.SYMTYPE, "s/../.."), ti("s", tarfile.SYMTYPE, "f")],
            "through the symlink 's'",
            id="symlink-through-later-symlink",
        ),
        pytest.param([ti("null", tarfile.CHRTYPE)], "is a device", id="device"),
        pytest.param([ti("pipe", tarfile.FIFOTYPE)], "is a FIFO", id="fifo"),
        pytest.param([(ti("a\\..\\x"), b"x")], "it contains '\\\\'", id="backslash"),
        pytest.param([(ti("a\x07b"), b"x")], "control character", id="control"),
        pytest.param([(ti("n" * 256), b"x")], "256 bytes long", id="long-name"),
        pytest.param(
            [(ti("same"), b"1"), (ti("same"), b"2")], "clashes with an earlier", id="twice"
        ),
    ],
)
def test_hostile_tar_members_are_refused(tmp_path, victim, members, reason):
    for m in members:
        if isinstance(m, tarfile.TarInfo) and m.linkname == "ABSOLUTE":
            m.linkname = str(victim)
    info = fetch_archive(tmp_path, tar_bytes(members), ".tar")
    assert reason in str(info.value)


LINK = stat.S_IFLNK | 0o777
FILE = stat.S_IFREG | 0o644


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        pytest.param([(OUT, b"x", FILE)], "it contains '..'", id="dotdot"),
        pytest.param([("/abs/victim", b"x", 0)], "it is an absolute path", id="absolute"),
        pytest.param([("a\\..\\..\\x", b"x", 0)], "it contains '\\\\'", id="backslash"),
        pytest.param([("link", OUT.encode(), LINK)], "outside the folder", id="symlink-out"),
        pytest.param([("link", b"/etc/passwd", LINK)], "an absolute path", id="symlink-absolute"),
        pytest.param(
            [("link", b".", LINK), ("link/x", b"x", FILE)],
            "lies under the symlink 'link'",
            id="through-symlink",
        ),
        pytest.param([("pipe", b"", stat.S_IFIFO | 0o644)], "is a FIFO", id="fifo"),
        pytest.param([("dev", b"", stat.S_IFCHR | 0o644)], "character device", id="device"),
    ],
)
def test_hostile_zip_members_are_refused(tmp_path, victim, members, reason):
    info = fetch_archive(tmp_path, zip_bytes(members), ".zip")
    assert reason in str(info.value)


def test_zip_bomb_and_member_flood_stop_at_the_limits(tmp_path, victim):
    zeros = zip_bytes([("zeros.bin", bytes(20 << 20), FILE)])
    assert len(zeros) < 100_000  # 20 MB of zeros, a few KB packed
    limits = archive.Limits(bytes=10 << 20)
    (tmp_path / "bomb.zip").write_bytes(zeros)
    with pytest.raises(DataError, match=r"refused: it unpacks to more than 10,485,760 bytes"):
        archive.extract(
            tmp_path / "bomb.zip", tmp_path / "d1", "data.sources[0] (z)", limits=limits
        )
    assert list((tmp_path / "d1").iterdir()) == []

    tar = tar_bytes([(ti("zeros.bin"), bytes(20 << 20))])
    (tmp_path / "bomb.tar").write_bytes(tar)
    with pytest.raises(DataError, match="it unpacks to more than"):
        archive.extract(
            tmp_path / "bomb.tar", tmp_path / "d2", "data.sources[0] (z)", limits=limits
        )

    flood = zip_bytes([(f"f{i}", b"", FILE) for i in range(50)])
    (tmp_path / "flood.zip").write_bytes(flood)
    with pytest.raises(DataError, match="it has more than 10 members"):
        archive.extract(
            tmp_path / "flood.zip", tmp_path / "d3", "x", limits=archive.Limits(members=10)
        )
    # The defaults are generous: far above real datasets, far below a bomb's claims.
    assert archive.LIMITS == archive.Limits(members=10_000_000, bytes=2 << 40, path_bytes=1024)
    assert victim.read_bytes() == VICTIM_TEXT


def test_archive_larger_than_the_free_space_is_refused_up_front(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(archive._Refused, match="bytes free"):
        archive._check_space(tmp_path, free + (1 << 40))


def test_ordinary_archives_with_inside_links_still_unpack(tmp_path):
    """`tar -C dir .` style ('./' first), folders, an inside symlink chain and a hardlink."""
    src = tmp_path / "src"
    (src / "set" / "sub").mkdir(parents=True)
    (src / "set" / "a.txt").write_bytes(b"alpha")
    (src / "set" / "sub" / "b.txt").write_bytes(b"beta")
    os.symlink("sub/b.txt", src / "set" / "latest")
    os.symlink("latest", src / "set" / "current")
    os.link(src / "set" / "a.txt", src / "set" / "a-again.txt")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(src, arcname=".")
    (tmp_path / "ok.tgz").write_bytes(buf.getvalue())
    zipped = zip_bytes(
        [("set/", b"", stat.S_IFDIR | 0o755), ("set/a.txt", b"alpha", FILE)]
        + [("set/sub/b.txt", b"beta", FILE), ("set/latest", b"sub/b.txt", LINK)]
    )
    (tmp_path / "ok.zip").write_bytes(zipped)
    for name in ("ok.tgz", "ok.zip"):
        dest = tmp_path / f"out-{name}"
        archive.extract(tmp_path / name, dest, "data.sources[0] (ok)")
        assert (dest / "set" / "sub" / "b.txt").read_bytes() == b"beta"
        assert os.readlink(dest / "set" / "latest") == "sub/b.txt"
        assert (dest / "set" / "latest").read_bytes() == b"beta"
    tgz = tmp_path / "out-ok.tgz" / "set"
    assert (tgz / "current").read_bytes() == b"beta"
    assert os.stat(tgz / "a-again.txt").st_ino == os.stat(tgz / "a.txt").st_ino


# --- property: no archive writes outside its folder -------------------------------------------

BENIGN = st.one_of(
    st.sampled_from(["a", "b", "s", "victim", "café", "c d"]),
    st.integers(0, 30).map(lambda i: f"n{i}"),
)
HOSTILE = st.sampled_from(["..", ".", "", "x\\y", "l" * 256, "a\x01", "\u202e"])
ANY_TEXT = st.text(
    st.characters(blacklist_characters="\x00/", blacklist_categories=("Cs",)), max_size=6
)


def paths(component: st.SearchStrategy[str], leads: list[str]) -> st.SearchStrategy[str]:
    return st.builds(
        lambda lead, parts: lead + "/".join(parts),
        st.sampled_from(leads),
        st.lists(component, min_size=1, max_size=3),
    )


@st.composite
def members(draw: st.DrawFn) -> list[tuple[str, str, str, int]]:
    """Half the archives from plain names and inside targets (most unpack), half from
    anything (most are refused): the statistics show the split."""
    if draw(st.booleans()):
        names = paths(BENIGN, ["", "./"])
        targets = st.one_of(names, st.sampled_from(["../a", "s/a", "a/../b", ".", "../n3"]))
    else:
        names = paths(st.one_of(BENIGN, HOSTILE, ANY_TEXT), ["", "/", "./"])
        escapes = ["../victim", "../../../victim", "..", "../../..", "s/..", "a/../.."]
        targets = st.one_of(names, st.sampled_from(escapes))
    member = st.tuples(
        st.sampled_from(["file", "file", "dir", "symlink", "hardlink"]),
        names,
        targets,
        st.integers(0, 3000),
    )
    return draw(st.lists(member, min_size=1, max_size=6))


PROPERTY = settings(
    max_examples=ARCHIVE_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def build_tar(members: list[tuple[str, str, str, int]]) -> bytes:
    items: list = []
    for kind, name, target, size in members:
        code = {
            "file": tarfile.REGTYPE,
            "dir": tarfile.DIRTYPE,
            "symlink": tarfile.SYMTYPE,
            "hardlink": tarfile.LNKTYPE,
        }[kind]
        data = bytes([size % 251]) * size if kind == "file" else b""
        items.append((ti(name, code, target if kind in ("symlink", "hardlink") else ""), data))
    return tar_bytes(items)


def build_zip(members: list[tuple[str, str, str, int]]) -> bytes:
    warnings.simplefilter("ignore")  # zipfile warns about a duplicate name; it is wanted here
    items = []
    for kind, name, target, size in members:
        if kind == "dir":
            items.append((name.rstrip("/") + "/", b"", stat.S_IFDIR | 0o755))
        elif kind == "symlink":
            items.append((name, os.fsencode(target), LINK))
        else:  # a zip has no hardlinks: a file
            items.append((name, bytes([size % 251]) * size, FILE))
    return zip_bytes(items)


def assert_contained(build, members) -> None:
    """The property: nothing outside dest changes; success leaves only files, folders and
    links that resolve inside dest; failure is a one-line DataError."""
    try:
        data = build(members)
    except (ValueError, UnicodeError, tarfile.TarError, zipfile.BadZipFile):
        event("not writable")
        return  # a name the writer itself cannot store
    with tempfile.TemporaryDirectory() as box:
        base = Path(box)
        (base / "victim").write_bytes(VICTIM_TEXT)
        (base / "in").mkdir()
        (base / "in" / "arc").write_bytes(data)
        dest = base / "a" / "b" / "dest"
        (base / "a" / "b").mkdir(parents=True)
        before = snapshot(base)
        try:
            archive.extract(base / "in" / "arc", dest, "data.sources[0] (p)")
        except DataError as exc:
            assert "\n" not in str(exc) and str(exc).startswith("data.sources[0] (p).extract")
            event("refused")
        else:
            event("unpacked")
            top = os.path.realpath(dest)
            for folder, dirs, files in os.walk(dest):
                for name in dirs + files:
                    full = os.path.join(folder, name)
                    mode = os.lstat(full).st_mode
                    assert stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)
                    real = os.path.realpath(full)
                    assert os.path.commonpath([real, top]) == top, (name, real)
        assert snapshot(base, skip=dest) == before
        assert (base / "victim").read_bytes() == VICTIM_TEXT


@PROPERTY
@given(members())
def test_property_tar_extraction_stays_inside(members):
    assert_contained(build_tar, members)


@PROPERTY
@given(members())
def test_property_zip_extraction_stays_inside(members):
    assert_contained(build_zip, members)


# --- property: a URL gives one safe name or an error ------------------------------------------

UNICODE = st.characters(blacklist_categories=("Cs",))
RAW_NAMES = st.one_of(
    st.text(UNICODE, max_size=20),
    st.sampled_from(["..", ".", "../..", "a/../b", "..\\..\\x", "\x00", "ok.bin", "l" * 300]),
)


@st.composite
def urls(draw: st.DrawFn) -> str:
    """A URL whose last part is some text percent-encoded (or raw percent soup)."""
    head = draw(st.lists(st.text("abc/.%", max_size=4), max_size=3))
    raw = draw(RAW_NAMES)
    last = draw(
        st.one_of(
            st.builds(urllib.parse.quote, st.just(raw), st.sampled_from(["", "/", ".", "/\\"])),
            st.text("%0123456789abcdefABCDEF./\\", max_size=12),
        )
    )
    tail = draw(st.sampled_from(["", "?q=../../x", "#frag/../..", "?a=%2F"]))
    return "https://host.example/" + "/".join(head) + "/" + last + tail


@settings(max_examples=URL_EXAMPLES, deadline=None)
@given(urls())
def test_property_url_gives_one_safe_name_or_an_error(url):
    folder = Path("/srv/cache/staging/download")
    try:
        name = url_filename(url)
    except UnsafeName as exc:
        assert "\n" not in str(exc)
        return
    assert check_name(name) == name
    assert "/" not in name and "\\" not in name and "\x00" not in name
    assert name not in ("", ".", "..")
    assert len(os.fsencode(name)) <= MAX_NAME_BYTES
    assert safe_join(folder, name).parent == folder


@settings(max_examples=URL_EXAMPLES // 3, deadline=None)
@given(st.text(UNICODE, min_size=1, max_size=30))
def test_property_a_safe_decoded_name_is_kept_exactly(raw):
    """No silent mangling: when the decoded name is safe, it is the name used."""
    url = "https://host.example/d/" + urllib.parse.quote(raw, safe="")
    try:
        check_name(raw)
    except UnsafeName:
        with pytest.raises(UnsafeName):
            url_filename(url)
    else:
        assert url_filename(url) == raw


# --- 3. verify and manifest never open a FIFO or a device ----------------------------------------


@pytest.fixture
def special_tree(tmp_path: Path) -> Path:
    """Good files, then a FIFO, a socket, a symlink to /dev/zero, a symlink to a FIFO outside,
    a symlink to a folder outside; plus an inside symlink to a file and one to a folder (fine)."""
    root = tmp_path / "set"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n")
    (root / "sub" / "b.txt").write_text("beta\n")
    os.symlink("sub/b.txt", root / "b-link.txt")
    os.symlink("sub", root / "sub-link")
    os.mkfifo(root / "pipe")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.mkfifo(outside / "far-pipe")
    os.symlink("/dev/zero", root / "zero.bin")
    os.symlink(outside / "far-pipe", root / "far.bin")
    os.symlink(outside, root / "elsewhere")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock"))
    sock.close()
    return root


SPECIAL = {
    "pipe": "a FIFO, not a regular file: not opened",
    "sock": "a socket, not a regular file: not opened",
    "zero.bin": "symlink to /dev/zero, outside the folder: not opened",
}


def check_special(bad: dict[str, list[str]], tmp_path: Path) -> None:
    for name, text in SPECIAL.items():
        assert bad[name] == [text]
    outside = os.path.realpath(tmp_path / "outside")
    for name, real in (("far.bin", f"{outside}/far-pipe"), ("elsewhere", outside)):
        assert bad[name] == [f"symlink to {real}, outside the folder: not opened"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("jobs", [1, 2])
def test_verify_reports_special_files_without_opening_them(special_tree, tmp_path, jobs):
    report = verify_tree(special_tree, jobs=jobs, want_hashes=True)
    assert set(report.bad) == {*SPECIAL, "far.bin", "elsewhere"}
    check_special(report.bad, tmp_path)
    # The regular files, and the inside link to one, are checked and hashed as before.
    assert set(report.hashes) == {"a.txt", "sub/b.txt", "b-link.txt"}
    assert report.hashes["b-link.txt"] == report.hashes["sub/b.txt"]


@pytest.mark.timeout(30)
def test_verify_against_a_manifest_that_lists_the_special_files(special_tree, tmp_path):
    """The reported hang: `verify --manifest` hashed /dev/zero (and blocked on the FIFO)."""
    listed = {name: "0" * 64 for name in ["a.txt", "sub/b.txt", *SPECIAL, "far.bin"]}
    (tmp_path / "sums").write_text(format_manifest(listed))
    report = verify_tree(special_tree, manifest=tmp_path / "sums", jobs=2)
    for name, text in SPECIAL.items():
        assert report.bad[name] == [text]  # one line each; no hash, so no mismatch line
    assert "differs from the manifest" in report.bad["a.txt"][0]


@pytest.mark.timeout(30)
def test_manifest_command_refuses_the_tree_quickly_and_writes_nothing(special_tree, tmp_path):
    assert run_manifest_command(special_tree, jobs=2) == 1
    assert not (special_tree / MANIFEST_NAME).exists()
    done = launcher_cmd("data", "manifest", str(special_tree), "--jobs", "2", timeout=25)
    assert done.returncode == 1
    bad = {line[4:].split(":")[0] for line in done.stdout.splitlines() if line.startswith("BAD ")}
    assert bad == {*SPECIAL, "far.bin", "elsewhere"}
    assert "Traceback" not in done.stderr
    assert not (special_tree / MANIFEST_NAME).exists()


@pytest.mark.timeout(30)
def test_manifest_that_is_a_fifo_or_a_device_is_a_one_line_error(special_tree, tmp_path):
    for path in (special_tree / "pipe", Path("/dev/zero")):
        with pytest.raises(DataError) as info:
            read_manifest(path)
        assert "the manifest must be a regular file" in one_line(info)
    done = launcher_cmd(
        "data", "verify", str(special_tree), "--manifest", str(special_tree / "pipe"), timeout=25
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "the manifest must be a regular file" in done.stderr


def test_manifest_lines_must_stay_inside_the_folder(tmp_path):
    digest = "a" * 64
    for name, reason in [
        ("../../etc/passwd", "it contains '..'"),
        ("/etc/passwd", "it is an absolute path"),
        ("a/../../b", "it contains '..'"),
    ]:
        (tmp_path / "m").write_text(f"{digest}  {name}\n")
        with pytest.raises(DataError) as info:
            read_manifest(tmp_path / "m")
        assert one_line(info).startswith(f"{tmp_path / 'm'}:1: expected a path inside the folder")
        assert reason in one_line(info)
    # sha256sum run as `sha256sum ./x` writes './x': the same file as 'x'.
    (tmp_path / "m").write_text(f"{digest}  ./sub//x\n")
    assert read_manifest(tmp_path / "m") == {"sub/x": digest}


@pytest.mark.timeout(30)
def test_local_source_that_is_a_fifo_is_refused_without_opening_it(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    for path in (tmp_path / "pipe", Path("/dev/zero")):
        source = {"name": "p", "path": str(path), "sha256": "0" * 64}
        with pytest.raises(DataError) as info:
            fetch_all(spec(tmp_path / "cache", source))
        assert "needs a regular file" in one_line(info)
        assert one_line(info).startswith("data.sources[0] (p).path: ")


def test_cli_is_still_a_one_liner_for_a_hostile_url(tmp_path):
    config = tmp_path / "job.yaml"
    url = "http://127.0.0.1:9/f/..%2F..%2Fvictim"
    source = f"{{name: x, url: '{url}'}}"
    config.write_text(f"name: j\ndata:\n  cache_dir: {tmp_path / 'c'}\n  sources: [{source}]\n")
    done = launcher_cmd("data", "fetch", str(config), timeout=60)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert errors == [
        "launcher: error: data.sources[0] (x).url: the URL ends in an unsafe file name, "
        "'../../victim': it contains '/'; set 'filename:' to name the file"
    ]
