"""The `sweep:` section -> a fixed list of points, each a validated JobSpec with a stable id.

Pure: reads nothing but the config dict, so `--dry-run` and the tests need no backend.
Fast for big sweeps: each distinct value of a key is type-checked once, and each point
rebuilds only the top-level sections its keys touch (memoized), instead of a whole JobSpec.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import random
from dataclasses import dataclass
from typing import Any

from launcher import schema
from launcher.config import set_dotted
from launcher.errors import ConfigError
from launcher.spec import JobSpec

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int")
SECTION_KEYS = ("grid", "zip", "random", "seeds", "max_points", "parallelism", "metric")
RANDOM_KEYS = ("n", "seed", "params")
# A sweep runs one job name on one backend into one runs_dir.
NOT_SWEEPABLE = ("name", "runs_dir", "sweep", "backend")
# Left out of a point's id: where results go does not change what runs.
ID_EXCLUDED = ("runs_dir", "sweep")
DEFAULT_MAX_POINTS = 100_000
DEFAULT_METRIC = "loss"
SEEDS_KEY = "train.seed"
ID_CHARS = 12


@dataclass(frozen=True)
class Axis:
    """One dimension of the product: keys that change together and their rows of values."""

    source: str  # grid | zip | random | seeds
    keys: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]


@dataclass(frozen=True)
class SweepDef:
    """A parsed, checked `sweep:` section (values not yet typed against the schema)."""

    axes: tuple[Axis, ...]
    max_points: int
    parallelism: int | None
    metric: str
    # Keys sampled from a loguniform range: the report plots them on a log axis.
    log_keys: tuple[str, ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(k for axis in self.axes for k in axis.keys)

    @property
    def size(self) -> int:
        return math.prod(len(axis.rows) for axis in self.axes)

    def source_of(self, key: str) -> str:
        for axis in self.axes:
            if key in axis.keys:
                return axis.source
        raise KeyError(key)

    def to_dict(self) -> dict[str, Any]:
        """What identifies the points (not the cap, the parallelism or the metric)."""
        return {
            "axes": [
                {"source": a.source, "keys": list(a.keys), "rows": [list(r) for r in a.rows]}
                for a in self.axes
            ]
        }


@dataclass(frozen=True)
class Point:
    """One run of the sweep: its index in expansion order, id, swept values and spec."""

    index: int
    id: str
    overrides: dict[str, Any]
    spec: JobSpec

    @property
    def run_id(self) -> str:
        return f"pt-{self.id}"


# --- parsing the section ---------------------------------------------------------------


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _flatten(
    mapping: dict[str, Any], where: str, file: str | None, leaf: Any, prefix: str = ""
) -> dict[str, Any]:
    """{'train': {'lr': [...]}} and {'train.lr': [...]} both -> {'train.lr': [...]}.

    `leaf(value)` says whether a mapping value is a leaf (a random distribution) rather
    than a nested section. Later spellings of the same key win (command-line overrides
    arrive nested and after the file's own keys).
    """
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(
                f"expected dotted config keys, got {_show(key)}", file=file, key=where
            )
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and not leaf(value):
            if not value:
                raise ConfigError(
                    "expected values, got an empty mapping", file=file, key=f"{where}.{dotted}"
                )
            out.update(_flatten(value, where, file, leaf, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def check_key(dotted: str, *, file: str | None, where: str) -> None:
    """A swept key must name a place in the JobSpec schema that a sweep may change."""
    top = dotted.split(".")[0]
    if top in NOT_SWEEPABLE:
        raise ConfigError(
            f"'{top}' cannot be swept (a sweep runs one job name on one backend)",
            file=file,
            key=f"{where}.{dotted}",
        )
    try:
        schema.type_at(JobSpec, dotted)
    except ConfigError as exc:
        hint = f" ({exc.hint})" if exc.hint else ""
        raise ConfigError(
            f"'{dotted}' is not a config key{hint}", file=file, key=f"{where}.{dotted}"
        ) from None


def _value_list(value: Any, *, file: str | None, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(f"expected a list of values, got {_show(value)}", file=file, key=key)
    if not value:
        raise ConfigError("expected a non-empty list of values, got []", file=file, key=key)
    return value


def _int_setting(raw: dict[str, Any], name: str, default: Any, lo: int, *, file, key) -> Any:
    value = raw.get(name, default)
    if value is None and default is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ConfigError(
            f"expected an integer >= {lo}, got {_show(value)}", file=file, key=f"{key}.{name}"
        )
    return value


def _parse_random(raw: Any, *, file: str | None) -> tuple[Axis, tuple[str, ...]]:
    where = "sweep.random"
    if not isinstance(raw, dict):
        raise ConfigError(
            f"expected a mapping with n, seed and params, got {_show(raw)}", file=file, key=where
        )
    for key in raw:
        if key not in RANDOM_KEYS:
            near = schema.closest(str(key), list(RANDOM_KEYS))
            hint = f"did you mean '{where}.{near}'?" if near else "valid keys: n, params, seed"
            raise ConfigError("unknown key", file=file, key=f"{where}.{key}", hint=hint)
    if "n" not in raw:
        raise ConfigError(
            "missing required key (expected the number of samples, an integer >= 1)",
            file=file,
            key=f"{where}.n",
        )
    n = _int_setting(raw, "n", None, 1, file=file, key=where)
    seed = _int_setting(raw, "seed", 0, 0, file=file, key=where)
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        raise ConfigError(
            "expected a mapping of dotted keys to distributions "
            "({choice: [...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]}, {int: [lo, hi]})",
            file=file,
            key=f"{where}.params",
        )

    def is_dist(value: dict) -> bool:
        # {name: [...]} is a distribution (maybe a misspelled one), not a nested section.
        if len(value) != 1:
            return False
        kind, arg = next(iter(value.items()))
        return kind in DISTRIBUTIONS or isinstance(arg, list)

    flat = _flatten(params, f"{where}.params", file, is_dist)
    dists: dict[str, tuple[str, Any]] = {}
    log_keys = []
    for key, dist in flat.items():
        dkey = f"{where}.params.{key}"
        if not isinstance(dist, dict) or not is_dist(dist):
            raise ConfigError(
                f"expected one of {{choice: [...]}}, {{uniform: [lo, hi]}}, "
                f"{{loguniform: [lo, hi]}}, {{int: [lo, hi]}}, got {_show(dist)}",
                file=file,
                key=dkey,
            )
        kind, arg = next(iter(dist.items()))
        if kind not in DISTRIBUTIONS:
            near = schema.closest(str(kind), list(DISTRIBUTIONS))
            raise ConfigError(
                f"unknown distribution {kind!r}: expected one of {', '.join(DISTRIBUTIONS)}",
                file=file,
                key=dkey,
                hint=f"did you mean {near!r}?" if near else None,
            )
        if kind == "choice":
            _value_list(arg, file=file, key=f"{dkey}.choice")
        else:
            ok = isinstance(arg, list) and len(arg) == 2 and all(_is_number(v) for v in arg)
            if kind == "int":
                ok = ok and all(isinstance(v, int) for v in arg)
            if not ok:
                what = "two integers" if kind == "int" else "two numbers"
                raise ConfigError(
                    f"expected [lo, hi] ({what}), got {_show(arg)}", file=file, key=f"{dkey}.{kind}"
                )
            lo, hi = arg
            if lo > hi:
                raise ConfigError(
                    f"expected lo <= hi, got [{lo}, {hi}]", file=file, key=f"{dkey}.{kind}"
                )
            if kind == "loguniform":
                if lo <= 0:
                    raise ConfigError(
                        f"loguniform needs lo > 0, got [{lo}, {hi}]",
                        file=file,
                        key=f"{dkey}.{kind}",
                    )
                log_keys.append(key)
        dists[key] = (kind, arg)
    rows = tuple(
        tuple(
            _sample(kind, arg, random.Random(f"{seed}/{i}/{key}"))
            for key, (kind, arg) in dists.items()
        )
        for i in range(n)
    )
    return Axis("random", tuple(dists), rows), tuple(log_keys)


def _sample(kind: str, arg: Any, rng: random.Random) -> Any:
    """One draw. Each (seed, sample, key) has its own generator, so adding a parameter
    leaves the other parameters' draws unchanged. Floats keep 6 significant digits."""
    if kind == "choice":
        return arg[rng.randrange(len(arg))]
    lo, hi = arg
    if kind == "int":
        return rng.randint(lo, hi)
    if kind == "uniform":
        value = lo + (hi - lo) * rng.random()
    else:
        value = math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * rng.random())
    return float(f"{value:.6g}")


def _where(source: str) -> str:
    """The dotted place in the config where an axis' keys are written."""
    return "sweep.random.params" if source == "random" else f"sweep.{source}"


def parse(raw: Any, *, file: str | None, max_points: int | None = None) -> SweepDef:
    """Check the `sweep:` mapping and build its axes. Raises ConfigError (exit 2)."""
    if raw is None:
        raise ConfigError(
            "the config has no sweep: section (add grid, zip, random or seeds)",
            file=file,
            key="sweep",
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping, got {_show(raw)}", file=file, key="sweep")
    for key in raw:
        if key not in SECTION_KEYS:
            near = schema.closest(str(key), list(SECTION_KEYS))
            hint = (
                f"did you mean 'sweep.{near}'?"
                if near
                else f"valid keys: {', '.join(SECTION_KEYS)}"
            )
            raise ConfigError("unknown key", file=file, key=f"sweep.{key}", hint=hint)
    if not any(raw.get(k) is not None for k in ("grid", "zip", "random", "seeds")):
        raise ConfigError(
            "nothing to sweep: give at least one of grid, zip, random or seeds",
            file=file,
            key="sweep",
        )
    axes: list[Axis] = []
    log_keys: tuple[str, ...] = ()
    if raw.get("grid") is not None:
        grid = raw["grid"]
        if not isinstance(grid, dict) or not grid:
            raise ConfigError(
                f"expected a mapping of dotted keys to lists of values, got {_show(grid)}",
                file=file,
                key="sweep.grid",
            )
        for key, values in _flatten(grid, "sweep.grid", file, lambda v: False).items():
            values = _value_list(values, file=file, key=f"sweep.grid.{key}")
            axes.append(Axis("grid", (key,), tuple((v,) for v in values)))
    if raw.get("zip") is not None:
        zipped = raw["zip"]
        if not isinstance(zipped, dict) or not zipped:
            raise ConfigError(
                f"expected a mapping of dotted keys to equal-length lists, got {_show(zipped)}",
                file=file,
                key="sweep.zip",
            )
        flat = _flatten(zipped, "sweep.zip", file, lambda v: False)
        lists = {k: _value_list(v, file=file, key=f"sweep.zip.{k}") for k, v in flat.items()}
        lengths = {k: len(v) for k, v in lists.items()}
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"{k}: {n}" for k, n in lengths.items())
            raise ConfigError(
                f"zip lists must have equal lengths, got {shown}", file=file, key="sweep.zip"
            )
        axes.append(Axis("zip", tuple(lists), tuple(zip(*lists.values(), strict=True))))
    if raw.get("random") is not None:
        axis, log_keys = _parse_random(raw["random"], file=file)
        axes.append(axis)
    if raw.get("seeds") is not None:
        seeds = _value_list(raw["seeds"], file=file, key="sweep.seeds")
        axes.append(Axis("seeds", (SEEDS_KEY,), tuple((s,) for s in seeds)))
    seen: dict[str, str] = {}
    for axis in axes:
        for key in axis.keys:
            where = _where(axis.source)
            if key in seen:
                raise ConfigError(
                    f"'{key}' is swept twice (in sweep.{seen[key]} and sweep.{axis.source})",
                    file=file,
                    key=where if axis.source == "seeds" else f"{where}.{key}",
                )
            seen[key] = axis.source
            if axis.source != "seeds":
                check_key(key, file=file, where=where)
    cap = max_points if max_points is not None else raw.get("max_points", DEFAULT_MAX_POINTS)
    if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
        raise ConfigError(
            f"expected an integer >= 1, got {_show(cap)}", file=file, key="sweep.max_points"
        )
    parallelism = _int_setting(raw, "parallelism", None, 1, file=file, key="sweep")
    metric = raw.get("metric", DEFAULT_METRIC)
    if not isinstance(metric, str) or not metric:
        raise ConfigError(
            f"expected a metric name, got {_show(metric)}", file=file, key="sweep.metric"
        )
    sweep = SweepDef(tuple(axes), cap, parallelism, metric, log_keys)
    if sweep.size > cap:
        sizes = " x ".join(f"{len(a.rows)} ({a.source})" for a in axes)
        raise ConfigError(
            f"the sweep has {sweep.size} points ({sizes}), more than max_points={cap}",
            file=file,
            key="sweep.max_points",
            hint="raise sweep.max_points or pass --max-points, or sweep fewer values",
        )
    return sweep


# --- typing values and building points -------------------------------------------------


def _field_at(dotted: str) -> dataclasses.Field | None:
    """The dataclass field at a dotted key (for its bounds), or None inside a free mapping."""
    tp: Any = JobSpec
    found = None
    for part in dotted.split("."):
        base = schema._dataclass_in(tp)
        if base is None:
            return None
        found = schema.fields_of(base)[part]
        tp = schema.hints(base)[part]
    return found


def _core(exc: ConfigError) -> str:
    """The message of a ConfigError without its 'file: key: ' prefix."""
    text = str(exc)
    prefix = f"{exc.file or '<config>'}: "
    if exc.key:
        prefix += f"{exc.key}: "
    return text.removeprefix(prefix)


def _json_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def _check_values(sweep: SweepDef, file: str | None) -> None:
    """Type-check and bound-check every distinct value of every key, once."""
    for axis in sweep.axes:
        for col, key in enumerate(axis.keys):
            tp = schema.type_at(JobSpec, key)
            field = _field_at(key)
            where = _where(axis.source)
            where = where if axis.source == "seeds" else f"{where}.{key}"
            seen: set[str] = set()
            for row in axis.rows:
                value = row[col]
                vkey = _json_key(value)
                if vkey in seen:
                    continue
                seen.add(vkey)
                try:
                    typed = schema.convert(tp, value, file=file, key=key)
                    if field is not None:
                        schema._check_bounds(field, typed, file=file, key=key)
                except ConfigError as exc:
                    raise ConfigError(
                        f"value {_show(value)} for {key}: {_core(exc)}", file=file, key=where
                    ) from None


class _Builder:
    """Builds each point's JobSpec from the base spec, rebuilding only touched sections."""

    def __init__(self, base_raw: dict[str, Any], base: JobSpec, keys: tuple[str, ...], file):
        self.base_raw = base_raw
        self.base = base
        self.file = file
        self.hints = schema.hints(JobSpec)
        self.fields = schema.fields_of(JobSpec)
        self.tops: dict[str, list[str]] = {}
        for key in keys:
            self.tops.setdefault(key.split(".")[0], []).append(key)
        self.memo: dict[tuple, tuple[Any, str]] = {}
        self.base_json = {
            f.name: _json_key(schema.to_dict(getattr(base, f.name)))
            for f in dataclasses.fields(JobSpec)
            if f.name not in ID_EXCLUDED
        }

    def section(self, top: str, overrides: dict[str, Any]) -> tuple[Any, str]:
        keys = self.tops[top]
        memo_key = (top, *(_json_key(overrides[k]) for k in keys))
        hit = self.memo.get(memo_key)
        if hit is not None:
            return hit
        holder = {top: copy.deepcopy(self.base_raw.get(top))}
        for key in keys:
            set_dotted(holder, key, copy.deepcopy(overrides[key]))
        value = schema.convert(self.hints[top], holder[top], file=self.file, key=top)
        schema._check_bounds(self.fields[top], value, file=self.file, key=top)
        built = (value, _json_key(schema.to_dict(value)))
        self.memo[memo_key] = built
        return built

    def build(self, index: int, overrides: dict[str, Any]) -> Point:
        changes: dict[str, Any] = {}
        parts = dict(self.base_json)
        try:
            for top in self.tops:
                changes[top], parts[top] = self.section(top, overrides)
            spec = dataclasses.replace(self.base, **changes)
            for rel_key, message in spec.problems():
                raise ConfigError(message, file=self.file, key=rel_key)
        except ConfigError as exc:
            shown = ", ".join(f"{k}={_show(v)}" for k, v in overrides.items())
            raise ConfigError(
                f"sweep point {index} ({shown}): {_core(exc)}", file=self.file, key=exc.key
            ) from None
        return Point(index, _digest(parts), overrides, spec)


def _digest(parts: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(parts):
        digest.update(f"{name}={parts[name]}\n".encode())
    return digest.hexdigest()[:ID_CHARS]


def spec_id(spec: JobSpec) -> str:
    """A point's id from its whole resolved spec (what `expand` computes section by section)."""
    return _digest(
        {
            f.name: _json_key(schema.to_dict(getattr(spec, f.name)))
            for f in dataclasses.fields(JobSpec)
            if f.name not in ID_EXCLUDED
        }
    )


def point_spec(base_raw: dict[str, Any], overrides: dict[str, Any], file: str | None) -> JobSpec:
    """One point's spec built the plain way (inside an array task, from the stored config)."""
    raw = copy.deepcopy(base_raw)
    for key, value in overrides.items():
        set_dotted(raw, key, copy.deepcopy(value))
    return schema.build(JobSpec, raw, file=file)


@dataclass(frozen=True)
class Expansion:
    points: list[Point]
    duplicates: int


def expand(
    sweep: SweepDef, base_raw: dict[str, Any], base: JobSpec, *, file: str | None
) -> Expansion:
    """Every point in a fixed order (grid keys as written, then zip, random, seeds; the last
    varies fastest), each validated; points whose resolved config repeats one before are
    dropped, so no configuration runs twice."""
    _check_values(sweep, file)
    builder = _Builder(base_raw, base, sweep.keys, file)
    keys = sweep.keys
    points: list[Point] = []
    ids: set[str] = set()
    duplicates = 0
    for index, combo in enumerate(itertools.product(*(axis.rows for axis in sweep.axes))):
        values = [v for row in combo for v in row]
        point = builder.build(index, dict(zip(keys, values, strict=True)))
        if point.id in ids:
            duplicates += 1
            continue
        ids.add(point.id)
        points.append(point)
    return Expansion(points, duplicates)


def sweep_id(sweep: SweepDef, base: JobSpec, config_file: str | None) -> str:
    """The sweep's folder name: the config's stem plus a hash of what defines its points."""
    from pathlib import Path

    from launcher.runs import slug

    base_dict = {k: v for k, v in schema.to_dict(base).items() if k not in ID_EXCLUDED}
    text = _json_key({"base": base_dict, "sweep": sweep.to_dict()})
    stem = slug(Path(config_file).stem) if config_file else "sweep"
    return f"{stem}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
