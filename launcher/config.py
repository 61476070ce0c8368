"""YAML file -> JobSpec: `extends:` base files, `key.path=value` overrides, validation.

Everything here is pure Python + PyYAML, so `--help` and `--dry-run` stay fast. Every input
is bounded (bytes, nesting, values after alias expansion, `extends:` chain) and checked to be
plain data, so any file or override that is not a config is one ConfigError line (exit 2),
never a traceback or a hang.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from launcher import schema
from launcher.errors import ConfigError
from launcher.spec import JobSpec

OVERRIDE_SOURCE = "command line"

# Bounds on what one config may be. Nothing honest comes near them; each stops a document
# that would otherwise hang or crash the loader (PyYAML's composer recurses per level, and
# aliases let a few hundred bytes stand for billions of values).
MAX_BYTES = 1 << 20  # 1 MiB: pure-Python PyYAML reads ~40 KB/s on 2 busy cores
MAX_DEPTH = 64  # nested lists/mappings, counted after alias expansion
MAX_NODES = 1_000_000  # values after alias expansion (more than 1 MiB can spell out)
MAX_EXTENDS = 32  # files in one `extends:` chain
MAX_INT_BITS = 64

# libyaml when present: the pure-Python scanner takes seconds per 100 KB.
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# What YAML allows unescaped (PyYAML's Reader.NON_PRINTABLE, inverted).
_NON_PRINTABLE = re.compile(
    "[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
)
_BAD_IN_STRING = re.compile("[\x00\ud800-\udfff]")
_KINDS = {
    dict: "a mapping",
    list: "a list",
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true/false",
    type(None): "null",
}


@dataclass(frozen=True)
class Loaded:
    """A validated spec plus the merged plain dict it came from (sweeps expand the dict)."""

    spec: JobSpec
    raw: dict[str, Any]
    file: str


def shown(path: str | bytes | os.PathLike[str]) -> str:
    """A path as printable text: bytes that are not UTF-8 appear as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _kind(value: Any) -> str:
    return _KINDS.get(type(value), type(value).__name__)


def _as_path(path: str | bytes | os.PathLike[str]) -> Path:
    """The config path, refusing names that are not UTF-8 (they cannot be printed or recorded)."""
    text = os.fsdecode(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raw = os.fsencode(text)
        where = len(text[: exc.start].encode("utf-8", "surrogateescape"))
        raise ConfigError(
            f"the file name has byte 0x{raw[where]:02x} at offset {where}, which is not UTF-8; "
            "expected a UTF-8 file name",
            file=shown(text),
        ) from None
    return Path(text)


def _read_bytes(path: Path) -> bytes:
    name = shown(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError("file not found; expected a YAML config file", file=name) from None
    except IsADirectoryError:
        raise ConfigError("is a directory; expected a YAML config file", file=name) from None
    except OSError as exc:
        what = "is a symlink loop" if exc.errno == errno.ELOOP else "cannot be read"
        raise ConfigError(
            f"{what} ({exc.strerror or exc}); expected a readable YAML config file", file=name
        ) from None
    if len(data) > MAX_BYTES:
        try:
            size = f"{os.stat(path).st_size} bytes"
        except OSError:
            size = f"over {MAX_BYTES} bytes"
        raise ConfigError(
            f"is {size}; expected a config file of at most 1 MiB ({MAX_BYTES} bytes)", file=name
        )
    return data


def _decode(data: bytes, *, file: str) -> str:
    """UTF-8 text YAML can hold, or an error with the byte offset of the first bad byte."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"byte 0x{data[exc.start]:02x} at offset {exc.start} (line {line}) is not UTF-8; "
            "expected UTF-8 text",
            file=file,
        ) from None
    bad = _NON_PRINTABLE.search(text)
    if bad:
        i = bad.start()
        offset = len(text[:i].encode("utf-8"))
        line = text.count("\n", 0, i) + 1
        column = i - (text.rfind("\n", 0, i) + 1) + 1
        char = (
            "a NUL byte" if bad.group() == "\x00" else f"control character U+{ord(bad.group()):04X}"
        )
        raise ConfigError(
            f"line {line}, column {column}: found {char} at offset {offset}; "
            "expected printable text (escape it inside double quotes)",
            file=file,
        )
    return text


def _yaml_error(exc: yaml.YAMLError, *, file: str, key: str | None = None) -> ConfigError:
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = getattr(exc, "problem", None) or str(exc).split("\n")[0] or "invalid YAML"
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    if context and context_mark is not None:
        context = f"{context} at line {context_mark.line + 1}, column {context_mark.column + 1}"
    detail = f" ({context})" if context else ""
    return ConfigError(f"{where}{problem}{detail}; expected valid YAML", file=file, key=key)


def _scan(text: str, *, file: str, key: str | None = None) -> int:
    """Check nesting depth and alias expansion from the event stream, before composing.

    The event parser keeps its own stack (no recursion) and nothing is expanded: each anchor
    remembers how many values and levels it stands for. Returns the number of documents.
    """

    def fail(event: Any, message: str) -> ConfigError:
        mark = event.start_mark
        return ConfigError(
            f"line {mark.line + 1}, column {mark.column + 1}: {message}", file=file, key=key
        )

    anchors: dict[str, tuple[int, int]] = {}  # anchor -> (values, levels) it expands to
    stack: list[list[Any]] = []  # open collections: [values, levels below, anchor]
    total = 0
    documents = 0
    for event in yaml.parse(text, Loader=_LOADER):
        if isinstance(event, yaml.DocumentStartEvent):
            documents += 1
            if documents > 1:
                raise fail(event, "found a second YAML document; expected one document per file")
            continue
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            if len(stack) >= MAX_DEPTH:
                raise fail(
                    event,
                    f"found nesting deeper than {MAX_DEPTH} levels; expected at most {MAX_DEPTH}",
                )
            stack.append([1, 0, event.anchor])
            total += 1
            continue
        if isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            values, below, anchor = stack.pop()
            levels = below + 1
            if anchor is not None:
                anchors[anchor] = (values, levels)
        elif isinstance(event, yaml.ScalarEvent):
            values, levels = 1, 0
            total += 1
            if event.anchor is not None:
                anchors[event.anchor] = (values, levels)
        elif isinstance(event, yaml.AliasEvent):
            if any(frame[2] == event.anchor for frame in stack):
                raise fail(
                    event,
                    f"alias *{event.anchor} refers to a value that contains it; "
                    "expected aliases to finished values (no recursion)",
                )
            if event.anchor not in anchors:
                raise fail(
                    event,
                    f"found undefined alias *{event.anchor}; expected an anchor "
                    f"&{event.anchor} before it",
                )
            values, levels = anchors[event.anchor]
            total += values
            if len(stack) + levels > MAX_DEPTH:
                raise fail(
                    event,
                    f"alias *{event.anchor} nests deeper than {MAX_DEPTH} levels; "
                    f"expected at most {MAX_DEPTH}",
                )
        else:
            continue
        if total > MAX_NODES:
            raise fail(
                event,
                f"aliases expand to more than {MAX_NODES} values; expected at most {MAX_NODES}",
            )
        if stack:
            stack[-1][0] += values
            stack[-1][1] = max(stack[-1][1], levels)
    return documents


_EMPTY = object()


def _parse(text: str, *, file: str, key: str | None = None) -> Any:
    """One YAML document as plain data (`_EMPTY` if there is none). Raises yaml.YAMLError for
    syntax errors and ConfigError for everything else that is wrong with it."""
    if not _scan(text, file=file, key=key):
        return _EMPTY
    try:
        data = yaml.load(text, Loader=_LOADER)  # a safe loader: CSafeLoader or SafeLoader
    except RecursionError:
        raise ConfigError(
            f"found nesting too deep to read; expected at most {MAX_DEPTH} levels",
            file=file,
            key=key,
        ) from None
    except (ValueError, TypeError, AttributeError, OverflowError, IndexError, KeyError) as exc:
        # PyYAML's constructors raise these for values its resolver matched but cannot build
        # (`2001-13-45`, a 5000-digit integer, `!!timestamp abc`).
        reason = str(exc).split(";")[0] or type(exc).__name__
        raise ConfigError(
            f"found a value YAML cannot read ({reason}); expected a valid value "
            "(quote it to keep it as text)",
            file=file,
            key=key,
        ) from None
    check_tree(data, file=file, prefix=key or "")
    return data


def parse_value(text: str, *, key: str, file: str = OVERRIDE_SOURCE) -> Any:
    """An override's value read as YAML; text that is not YAML stays text. Bounded like a file."""
    _check_string(text, file=file, key=key)
    try:
        value = _parse(text, file=file, key=key)
    except yaml.YAMLError:
        return text
    return None if value is _EMPTY else value


def _check_string(text: str, *, file: str, key: str | None) -> None:
    bad = _BAD_IN_STRING.search(text)
    if not bad:
        return
    code = ord(bad.group())
    if code == 0:
        what, expected = "a NUL character", "text without NUL"
    elif 0xDC80 <= code <= 0xDCFF:  # how Python keeps a byte of argv that is not UTF-8
        what, expected = f"byte 0x{code - 0xDC00:02x}, which is not UTF-8,", "UTF-8 text"
    else:
        what, expected = "a lone surrogate", "Unicode text"
    raise ConfigError(
        f"found {what} at position {bad.start()} of {_show(text)}; expected {expected}",
        file=file,
        key=key or None,
    )


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _short(key: str) -> str | None:
    """A dotted key cut to a readable length (a deep one is mostly `[0][0]...`)."""
    return (key if len(key) <= 80 else key[:77] + "...") or None


def check_tree(data: Any, *, file: str, prefix: str = "", depth: int = 0) -> None:
    """Plain data only (mappings, lists, strings, numbers, true/false, null), at most
    MAX_DEPTH levels and MAX_NODES values with shared parts counted each time, no cycles,
    no NUL or surrogate in any string.

    Iterative and memoised by identity, so a value shared a billion times is walked once.
    Files are already bounded by `_scan`; this also covers merged and overridden dicts.
    `depth` is how many levels `data` sits below the top (an override's key).
    """
    done: dict[int, tuple[int, int]] = {}  # id -> (values, levels) of a finished collection
    open_ids: set[int] = set()
    # frames: [value, dotted key, iterator of (key, child), values, levels below]
    stack: list[list[Any]] = []

    def child_key(parent: str, part: Any, is_list: bool) -> str:
        if is_list:
            return f"{parent}[{part}]"
        return f"{parent}.{part}" if parent else str(part)

    def leaf(value: Any, key: str) -> None:
        if isinstance(value, str):
            _check_string(value, file=file, key=key)
        elif isinstance(value, bool) or value is None or isinstance(value, float):
            pass
        elif isinstance(value, int):
            if value.bit_length() > MAX_INT_BITS:
                raise ConfigError(
                    f"found an integer of {value.bit_length()} bits; expected at most "
                    f"{MAX_INT_BITS} bits",
                    file=file,
                    key=key or None,
                )
        else:
            raise ConfigError(
                f"found {_kind(value)} ({_show(value)}); expected a mapping, list, string, "
                "number, true/false or null (quote it to keep it as text)",
                file=file,
                key=key or None,
            )

    def enter(value: Any, key: str) -> tuple[int, int] | None:
        """Start walking a collection; (values, levels) at once if it needs no walk."""
        if not isinstance(value, (dict, list)):
            leaf(value, key)
            return 1, 0
        ident = id(value)
        if ident in done:
            return done[ident]
        if ident in open_ids:
            raise ConfigError(
                "found a value that contains itself (a recursive alias); expected a tree",
                file=file,
                key=key or None,
            )
        if len(stack) + depth >= MAX_DEPTH:
            raise ConfigError(
                f"found nesting deeper than {MAX_DEPTH} levels; expected at most {MAX_DEPTH}",
                file=file,
                key=_short(key),
            )
        open_ids.add(ident)
        items = enumerate(value) if isinstance(value, list) else iter(value.items())
        stack.append([value, key, items, 1, 0])
        return None

    def add(frame: list[Any], values: int, levels: int) -> None:
        frame[3] += values
        frame[4] = max(frame[4], levels)
        if frame[3] > MAX_NODES:
            raise ConfigError(
                f"found more than {MAX_NODES} values (aliases count each time they are used); "
                f"expected at most {MAX_NODES}",
                file=file,
                key=frame[1] or None,
            )
        if len(stack) + depth + levels > MAX_DEPTH:
            raise ConfigError(
                f"found nesting deeper than {MAX_DEPTH} levels; expected at most {MAX_DEPTH}",
                file=file,
                key=_short(frame[1]),
            )

    if enter(data, prefix) is not None:
        return
    while stack:
        frame = stack[-1]
        value, key, items = frame[0], frame[1], frame[2]
        is_list = isinstance(value, list)
        for part, child in items:
            here = child_key(key, part, is_list)
            if not is_list:
                if not isinstance(part, (str, int, float, bool, type(None))):
                    raise ConfigError(
                        f"found a key that is {_kind(part)} ({_show(part)}); expected a string key",
                        file=file,
                        key=key or None,
                    )
                leaf(part, key)  # a bad key is shown by repr under its parent's name
                add(frame, 1, 0)
            finished = enter(child, here)
            if finished is None:
                break  # walk the child first; this frame's iterator resumes after it
            add(frame, *finished)
        else:
            stack.pop()
            open_ids.discard(id(value))
            result = (frame[3], frame[4] + 1)
            done[id(value)] = result
            if stack:
                add(stack[-1], *result)


def _read_yaml(path: str | bytes | os.PathLike[str]) -> dict[str, Any]:
    """A file's top-level mapping; any other content is a one-line ConfigError."""
    path = _as_path(path)
    name = shown(path)
    text = _decode(_read_bytes(path), file=name)
    try:
        data = _parse(text, file=name)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, file=name) from None
    if data is _EMPTY:
        raise ConfigError("is empty; expected a mapping of config keys", file=name)
    if not isinstance(data, dict):
        raise ConfigError(
            f"found {_kind(data)} at the top level; expected a mapping of config keys",
            file=name,
        )
    return data


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` wins; mappings merge key by key; lists and scalars replace."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_raw(path: str | bytes | os.PathLike[str]) -> dict[str, Any]:
    """The file's mapping with its `extends:` bases merged under it."""
    return _load_raw(_as_path(path), (), {})


def _load_raw(
    path: Path, chain: tuple[str, ...], cache: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    # realpath, not Path.resolve: on Python 3.11 resolve() raises RuntimeError on a loop.
    real = os.path.realpath(path)
    if real in cache:  # a base shared by several files (a diamond) is read once
        return cache[real]
    name = shown(path)
    chain = (*chain, real)
    if len(chain) > MAX_EXTENDS:
        raise ConfigError(
            f"found a chain of more than {MAX_EXTENDS} files; expected at most {MAX_EXTENDS}",
            file=name,
            key="extends",
        )
    data = _read_yaml(path)
    bases = data.pop("extends", None)
    if bases is None:
        cache[real] = data
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b.strip() for b in bases):
        raise ConfigError(
            f"found {_show(bases)}; expected a file name or a list of file names",
            file=name,
            key="extends",
        )
    merged: dict[str, Any] = {}
    for base in bases:
        base_path = Path(base) if os.path.isabs(base) else path.parent / base
        if not os.path.lexists(base_path):
            raise ConfigError(
                f"found {base!r}, which does not exist ({shown(base_path)}); "
                "expected an existing YAML file",
                file=name,
                key="extends",
            )
        base_real = os.path.realpath(base_path)
        if base_real in chain:
            cycle = chain[chain.index(base_real) :] + (base_real,)
            names = " -> ".join(shown(os.path.basename(p)) for p in cycle)
            raise ConfigError(
                f"found a cycle {names}; expected bases that do not extend this file",
                file=name,
                key="extends",
            )
        merged = deep_merge(merged, _load_raw(base_path, chain, cache))
    result = deep_merge(merged, data)
    cache[real] = result
    return result


def _accepts_only_strings(tp: Any) -> bool:
    """str and `str | None` keys take the override text as it is ('yes' stays 'yes')."""
    if tp is str:
        return True
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and args == [str]


def _has_dataclass(tp: Any) -> bool:
    if dataclasses.is_dataclass(tp):
        return True
    return any(_has_dataclass(arg) for arg in typing.get_args(tp))


def parse_override(item: str) -> tuple[str, Any]:
    """'train.lr=0.1' -> ('train.lr', 0.1), typed by the schema at that key."""
    _check_string(item, file=OVERRIDE_SOURCE, key=None)
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        what = "no '='" if not sep else "no key before '='"
        raise ConfigError(
            f"override {item!r}: found {what}; expected key.path=value", file=OVERRIDE_SOURCE
        )
    parts = key.split(".")
    if not all(part.strip() for part in parts):
        raise ConfigError(
            f"override {item!r}: found an empty name in {key!r}; expected key.path=value "
            "with a name between each pair of dots",
            file=OVERRIDE_SOURCE,
        )
    if len(parts) > MAX_DEPTH:
        raise ConfigError(
            f"found a key {len(parts)} levels deep; expected at most {MAX_DEPTH}",
            file=OVERRIDE_SOURCE,
            key=_show(key),
        )
    tp = schema.type_at(JobSpec, key, file=OVERRIDE_SOURCE)
    if _accepts_only_strings(tp) and text not in ("null", "~"):
        return key, text
    value = parse_value(text, key=key) if text != "" else ""
    check_tree(value, file=OVERRIDE_SOURCE, prefix=key, depth=len(parts))
    if not _has_dataclass(tp):
        # Type it here so the error names the command line, not the config file.
        schema.convert(tp, value, file=OVERRIDE_SOURCE, key=key)
    return key, value


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def get_dotted(data: dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(out, key, value)
    return out


def resolve_paths(raw: dict[str, Any], config_file: Path, cwd: Path) -> dict[str, Any]:
    """Make workdir and runs_dir absolute so the resolved config works from anywhere."""
    out = copy.deepcopy(raw)
    workdir = out.get("workdir")
    if workdir is None:
        out["workdir"] = str(cwd)
    elif isinstance(workdir, str) and not os.path.isabs(workdir):
        out["workdir"] = os.path.realpath(config_file.parent / workdir)
    runs_dir = out.get("runs_dir", "runs")
    if isinstance(runs_dir, str) and not os.path.isabs(runs_dir):
        out["runs_dir"] = os.path.realpath(cwd / runs_dir)
    image = out.get("image")
    if isinstance(image, dict):
        for key in ("wheelhouse", "ca_cert"):
            if isinstance(image.get(key), str):
                image[key] = _absolute(image[key], config_file.parent)
    data = out.get("data")
    if isinstance(data, dict):
        base = config_file.parent
        cache = data.get("cache_dir")
        if isinstance(cache, str):
            data["cache_dir"] = _absolute(cache, base)
        sources = data.get("sources")
        for source in sources if isinstance(sources, list) else []:
            if isinstance(source, dict) and isinstance(source.get("path"), str):
                source["path"] = _absolute(source["path"], base)
    return out


def _absolute(path: str, base: Path) -> str:
    """`~` expands; relative paths are relative to the config file's folder."""
    expanded = os.path.expanduser(path)
    return expanded if os.path.isabs(expanded) else os.path.realpath(base / expanded)


def build_spec(raw: dict[str, Any], file: str) -> JobSpec:
    """Validate a merged dict; check_tree first, since callers may have added to it."""
    check_tree(raw, file=file)
    return schema.build(JobSpec, raw, file=file)


def load(
    path: str | bytes | os.PathLike[str],
    overrides: list[str] | tuple[str, ...] = (),
    *,
    cwd: Path | None = None,
) -> Loaded:
    """Load, merge bases, apply overrides, validate. Raises ConfigError (exit code 2)."""
    path = _as_path(path)
    raw = apply_overrides(load_raw(path), overrides)
    raw = resolve_paths(raw, path, cwd or Path.cwd())
    return Loaded(spec=build_spec(raw, str(path)), raw=raw, file=str(path))


def dump(spec: JobSpec) -> str:
    """The resolved config as YAML (what a run directory keeps as config.yaml)."""
    return yaml.safe_dump(schema.to_dict(spec), sort_keys=False, default_flow_style=False)


def load_resolved(path: str | bytes | os.PathLike[str]) -> JobSpec:
    """Read a run directory's config.yaml back (inside the job, no overrides, no extends)."""
    path = _as_path(path)
    return build_spec(_read_yaml(path), str(path))
