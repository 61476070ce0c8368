"""The cause rules of launcher.triage on captured logs and exit codes (pure logic).

The logs are real output captured from torch 2.13 / Python 3.11 on this machine (gloo
timeouts, a peer that crashed, tracebacks), except CUDA OOM, which cannot be produced without
a GPU: its message is the one torch prints (torch.OutOfMemoryError). Real failures on the
backends are reproduced in tests/test_triage_real.py.
"""

from __future__ import annotations

import pytest

from launcher.causes import backend_view, rank_ends
from launcher.triage import BackendView, RankEnd, diagnose, last_exception, signal_of

SITE = "/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages"

GLOO_TIMEOUT = f"""[rank0]: Traceback (most recent call last):
[rank0]:   File "/work/job/train.py", line 8, in <module>
[rank0]:     dist.all_reduce(t)
[rank0]:   File "{SITE}/torch/distributed/c10d_logger.py", line 83, in wrapper
[rank0]:     return func(*args, **kwargs)
[rank0]:   File "{SITE}/torch/distributed/distributed_c10d.py", line 3252, in all_reduce
[rank0]:     work.wait()
[rank0]: RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation to complete
"""  # noqa: E501

PEER_GONE = f"""[rank0]: Traceback (most recent call last):
[rank0]:   File "/work/job/train.py", line 8, in <module>
[rank0]:     dist.all_reduce(t)
[rank0]:   File "{SITE}/torch/distributed/distributed_c10d.py", line 3252, in all_reduce
[rank0]:     work.wait()
[rank0]: RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:34469. This is typically caused by a remote worker crashing. Check the logs of the remote worker before reporting an error.
"""  # noqa: E501

USER_EXCEPTION = f"""step 3 loss 0.51
Traceback (most recent call last):
  File "/work/job/train.py", line 40, in <module>
    main()
  File "/work/job/train.py", line 31, in main
    loss = model(x)
  File "{SITE}/torch/nn/modules/module.py", line 1775, in _call_impl
    return forward_call(*args, **kwargs)
  File "/work/job/model.py", line 12, in forward
    raise ValueError("shapes do not match: 3 vs 4")
ValueError: shapes do not match: 3 vs 4
"""

CUDA_OOM = """Traceback (most recent call last):
  File "/work/job/train.py", line 20, in <module>
    y = model(x)
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 139.72 GiB of which 1.20 GiB is free.
"""  # noqa: E501

SHM_BUS = """ERROR: Unexpected bus error encountered in worker. This might be caused by insufficient shared memory (shm).
Traceback (most recent call last):
RuntimeError: DataLoader worker (pid 812) is killed by signal: Bus error. It is possible that dataloader's workers are out of shared memory. Please try to raise your shared memory limit.
"""  # noqa: E501

# What torch 2.x says in Docker with docker.shm_gb 0.0625 (tests/test_triage_docker.py).
SHM_ENOSPC = """RuntimeError: Caught RuntimeError in DataLoader worker process 0.
Original Traceback (most recent call last):
  File "/opt/venv/lib/python3.11/site-packages/torch/storage.py", line 414, in _new_shared
    return cls._new_using_fd_cpu(size)
RuntimeError: unable to allocate shared memory(shm) for file </torch_11_4213813803_0>: No space left on device (28)
"""  # noqa: E501

NO_MODULE = """Traceback (most recent call last):
  File "/work/job/train.py", line 3, in <module>
    import transformers
ModuleNotFoundError: No module named 'transformers'
"""


def test_a_python_exception_names_the_users_file_and_line_not_torch() -> None:
    cause = diagnose([RankEnd(0, 1, "node1", 10.0, USER_EXCEPTION), RankEnd(1, 0, "node2", 9.0)])
    assert cause.kind == "python_exception"
    assert cause.rank == 0 and cause.node == "node1"
    assert cause.detail["exception"] == "ValueError"
    assert cause.detail["where"] == "/work/job/model.py:12"
    assert "shapes do not match" in cause.summary


def test_the_first_failure_is_the_cause_and_the_others_are_consequences() -> None:
    # rank 3 raised first; rank 0 saw its peer go; rank 1 and 2 were stopped by the launcher.
    ends = [
        RankEnd(0, 1, "node1", 12.0, PEER_GONE),
        RankEnd(1, -15, "node1", 12.5, "", stopped_by_launcher=True),
        RankEnd(2, -9, "node2", 12.6, "", stopped_by_launcher=True),
        RankEnd(3, 1, "node2", 11.0, USER_EXCEPTION),
    ]
    cause = diagnose(ends)
    assert cause.kind == "python_exception" and cause.rank == 3 and cause.node == "node2"
    assert cause.consequences == (0, 1, 2)


def test_a_peer_gone_error_that_ended_first_is_still_a_consequence() -> None:
    """Exit order alone misleads: the survivor of a crash can exit before the crashed
    rank's exit is seen."""
    ends = [RankEnd(0, 1, None, 5.0, PEER_GONE), RankEnd(1, -11, None, 5.2, "")]
    cause = diagnose(ends)
    assert cause.kind == "native_crash" and cause.rank == 1
    assert cause.consequences == (0,)


def test_a_gloo_timeout_names_the_rank_that_did_not_arrive() -> None:
    ends = [
        RankEnd(0, 1, "node1", 20.0, GLOO_TIMEOUT),
        RankEnd(1, -15, "node2", 20.5, "step 3\n", stopped_by_launcher=True),
    ]
    cause = diagnose(ends)
    assert cause.kind == "collective_timeout" and cause.rank == 0
    assert cause.detail["did_not_arrive"] == [1]


def test_cuda_oom_is_matched_from_its_message() -> None:
    cause = diagnose([RankEnd(0, 1, None, 1.0, CUDA_OOM)])
    assert cause.kind == "cuda_oom" and "micro batch" in cause.hint


def test_a_bus_error_in_a_loader_worker_is_a_full_dev_shm() -> None:
    assert diagnose([RankEnd(0, 1, None, 1.0, SHM_BUS)]).kind == "shm_full"
    enospc = diagnose([RankEnd(0, 1, None, 1.0, SHM_ENOSPC)])
    assert enospc.kind == "shm_full", enospc  # not the RuntimeError it is raised as
    assert "unable to allocate shared memory(shm)" in enospc.summary


def test_a_missing_module_is_named() -> None:
    cause = diagnose([RankEnd(0, 1, None, 1.0, NO_MODULE)])
    assert cause.kind == "module_not_found" and "transformers" in cause.summary


def test_a_missing_script_is_a_file_not_found() -> None:
    log = "/usr/bin/python3: can't open file '/work/job/trian.py': [Errno 2] No such file\n"
    cause = diagnose([RankEnd(0, 2, None, 1.0, log)])
    assert cause.kind == "file_not_found" and "trian.py" in cause.summary


@pytest.mark.parametrize("code", [-11, 139, -6, 134])
def test_a_segfault_or_abort_is_a_native_crash(code: int) -> None:
    assert diagnose([RankEnd(0, code, None, 1.0, "")]).kind == "native_crash"


@pytest.mark.parametrize(
    ("state", "kind"),
    [
        ("TIMEOUT", "time_limit"),
        ("DEADLINE", "time_limit"),
        ("NODE_FAIL", "node_failure"),
        ("OUT_OF_MEMORY", "host_oom"),
        ("BOOT_FAIL", "never_started"),
        ("PREEMPTED", "preempted"),
        ("CANCELLED by 1000", "cancelled"),
    ],
)
def test_slurms_own_verdict_comes_first(state: str, kind: str) -> None:
    cause = diagnose([RankEnd(0, -15, "node1", 1.0, "")], BackendView(slurm_state=state))
    assert cause.kind == kind
    if kind == "cancelled":
        assert cause.summary == "cancelled by 1000"


def test_a_cancel_with_no_word_of_who_says_what_the_backend_said() -> None:
    view = BackendView(slurm_state="CANCELLED", error="cancelled (scancel or preemption)")
    cause = diagnose([RankEnd(0, -15, "node1", 1.0, "")], view)
    assert (cause.kind, cause.summary) == ("cancelled", "cancelled (scancel or preemption)")


def test_docker_oom_killed_is_host_oom() -> None:
    ends = [RankEnd(0, -9, None, 1.0, ""), RankEnd(1, -9, None, 1.1, "")]
    assert diagnose(ends, BackendView(oom_killed=True)).kind == "host_oom"


def test_ranks_that_never_reported_mean_the_job_never_started() -> None:
    cause = diagnose([RankEnd(0, None), RankEnd(1, None)])
    assert cause.kind == "never_started"


def test_an_unrecognised_failure_is_unknown_with_the_raw_codes() -> None:
    cause = diagnose([RankEnd(0, 3, None, 1.0, "something odd\n")])
    assert cause.kind == "unknown"
    assert cause.detail["exit_codes"] == {"0": 3}


def test_signal_of_reads_both_conventions() -> None:
    assert signal_of(-9) == 9 and signal_of(137) == 9 and signal_of(1) is None
    assert signal_of(None) is None


def test_last_exception_reads_the_final_traceback() -> None:
    assert last_exception(USER_EXCEPTION) == (
        "ValueError",
        "shapes do not match: 3 vs 4",
        "/work/job/model.py:12",
    )
    assert last_exception("no traceback here") is None


def _attempt(**event) -> dict:
    return {"attempt": 1, "job_id": "7", "started": 1.0, "signalled": 31.0, **event}


def test_the_launchers_stop_at_the_time_limit_with_no_requeue_is_time_limit() -> None:
    # What a real 1-minute job left (tests/test_triage_slurm.py): FAILED, not TIMEOUT, and
    # the rank's SIGTERM came from the launcher.
    record = {
        "state": "FAILED",
        "slurm_state": "FAILED",
        "attempts": [_attempt(requeued=False, reason="slurm.max_requeue=0 reached")],
    }
    view = backend_view(record)  # type: ignore[arg-type]
    assert view.stopped_for == "time_limit"
    assert view.stop_reason == "slurm.max_requeue=0 reached: not requeued"
    cause = diagnose([RankEnd(0, -15, "node1", 30.0, "", stopped_by_launcher=True)], view)
    assert cause.kind == "time_limit" and "not requeued" in cause.summary
    assert cause.rank is None  # every rank was stopped on purpose


def test_a_rank_asking_to_requeue_or_slurms_term_is_not_a_time_limit() -> None:
    asked = _attempt(requeued=False, reason="slurm.max_requeue=0 reached", asked_by_ranks=[0])
    term = _attempt(requeued=None, by="slurm", reason="ended by Slurm (TERM)")
    for attempt in (asked, term):
        view = backend_view({"state": "FAILED", "attempts": [attempt]})  # type: ignore[typeddict-item]
        assert view.stopped_for is None, attempt


def test_preempted_in_the_last_attempt_is_preempted_even_when_slurm_says_cancelled() -> None:
    record = {
        "state": "CANCELLED",
        "slurm_state": "CANCELLED",
        "slurm_reason": "by 0",
        "attempts": [_attempt(requeued=None, by="slurm", reason="preempted")],
    }
    cause = diagnose([RankEnd(0, -15, "node1", 30.0, "")], backend_view(record))  # type: ignore[arg-type]
    assert cause.kind == "preempted" and "slurm.max_requeue" in cause.hint


def test_a_slurm_rank_whose_wrapper_got_a_stop_is_a_consequence(tmp_path) -> None:
    # rank.py's exit files: rank 1 raised; srun's kill-on-bad-exit TERM reached rank 0's
    # wrapper ("stopped_by"). Its end time is earlier (the nodes' clocks, or rank 1's exit
    # file written after srun's kill): it is still the consequence.
    import json

    (tmp_path / "exits").mkdir()
    (tmp_path / "logs").mkdir()
    exits = {
        0: {"exit_code": -15, "node": "node1", "ended": 10.0, "stopped_by": "SIGTERM"},
        1: {"exit_code": 1, "node": "node2", "ended": 11.0},
    }
    for rank, data in exits.items():
        (tmp_path / "exits" / f"rank{rank}.json").write_text(json.dumps({"rank": rank, **data}))
    (tmp_path / "logs" / "rank1.log").write_text(
        'Traceback (most recent call last):\n  File "/w/job.py", line 8, in <module>\n'
        "ValueError: bad batch shape\n"
    )
    record = {"state": "FAILED", "world_size": 2, "slurm_state": "FAILED"}
    ends = rank_ends(tmp_path, record)  # type: ignore[arg-type]
    assert [e.stopped_by_launcher for e in ends] == [True, False]
    cause = diagnose(ends, backend_view(record))  # type: ignore[arg-type]
    assert (cause.kind, cause.rank, cause.node, cause.consequences) == (
        "python_exception",
        1,
        "node2",
        (0,),
    )


def test_the_local_supervisors_time_limit_is_time_limit() -> None:
    error = (
        "time limit of 1 min reached (resources.time_min); every rank got SIGTERM and 2 s to "
        "save, then was stopped"
    )
    view = backend_view({"state": "FAILED", "error": error})  # type: ignore[typeddict-item]
    cause = diagnose([RankEnd(0, -15, None, 60.0, "", stopped_by_launcher=True)], view)
    assert cause.kind == "time_limit", cause
    assert "time limit of 1 min reached" in cause.summary


# Captured on a throwaway one-node Slurm 22.05 cluster with TaskPlugin=task/cgroup,
# ProctrackType=proctrack/cgroup, SelectTypeParameters=CR_Core_Memory and cgroup.conf
# ConstrainRAMSpace=yes (the change proposed for slurm/start.sh): `srun -n2 --mem=300M
# --kill-on-bad-exit=1 --output=logs/rank%t.log rank.py -- python job.py`, rank 1 touching
# 1 GiB. slurmstepd wrote its line into rank 0's log, not the victim's (rank 1's was empty).
SLURM_CGROUP_OOM_RANK0 = """slurmstepd-memnode1: error: Detected 1 oom-kill event(s) in StepId=3.0. Some of your processes may have been killed by the cgroup out-of-memory handler.
slurmstepd-memnode1: error: *** STEP 3.0 ON memnode1 CANCELLED AT 2026-12-01T10:19:02 ***
launcher: rank 0: SIGTERM -> SIGTERM to the script
"""  # noqa: E501


def test_slurms_cgroup_oom_kill_is_host_oom_on_the_rank_it_killed(tmp_path) -> None:
    import json

    (tmp_path / "exits").mkdir()
    (tmp_path / "logs").mkdir()
    exits = {  # rank.py's exit files of that job, as written
        0: {"exit_code": -15, "node": "memnode1", "ended": 1796120342.25, "stopped_by": "SIGTERM"},
        1: {"exit_code": -9, "node": "memnode1", "ended": 1796120341.97},
    }
    for rank, data in exits.items():
        (tmp_path / "exits" / f"rank{rank}.json").write_text(json.dumps({"rank": rank, **data}))
    (tmp_path / "logs" / "rank0.log").write_text(SLURM_CGROUP_OOM_RANK0)
    (tmp_path / "logs" / "rank1.log").write_text("")
    record = {"state": "FAILED", "world_size": 2, "slurm_state": "FAILED"}
    cause = diagnose(rank_ends(tmp_path, record), backend_view(record))  # type: ignore[arg-type]
    # Without the rule: "killed" (SIGKILL from outside), which does not say memory.
    assert (cause.kind, cause.rank, cause.node, cause.consequences) == (
        "host_oom",
        1,
        "memnode1",
        (0,),
    )
    assert cause.summary == (
        "killed by the OOM killer of the job's memory cgroup "
        "(slurmstepd: Detected 1 oom-kill event(s) in StepId=3.0)"
    )
    assert "resources.mem_gb" in cause.hint


def test_a_sigkill_without_slurmstepds_oom_line_stays_killed() -> None:
    ends = [RankEnd(0, -9, "node1", 1.0, "step 3\n")]
    assert diagnose(ends, BackendView(slurm_state="FAILED")).kind == "killed"
