"""Decide which points to (re)submit and submit them: job arrays on Slurm, a
concurrency-limited set of detached runs on the local and docker backends.

Everything that can be wrong with a sweep is found before the first submission: the whole
expansion is validated and every point is planned (local, docker) or checked to fit one
array script (Slurm) first. Claims happen under the job's sweep lock, re-reading the
state, so two invocations never submit the same point.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from launcher import config, runs
from launcher.backends.base import Backend, Plan
from launcher.spec import JobSpec
from launcher.sweep import define, state
from launcher.sweep.define import Point, SweepDef

POLL_S = 0.2
SLURM_POLL_S = 2.0
DEFAULT_MAX_ARRAY_SIZE = 1001  # Slurm's own default MaxArraySize
ACTIVE = ("PENDING", "RUNNING")
# Submitted to Slurm, but the batched query does not know the task yet.
SUBMITTED = "SUBMITTED"
WAITING = (*ACTIVE, SUBMITTED)


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
    # Local and docker: every point's plan. Slurm: the first point's (each array task
    # plans its own point on the cluster).
    plans: dict[str, Plan] = field(default_factory=dict)
    # Slurm: the sbatch parameters every point shares.
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
    """Load, expand, validate and plan. Touches nothing (no files, no cluster)."""
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
    if spec.backend == "slurm":
        from launcher.backends.slurm import array as slurm_array

        prepared.array_params = slurm_array.check(prepared)
        planned = prepared.points[:1]
        extra: dict[str, Any] = {}
    else:
        planned = prepared.points
        extra = {}
        if spec.backend == "local":
            from launcher.hardware import detect

            extra["hardware"] = detect()  # once, not once per point
    for point in planned:
        prepared.plans[point.id] = prepared.backend.plan(
            point.spec,
            run_id=point.run_id,
            run_dir=prepared.run_dir(point),
            config_file=loaded.file,
            **extra,
        )
    prepared.timings = {"expand_s": t1 - t0, "plan_s": time.perf_counter() - t1}
    return prepared


# --- where each point stands -------------------------------------------------------------


def current_states(entries: list[dict[str, Any]]) -> dict[str, str]:
    """Point id -> state, brought up to date with one batched query per backend (not one
    per point): `refresh` for runs with a record, and for Slurm array tasks that have not
    written theirs yet (or whose record is from an earlier attempt) one sacct + squeue."""
    from launcher.backends import get_backend

    found: dict[str, str] = {}
    active: dict[str, list[tuple[str, Path]]] = {}
    queued: dict[str, str] = {}
    for entry in entries:
        run_dir = entry["run_dir"]
        job_ids = entry.get("job_ids") or []
        record = _read_record(run_dir)
        info = (record or {}).get("backend_info") or {}
        if job_ids and info.get("job_id") != job_ids[-1]:
            queued[entry["id"]] = job_ids[-1]  # this attempt's task has not started yet
            continue
        if record is None or (record["state"] == "PENDING" and not info):
            # Never started, or a record written just before a submission that failed.
            found[entry["id"]] = state.NEW
            continue
        found[entry["id"]] = record["state"]
        if record["state"] in ACTIVE:
            active.setdefault(record["backend"], []).append((entry["id"], Path(run_dir)))
    for backend_name, items in active.items():
        get_backend(backend_name).refresh([run_dir for _, run_dir in items])
        for point_id, run_dir in items:
            found[point_id] = state.record_state(run_dir)
    if queued:
        from launcher.backends.slurm import array as slurm_array

        tasks = slurm_array.task_states(sorted(set(queued.values())))
        for point_id, job_id in queued.items():
            found[point_id] = tasks[job_id]
    return found


def _read_record(run_dir: str) -> dict[str, Any] | None:
    """The run record, or None when the point has no (readable) record yet."""
    try:
        with open(os.path.join(run_dir, runs.RECORD), "rb") as fh:
            return json.loads(fh.read())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None


@dataclass
class Decision:
    submit: list[str]
    skipped: dict[str, int]
    reasons: dict[str, str]


def decide(ids: list[str], states: dict[str, str], *, retry_failed: bool, force: bool) -> Decision:
    """New points always run; failed ones with --retry-failed; --force reruns every point
    that is not queued or running right now."""
    submit: list[str] = []
    skipped: dict[str, int] = {}
    reasons: dict[str, str] = {}
    for point_id in ids:
        now = states.get(point_id, state.NEW)
        if now in WAITING:
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
    """sweep.json for this expansion, keeping attempts and job ids from earlier runs."""
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
        new["array_job_ids"] = old.get("array_job_ids", [])
    for point in prepared.points:
        entry = state.new_point(
            point.index, point.id, prepared.run_dir_text(point), point.overrides
        )
        before = previous.get(point.id)
        if before:
            for key in ("state", "attempts", "job_ids", "submitted_at"):
                entry[key] = before.get(key, entry[key])
        new["points"].append(entry)
    return new


def _set_aside(run_dir: Path, directory: Path, attempt: int) -> None:
    """--force: keep the previous run's folder (under the sweep dir) and start clean."""
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
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    poll_s: float = POLL_S
    # Slurm (benchmarks): submit the arrays held, so nothing starts.
    hold: bool = False


def parallelism(prepared: Prepared) -> int | None:
    """Slurm: the %N limit of each array (None: no limit). Local/docker: points at once
    (default: as many as this machine's CPUs hold, at the point's processes each)."""
    spec = prepared.spec
    if spec.backend == "slurm":
        return prepared.sweep.parallelism or spec.slurm.array_parallelism
    if prepared.sweep.parallelism:
        return prepared.sweep.parallelism
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cpus or 1) // spec.resources.tasks_per_node)


def array_size(prepared: Prepared) -> int | None:
    """Configured MaxArraySize; None: read from the cluster at submission."""
    return prepared.spec.slurm.max_array_size


def header(prepared: Prepared) -> str:
    dropped = f" ({prepared.duplicates} duplicate configs dropped)" if prepared.duplicates else ""
    return (
        f"sweep {prepared.sweep_id}: {len(prepared.points)} points on "
        f"{prepared.spec.backend}{dropped}"
    )


def run(prepared: Prepared, opts: Options) -> int:
    """Submit what is missing (and failed, or all, as asked); local: run them to the end."""
    if opts.dry_run:
        return _dry_run(prepared, opts)
    if prepared.spec.backend == "slurm":
        return _run_slurm(prepared, opts)
    return _run_local(prepared, opts)


def _dry_run(prepared: Prepared, opts: Options) -> int:
    """The table of points and what a real run would submit; reads records, queries nothing."""
    from launcher.sweep import report

    old = state.load(prepared.directory) or {}
    previous = {p["id"]: p for p in old.get("points", [])}
    states = {}
    for point in prepared.points:
        now = state.record_state(prepared.run_dir(point))
        if previous.get(point.id, {}).get("job_ids") and now in (state.NEW, "FAILED"):
            now = SUBMITTED if now == state.NEW else now
        states[point.id] = now
    ids = [p.id for p in prepared.points]
    decision = decide(ids, states, retry_failed=opts.retry_failed, force=opts.force)
    out = opts.out
    print(f"# launcher sweep plan: nothing has been submitted\n# {header(prepared)}", file=out)
    print(f"# would submit {len(decision.submit)}; {skip_text(decision)}", file=out)
    keys = prepared.sweep.keys
    rows = [
        [str(p.index), p.id, states[p.id], decision.reasons[p.id]]
        + [report.show_value(p.overrides[k]) for k in keys]
        for p in prepared.points
    ]
    print(report.table(["#", "POINT", "STATE", "ACTION", *keys], rows), file=out)
    _print_backend_plan(prepared, decision.submit, out)
    return 0


def _print_backend_plan(prepared: Prepared, submit: list[str], out: TextIO) -> None:
    spec = prepared.spec
    limit = parallelism(prepared)
    if spec.backend != "slurm":
        print(f"# {spec.backend}: at most {limit} points at a time", file=out)
        if submit:
            print("# the first point's plan:", file=out)
            print(prepared.plans[submit[0]].render(), file=out)
        return
    from launcher.backends.slurm import array as slurm_array

    size = array_size(prepared)
    where = "slurm.max_array_size" if size else "Slurm's default; the cluster's is read at submit"
    size = size or DEFAULT_MAX_ARRAY_SIZE
    groups = slurm_array.chunks(submit, size)
    print(
        f"# slurm: {len(submit)} points in {len(groups)} array(s) of at most {size} tasks "
        f"({where}); "
        + (
            f"at most {limit} tasks at once (each array starts after the one before it ends)"
            if limit
            else "no limit on running tasks"
        ),
        file=out,
    )
    folder = slurm_array.folder_of(prepared)
    first = slurm_array.next_chunk_number(folder) if folder.is_dir() else 1
    for n, group in enumerate(groups):
        chunk_file = folder / f"chunk-{first + n}.json"
        print(
            f"# ---- array {n + 1}/{len(groups)}: {len(group)} points, task i runs point "
            f"i of {chunk_file} ----",
            file=out,
        )
        script = slurm_array.render(prepared, folder, chunk_file, len(group), limit)
        print(script.rstrip("\n"), file=out)
    if prepared.points:
        plan = next(iter(prepared.plans.values()))
        print("# then each task runs its own point like this (point 0 shown):", file=out)
        print(plan.render().split(plan.payload.script.rstrip("\n"), 1)[-1].lstrip("\n"), file=out)


def _claim(prepared: Prepared, opts: Options) -> tuple[dict[str, Any], Decision]:
    """Under the lock: the merged state with fresh point states, and what to submit."""
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
    return current, decision


def _run_slurm(prepared: Prepared, opts: Options) -> int:
    from launcher.backends.slurm import array as slurm_array

    with state.locked(prepared.lock_root):
        current, decision = _claim(prepared, opts)
        print(
            f"launcher: {header(prepared)}; submitting {len(decision.submit)}; "
            f"{skip_text(decision)}",
            file=opts.err,
        )
        by_id = {e["id"]: e for e in current["points"]}
        if opts.force:
            for point_id in decision.submit:
                entry = by_id[point_id]
                if entry["state"] != state.NEW:
                    _set_aside(Path(entry["run_dir"]), prepared.directory, entry["attempts"])

        def submitted(array_id: str, ids: list[str]) -> None:
            stamp = runs.now()
            for task, point_id in enumerate(ids):
                entry = by_id[point_id]
                entry["attempts"] += 1
                entry["job_ids"] = [*entry["job_ids"], f"{array_id}_{task}"]
                entry["submitted_at"] = stamp
                entry["state"] = "PENDING"
            current["array_job_ids"] = [*current.get("array_job_ids", []), array_id]
            state.save(prepared.directory, current)  # an array task may look for it now

        try:
            job_ids = slurm_array.submit(
                prepared,
                decision.submit,
                parallelism=parallelism(prepared),
                max_array_size=array_size(prepared),
                on_submitted=submitted,
                hold=opts.hold,
            )
        finally:
            state.save(prepared.directory, current)
    if job_ids:
        print(f"launcher: submitted array job(s) {', '.join(job_ids)}", file=opts.err)
    print(f"launcher: follow with `launcher sweep status {prepared.directory}`", file=opts.err)
    if not opts.wait:
        return 0
    return _wait_all(prepared, opts)


def _wait_all(prepared: Prepared, opts: Options) -> int:
    while True:
        current = state.load(prepared.directory) or {"points": []}
        states = current_states(current["points"])
        if not any(s in WAITING for s in states.values()):
            return _finish(prepared, states, opts)
        time.sleep(max(opts.poll_s, SLURM_POLL_S))


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


def _run_local(prepared: Prepared, opts: Options) -> int:
    """Keep up to `parallelism` points of this sweep running (counting points started by
    another invocation), claiming each under the lock, until this invocation's share ends."""
    limit = parallelism(prepared) or 1
    directory = prepared.directory
    with state.locked(prepared.lock_root):
        current, decision = _claim(prepared, opts)
        state.save(directory, current)
    print(
        f"launcher: {header(prepared)}; running {len(decision.submit)}, at most {limit} at a "
        f"time; {skip_text(decision)}",
        file=opts.err,
    )
    # A point is claimed only if nobody submitted it since we decided (attempts unchanged).
    todo = {e["id"]: e["attempts"] for e in current["points"] if e["id"] in decision.submit}
    queue = list(decision.submit)
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
                mine = {i for i in mine if by_id[i]["state"] in ACTIVE}
                running = sum(e["state"] in ACTIVE for e in current["points"])
                try:
                    while queue and running < limit:
                        point_id = queue.pop(0)
                        entry = by_id[point_id]
                        if entry["attempts"] != todo[point_id]:
                            continue  # another invocation took it
                        _start_local(prepared, entry, opts.force)
                        mine.add(point_id)
                        running += 1
                finally:
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


def _start_local(prepared: Prepared, entry: dict[str, Any], force: bool) -> None:
    if force and entry["state"] != state.NEW:
        _set_aside(Path(entry["run_dir"]), prepared.directory, entry["attempts"])
    entry["attempts"] += 1
    entry["submitted_at"] = runs.now()
    entry["state"] = "PENDING"
    plan = prepared.plans[entry["id"]]
    try:
        prepared.backend.submit(plan, foreground=False)
    except BaseException:
        entry["state"] = state.record_state(plan.run_dir)
        raise
