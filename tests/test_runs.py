"""Run records as files on disk: every way a record.json can be damaged is one DamagedRecord
(file and why), never a traceback; what launcher writes always reads back; terminal output
made from records and logs cannot carry control sequences."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from launcher import runs
from launcher.errors import DamagedRecord, LauncherError, RunNotFound

# Property-test sizes, stated here so the report can quote them.
BYTES_EXAMPLES = 400
JSON_EXAMPLES = 400
MUTATION_EXAMPLES = 600

FIXED = settings(
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def good_record(**changes) -> dict:
    record = runs.new_record(
        run_id="20250101-000000-abcdef", name="job", backend="local", world_size=2, config_file=None
    )
    return {**record, **changes}


def run_dir_with(tmp_path: Path, content: bytes | str | None) -> Path:
    run_dir = tmp_path / "job" / "20250101-000000-abcdef"
    run_dir.mkdir(parents=True, exist_ok=True)
    if content is not None:
        data = content.encode() if isinstance(content, str) else content
        (run_dir / runs.RECORD).write_bytes(data)
    return run_dir


def damaged_why(run_dir: Path) -> str:
    with pytest.raises(DamagedRecord) as info:
        runs.read_record(run_dir)
    err = info.value
    assert err.path == str(run_dir / runs.RECORD)
    assert "\n" not in str(err) and str(err).startswith(f"{run_dir / runs.RECORD}: damaged")
    assert err.exit_code == 2
    return err.why


def test_a_record_launcher_writes_reads_back(tmp_path):
    run_dir = run_dir_with(tmp_path, None)
    record = good_record(
        state="FAILED",
        exit_codes={"0": 0, "1": 3},
        failed_rank=1,
        error="rank 1 exited with code 3",
        backend_info={
            "supervisor_pid": os.getpid(),
            "rank_pids": {"0": 12, "1": 13},
            "supervisor": {"pid": 12, "start_ticks": 5, "boot_id": "b", "pid_ns": "pid:[1]"},
            "ranks": {"0": {"pid": 13, "start_ticks": 6, "boot_id": "b"}, "1": None},
        },
        submitter=None,
        attempts=[{"attempt": 1, "job_id": "7", "node": "node1"}],
        submitted_at=runs.now(),
        slurm_state="FAILED",
        container_exit_code=None,
    )
    runs.write_record(run_dir, record)
    assert runs.read_record(run_dir) == record
    assert runs.update_record(run_dir, state="CANCELLED")["state"] == "CANCELLED"
    assert runs.read_record(run_dir)["state"] == "CANCELLED"


def test_missing_record_is_run_not_found_not_damaged(tmp_path):
    with pytest.raises(RunNotFound) as info:
        runs.read_record(run_dir_with(tmp_path, None))
    assert not isinstance(info.value, DamagedRecord)


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "empty file"),
        (b"  \n", "empty file"),
        (b'{"run_id": "x", ', "not JSON: "),
        (b"\xff\xfe\x00garbage\x00\x01", "not JSON: "),
        (b"\x1b[2J\x89PNG\r\n\x1a\n", "not JSON: "),
        (b"[1, 2, 3]", "expected a JSON object, got list"),
        (b'"just a string"', "expected a JSON object, got str"),
        (b"null", "expected a JSON object, got NoneType"),
        (b"1" * 5000, "not JSON: "),  # Python refuses ints this long
        (b"[" * 100_000, "not JSON: nested too deeply"),
        ('{"a": ' + "[" * 20 + "]" * 20 + "}", "nested more than 16"),
        (json.dumps({"run_id": "x"}), "name: missing"),
        (json.dumps(good_record(state="FINISHED")), "state: expected one of PENDING"),
        (json.dumps(good_record(world_size="2")), "world_size: expected a whole number"),
        (json.dumps(good_record(world_size=True)), "world_size: expected a whole number"),
        (json.dumps(good_record(world_size=10**12)), "world_size: expected a whole number"),
        (json.dumps(good_record(backend="")), "backend: expected a non-empty string"),
        (json.dumps(good_record(attempts={"1": {}})), "attempts: expected a list"),
        (json.dumps(good_record(exit_codes={"0": "zero"})), "exit_codes: expected"),
        (json.dumps(good_record(error=["x"])), "error: expected a string or null"),
        (json.dumps(good_record(backend_info=[])), "backend_info: expected an object"),
        (json.dumps(good_record(world_size=float("nan"))), "world_size: expected"),
    ],
    # Ids by position: the records carry timestamps, and xdist workers must collect the same ids.
    ids=lambda value: None if isinstance(value, str) and len(value) < 60 else "",
)
def test_each_kind_of_damage_is_one_line_naming_the_file(tmp_path, content, why):
    assert why in damaged_why(run_dir_with(tmp_path, content))


@pytest.mark.parametrize("pid", [0, -1, -12345, 2**70, "123", 1.5, True])
def test_a_pid_that_kill_would_misread_makes_the_record_damaged(tmp_path, pid):
    """kill(0) signals our own process group, kill(-1) every process; a huge one overflows."""
    ident = {"pid": pid, "start_ticks": 1, "boot_id": "b", "pid_ns": "pid:[1]"}
    for info in (
        {"supervisor_pid": pid},
        {"rank_pids": {"0": pid}},
        {"supervisor": ident},
        {"ranks": {"0": ident}},
    ):
        run_dir = run_dir_with(tmp_path, json.dumps(good_record(backend_info=info)))
        assert "backend_info." in damaged_why(run_dir)
    run_dir = run_dir_with(tmp_path, json.dumps(good_record(submitter=ident)))
    assert damaged_why(run_dir).startswith("submitter: expected a process identity")


def test_a_huge_record_is_refused_without_reading_it(tmp_path):
    run_dir = run_dir_with(tmp_path, None)
    with open(run_dir / runs.RECORD, "wb") as fh:
        fh.truncate(8 << 30)  # 8 GiB, sparse: reading it would take minutes and the memory
    assert f"a record is at most {runs.MAX_RECORD_BYTES} bytes" in damaged_why(run_dir)


def test_a_folder_fifo_or_symlink_as_record_is_damaged_and_never_blocks(tmp_path):
    run_dir = run_dir_with(tmp_path, None)
    record = run_dir / runs.RECORD
    record.mkdir()
    assert "is a folder" in damaged_why(run_dir)
    record.rmdir()
    os.mkfifo(record)  # nobody writes to it: a blocking open would hang forever
    assert "not a plain file" in damaged_why(run_dir)
    record.unlink()
    (tmp_path / "elsewhere.json").write_text(json.dumps(good_record()))
    record.symlink_to(tmp_path / "elsewhere.json")
    assert "symbolic link" in damaged_why(run_dir)
    record.unlink()
    record.symlink_to("/dev/zero")
    assert "symbolic link" in damaged_why(run_dir)


def test_a_record_that_would_not_read_back_is_never_written(tmp_path):
    run_dir = run_dir_with(tmp_path, json.dumps(good_record()))
    before = (run_dir / runs.RECORD).read_bytes()
    with pytest.raises(DamagedRecord, match="not written: state: expected one of"):
        runs.update_record(run_dir, state="DONE")
    with pytest.raises(DamagedRecord, match="not written: backend_info.supervisor_pid"):
        runs.update_record(run_dir, backend_info={"supervisor_pid": 0})
    assert (run_dir / runs.RECORD).read_bytes() == before
    assert [p.name for p in run_dir.iterdir()] == [runs.RECORD]  # no temp file left


def test_scan_lists_damaged_runs_and_skips_folders_without_a_record(tmp_path):
    root = tmp_path / "runs"
    (root / "a" / "20250101-000001-aaaaaa").mkdir(parents=True)
    (root / "a" / "20250101-000001-aaaaaa" / runs.RECORD).write_text("not json")
    (root / "b" / "20250101-000000-bbbbbb" / runs.RECORD).mkdir(parents=True)
    (root / "a" / "sweeps" / "s1").mkdir(parents=True)  # no record: not a run
    (root / "stray-file").write_text("x")
    found, unreadable = runs.scan_runs(root)
    assert [p.name for p in found] == ["20250101-000000-bbbbbb", "20250101-000001-aaaaaa"]
    assert unreadable == {}
    assert runs.find_run(root, "20250101-000000-bbbbbb") == found[0]


def test_a_runs_dir_that_is_a_file_is_one_error(tmp_path):
    (tmp_path / "runs").write_text("oops")
    with pytest.raises(runs.RunsDirError, match="the runs dir is not a folder"):
        runs.scan_runs(tmp_path / "runs")
    assert runs.scan_runs(tmp_path / "absent") == ([], {})


# --- printable ------------------------------------------------------------------------

UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def test_printable_escapes_terminal_sequences_visibly():
    text = "job\x1b]0;owned\x07\x1b[2J\x9b31m\r\u202etxt.exe\ud800"
    assert runs.printable(text) == "job\\x1b]0;owned\\x07\\x1b[2J\\x9b31m\\x0d\\u202etxt.exe\\ud800"
    assert runs.printable("a\nb\tc") == "a\\x0ab\\x09c"  # a value stays on its line
    assert runs.printable("a\r\nb\tc\rd", keep_lines=True) == "a\nb\tc\\x0dd"
    assert runs.printable("plain é 🙂 text") == "plain é 🙂 text"
    runs.printable("x\ud800y").encode()  # a lone surrogate no longer breaks printing


@given(st.text())
@settings(FIXED, max_examples=500)
def test_printable_output_never_holds_a_control_character(text):
    line = runs.printable(text)
    assert not UNSAFE.search(line) and "\n" not in line and "\t" not in line
    line.encode("utf-8")
    log = runs.printable(text, keep_lines=True)
    assert not UNSAFE.search(log)
    log.encode("utf-8")
    assert log.count("\n") == text.replace("\r\n", "\n").count("\n")


def test_tail_of_a_log_is_printable(tmp_path):
    log = tmp_path / "rank0.log"
    log.write_bytes(b"step 1\n\x1b[31merror\x1b[0m \xff\n\x1b]8;;http://x\x07link\n")
    assert runs.tail(log, 2) == "\\x1b[31merror\\x1b[0m \ufffd\n\\x1b]8;;http://x\\x07link"


# --- properties: whatever is in record.json, read_record answers in one of two ways ------


def check_read(run_dir: Path) -> None:
    try:
        record = runs.read_record(run_dir)
    except DamagedRecord as exc:
        assert str(exc).count("\n") == 0
        event("damaged")
        return
    event("a valid record")
    assert runs.record_problem(record) is None
    assert record["state"] in runs.STATES and isinstance(record["backend_info"], dict)


@given(st.binary(max_size=2048))
@settings(FIXED, max_examples=BYTES_EXAMPLES)
def test_any_bytes_give_a_record_or_damaged(tmp_path, data):
    check_read(run_dir_with(tmp_path, data))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)


@given(JSON)
@settings(FIXED, max_examples=JSON_EXAMPLES)
def test_any_json_value_gives_a_record_or_damaged(tmp_path, value):
    check_read(run_dir_with(tmp_path, json.dumps(value)))


@given(
    st.sampled_from(sorted(good_record()) + ["submitter", "sweep_dir", "container_exit_code"]),
    JSON,
    st.booleans(),
    st.dictionaries(
        st.sampled_from(["supervisor_pid", "rank_pids", "supervisor", "ranks", "job_id"]), JSON
    ),
)
@settings(FIXED, max_examples=MUTATION_EXAMPLES)
def test_any_change_to_a_good_record_gives_a_record_or_damaged(
    tmp_path, key, value, drop, backend_info
):
    record = good_record(backend_info=backend_info)
    if drop:
        record.pop(key, None)
    else:
        record[key] = value
    check_read(run_dir_with(tmp_path, json.dumps(record)))


def test_damaged_record_is_the_launcher_error_family():
    assert issubclass(DamagedRecord, RunNotFound) and issubclass(DamagedRecord, LauncherError)
