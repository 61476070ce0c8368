"""YAML file -> JobSpec: `extends:` base files, `key.path=value` overrides, validation.

Everything here is pure Python + PyYAML, so `--help` and `--dry-run` stay fast.
"""

from __future__ import annotations

import copy
import os
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


@dataclass(frozen=True)
class Loaded:
    """A validated spec plus the merged plain dict it came from (sweeps expand the dict)."""

    spec: JobSpec
    raw: dict[str, Any]
    file: str


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError("file not found", file=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read file: {exc.strerror}", file=str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{where}{problem}", file=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"expected a mapping at the top level, got {type(data).__name__}", file=str(path)
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


def load_raw(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The file's mapping with its `extends:` bases merged under it."""
    path = Path(path)
    resolved = path.resolve()
    if resolved in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, resolved))
        raise ConfigError(f"extends forms a cycle: {chain}", file=str(path), key="extends")
    data = _read_yaml(path)
    bases = data.pop("extends", None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(
            "expected a file name or a list of file names", file=str(path), key="extends"
        )
    merged: dict[str, Any] = {}
    for base in bases:
        base_path = (path.parent / base) if not os.path.isabs(base) else Path(base)
        if not base_path.is_file():
            raise ConfigError(f"base file not found: {base_path}", file=str(path), key="extends")
        merged = deep_merge(merged, load_raw(base_path, (*_seen, resolved)))
    return deep_merge(merged, data)


def _accepts_only_strings(tp: Any) -> bool:
    """str and `str | None` keys take the override text as it is ('yes' stays 'yes')."""
    if tp is str:
        return True
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and args == [str]


def parse_override(item: str) -> tuple[str, Any]:
    """'train.lr=0.1' -> ('train.lr', 0.1), typed by the schema at that key."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(
            f"override {item!r} is not of the form key.path=value", file=OVERRIDE_SOURCE
        )
    tp = schema.type_at(JobSpec, key, file=OVERRIDE_SOURCE)
    if _accepts_only_strings(tp) and text not in ("null", "~"):
        return key, text
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
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
        out["workdir"] = str((config_file.parent / workdir).resolve())
    runs_dir = out.get("runs_dir", "runs")
    if isinstance(runs_dir, str) and not os.path.isabs(runs_dir):
        out["runs_dir"] = str((cwd / runs_dir).resolve())
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
        for source in data.get("sources") or []:
            if isinstance(source, dict) and isinstance(source.get("path"), str):
                source["path"] = _absolute(source["path"], base)
    return out


def _absolute(path: str, base: Path) -> str:
    """`~` expands; relative paths are relative to the config file's folder."""
    expanded = os.path.expanduser(path)
    return expanded if os.path.isabs(expanded) else str((base / expanded).resolve())


def build_spec(raw: dict[str, Any], file: str) -> JobSpec:
    return schema.build(JobSpec, raw, file=file)


def load(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, cwd: Path | None = None
) -> Loaded:
    """Load, merge bases, apply overrides, validate. Raises ConfigError (exit code 2)."""
    path = Path(path)
    raw = apply_overrides(load_raw(path), overrides)
    raw = resolve_paths(raw, path, cwd or Path.cwd())
    return Loaded(spec=build_spec(raw, str(path)), raw=raw, file=str(path))


def dump(spec: JobSpec) -> str:
    """The resolved config as YAML (what a run directory keeps as config.yaml)."""
    return yaml.safe_dump(schema.to_dict(spec), sort_keys=False, default_flow_style=False)


def load_resolved(path: str | Path) -> JobSpec:
    """Read a run directory's config.yaml back (inside the job, no overrides, no extends)."""
    path = Path(path)
    return build_spec(_read_yaml(path), str(path))
