"""A sweep ready to submit: the loaded config, its points, and what the backend plans.

Everything that can be wrong with a sweep is found here, before any submission: the whole
expansion is validated, and every point is planned (backends that run points one by one)
or checked to fit one array script (backends with the array capability). Nothing here
writes a file or contacts a cluster.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher import config, runs
from launcher.backends.base import Backend, Plan
from launcher.spec import JobSpec
from launcher.sweep import define, state
from launcher.sweep.define import Point, SweepDef


@dataclass
class Prepared:
    """A sweep ready to submit: the loaded config, its points and their plans."""

    loaded: config.Loaded
    sweep: SweepDef
    points: list[Point]
    duplicates: int
    sweep_id: str
    directory: Path
    backend: Backend
    # Every point's plan; with an array backend only the first point's (each array task
    # plans its own point where it runs).
    plans: dict[str, Plan[Any]] = field(default_factory=dict)
    # Array backends: the parameters every point's array script shares.
    array_params: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    runs_base: str | None = field(default=None, repr=False)

    @property
    def spec(self) -> JobSpec:
        return self.loaded.spec

    @property
    def lock_root(self) -> Path:
        return state.sweeps_root(self.spec.runs_dir, self.spec.name)

    def run_dir(self, point: Point) -> Path:
        return runs.run_dir_for(self.spec.runs_dir, self.spec.name, point.run_id)

    def run_dir_text(self, point: Point) -> str:
        """run_dir() as text, without building a Path per point (10,000-point sweeps)."""
        if self.runs_base is None:
            self.runs_base = str(self.run_dir(point).parent)
        return os.path.join(self.runs_base, point.run_id)

    def open_state(self) -> state.SweepState:
        """sweep.json for this expansion: the saved history of each point, this sweep's
        points and header (call under `state.locked(self.lock_root)` to claim)."""
        spec = self.spec
        current = state.SweepState.open(
            self.directory,
            sweep_id=self.sweep_id,
            name=spec.name,
            backend=spec.backend,
            config_file=self.loaded.file,
            runs_dir=spec.runs_dir,
            keys=self.sweep.keys,
            log_keys=self.sweep.log_keys,
            metric=self.sweep.metric,
        )
        current.merge(self.points, self.run_dir_text)
        return current


def load_config(path: str, overrides: list[str]) -> config.Loaded:
    """config.load, plus `sweep.*=value` overrides (the sweep section is a free mapping the
    schema cannot type, so its values are read as YAML)."""
    raw = config.load_raw(path)
    plain: list[str] = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if sep and (key == "sweep" or key.startswith("sweep.")):
            value = config.parse_value(text, key=key) if text else None
            if key == "sweep":
                raw["sweep"] = value
            else:
                if not isinstance(raw.get("sweep"), dict):
                    raw["sweep"] = {}
                config.set_dotted(raw, key, value)
        else:
            plain.append(item)
    raw = config.apply_overrides(raw, plain)
    raw = config.resolve_paths(raw, Path(path), Path.cwd())
    return config.Loaded(spec=config.build_spec(raw, path), raw=raw, file=path)


def prepare(path: str, overrides: list[str], *, max_points: int | None = None) -> Prepared:
    """Load, expand, validate and plan. Touches nothing (no files, no cluster)."""
    from launcher.backends import get_backend

    t0 = time.perf_counter()
    loaded = load_config(path, overrides)
    spec = loaded.spec
    sweep = define.parse(spec.sweep, file=loaded.file, max_points=max_points)
    expansion = define.expand(sweep, loaded.raw, spec, file=loaded.file)
    t1 = time.perf_counter()
    sweep_id = define.sweep_id(sweep, spec, loaded.file)
    backend = get_backend(spec.backend)
    prepared = Prepared(
        loaded=loaded,
        sweep=sweep,
        points=expansion.points,
        duplicates=expansion.duplicates,
        sweep_id=sweep_id,
        directory=state.sweep_dir(spec.runs_dir, spec.name, sweep_id),
        backend=backend,
    )
    points = prepared.points
    planned = points
    if backend.array is not None:
        prepared.array_params = backend.array.check_points(
            [p.spec for p in points], loaded.file, describe=lambda i: _describe(points[i])
        )
        planned = points[:1]
    # Detected once for the whole sweep, not once per point (nvidia-smi is slow).
    hardware = None
    if backend.needs_hardware():
        from launcher.hardware import detect

        hardware = detect()
    for point in planned:
        prepared.plans[point.id] = backend.plan(
            point.spec,
            run_id=point.run_id,
            run_dir=prepared.run_dir(point),
            config_file=loaded.file,
            hardware=hardware,
        )
    prepared.timings = {"expand_s": t1 - t0, "plan_s": time.perf_counter() - t1}
    return prepared


def _describe(point: Point) -> str:
    """How an error names a point: its index and swept values."""
    values = ", ".join(f"{k}={v!r}" for k, v in point.overrides.items())
    return f"sweep point {point.index} ({values})"
