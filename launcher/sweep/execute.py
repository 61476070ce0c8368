"""Plan every point, decide which to (re)submit, and submit them: job arrays on Slurm,
a concurrency-limited set of detached runs on the local and docker backends.

Everything that can be wrong with a sweep is found before the first submission: the whole
expansion is validated and every point is planned first. Claims happen under the job's
sweep lock, re-reading the state, so two invocations never submit the same point.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from launcher import config, runs
from launcher.backends.base import Backend, Plan
from launcher.errors import ConfigError, RunNotFound
from launcher.sweep import define, state
from launcher.sweep.define import Point, SweepDef

POLL_S = 0.2
DEFAULT_MAX_ARRAY_SIZE = 1001  # Slurm's own default MaxArraySize
ACTIVE = ("PENDING", "RUNNING")
# A point submitted to Slurm whose task has not written its run record yet.
SUBMITTED = "SUBMITTED"


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
    plans: dict[str, Plan] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def spec(self):
        return self.loaded.spec

    @property
    def lock_root(self) -> Path:
        return state.sweeps_root(self.spec.runs_dir, self.spec.name)


def load_config(path: str, overrides: list[str]) -> config.Loaded:
    """config.load, plus `sweep.*=value` overrides (the sweep section is a free mapping the
    schema cannot type, so its values are read as YAML)."""
    raw = config.load_raw(path)
    plain: list[str] = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if sep and (key == "sweep" or key.startswith("sweep.")):
            try:
                value = yaml.safe_load(text) if text else None
            except yaml.YAMLError:
                value = text
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
    """Load, expand, validate and plan every point. Touches nothing."""
    from launcher.backends import get_backend

    t0 = time.perf_counter()
    loaded = load_config(path, overrides)
    spec = loaded.spec
    sweep = define.parse(spec.sweep, file=loaded.file, max_points=max_points)
    expansion = define.expand(sweep, loaded.raw, spec, file=loaded.file)
    t1 = time.perf_counter()
    sweep_id = define.sweep_id(sweep, spec, loaded.file)
    prepared = Prepared(
        loaded=loaded,
        sweep=sweep,
        points=expansion.points,
        duplicates=expansion.duplicates,
        sweep_id=sweep_id,
        directory=state.sweep_dir(spec.runs_dir, spec.name, sweep_id),
        backend=get_backend(spec.backend),
    )
    extra: dict[str, Any] = {}
    if spec.backend == "local":
        from launcher.hardware import detect

        extra["hardware"] = detect()  # once, not once per point
    for point in prepared.points:
        run_dir = runs.run_dir_for(spec.runs_dir, spec.name, point.run_id)
        prepared.plans[point.id] = prepared.backend.plan(
            point.spec, run_id=point.run_id, run_dir=run_dir, config_file=loaded.file, **extra
        )
    prepared.timings = {"expand_s": t1 - t0, "plan_s": time.perf_counter() - t1}
    return prepared


# --- deciding what to submit -------------------------------------------------------------


def current_states(entries: list[dict[str, Any]]) -> dict[str, str]:
    """Point id -> state from its run record, brought up to date with one batched
    `refresh` per backend (not one query per point)."""
    from launcher.backends import get_backend

    found: dict[str, str] = {}
    active: dict[str, list[tuple[str, Path]]] = {}
    for entry in entries:
        run_dir = Path(entry["run_dir"])
        try:
            record = runs.read_record(run_dir)
        except (RunNotFound, ValueError):
            record = None
        if record is None:
            # Submitted as an array task that has not started (and written its record) yet.
            found[entry["id"]] = SUBMITTED if entry.get("attempts") else state.NEW
            continue
        found[entry["id"]] = record["state"]
        if record["state"] == "PENDING" and not record.get("backend_info"):
            # Written just before an sbatch that then failed: never queued.
            found[entry["id"]] = state.NEW
            continue
        if record["state"] in ACTIVE:
            active.setdefault(record["backend"], []).append((entry["id"], run_dir))
    for backend_name, items in active.items():
        get_backend(backend_name).refresh([run_dir for _, run_dir in items])
        for point_id, run_dir in items:
            found[point_id] = state.record_state(run_dir)
    return found


@dataclass
class Decision:
    submit: list[str]
    skipped: dict[str, int]
    reasons: dict[str, str]


def decide(ids: list[str], states: dict[str, str], *, retry_failed: bool, force: bool) -> Decision:
    """New points always run; failed ones with --retry-failed; --force reruns every point
    that is not running right now."""
    submit: list[str] = []
    skipped: dict[str, int] = {}
    reasons: dict[str, str] = {}
    for point_id in ids:
        now = states.get(point_id, state.NEW)
        if now in (*ACTIVE, SUBMITTED):
            go = False
        elif now == state.NEW:
            go = True
        elif now in ("FAILED", "CANCELLED"):
            go = retry_failed or force
        else:
            go = force
        if go:
            submit.append(point_id)
            reasons[point_id] = "submit" if now == state.NEW else "resubmit"
        else:
            skipped[now] = skipped.get(now, 0) + 1
            reasons[point_id] = "skip"
    return Decision(submit, skipped, reasons)


def skip_text(decision: Decision) -> str:
    if not decision.skipped:
        return "skipping none"
    parts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(decision.skipped.items()))
    total = sum(decision.skipped.values())
    text = f"skipping {total} ({parts})"
    if any(s in decision.skipped for s in ("FAILED", "CANCELLED")):
        text += "; --retry-failed reruns failed points"
    return text


# --- state file --------------------------------------------------------------------------


def merged_state(prepared: Prepared) -> dict[str, Any]:
    """sweep.json for this expansion, keeping attempts and job ids from an earlier run."""
    spec = prepared.spec
    old = state.load(prepared.directory)
    new = state.new_state(
        sweep_id=prepared.sweep_id,
        name=spec.name,
        backend=spec.backend,
        config_file=prepared.loaded.file,
        runs_dir=spec.runs_dir,
        keys=prepared.sweep.keys,
        log_keys=prepared.sweep.log_keys,
        metric=prepared.sweep.metric,
    )
    previous = {p["id"]: p for p in (old or {}).get("points", [])}
    if old:
        new["created_at"] = old.get("created_at", new["created_at"])
    for point in prepared.points:
        entry = state.new_point(
            point.index, point.id, prepared.plans[point.id].run_dir, point.overrides
        )
        before = previous.get(point.id)
        if before:
            for key in ("state", "attempts", "job_ids", "submitted_at"):
                entry[key] = before.get(key, entry[key])
        new["points"].append(entry)
    return new


def _set_aside(run_dir: Path, directory: Path, attempt: int) -> None:
    """--force: keep the previous run's folder (under the sweep dir), start clean."""
    if run_dir.exists():
        target = directory / "replaced" / f"{run_dir.name}.{attempt}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(run_dir, target)


# --- running -----------------------------------------------------------------------------


@dataclass
class Options:
    dry_run: bool = False
    retry_failed: bool = False
    force: bool = False
    wait: bool = False
    out: TextIO = sys.stdout
    err: TextIO = sys.stderr
    poll_s: float = POLL_S
    clock: Callable[[], float] = time.monotonic


def parallelism(prepared: Prepared) -> int | None:
    """Slurm: the %N limit (None: no limit). Local/docker: points at once (default: one
    point per its share of this machine's CPUs)."""
    spec = prepared.spec
    if spec.backend == "slurm":
        return prepared.sweep.parallelism or spec.slurm.array_parallelism
    if prepared.sweep.parallelism:
        return prepared.sweep.parallelism
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cpus or 1) // spec.resources.tasks_per_node)


def run(prepared: Prepared, opts: Options) -> int:
    """Submit what is missing (and failed, or all, as asked); local: run them to the end."""
    from launcher.sweep import report

    spec = prepared.spec
    ids = [p.id for p in prepared.points]
    header = f"sweep {prepared.sweep_id}: {len(ids)} points on {spec.backend}" + (
        f" ({prepared.duplicates} duplicate configs dropped)" if prepared.duplicates else ""
    )
    if opts.dry_run:
        entries = [
            {"id": p.id, "run_dir": str(prepared.plans[p.id].run_dir)} for p in prepared.points
        ]
        old = state.load(prepared.directory) or {}
        attempts = {p["id"]: p.get("attempts", 0) for p in old.get("points", [])}
        for entry in entries:
            entry["attempts"] = attempts.get(entry["id"], 0)
        states = _read_only_states(entries)
        decision = decide(ids, states, retry_failed=opts.retry_failed, force=opts.force)
        print(f"# launcher sweep plan: nothing has been submitted\n# {header}", file=opts.out)
        print(f"# would submit {len(decision.submit)}; {skip_text(decision)}", file=opts.out)
        rows = [
            [str(p.index), p.id, states.get(p.id, state.NEW), decision.reasons[p.id]]
            + [report.show_value(p.overrides[k]) for k in prepared.sweep.keys]
            for p in prepared.points
        ]
        print(
            report.table(["#", "POINT", "STATE", "ACTION", *prepared.sweep.keys], rows),
            file=opts.out,
        )
        _print_backend_plan(prepared, decision.submit, opts.out)
        return 0
    if spec.backend == "slurm":
        return _run_slurm(prepared, opts, header)
    return _run_local(prepared, opts, header)


def _read_only_states(entries: list[dict[str, Any]]) -> dict[str, str]:
    """States as the records say, without refreshing (a dry run queries no backend)."""
    out = {}
    for entry in entries:
        now = state.record_state(entry["run_dir"])
        out[entry["id"]] = SUBMITTED if now == state.NEW and entry.get("attempts") else now
    return out


def _print_backend_plan(prepared: Prepared, submit: list[str], out: TextIO) -> None:
    plans = [prepared.plans[i] for i in submit]
    spec = prepared.spec
    limit = parallelism(prepared)
    if spec.backend == "slurm":
        size = array_size(prepared)
        where = (
            "slurm.max_array_size" if size else "Slurm's default; the cluster's is read at submit"
        )
        size = size or DEFAULT_MAX_ARRAY_SIZE
        print(
            f"# slurm: {len(plans)} points in arrays of at most {size} tasks ({where}), "
            f"at most {limit or 'all'} running at once",
            file=out,
        )
        if not plans:
            return
        scripts = prepared.backend.render_array(  # type: ignore[attr-defined]
            plans, folder=prepared.directory / "slurm", parallelism=limit, max_array_size=size
        )
        for n, script in enumerate(scripts):
            first = n * size
            last = min(len(plans), first + size) - 1
            print(
                f"# ---- array {n + 1}/{len(scripts)}: points {first}-{last} of this "
                "submission ----",
                file=out,
            )
            print(script.rstrip("\n"), file=out)
        return
    print(f"# {spec.backend}: at most {limit} points at a time", file=out)
    if plans:
        print("# the first point's plan:", file=out)
        print(plans[0].render(), file=out)


def _claim(prepared: Prepared, opts: Options) -> tuple[dict[str, Any], dict[str, str], Decision]:
    """Under the lock: merged state, fresh states, and what to submit."""
    current = merged_state(prepared)
    states = current_states(current["points"])
    for entry in current["points"]:
        entry["state"] = states[entry["id"]]
    decision = decide(
        [e["id"] for e in current["points"]],
        states,
        retry_failed=opts.retry_failed,
        force=opts.force,
    )
    return current, states, decision


def _mark_submitted(entry: dict[str, Any], directory: Path, force: bool) -> None:
    if force and entry["state"] != state.NEW:
        _set_aside(Path(entry["run_dir"]), directory, entry["attempts"])
    entry["attempts"] += 1
    entry["submitted_at"] = runs.now()
    entry["state"] = "PENDING"


def array_size(prepared: Prepared) -> int | None:
    """Configured MaxArraySize; None: the backend reads it from the cluster at submission."""
    return prepared.spec.slurm.max_array_size


def _run_slurm(prepared: Prepared, opts: Options, header: str) -> int:
    folder = prepared.directory / "slurm"
    with state.locked(prepared.lock_root):
        current, _, decision = _claim(prepared, opts)
        print(
            f"launcher: {header}; submitting {len(decision.submit)}; {skip_text(decision)}",
            file=opts.err,
        )
        by_id = {e["id"]: e for e in current["points"]}
        try:
            if decision.submit:
                for point_id in decision.submit:
                    _mark_submitted(by_id[point_id], prepared.directory, opts.force)
                plans = [prepared.plans[i] for i in decision.submit]
                job_ids = prepared.backend.submit_array(  # type: ignore[attr-defined]
                    plans,
                    folder=folder,
                    parallelism=parallelism(prepared),
                    max_array_size=array_size(prepared),
                )
                current["array_job_ids"] = [*current.get("array_job_ids", []), *job_ids]
                print(f"launcher: submitted array job(s) {', '.join(job_ids)}", file=opts.err)
        finally:
            state.save(prepared.directory, current)
    print(f"launcher: follow with `launcher sweep status {prepared.directory}`", file=opts.err)
    if not opts.wait:
        return 0
    return _wait_all(prepared, opts)


def _wait_all(prepared: Prepared, opts: Options) -> int:
    while True:
        current = state.load(prepared.directory) or {"points": []}
        states = current_states(current["points"])
        if all(s not in (*ACTIVE, SUBMITTED) for s in states.values()):
            return _finish(prepared, states, opts)
        time.sleep(max(opts.poll_s, 1.0))


def _finish(prepared: Prepared, states: dict[str, str], opts: Options) -> int:
    counts: dict[str, int] = {}
    for s in states.values():
        counts[s] = counts.get(s, 0) + 1
    shown = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
    print(f"launcher: sweep {prepared.sweep_id}: {shown}", file=opts.err)
    failed = any(s in ("FAILED", "CANCELLED") for s in states.values())
    if failed:
        print("launcher: rerun with --retry-failed to resubmit failed points", file=opts.err)
    return 1 if failed else 0


def _run_local(prepared: Prepared, opts: Options, header: str) -> int:
    """Keep up to `parallelism` points of this sweep running (counting points started by
    another invocation), claiming each under the lock, until this invocation's share ends."""
    limit = parallelism(prepared) or 1
    directory = prepared.directory
    with state.locked(prepared.lock_root):
        current, _, decision = _claim(prepared, opts)
        state.save(directory, current)
    print(
        f"launcher: {header}; running {len(decision.submit)}, at most {limit} at a time; "
        f"{skip_text(decision)}",
        file=opts.err,
    )
    # Each point is claimed only if nobody submitted it since we decided.
    todo = {e["id"]: e["attempts"] for e in current["points"] if e["id"] in decision.submit}
    queue = [i for i in decision.submit]
    mine: set[str] = set()
    try:
        while queue or mine:
            with state.locked(prepared.lock_root):
                current = merged_state(prepared)
                by_id = {e["id"]: e for e in current["points"]}
                active = [e for e in current["points"] if e["state"] in ACTIVE]
                fresh = current_states(active)
                for entry in active:
                    entry["state"] = fresh[entry["id"]]
                for point_id in list(mine):
                    if by_id[point_id]["state"] not in ACTIVE:
                        mine.discard(point_id)
                running = sum(e["state"] in ACTIVE for e in current["points"])
                while queue and running < limit:
                    point_id = queue.pop(0)
                    entry = by_id[point_id]
                    if entry["attempts"] != todo[point_id]:
                        continue  # another invocation took it
                    _mark_submitted(entry, directory, opts.force)
                    plan = prepared.plans[point_id]
                    try:
                        prepared.backend.submit(plan, foreground=False)
                    except Exception:
                        entry["state"] = state.record_state(plan.run_dir)
                        raise
                    finally:
                        state.save(directory, current)
                    mine.add(point_id)
                    running += 1
                state.save(directory, current)
            if queue or mine:
                time.sleep(opts.poll_s)
    except KeyboardInterrupt:
        print(
            f"launcher: interrupted; {len(mine)} started point(s) keep running "
            f"(`launcher sweep status {directory}`; rerun the sweep to continue)",
            file=opts.err,
        )
        raise
    final = current_states(merged_state(prepared)["points"])
    return _finish(prepared, final, opts)


def check_backend(prepared: Prepared) -> None:
    """Slurm: every point must fit one array (same resources), checked before submitting."""
    if prepared.spec.backend != "slurm":
        return
    if not hasattr(prepared.backend, "submit_array"):
        raise ConfigError(
            "this Slurm backend cannot submit job arrays (launcher.backends.slurm has no "
            "submit_array)",
            file=prepared.loaded.file,
            key="backend",
        )
    plans = list(prepared.plans.values())
    if plans:
        prepared.backend._array_params(plans, parallelism(prepared))  # type: ignore[attr-defined]
