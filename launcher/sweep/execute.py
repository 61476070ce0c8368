"""Decide which points to (re)submit and submit them: as queued arrays on a backend with
the array capability (Slurm), else as a concurrency-limited set of detached runs.

A sweep is prepared (validated, planned) in `plan.py` before anything here runs. Claims
happen under the job's sweep lock on a freshly read `SweepState`, so two invocations never
submit the same point. This module never tests a backend's name: it asks `backend.array`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from launcher.sweep import report, state
from launcher.sweep.plan import Prepared
from launcher.sweep.state import NEW, WAITING, SweepState

POLL_S = 0.2
# Array backends: a queue, polled less often than local runs.
ARRAY_POLL_S = 2.0


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
        now = states.get(point_id, NEW)
        if now in WAITING:
            go = False
        elif now == NEW:
            go = True
        elif now in ("FAILED", "CANCELLED"):
            go = retry_failed or force
        else:
            go = force
        if go:
            submit.append(point_id)
            reasons[point_id] = "submit" if now == NEW else "resubmit"
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
    # Array backends (benchmarks): queue the arrays held, so nothing starts; or only ask
    # the scheduler (`sbatch --test-only`), so no job is made at all.
    hold: bool = False
    test_only: bool = False
    # `--no-preflight`: submit without the checks; `--check`: a dry-run runs them too.
    preflight: bool = True
    check: bool = False


def parallelism(prepared: Prepared) -> int | None:
    """Points running at once: the sweep's `parallelism`, else the backend's default (an
    array's %N limit, None: no limit; points at once on this machine)."""
    return prepared.sweep.parallelism or prepared.backend.default_parallelism(prepared.spec)


def header(prepared: Prepared) -> str:
    dropped = f" ({prepared.duplicates} duplicate configs dropped)" if prepared.duplicates else ""
    return (
        f"sweep {prepared.sweep_id}: {len(prepared.points)} points on "
        f"{prepared.spec.backend}{dropped}"
    )


def run(prepared: Prepared, opts: Options) -> int:
    """Submit what is missing (and failed, or all, as asked); detached runs: to the end."""
    if opts.dry_run:
        code = _dry_run(prepared, opts)
        if opts.check:
            _preflight(prepared, _missing(prepared, opts)[1].submit, opts)
            print("# preflight: every check passed", file=opts.out)
        return code
    if prepared.backend.array is not None:
        return _run_arrays(prepared, opts)
    return _run_detached(prepared, opts)


def claim(prepared: Prepared, opts: Options) -> tuple[SweepState, Decision]:
    """Under the lock: the sweep's state with fresh point states, and what to submit."""
    current = prepared.open_state()
    states = current.refresh()
    decision = decide(current.ids, states, retry_failed=opts.retry_failed, force=opts.force)
    return current, decision


def _preflight(prepared: Prepared, submit: list[str], opts: Options) -> None:
    """The preflight checks for the points about to be submitted: once, on the first one's
    plan, with the count (array backends check the array, not each point). Raises
    PreflightFailed (one line, exit 2) before anything is claimed or written."""
    if not opts.preflight or not submit:
        return
    from launcher import preflight

    plan = prepared.plans.get(submit[0]) or next(iter(prepared.plans.values()))
    preflight.before_submit(prepared.backend, plan, points=len(submit), err=opts.err)


def _missing(prepared: Prepared, opts: Options) -> tuple[dict[str, str], Decision]:
    """Each point's state and what a real run would submit, from the records alone (no
    backend query)."""
    saved = SweepState.load(prepared.directory)
    states = {}
    for point in prepared.points:
        now = state.record_state(prepared.run_dir(point))
        before = saved.get(point.id) if saved else None
        if now == NEW and before and before["job_ids"]:
            now = state.SUBMITTED  # queued as an array task that has no record yet
        states[point.id] = now
    ids = [p.id for p in prepared.points]
    return states, decide(ids, states, retry_failed=opts.retry_failed, force=opts.force)


def _dry_run(prepared: Prepared, opts: Options) -> int:
    """The table of points and what a real run would submit; reads records, queries nothing."""
    states, decision = _missing(prepared, opts)
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
    limit = parallelism(prepared)
    array = prepared.backend.array
    if array is None:
        print(f"# {prepared.spec.backend}: at most {limit or 1} points at a time", file=out)
        if submit:
            print("# the first point's plan:", file=out)
            print(prepared.plans[submit[0]].render(), file=out)
        return
    text = array.render(
        prepared.directory,
        submit,
        spec=prepared.points[0].spec if prepared.points else prepared.spec,
        params=prepared.array_params,
        parallelism=limit,
    )
    print(text, file=out)
    if prepared.plans:
        plan = next(iter(prepared.plans.values()))
        print("# then each task runs its own point like this (point 0 shown):", file=out)
        print(array.render_task(plan), file=out)


def _run_arrays(prepared: Prepared, opts: Options) -> int:
    with state.locked(prepared.lock_root):
        current, decision = claim(prepared, opts)
        _preflight(prepared, decision.submit, opts)
        print(
            f"launcher: {header(prepared)}; submitting {len(decision.submit)}; "
            f"{skip_text(decision)}",
            file=opts.err,
        )
        ids = current.claim(decision.submit, force=opts.force)
        job_ids = queue_arrays(prepared, current, ids, hold=opts.hold, test_only=opts.test_only)
    if job_ids:
        print(f"launcher: submitted array job(s) {', '.join(job_ids)}", file=opts.err)
    print(f"launcher: follow with `launcher sweep status {prepared.directory}`", file=opts.err)
    if not opts.wait:
        return 0
    return _wait_all(prepared, opts)


def queue_arrays(
    prepared: Prepared,
    current: SweepState,
    ids: list[str],
    *,
    hold: bool = False,
    test_only: bool = False,
    after_each: Callable[[str, list[str]], None] | None = None,
) -> list[str]:
    """Under the lock: queue these claimed points with the backend's array capability,
    saving the state after each array (its tasks may look for it at once) and at the end,
    also when a later array fails. `test_only`, `after_each`: benchmarks."""
    array = prepared.backend.array
    assert array is not None

    def submitted(array_id: str, point_ids: list[str]) -> None:
        if array_id:  # '' with test_only: nothing was queued
            current.mark_submitted(point_ids, array_id)
            current.save()
        if after_each:
            after_each(array_id, point_ids)

    try:
        return array.submit(
            prepared.directory,
            _array_points(prepared, ids),
            base=prepared.loaded.raw,
            config_file=prepared.loaded.file,
            spec=prepared.points[0].spec,
            params=prepared.array_params,
            parallelism=parallelism(prepared),
            on_submitted=submitted,
            hold=hold,
            test_only=test_only,
        )
    finally:
        current.save()


def _array_points(prepared: Prepared, ids: list[str]) -> list[dict[str, Any]]:
    """What an array task needs to rebuild its point: id, index, run id, swept values."""
    by_id = {p.id: p for p in prepared.points}
    return [
        {
            "id": i,
            "index": by_id[i].index,
            "run_id": by_id[i].run_id,
            "overrides": by_id[i].overrides,
        }
        for i in ids
    ]


def _wait_all(prepared: Prepared, opts: Options) -> int:
    while True:
        current = SweepState.load(prepared.directory)
        states = current.refresh() if current else {}
        if not any(s in WAITING for s in states.values()):
            return _finish(prepared, states, opts)
        time.sleep(max(opts.poll_s, ARRAY_POLL_S))


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


def _run_detached(prepared: Prepared, opts: Options) -> int:
    """Keep up to `parallelism` points of this sweep running (counting points started by
    another invocation), claiming each under the lock, until this invocation's share ends."""
    limit = parallelism(prepared) or 1
    directory = prepared.directory
    with state.locked(prepared.lock_root):
        current, decision = claim(prepared, opts)
        _preflight(prepared, decision.submit, opts)
        current.save()
    print(
        f"launcher: {header(prepared)}; running {len(decision.submit)}, at most {limit} at a "
        f"time; {skip_text(decision)}",
        file=opts.err,
    )
    # A point is claimed only if nobody submitted it since we decided (attempts unchanged).
    seen = {i: current.entry(i)["attempts"] for i in decision.submit}
    queue = list(decision.submit)
    mine: set[str] = set()
    try:
        while queue or mine:
            with state.locked(prepared.lock_root):
                current = prepared.open_state()
                current.refresh(only_states=state.ACTIVE)
                mine = {i for i in mine if current.entry(i)["state"] in state.ACTIVE}
                running = current.count(state.ACTIVE)
                try:
                    while queue and running < limit:
                        point_id = queue.pop(0)
                        if current.claim([point_id], force=opts.force, seen=seen):
                            _start(prepared, current, point_id)
                            mine.add(point_id)
                            running += 1
                finally:
                    current.save()
            if queue or mine:
                time.sleep(opts.poll_s)
    except KeyboardInterrupt:
        print(
            f"launcher: interrupted; {len(mine)} started point(s) keep running "
            f"(`launcher sweep status {directory}`; rerun the sweep to continue)",
            file=opts.err,
        )
        raise
    final = prepared.open_state().refresh()
    return _finish(prepared, final, opts)


def _start(prepared: Prepared, current: SweepState, point_id: str) -> None:
    """Submit one claimed point detached; a failed start leaves its record's state."""
    current.mark_submitted([point_id])
    plan = prepared.plans[point_id]
    try:
        prepared.backend.submit(plan, foreground=False, echo=False)
    except BaseException:
        current.apply({point_id: state.record_state(plan.run_dir)})
        raise
