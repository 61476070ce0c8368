"""Build (and push) the training image through the docker SDK, tagged by a content hash.

The tag is a hash of everything the build reads (Dockerfile, the context files its COPY/ADD
lines name, build args, base image, wheelhouse, CA certificate), so `launcher build` is a no-op
when nothing changed and a run can name the exact image it ran in. The build context is made
here, not by the daemon: the files the COPY/ADD lines read from the project root filtered by
`.dockerignore`, plus the wheelhouse and CA certificate staged under `.build-extras/`; the
hash covers exactly that, so tag and context agree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import stat
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from launcher.errors import BackendError, ConfigError, LauncherError
from launcher.files import human_size
from launcher.spec import ImageSpec, JobSpec

if TYPE_CHECKING:
    from rich.console import Console

    import docker

# Where `launcher build` stages the optional wheelhouse and CA certificate in the context;
# docker/Dockerfile copies `.build-extra[s]` (a glob, so a plain `docker build` works without).
EXTRAS_DIR = ".build-extras"
HASH_VERSION = b"launcher-image-v1\n"
TAG_HEX = 12
LOG_TAIL_LINES = 12
# A build step can be silent for long (unpacking torch); the SDK's default read timeout is 60 s.
BUILD_TIMEOUT_S = 3600

_STEP = re.compile(r"^Step (\d+)/(\d+) : (.*)$")
_FROM = re.compile(r"^FROM\s+(?:--\S+\s+)*\S+(?:\s+AS\s+(?P<name>\S+))?\s*$", re.IGNORECASE)
_LAYER = re.compile(r"^ ---> ([0-9a-f]{12,64})$")
_STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,100}$")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Docker reference grammar: [host[:port]/]path-component(/path-component)*, lowercase.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(
    rf"^(?:(?P<host>[A-Za-z0-9.-]+(?::\d+)?)/)?(?P<path>{_COMPONENT}(?:/{_COMPONENT})*)$"
)
_BUILD_ARG = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class BuildResult:
    """What a build did: the tag to run, whether anything was built, and its figures."""

    tag: str
    image_id: str
    # False when the tag already existed and nothing was built ("up to date").
    built: bool
    seconds: float
    size_bytes: int
    # Step numbers the builder took from its cache ("---> Using cache").
    cached_steps: tuple[int, ...] = ()
    total_steps: int = 0
    # Wall seconds of each step seen, in order (step 1 first).
    step_seconds: tuple[float, ...] = ()
    log: tuple[str, ...] = ()
    # `repository:cache-STAGE` tags that keep the named build stages' cache (see _tag_stages).
    stage_tags: tuple[str, ...] = ()
    # The reference pushed to the registry, when asked to push.
    pushed: str | None = None


# --------------------------------------------------------------------------------------------
# .dockerignore and the build context (pure: no docker import)


@dataclass(frozen=True)
class _Pattern:
    regex: re.Pattern[str]
    text: str
    exclude: bool


def _glob_component(part: str) -> str:
    """One path component of a Go filepath.Match pattern as a regex (no `/` crossing)."""
    out, i = [], 0
    while i < len(part):
        c = part[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\" and i + 1 < len(part):
            i += 1
            out.append(re.escape(part[i]))
        elif c == "[":
            end = part.find("]", i + 1)
            if end == -1:
                out.append(re.escape(c))
            else:
                body = part[i + 1 : end]
                if body.startswith("^") or body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: `*` stays in one component, `**` spans any number."""
    parts = pattern.split("/")
    out = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out.append(".*" if last else "(?:[^/]*/)*")
        else:
            out.append(_glob_component(part) + ("" if last else "/"))
    return re.compile("".join(out) + r"\Z")


def _clean(path: str) -> str:
    path = os.path.normpath(path.strip().lstrip("/")).replace(os.sep, "/")
    return "" if path == "." else path


# Never part of an image, even without a .dockerignore: bytecode changes on every test run
# and would change the tag. A `!` line in .dockerignore can still bring one back.
DEFAULT_IGNORES = (".git", "**/__pycache__", "**/*.py[cod]")


def read_dockerignore(root: Path) -> list[_Pattern]:
    """DEFAULT_IGNORES then root/.dockerignore, in order (the last matching pattern decides)."""
    path = root / ".dockerignore"
    lines = list(DEFAULT_IGNORES)
    if path.is_file():
        lines += path.read_text().splitlines()
    patterns = []
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        text = _clean(line if exclude else line[1:])
        if text:
            patterns.append(_Pattern(_glob_regex(text), text, exclude))
    return patterns


def _excluded(rel: str, patterns: list[_Pattern]) -> bool:
    """Docker's rule: a path is excluded by a pattern matching it or one of its parents."""
    prefixes = [rel]
    parts = rel.split("/")
    prefixes += ["/".join(parts[:i]) for i in range(1, len(parts))]
    excluded = False
    for pattern in patterns:
        if any(pattern.regex.match(p) for p in prefixes):
            excluded = pattern.exclude
    return excluded


def _may_reinclude(rel_dir: str, patterns: list[_Pattern]) -> bool:
    """Whether a `!` pattern could bring back something under an excluded folder."""
    for p in patterns:
        if not p.exclude:
            head = p.text.split("/")[0]
            if p.text.startswith(rel_dir + "/") or any(ch in head for ch in "*?[\\"):
                return True
    return False


def context_files(root: Path) -> list[str]:
    """Files (and symlinks) of the build context: root minus .dockerignore, sorted, posix."""
    root = Path(root)
    patterns = read_dockerignore(root)
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = _clean(os.path.relpath(dirpath, root))
        keep = []
        for name in sorted(dirnames):
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if os.path.islink(os.path.join(dirpath, name)):
                filenames.append(name)
            elif not _excluded(rel, patterns) or _may_reinclude(rel, patterns):
                keep.append(name)
        dirnames[:] = keep
        for name in sorted(filenames):
            rel = f"{rel_dir}/{name}" if rel_dir else name
            path = os.path.join(dirpath, name)
            regular = os.path.islink(path) or os.path.isfile(path)  # no sockets or fifos
            if regular and not _excluded(rel, patterns):
                files.append(rel)
    # The staged extras always come from the spec, never from a folder of that name.
    return sorted(f for f in files if f != EXTRAS_DIR and not f.startswith(EXTRAS_DIR + "/"))


def _instructions(text: str) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, with continuation lines joined."""
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, rest = current.strip().partition(" ")
        current = ""
        if word:
            yield word.upper(), rest.strip()


def dockerfile_sources(text: str) -> list[str] | None:
    """Context paths the COPY/ADD lines read; None when a variable makes them unknowable."""
    sources: list[str] = []
    for word, rest in _instructions(text):
        if word not in ("COPY", "ADD"):
            continue
        if rest.startswith("["):
            try:
                args = [str(a) for a in json.loads(rest)]
            except ValueError:
                return None
        else:
            args = rest.split()
        flags = [a for a in args if a.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue  # copies from another stage or image, not from the context
        paths = [a for a in args if not a.startswith("--")][:-1]
        for src in paths:
            if "$" in src:
                return None
            if word == "ADD" and re.match(r"^(https?://|git@)", src):
                continue
            sources.append(_clean(src))
    return sources


def _read_sources(files: list[str], sources: list[str] | None) -> list[str]:
    """The context files that the COPY/ADD sources match (a source folder takes its tree)."""
    if sources is None or "" in sources:
        return files
    regexes = [_glob_regex(s) for s in sources]
    chosen = []
    for rel in files:
        parts = rel.split("/")
        prefixes = [rel] + ["/".join(parts[:i]) for i in range(1, len(parts))]
        if any(r.match(p) for r in regexes for p in prefixes):
            chosen.append(rel)
    return chosen


def _resolve(root: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else root / path


def _dockerfile_path(spec: ImageSpec, root: Path) -> Path:
    path = _resolve(root, spec.dockerfile)
    if not path.is_file():
        raise ConfigError(f"no Dockerfile at {path}", key="image.dockerfile")
    return path


def _wheels(spec: ImageSpec, root: Path) -> list[Path]:
    if not spec.wheelhouse:
        return []
    folder = _resolve(root, spec.wheelhouse)
    if not folder.is_dir():
        raise ConfigError(f"wheelhouse folder {folder} does not exist", key="image.wheelhouse")
    wheels = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".whl")
    if not wheels:
        raise ConfigError(
            f"wheelhouse folder {folder} holds no .whl files",
            key="image.wheelhouse",
            hint="fill it with `pip download -r docker/requirements.txt -d DIR`",
        )
    return wheels


def _ca_cert(spec: ImageSpec, root: Path) -> bytes | None:
    if not spec.ca_cert:
        return None
    path = _resolve(root, spec.ca_cert)
    if not path.is_file():
        raise ConfigError(f"CA certificate file {path} does not exist", key="image.ca_cert")
    data = path.read_bytes()
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigError(
            f"{path} holds no PEM certificate ('-----BEGIN CERTIFICATE-----')",
            key="image.ca_cert",
        )
    return data


def build_args(spec: ImageSpec) -> dict[str, str]:
    """The --build-arg values: the spec's own plus BASE_IMAGE when a base image is given."""
    args = {str(k): str(v) for k, v in spec.build_args.items()}
    for key in args:
        if not _BUILD_ARG.match(key):
            raise ConfigError(
                f"build arg name {key!r} is not a valid ARG name (letters, digits, '_')",
                key=f"image.build_args.{key}",
            )
    if spec.base_image:
        args["BASE_IMAGE"] = spec.base_image
    return args


def _check_repository(spec: ImageSpec) -> None:
    if not _REPOSITORY.match(spec.repository):
        raise ConfigError(
            f"{spec.repository!r} is not a valid image repository "
            "(lowercase letters, digits, '.', '_', '-', '/' separated; optional 'host:port/')",
            key="image.repository",
        )


def _file_digest(path: Path) -> str:
    if path.is_symlink():
        return "link:" + os.readlink(path)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_hash(spec: ImageSpec, root: Path) -> str:
    """sha256 over every input of the build; equal hashes mean an equal image."""
    root = Path(root)
    _check_repository(spec)
    dockerfile = _dockerfile_path(spec, root)
    text = dockerfile.read_text()
    h = hashlib.sha256(HASH_VERSION)

    def put(kind: str, value: str) -> None:
        h.update(f"{kind}\0{value}\n".encode())

    put("dockerfile", text)
    put("base_image", spec.base_image or "")
    put("build_args", json.dumps(build_args(spec), sort_keys=True))
    for rel in _read_sources(context_files(root), dockerfile_sources(text)):
        path = root / rel
        executable = bool(path.lstat().st_mode & stat.S_IXUSR)
        put("file", f"{rel}\0{int(executable)}\0{_file_digest(path)}")
    # Names and sizes: hashing a 200 MB torch wheel on every `launcher build` is not worth it.
    for wheel in _wheels(spec, root):
        put("wheel", f"{wheel.name}\0{wheel.stat().st_size}")
    ca = _ca_cert(spec, root)
    put("ca_cert", hashlib.sha256(ca).hexdigest() if ca else "")
    return h.hexdigest()


def image_tag(spec: ImageSpec, root: Path) -> str:
    """`repository:<12 hex>` named by the content hash; pure (no docker daemon)."""
    return f"{spec.repository}:{content_hash(spec, root)[:TAG_HEX]}"


def project_root() -> Path:
    """The folder holding docker/Dockerfile (the build context): cwd or above, else the repo."""
    here = Path.cwd()
    for folder in (here, *here.parents):
        if (folder / "docker" / "Dockerfile").is_file():
            return folder
    return Path(__file__).resolve().parent.parent


def image_for(spec: JobSpec) -> str:
    """The job's image: `docker.image` if set, else the tag `launcher build` gives (pure)."""
    if spec.docker.image:
        return spec.docker.image
    return image_tag(spec.image, project_root())


def push_reference(spec: ImageSpec, tag: str) -> str:
    """Where `--push` sends the image: image.registry/repository:hash."""
    _, _, version = tag.rpartition(":")
    if spec.registry:
        return f"{spec.registry.rstrip('/')}/{spec.repository}:{version}"
    match = _REPOSITORY.match(spec.repository)
    host = match.group("host") if match else None
    if host and ("." in host or ":" in host or host == "localhost"):
        return tag
    raise ConfigError(
        "pushing needs a registry",
        key="image.registry",
        hint="set image.registry (e.g. registry.example.com:5000/team) "
        "or a repository that starts with a registry host",
    )


def write_context(spec: ImageSpec, root: Path, out: IO[bytes]) -> str:
    """Write the build context as a tar to `out`; return the Dockerfile's path inside it.

    The context holds the files the Dockerfile's COPY/ADD lines read (all of root minus
    .dockerignore when a variable hides them), the Dockerfile, and the staged extras.
    """
    root = Path(root)
    dockerfile = _dockerfile_path(spec, root).resolve()
    # Only what COPY/ADD read (and so what the tag hashes): stray big files cost nothing.
    files = _read_sources(context_files(root), dockerfile_sources(dockerfile.read_text()))
    try:
        dockerfile_arc = dockerfile.relative_to(root.resolve()).as_posix()
    except ValueError:
        dockerfile_arc = f"{EXTRAS_DIR}/Dockerfile"
    wheels = _wheels(spec, root)
    ca = _ca_cert(spec, root)

    def normalized(info: tarfile.TarInfo) -> tarfile.TarInfo:
        # The legacy builder's COPY cache key covers uid/gid/names but not mtime.
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    with tarfile.open(fileobj=out, mode="w") as tar:
        for rel in files:
            tar.add(root / rel, arcname=rel, recursive=False, filter=normalized)
        if dockerfile_arc not in files:
            tar.add(dockerfile, arcname=dockerfile_arc, recursive=False, filter=normalized)
        for wheel in wheels:
            tar.add(wheel, arcname=f"{EXTRAS_DIR}/wheelhouse/{wheel.name}", filter=normalized)
        if ca is not None:
            info = tarfile.TarInfo(f"{EXTRAS_DIR}/ca/extra-ca.crt")
            info.size, info.mode, info.mtime = len(ca), 0o644, int(time.time())
            tar.addfile(info, io.BytesIO(ca))
    return dockerfile_arc


# --------------------------------------------------------------------------------------------
# Talking to the engine


def connect(timeout_s: float = 60) -> docker.DockerClient:
    """A docker SDK client, or a BackendError that says how to start an engine."""
    import docker

    try:
        client = docker.from_env(timeout=int(timeout_s))
        client.ping()
    except docker.errors.DockerException as exc:
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        reason = " ".join(str(exc).split())
        raise BackendError(
            f"cannot reach the Docker engine at {where}: {reason} "
            "(start one with scripts/docker-start.sh)"
        ) from exc
    return client


def _network_mode(client: docker.DockerClient) -> str | None:
    """Build steps use the host network when the engine has no bridge (dockerd --bridge=none)."""
    names = {n.get("Name") for n in client.api.networks(names=["bridge"])}
    return None if "bridge" in names else "host"


def _image(client: docker.DockerClient, ref: str) -> dict[str, Any] | None:
    import docker

    try:
        return client.api.inspect_image(ref)
    except docker.errors.ImageNotFound:
        return None


class _Display:
    """Shows the build as it streams: step N/M and the last lines (live on a terminal)."""

    def __init__(self, console: Console, title: str) -> None:
        self.console, self.title = console, title
        self.step, self.total, self.instruction = 0, 0, ""
        self.tail: deque[str] = deque(maxlen=6)
        self.started = time.monotonic()
        self._live: Any = None

    def __enter__(self) -> _Display:
        if self.console.is_terminal:
            from rich.live import Live

            self._live = Live(
                get_renderable=self._render,
                console=self.console,
                transient=True,
                refresh_per_second=8,
            )
            self._live.__enter__()
        else:
            self.console.print(self.title, highlight=False, markup=False)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)

    def _render(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        elapsed = time.monotonic() - self.started
        head = Text(f"{self.title}  ", style="bold")
        if self.total:
            head.append(f"step {self.step}/{self.total}", style="cyan")
        head.append(f"  {elapsed:.0f}s", style="dim")
        lines = [head, Text(f"  {self.instruction}", no_wrap=True, overflow="ellipsis")]
        lines += [
            Text(f"    {t}", style="dim", no_wrap=True, overflow="ellipsis") for t in self.tail
        ]
        return Group(*lines)

    def step_started(self, step: int, total: int, instruction: str) -> None:
        self.step, self.total = step, total
        self.instruction = _one_line(instruction)
        self.tail.clear()
        if self._live is None:
            text = f"  step {step}/{total}: {self.instruction}"
            self.console.print(
                text, highlight=False, markup=False, no_wrap=True, overflow="ellipsis"
            )

    def line(self, text: str) -> None:
        self.tail.append(text)


def _one_line(instruction: str, width: int = 120) -> str:
    text = " ".join(instruction.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _stream_lines(chunks: Iterable[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Split the builder's JSON stream into ("line", ...) and ("error"/"aux", chunk) events."""
    pending = ""
    for chunk in chunks:
        if "stream" in chunk:
            pending += _ANSI.sub("", chunk["stream"])
            *lines, pending = pending.split("\n")
            for line in lines:
                yield "line", {"text": line.rstrip("\r")}
        if "error" in chunk or "errorDetail" in chunk:
            if pending:
                yield "line", {"text": pending}
                pending = ""
            yield "error", chunk
        if "aux" in chunk:
            yield "aux", chunk
    if pending:
        yield "line", {"text": pending}


def _failure(
    tag: str, step: int, total: int, instruction: str, message: str, log: list[str], base: str
) -> BackendError:
    where = f"step {step}/{total} ({_one_line(instruction)})" if step else "before the first step"
    hint = ""
    if instruction.upper().startswith("FROM"):
        hint = (
            f"; the base image {base} is not on this machine and could not be pulled: make one "
            "(scripts/make-base-image.sh NAME:TAG) and pass --base-image NAME:TAG"
        )
    if any("CERTIFICATE_VERIFY_FAILED" in t for t in log[-50:]):
        hint += (
            "; TLS verification failed inside the build: behind a TLS-intercepting proxy, "
            "pass its CA bundle with --ca-cert FILE (image.ca_cert)"
        )
    # The failing step's own output, without the builder's bookkeeping lines.
    starts = [i for i, t in enumerate(log) if _STEP.match(t)]
    own = log[starts[-1] + 1 :] if starts else log
    noise = ("---> ", "Removing intermediate container")
    tail = [t for t in own if t.strip() and not t.strip().startswith(noise)][-LOG_TAIL_LINES:]
    body = "\n".join(f"  | {t}" for t in tail)
    return BackendError(
        f"image build of {tag} failed at {where}: {' '.join(message.split())}{hint}"
        + (f"\n  last lines of the step's output:\n{body}" if body else "")
    )


def _push(client: docker.DockerClient, image_id: str, ref: str, display: Any) -> None:
    repository, _, version = ref.rpartition(":")
    client.api.tag(image_id, repository, version)
    last = ""
    for chunk in client.api.push(repository, tag=version, stream=True, decode=True):
        if "error" in chunk or "errorDetail" in chunk:
            detail = chunk.get("errorDetail", {}).get("message") or chunk.get("error")
            raise BackendError(f"push of {ref} failed: {' '.join(str(detail).split())}")
        status = chunk.get("status")
        if status and status != last:
            display.line(f"{chunk.get('id', '')} {status}".strip())
            last = status


def build_image(
    spec: ImageSpec,
    root: Path,
    *,
    no_cache: bool = False,
    push: bool = False,
    console: Console | None = None,
) -> BuildResult:
    """Build the image unless its content tag exists; stream progress; optionally push."""
    from rich.console import Console

    import docker

    root = Path(root)
    console = console or Console(stderr=True)
    tag = image_tag(spec, root)
    push_ref = push_reference(spec, tag) if push else None
    client = connect()
    started = time.monotonic()
    try:
        existing = None if no_cache else _image(client, tag)
        if existing is not None:
            result = BuildResult(
                tag=tag,
                image_id=existing["Id"],
                built=False,
                seconds=time.monotonic() - started,
                size_bytes=int(existing.get("Size", 0)),
            )
        else:
            result = _build(client, spec, root, tag, no_cache, console, started)
        if push_ref:
            with _Display(console, f"pushing {push_ref}") as display:
                _push(client, result.image_id, push_ref, display)
            result = dataclasses.replace(result, pushed=push_ref)
        return result
    except docker.errors.DockerException as exc:
        raise BackendError(f"image build of {tag} failed: {' '.join(str(exc).split())}") from exc
    finally:
        client.close()


def _build(
    client: docker.DockerClient,
    spec: ImageSpec,
    root: Path,
    tag: str,
    no_cache: bool,
    console: Console,
    started: float,
) -> BuildResult:
    log: list[str] = []
    cached: list[int] = []
    step, total, instruction = 0, 0, ""
    step_starts: list[float] = []
    # (stage name or None, last image id) per FROM, to keep the build stages' cache (below).
    stages: list[list[str | None]] = []
    base = spec.base_image or "(the Dockerfile's default BASE_IMAGE)"
    with tempfile.TemporaryFile() as context, _Display(console, f"building {tag}") as display:
        dockerfile = write_context(spec, root, context)
        if image_tag(spec, root) != tag:
            raise BackendError(
                f"files under {root} changed while the build context was being made "
                f"(the tag {tag} no longer matches them): run the build again"
            )
        context.seek(0)
        chunks = client.api.build(
            fileobj=context,
            custom_context=True,
            dockerfile=dockerfile,
            tag=tag,
            buildargs=build_args(spec),
            nocache=no_cache,
            rm=True,
            forcerm=True,
            pull=False,
            network_mode=_network_mode(client),
            timeout=BUILD_TIMEOUT_S,
            decode=True,
        )
        for kind, event in _stream_lines(chunks):
            if kind == "error":
                detail = event.get("errorDetail") or {}
                message = detail.get("message") or event.get("error") or "unknown error"
                raise _failure(tag, step, total, instruction, str(message), log, base)
            if kind != "line":
                continue
            text = event["text"]
            log.append(text)
            match = _STEP.match(text)
            if match:
                step, total, instruction = int(match[1]), int(match[2]), match[3]
                step_starts.append(time.monotonic())
                display.step_started(step, total, instruction)
                stage = _FROM.match(instruction)
                if stage:
                    stages.append([stage["name"], None])
            elif text.strip() == "---> Using cache":
                cached.append(step)
            elif text.strip():
                display.line(text)
                layer = _LAYER.match(text)
                if layer and stages:
                    stages[-1][1] = layer[1]
    step_starts.append(time.monotonic())
    info = _image(client, tag)
    if info is None:
        raise _failure(tag, step, total, instruction, "no image was tagged", log, base)
    return BuildResult(
        tag=tag,
        image_id=info["Id"],
        built=True,
        seconds=time.monotonic() - started,
        size_bytes=int(info.get("Size", 0)),
        cached_steps=tuple(cached),
        total_steps=total,
        step_seconds=tuple(b - a for a, b in zip(step_starts, step_starts[1:], strict=False)),
        stage_tags=_tag_stages(client, spec.repository, stages[:-1]),
        log=tuple(log),
    )


def _tag_stages(
    client: docker.DockerClient, repository: str, stages: list[list[str | None]]
) -> tuple[str, ...]:
    """Tag each named build stage `repository:cache-NAME`, so `docker image prune` keeps it.

    The legacy builder leaves a finished stage (e.g. `deps`, the installed venv) as an
    untagged image; a prune would drop it and the next code-only change would reinstall every
    dependency. One moving tag per stage keeps the latest build's cache and no older one.
    """
    tags = []
    for name, image_id in stages:
        if name and image_id and _STAGE_NAME.match(name):
            client.api.tag(image_id, repository, f"cache-{name.lower()}")
            tags.append(f"{repository}:cache-{name.lower()}")
    return tuple(tags)


def run_build_command(spec: ImageSpec, root: Path, *, no_cache: bool, push: bool) -> int:
    """`launcher build`: build, print one summary line (or the error), return the exit code."""
    from rich.console import Console

    console = Console(stderr=True)
    try:
        result = build_image(spec, root, no_cache=no_cache, push=push, console=console)
    except LauncherError as exc:
        from rich.text import Text

        console.print(Text.assemble(("error: ", "red"), str(exc)), soft_wrap=True)
        return exc.exit_code
    if result.built:
        reused = f", {len(result.cached_steps)}/{result.total_steps} steps from cache"
        line = (
            f"built {result.tag} in {result.seconds:.1f}s ({human_size(result.size_bytes)}{reused})"
        )
    else:
        line = f"{result.tag} is up to date ({human_size(result.size_bytes)})"
    if result.pushed:
        line += f"; pushed {result.pushed}"
    console.print(line, highlight=False, markup=False)
    # The tag alone on stdout, so scripts can take it: IMAGE=$(launcher build).
    print(result.tag)
    return 0
