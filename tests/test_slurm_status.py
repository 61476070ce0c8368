"""Slurm states to launcher states, from canned `sacct -P` / `squeue` outputs (no cluster).

One row per Slurm state the table maps, including those a test cluster cannot produce on
demand (NODE_FAIL, BOOT_FAIL, DEADLINE, OUT_OF_MEMORY); the real-cluster runs are in
test_slurm.py. The stand-in runner below only replays text Slurm prints.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import pytest

from launcher import runs
from launcher.backends.slurm.backend import STALE_SUBMISSION_S, SlurmBackend
from launcher.backends.slurm.rank import write_exit
from launcher.backends.slurm.status import (
    SlurmTimeout,
    apply_state,
    expand_array_id,
    launcher_state,
    merge_squeue,
    parse_sacct,
    query_states,
    tres_count,
    who_cancelled,
)
from launcher.errors import BackendError, DamagedRecord

T0, T1 = "2026-12-01T06:00:00", "2026-12-01T06:05:00"
# `sacct -X -P -n -o JobID,State,ExitCode,Start,End,NodeList` as Slurm 22.05 prints it.
SACCT = f"""\
101|PENDING|0:0|Unknown|Unknown|None assigned
102|RUNNING|0:0|{T0}|Unknown|node[1-2]
103|REQUEUED|0:0|{T0}|{T1}|node1
104|PREEMPTED|0:15|{T0}|{T1}|node1
105|SUSPENDED|0:0|{T0}|Unknown|node2
106|COMPLETED|0:0|{T0}|{T1}|node[1-2]
107|FAILED|1:0|{T0}|{T1}|node[1-2]
108|TIMEOUT|0:0|{T0}|{T1}|node1
109|NODE_FAIL|0:0|{T0}|{T1}|node2
110|OUT_OF_MEMORY|0:125|{T0}|{T1}|node1
111|BOOT_FAIL|0:0|{T0}|{T1}|node1
112|DEADLINE|0:0|{T0}|{T1}|None assigned
113|CANCELLED by 1000|0:15|{T0}|{T1}|node1
114_[0-3%2]|PENDING|0:0|Unknown|Unknown|None assigned
114_5|RUNNING|0:0|{T0}|Unknown|node1
115|COMPLETING|0:0|{T0}|Unknown|node1
116|CANCELLED+|0:0|{T0}|{T1}|node1
"""

TABLE = [
    ("101", "PENDING", "PENDING"),
    ("102", "RUNNING", "RUNNING"),
    ("103", "REQUEUED", "PENDING"),
    ("104", "PREEMPTED", "PENDING"),  # comes back under PreemptMode=REQUEUE
    ("105", "SUSPENDED", "RUNNING"),
    ("106", "COMPLETED", "COMPLETED"),
    ("107", "FAILED", "FAILED"),
    ("108", "TIMEOUT", "FAILED"),
    ("109", "NODE_FAIL", "FAILED"),
    ("110", "OUT_OF_MEMORY", "FAILED"),
    ("111", "BOOT_FAIL", "FAILED"),
    ("112", "DEADLINE", "FAILED"),
    ("113", "CANCELLED", "CANCELLED"),
    ("114_0", "PENDING", "PENDING"),
    ("114_3", "PENDING", "PENDING"),
    ("114_5", "RUNNING", "RUNNING"),
    ("115", "COMPLETING", "RUNNING"),
    ("116", "CANCELLED+", "CANCELLED"),
]


@pytest.mark.parametrize(("job", "slurm", "launcher"), TABLE)
def test_every_mapped_slurm_state(job, slurm, launcher):
    states = parse_sacct(SACCT)
    assert states[job]["state"] == slurm
    assert launcher_state(states[job]["state"]) == launcher


def test_sacct_fields_are_read_per_job():
    states = parse_sacct(SACCT)
    assert states["113"]["reason"] == "by 1000"
    assert states["110"]["exit"] == "0:125" and states["107"]["nodes"] == "node[1-2]"
    assert "114_4" not in states  # the %2 is a throttle, not a task
    assert launcher_state("SOMETHING_NEW") is None


def test_array_ids_expand_to_their_tasks():
    assert expand_array_id("12_[0-3%2]") == ["12_0", "12_1", "12_2", "12_3"]
    assert expand_array_id("12_[0,5-6]") == ["12_0", "12_5", "12_6"]
    assert expand_array_id("12_7") == ["12_7"] and expand_array_id("12") == ["12"]


def test_squeue_wins_over_a_late_sacct_but_not_over_a_cancellation():
    states = parse_sacct(SACCT)
    merge_squeue(states, "101|RUNNING\n113|COMPLETING\n200|PENDING\n201_[1-2]|PENDING\n")
    assert states["101"]["state"] == "RUNNING"  # sacct lags a few seconds behind
    assert states["113"]["state"] == "CANCELLED"
    assert states["200"]["state"] == "PENDING" and states["201_2"]["state"] == "PENDING"


class Replay:
    """Replays canned Slurm output per command; records what was run, with its timeout."""

    def __init__(self, **outputs):
        self.outputs = {k: list(v) if isinstance(v, list) else [v] for k, v in outputs.items()}
        self.calls: list[tuple[list[str], float]] = []

    def __call__(self, argv: list[str], timeout_s: float) -> str:
        self.calls.append((argv, timeout_s))
        queue = self.outputs[argv[0]]
        out = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(out, Exception):
            raise out
        return out

    def commands(self) -> list[str]:
        return [argv[0] for argv, _ in self.calls]


def test_one_sacct_and_one_squeue_for_all_runs_with_a_timeout():
    replay = Replay(sacct=SACCT, squeue="101|RUNNING\n")
    states = query_states(["101", "114_5", "106"], run=replay, timeout_s=7)
    assert replay.commands() == ["sacct", "squeue"]
    assert replay.calls[0][1] == 7 and 1 <= replay.calls[1][1] <= 7  # one budget for both
    sacct_argv = replay.calls[0][0]
    assert sacct_argv[sacct_argv.index("-j") + 1] == "101,106,114"
    # Every attempt's row (-D), with what it held, in this same one query.
    assert "-D" in sacct_argv
    assert sacct_argv[sacct_argv.index("-o") + 1].endswith(",AllocTRES,ElapsedRaw,Submit")
    assert states["101"]["state"] == "RUNNING" and states["106"]["state"] == "COMPLETED"


def test_squeue_refusing_finished_ids_is_fine_but_a_silent_one_is_an_error():
    gone = BackendError("squeue -h failed: slurm_load_jobs error: Invalid job id specified")
    assert query_states(["106"], run=Replay(sacct=SACCT, squeue=gone))["106"]["state"]
    hung = SlurmTimeout("squeue -h did not answer within 7 s: is the Slurm controller up?")
    with pytest.raises(SlurmTimeout):
        query_states(["106"], run=Replay(sacct=SACCT, squeue=hung))
    with pytest.raises(SlurmTimeout):
        query_states(["106"], run=Replay(sacct=SlurmTimeout("sacct did not answer")))


# ---- apply_state: COMPLETED only with every rank's exit file ----


def _run(tmp_path: Path, *, state="RUNNING", world=2, job_id="106", **fields) -> Path:
    run_dir = tmp_path / "run"
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = dict(
        runs.new_record(run_id="R1", name="t", backend="slurm", world_size=world, config_file=None)
    )
    record.update(state=state, backend_info={"job_id": job_id} if job_id else {}, **fields)
    runs.write_record(run_dir, record)
    return run_dir


def _exit(run_dir: Path, rank: int, code: int, restart: int = 0, node: str = "node1"):
    env = {"RANK": str(rank), "SLURMD_NODENAME": node, "SLURM_RESTART_COUNT": str(restart)}
    write_exit(run_dir, env, code, time.time())


def _attempt(run_dir: Path, restart: int):
    with open(run_dir / "attempts.jsonl", "a") as fh:
        event = {"phase": "start", "restart": restart, "job_id": "106", "time": time.time()}
        fh.write(json.dumps(event) + "\n")


def _apply(run_dir: Path, line: str) -> dict:
    info = parse_sacct(line)
    apply_state(run_dir, dict(runs.read_record(run_dir)), next(iter(info.values())))
    return dict(runs.read_record(run_dir))


def test_completed_with_every_rank_reported_is_completed(tmp_path):
    run_dir = _run(tmp_path)
    _exit(run_dir, 0, 0)
    _exit(run_dir, 1, 0, node="node2")
    record = _apply(run_dir, f"106|COMPLETED|0:0|{T0}|{T1}|node[1-2]")
    assert record["state"] == "COMPLETED" and record["exit_codes"] == {"0": 0, "1": 0}


def test_completed_without_exit_files_is_failed_naming_the_ranks(tmp_path):
    """srun exits 0 when it could not start the tasks: Slurm says COMPLETED, nothing ran."""
    run_dir = _run(tmp_path)
    record = _apply(run_dir, f"106|COMPLETED|0:0|{T0}|{T1}|node[1-2]")
    assert record["state"] == "FAILED"
    assert record["error"].startswith(
        "rank(s) 0,1 never reported an exit: the tasks did not start "
        "(is the run folder visible on every node?)"
    )


def test_exit_files_of_an_earlier_attempt_do_not_count(tmp_path):
    run_dir = _run(tmp_path)
    _exit(run_dir, 0, 0, restart=0)
    _exit(run_dir, 1, 0, restart=0)
    _attempt(run_dir, 0)
    _attempt(run_dir, 1)  # requeued; the second attempt's tasks never started
    _exit(run_dir, 0, 0, restart=1)
    record = _apply(run_dir, f"106|COMPLETED|0:0|{T0}|{T1}|node[1-2]")
    assert record["state"] == "FAILED" and record["error"].startswith("rank(s) 1 never reported")


def test_completed_with_a_nonzero_rank_is_failed_naming_it(tmp_path):
    run_dir = _run(tmp_path)
    _exit(run_dir, 0, 0)
    _exit(run_dir, 1, 75, node="node2")  # stopped for a requeue that never came
    record = _apply(run_dir, f"106|COMPLETED|0:0|{T0}|{T1}|node[1-2]")
    assert record["state"] == "FAILED" and record["failed_rank"] == 1
    assert record["error"].startswith("rank 1 on node2 exited with code 75")


@pytest.mark.parametrize("state", ["FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"])
def test_failed_states_name_the_first_failing_rank_or_the_slurm_state(tmp_path, state):
    run_dir = _run(tmp_path)
    _exit(run_dir, 0, 0)
    _exit(run_dir, 1, 3, node="node2")
    record = _apply(run_dir, f"106|{state}|3:0|{T0}|{T1}|node[1-2]")
    log = run_dir / "logs" / "rank1.log"
    assert record["state"] == "FAILED" and record["failed_rank"] == 1
    assert record["error"] == f"rank 1 on node2 exited with code 3 (log: {log}); " + (
        f"Slurm state {state}, exit 3:0"
    )
    other = _run(tmp_path / "b", world=1)
    _exit(other, 0, 0)
    assert _apply(other, f"106|{state}|0:0|{T0}|{T1}|n")["error"] == (
        f"Slurm state {state}, exit 0:0"
    )


def test_a_failed_job_whose_tasks_never_started_says_so(tmp_path):
    run_dir = _run(tmp_path)
    record = _apply(run_dir, f"106|FAILED|1:0|{T0}|{T1}|node[1-2]")
    assert record["error"] == (
        "rank(s) 0,1 never reported an exit: the tasks did not start (is the run folder "
        "visible on every node?); Slurm state FAILED, exit 1:0"
    )


@pytest.mark.parametrize(
    ("line", "state"),
    [
        ("106|PENDING|0:0|Unknown|Unknown|None assigned", "PENDING"),
        (f"106|REQUEUED|0:0|{T0}|{T1}|node1", "PENDING"),
        (f"106|PREEMPTED|0:0|{T0}|{T1}|node1", "PENDING"),
        (f"106|SUSPENDED|0:0|{T0}|Unknown|node1", "RUNNING"),
        (f"106|RUNNING|0:0|{T0}|Unknown|node1", "RUNNING"),
    ],
)
def test_active_states_keep_the_run_open(tmp_path, line, state):
    record = _apply(_run(tmp_path, state="PENDING"), line)
    assert record["state"] == state and record["ended_at"] is None
    assert (record["started_at"] is not None) == (state == "RUNNING")


def test_cancelled_says_who_cancelled(tmp_path):
    outside = _apply(_run(tmp_path / "a"), f"113|CANCELLED by 1000|0:15|{T0}|{T1}|node1")
    assert outside["state"] == "CANCELLED" and "scancel or preemption" in outside["error"]
    ours = _run(tmp_path / "b", cancel_requested_at=runs.now())
    record = _apply(ours, f"113|CANCELLED by 0|0:15|{T0}|{T1}|node1")
    assert record["error"] == "cancelled by launcher cancel"


# ---- cancel and refresh follow Slurm's word ----


def _backend(replay: Replay, wait_s: float = 5) -> SlurmBackend:
    return SlurmBackend(run=replay, timeout_s=3, cancel_wait_s=wait_s)


def test_cancel_of_a_run_sacct_sees_finished_leaves_it_completed(tmp_path):
    run_dir = _run(tmp_path)
    _exit(run_dir, 0, 0)
    _exit(run_dir, 1, 0)
    replay = Replay(sacct=f"106|COMPLETED|0:0|{T0}|{T1}|node[1-2]", squeue="")
    with pytest.raises(BackendError, match="run R1 already ended COMPLETED; nothing to cancel"):
        _backend(replay).cancel(run_dir)
    assert "scancel" not in replay.commands()
    assert runs.read_record(run_dir)["state"] == "COMPLETED"


def test_cancel_racing_the_end_of_the_job_records_what_sacct_says(tmp_path):
    run_dir = _run(tmp_path)
    _exit(run_dir, 0, 0)
    _exit(run_dir, 1, 0)
    replay = Replay(
        sacct=[f"106|RUNNING|0:0|{T0}|Unknown|node[1-2]", f"106|COMPLETED|0:0|{T0}|{T1}|n"],
        squeue="",
        scancel="",  # scancel of a job that just finished succeeds silently
    )
    with pytest.raises(BackendError, match="before the cancel reached Slurm ended COMPLETED"):
        _backend(replay).cancel(run_dir)
    assert replay.commands() == ["sacct", "squeue", "scancel", "sacct", "squeue"]
    record = runs.read_record(run_dir)
    assert record["state"] == "COMPLETED" and record.get("cancel_requested_at")


def test_cancel_records_cancelled_when_slurm_says_so(tmp_path):
    run_dir = _run(tmp_path)
    replay = Replay(
        sacct=[f"106|RUNNING|0:0|{T0}|Unknown|node1", f"106|CANCELLED by 0|0:15|{T0}|{T1}|n"],
        squeue=["106|RUNNING", "106|COMPLETING"],
        scancel="",
    )
    _backend(replay).cancel(run_dir)
    record = runs.read_record(run_dir)
    assert record["state"] == "CANCELLED" and record["error"] == "cancelled by launcher cancel"


def test_cancel_with_sacct_silent_scancels_but_writes_no_state_of_its_own(tmp_path):
    run_dir = _run(tmp_path)
    silent = SlurmTimeout("sacct -X did not answer within 3 s: is the Slurm controller up?")
    replay = Replay(sacct=silent, scancel="")
    _backend(replay, wait_s=0).cancel(run_dir)
    assert replay.commands() == ["sacct", "scancel"]
    record = runs.read_record(run_dir)
    assert record["state"] == "RUNNING" and record.get("cancel_requested_at")
    # Once Slurm answers, its word decides.
    later = Replay(sacct=f"106|CANCELLED by 0|0:15|{T0}|{T1}|n", squeue="")
    _backend(later).refresh([run_dir])
    assert runs.read_record(run_dir)["error"] == "cancelled by launcher cancel"


def test_cancel_when_scancel_fails_changes_nothing(tmp_path):
    run_dir = _run(tmp_path)
    replay = Replay(
        sacct=f"106|RUNNING|0:0|{T0}|Unknown|node1",
        squeue="106|RUNNING",
        scancel=SlurmTimeout("scancel 106 did not answer within 3 s"),
    )
    with pytest.raises(SlurmTimeout):
        _backend(replay).cancel(run_dir)
    record = runs.read_record(run_dir)
    assert record["state"] == "RUNNING" and "cancel_requested_at" not in record


def test_cancel_of_a_refused_submission_says_it_ended(tmp_path):
    run_dir = _run(tmp_path, state="FAILED", job_id=None, error="sbatch refused the job: x")
    replay = Replay()
    with pytest.raises(BackendError, match="already ended FAILED: sbatch refused the job: x"):
        _backend(replay).cancel(run_dir)
    assert replay.calls == []


def test_refresh_fails_a_submission_that_never_got_a_job_id(tmp_path):
    stale = _run(tmp_path / "a", state="PENDING", job_id=None)
    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=STALE_SUBMISSION_S + 5)
    runs.update_record(stale, created_at=old.isoformat())
    fresh = _run(tmp_path / "b", state="PENDING", job_id=None)
    replay = Replay()
    _backend(replay).refresh([stale, fresh])
    assert replay.calls == []  # no job ids: nothing to ask Slurm
    record = runs.read_record(stale)
    assert record["state"] == "FAILED" and "submission did not finish" in record["error"]
    assert runs.read_record(fresh)["state"] == "PENDING"


def test_refresh_when_slurm_is_silent_raises_and_leaves_records_alone(tmp_path):
    run_dir = _run(tmp_path)
    before = runs.read_record(run_dir)
    replay = Replay(sacct=SlurmTimeout("sacct -X did not answer within 3 s"))
    with pytest.raises(BackendError, match="did not answer"):
        _backend(replay).refresh([run_dir])
    assert runs.read_record(run_dir) == before


# ---- cost: AllocTRES x ElapsedRaw of each attempt, from the same sacct rows ----


def _submit(after_s: float) -> str:
    """A Submit stamp this long after now, as sacct prints it (the controller's local time,
    no zone). Made when a test runs: the rows must be newer than the record it writes."""
    return (dt.datetime.now().replace(microsecond=0) + dt.timedelta(seconds=after_s)).isoformat()


def _requeued_then_done() -> str:
    """`sacct -X -D -P -n -o JobID,...,AllocTRES,ElapsedRaw,Submit` as Slurm 22.05 prints a job
    that was requeued once and then completed (the shape seen on the local cluster)."""
    return (
        f"106|REQUEUED|0:0|{T0}|{T0}|node1|billing=4,cpu=4,node=1|900|{_submit(5)}\n"
        f"106|COMPLETED|0:0|{T0}|{T1}|node1|billing=4,cpu=4,node=1|2700|{_submit(60)}\n"
    )


def test_alloc_tres_counts():
    tres = "billing=8,cpu=8,gres/gpu=2,gres/gpu:a100=2,mem=16G,node=1"
    assert (tres_count(tres, "cpu"), tres_count(tres, "gres/gpu")) == (8, 2)
    assert tres_count("cpu=4,gres/gpu:a100=1,gres/gpu:v100=2", "gres/gpu") == 3
    assert tres_count("billing=1,cpu=1,node=1", "gres/gpu") == 0 and tres_count("", "cpu") == 0


def test_every_attempt_row_is_kept_and_the_latest_decides_the_state():
    info = parse_sacct(_requeued_then_done())["106"]
    assert info["state"] == "COMPLETED" and info["end"] == T1
    assert [(u["state"], u["cpus"], u["seconds"]) for u in info["usage"]] == [
        ("REQUEUED", 4, 900),
        ("COMPLETED", 4, 2700),
    ]
    # An old six-field line still parses (no usage figures: nothing held is known).
    assert parse_sacct(f"106|FAILED|1:0|{T0}|{T1}|n")["106"]["usage"][0]["cpus"] == 0


def test_a_completed_run_after_a_requeue_lost_its_earlier_attempt(tmp_path):
    run_dir = _run(tmp_path, world=1)
    _exit(run_dir, 0, 0)
    record = _apply(run_dir, _requeued_then_done())
    cost = record["cost"]
    assert record["state"] == "COMPLETED"
    assert cost["cpu_hours"] == 4 * 3600 / 3600 and cost["lost_cpu_hours"] == 1.0
    assert (cost["gpu_hours"], cost["lost_share"], cost["attempts"]) == (0, 0.25, 2)
    assert cost["source"] == "sacct AllocTRES x ElapsedRaw"
    assert runs.format_cost(cost) == (
        "4.00 CPU-h, 0 GPU-h held; 1.00 CPU-h (25%) lost to failures/requeues"
    )


def test_a_failed_run_lost_all_it_held_gpus_first(tmp_path):
    run_dir = _run(tmp_path)
    _exit(run_dir, 0, 0)
    _exit(run_dir, 1, 3, node="node2")
    tres = "billing=16,cpu=16,gres/gpu=4,node=2"
    record = _apply(run_dir, f"106|FAILED|3:0|{T0}|{T1}|node[1-2]|{tres}|1800|{_submit(5)}")
    cost = record["cost"]
    assert (cost["cpu_hours"], cost["gpu_hours"]) == (8.0, 2.0)
    assert (cost["lost_cpu_hours"], cost["lost_gpu_hours"], cost["lost_share"]) == (8, 2, 1)
    assert runs.format_cost(cost).endswith(
        "8.00 CPU-h, 2.00 GPU-h (100%) lost to failures/requeues"
    )


def test_an_older_job_with_the_same_id_is_not_counted(tmp_path):
    """After the controller's job ids were reset, `sacct -D -j 106` also lists the old 106."""
    run_dir = _run(tmp_path, world=1)
    _exit(run_dir, 0, 0)
    old = "2025-01-01T00:00:00"
    lines = f"106|COMPLETED|0:0|{old}|{old}|node1|cpu=64,node=1|36000|{old}\n"
    record = _apply(run_dir, lines + _requeued_then_done())
    assert (record["cost"]["cpu_hours"], record["cost"]["attempts"]) == (4.0, 2)


def test_the_cost_is_written_once_when_the_run_ends(tmp_path):
    run_dir = _run(tmp_path, state="PENDING", world=1)
    running = _apply(run_dir, f"106|RUNNING|0:0|{T0}|Unknown|node1|cpu=4,node=1|60|{_submit(5)}")
    assert "cost" not in running  # not final: nothing kept yet
    _exit(run_dir, 0, 0)
    assert _apply(run_dir, _requeued_then_done())["cost"]["cpu_hours"] == 4.0


def test_a_cancel_names_the_user_and_keeps_the_uid(tmp_path):
    record = _apply(
        _run(tmp_path), f"113|CANCELLED by 0|0:15|{T0}|{T1}|node1|cpu=1|30|{_submit(5)}"
    )
    assert record["slurm_reason"] == "by root (uid 0)"
    assert record["cancelled_by"] == {"uid": 0, "user": "root"}
    assert record["cost"]["lost_share"] == 1.0  # it did not complete
    # A uid this host has no name for stays a uid; other words stay as Slurm wrote them.
    assert who_cancelled("by 4000000000") == (
        "by uid 4000000000",
        {"uid": 4000000000, "user": None},
    )
    assert who_cancelled("by someone") == ("by someone", None)


def test_a_record_with_a_negative_cost_is_refused(tmp_path):
    run_dir = _run(tmp_path)
    with pytest.raises(DamagedRecord, match="cost: expected an object of non-negative hours"):
        runs.update_record(run_dir, cost={"cpu_hours": -1.0})
