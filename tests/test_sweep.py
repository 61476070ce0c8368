"""Sweeps: expansion and ids (pure), bad specs, and real local sweeps of a tiny script job."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import cli, runs
from launcher.sweep import define, plan, state
from tests.conftest import ROOT

# The tiny job: no torch. It records when it ran (for the concurrency checks), fails while
# a marker file for its X exists, and writes a loss that depends on X and the seed.
POINT_SCRIPT = """
import json, os, sys, time
trace = os.environ["TRACE"]
x, seed = os.environ["X"], os.environ["PYTHONHASHSEED"]
start = time.time()
time.sleep(float(os.environ.get("SLEEP", "0.4")))
failing = os.path.exists(os.path.join(trace, f"fail-{x}"))
with open(os.path.join(trace, f"run-{x}-{seed}-{os.getpid()}.json"), "w") as f:
    json.dump({"x": x, "seed": seed, "start": start, "end": time.time()}, f)
if failing:
    print("failing on purpose", flush=True)
    sys.exit(3)
with open(os.path.join(os.environ["LAUNCHER_RUN_DIR"], "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": 1, "loss": 0.5}) + "\\n")
    f.write(json.dumps({"step": 2, "loss": (float(x) - 2) ** 2 + int(seed)}) + "\\n")
"""


@pytest.fixture
def tiny(tmp_path: Path, runs_dir: Path):
    """Write the tiny job and a sweep config around it; returns a config writer."""
    (tmp_path / "point.py").write_text(POINT_SCRIPT)
    trace = tmp_path / "trace"
    trace.mkdir()

    def write(sweep: str, *, sleep: float = 0.4, name: str = "tiny") -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(
            f"""
name: {name}
workdir: {tmp_path}
runs_dir: {runs_dir}
entrypoint: {{script: point.py}}
resources: {{procs_per_node: 1}}
env: {{X: "0", TRACE: "{trace}", SLEEP: "{sleep}"}}
sweep:
{sweep}
"""
        )
        return path

    write.trace = trace  # type: ignore[attr-defined]
    return write


def _traces(trace: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(trace.glob("run-*.json"))]


def _max_overlap(spans: list[dict]) -> int:
    events = sorted([(s["start"], 1) for s in spans] + [(s["end"], -1) for s in spans])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def _sweep(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher", "sweep", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _state(runs_dir: Path, name: str = "tiny") -> dict:
    [path] = (runs_dir / name / "sweeps").glob("*/sweep.json")
    return json.loads(path.read_text())


# --- expansion (pure) --------------------------------------------------------------------


def _prepared(write_config, text: str, *overrides: str) -> plan.Prepared:
    return plan.prepare(str(write_config(text)), list(overrides))


BASE = "name: exp\nentrypoint: {script: x.py}\n"


def test_grid_zip_seeds_expand_in_a_fixed_order_with_stable_ids(write_config, tmp_path):
    text = BASE + (
        "sweep:\n"
        "  grid: {train.optimizer.lr: [0.1, 0.01], train.steps: [10, 20, 30]}\n"
        "  zip: {train.global_batch_size: [8, 16], train.optimizer.name: [sgd, adam]}\n"
        "  seeds: [0, 1]\n"
    )
    first = _prepared(write_config, text, f"runs_dir={tmp_path / 'a'}")
    again = _prepared(write_config, text, f"runs_dir={tmp_path / 'b'}")
    assert len(first.points) == 2 * 3 * 2 * 2
    # The last axis varies fastest; zip keys move together.
    assert [p.overrides for p in first.points[:3]] == [
        {"train.optimizer.lr": 0.1, "train.steps": 10, "train.global_batch_size": 8,
         "train.optimizer.name": "sgd", "train.seed": 0},
        {"train.optimizer.lr": 0.1, "train.steps": 10, "train.global_batch_size": 8,
         "train.optimizer.name": "sgd", "train.seed": 1},
        {"train.optimizer.lr": 0.1, "train.steps": 10, "train.global_batch_size": 16,
         "train.optimizer.name": "adam", "train.seed": 0},
    ]  # fmt: skip
    point = first.points[11]
    assert point.spec.train.optimizer.lr == 0.1 and point.spec.train.steps == 30
    assert point.spec.train.seed == 1 and point.spec.train.optimizer.name == "adam"
    # Ids: 12 hex digits, all different, the same when expanded again (runs_dir excluded),
    # and equal to the id of the spec built the plain way (what an array task checks).
    ids = [p.id for p in first.points]
    assert len(set(ids)) == len(ids) and all(len(i) == 12 for i in ids)
    assert ids == [p.id for p in again.points]
    plain = define.point_spec(first.loaded.raw, point.overrides, "x")
    assert plain == point.spec and define.spec_id(plain) == point.id
    assert first.sweep_id == again.sweep_id
    # A base config that differs elsewhere in a swept section gives other ids (and keeps
    # its own value there); one that differs only in a swept key gives the same points.
    other = _prepared(write_config, text, "train.log_every=5", f"runs_dir={tmp_path / 'a'}")
    assert not set(ids) & {p.id for p in other.points}
    assert {p.spec.train.log_every for p in other.points} == {5}
    same = _prepared(write_config, text, "train.steps=5", f"runs_dir={tmp_path / 'a'}")
    assert [p.id for p in same.points] == ids


def test_random_draws_are_seeded_bounded_and_independent_per_key(write_config):
    def params(extra: str = "", seed: int = 0) -> str:
        return BASE + (
            f"sweep:\n  random:\n    n: 25\n    seed: {seed}\n    params:\n"
            "      train.optimizer.lr: {loguniform: [1.0e-5, 1.0e-1]}\n"
            "      train.optimizer.weight_decay: {uniform: [0.0, 0.3]}\n"
            "      train.steps: {int: [5, 9]}\n"
            "      train.optimizer.name: {choice: [sgd, adam, adamw]}\n" + extra
        )

    a = _prepared(write_config, params())
    b = _prepared(write_config, params())
    c = _prepared(write_config, params(seed=1))
    d = _prepared(write_config, params("      train.grad_clip: {uniform: [0.5, 2.0]}\n"))
    assert [p.overrides for p in a.points] == [p.overrides for p in b.points]
    assert [p.overrides for p in a.points] != [p.overrides for p in c.points]
    lrs = [p.spec.train.optimizer.lr for p in a.points]
    assert all(1e-5 <= v <= 1e-1 for v in lrs) and max(lrs) / min(lrs) > 100
    assert all(0.0 <= p.spec.train.optimizer.weight_decay <= 0.3 for p in a.points)
    assert {p.spec.train.steps for p in a.points} <= set(range(5, 10))
    assert all(isinstance(p.overrides["train.steps"], int) for p in a.points)
    assert {p.spec.train.optimizer.name for p in a.points} <= {"sgd", "adam", "adamw"}
    # Adding a parameter leaves the other parameters' draws as they were.
    assert [p.overrides["train.optimizer.lr"] for p in d.points] == [
        p.overrides["train.optimizer.lr"] for p in a.points
    ]
    assert "train.optimizer.lr" in a.sweep.log_keys


def test_repeated_configurations_are_dropped(write_config):
    # 0.001 is the default lr and 1e-3 the same number: one configuration, run once.
    p = _prepared(
        write_config,
        BASE + "sweep:\n  grid: {train.optimizer.lr: [0.001, 1.0e-3, 0.01], env.A: ['1']}\n",
    )
    assert len(p.points) == 2 and p.duplicates == 1
    assert [pt.index for pt in p.points] == [0, 2]


def test_ten_thousand_points_expand_and_plan_quickly(write_config, tmp_path):
    values = ", ".join(str(i) for i in range(1, 101))
    text = BASE + f"sweep:\n  grid: {{train.steps: [{values}], env.B: [{values}]}}\n"
    start = time.perf_counter()
    p = _prepared(write_config, text, f"runs_dir={tmp_path}", "backend=slurm")
    elapsed = time.perf_counter() - start
    assert len(p.points) == 10_000 and len({pt.id for pt in p.points}) == 10_000
    assert elapsed < 5, f"expanding and checking 10,000 points took {elapsed:.1f} s"


# --- bad sweep specs: one line, exit 2, nothing written ----------------------------------

BAD_SPECS = [
    ("  grid: {train.optimizer.lr: []}\n", "sweep.grid.train.optimizer.lr", "non-empty list"),
    ("  gird: {train.steps: [1, 2]}\n", "sweep.gird", "did you mean 'sweep.grid'"),
    ("  grid: {train.lrr: [0.1]}\n", "sweep.grid.train.lrr", "not a config key"),
    ("  grid: {name: [a, b]}\n", "sweep.grid.name", "cannot be swept"),
    ("  random: {params: {train.steps: {int: [1, 5]}}}\n", "sweep.random.n", "missing"),
    (
        "  random: {n: 3, params: {train.optimizer.lr: {loguniform: [0, 1]}}}\n",
        "sweep.random.params.train.optimizer.lr.loguniform",
        "lo > 0",
    ),
    (
        "  random: {n: 3, params: {train.steps: {normal: [1, 5]}}}\n",
        "sweep.random.params.train.steps",
        "unknown distribution 'normal'",
    ),
    ("  zip: {train.steps: [1, 2], env.A: ['1']}\n", "sweep.zip", "equal lengths"),
    ("  grid: {train.steps: [5, many]}\n", "sweep.grid.train.steps", "'many'"),
    ("  grid: {train.optimizer.lr: [0.1, -1]}\n", "sweep.grid.train.optimizer.lr", ">= 0"),
    (
        "  grid: {train.micro_batch_size: [8, 5]}\n",
        "train.micro_batch_size",
        "sweep point 1 (train.micro_batch_size=5): must divide global_batch_size",
    ),
    (
        "  grid: {train.steps: [1, 2, 3], env.A: ['1', '2', '3']}\n  max_points: 8\n",
        "sweep.max_points",
        "9 points",
    ),
    ("  seeds: [0, 1]\n  grid: {train.seed: [3]}\n", "sweep.seeds", "swept twice"),
    ("  parallelism: 2\n", "sweep", "nothing to sweep"),
]


@pytest.mark.parametrize(("sweep", "key", "text"), BAD_SPECS, ids=[b[1] for b in BAD_SPECS])
def test_bad_sweep_spec_is_one_line_exit_2_and_submits_nothing(
    sweep, key, text, write_config, runs_dir, capsys
):
    cfg = write_config(f"name: bad\nentrypoint: {{script: x.py}}\nsweep:\n{sweep}")
    code = cli.main(["sweep", str(cfg), f"runs_dir={runs_dir}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert f"{cfg}: {key}:" in err and text in err, err
    assert list(runs_dir.iterdir()) == []


def test_cap_from_the_command_line_and_missing_section(write_config, runs_dir, capsys):
    cfg = write_config(BASE + "sweep:\n  grid: {train.steps: [1, 2, 3]}\n")
    assert cli.main(["sweep", str(cfg), f"runs_dir={runs_dir}", "--max-points", "2"]) == 2
    assert "3 points" in capsys.readouterr().err
    plain = write_config(BASE, name="plain.yaml")
    assert cli.main(["sweep", str(plain), f"runs_dir={runs_dir}"]) == 2
    assert "no sweep: section" in capsys.readouterr().err
    # On Slurm every point must fit one array script: found before any sbatch.
    assert cli.main(["sweep", str(cfg), f"runs_dir={runs_dir}", "backend=slurm",
                     "sweep.grid={resources.procs_per_node: [1, 2]}"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "sweep point 1 (resources.procs_per_node=2) needs other sbatch settings" in err
    assert list(runs_dir.iterdir()) == []


# --- local sweeps ------------------------------------------------------------------------


def test_dry_run_lists_points_and_touches_nothing(tiny, runs_dir):
    cfg = tiny("  grid: {env.X: ['0', '1', '2']}\n  seeds: [0, 1]\n  parallelism: 2\n")
    proc = _sweep(str(cfg), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    table = [line for line in lines if line[:1].isdigit()]
    assert len(table) == 6 and all(" NEW " in row and " submit " in row for row in table)
    assert "# local: at most 2 points at a time" in proc.stdout
    assert list(runs_dir.iterdir()) == []


def test_slurm_dry_run_shows_each_array_and_the_task_from_the_plan(tiny, runs_dir):
    cfg = tiny("  grid: {env.X: ['0', '1', '2']}\n  parallelism: 2\n")
    # No Slurm client on PATH: the dry-run must not need (or call) one.
    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(runs_dir.parent)}
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "sweep", str(cfg), "backend=slurm", "--dry-run"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "# slurm: 3 points in 1 array(s) of at most 1001 tasks" in out
    assert out.count("#SBATCH --array=0-2%2") == 1 and "-m launcher.sweep.task " in out
    # What each task runs comes from the first point's plan (its payload), in one piece.
    tail = out.split("# then each task runs its own point like this (point 0 shown):\n", 1)[1]
    assert tail.startswith("# the pickled task runs with this environment:\n")
    assert "export X=0\n" in tail and "srun --unbuffered" in tail and "#SBATCH" not in tail
    assert "end of sbatch script" not in out
    assert list(runs_dir.iterdir()) == []


def test_a_docker_sweep_detects_this_machines_hardware_once(tiny, runs_dir, monkeypatch):
    import launcher.backends.docker as docker_backend
    import launcher.hardware as hardware

    calls = []
    real = hardware.detect

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(hardware, "detect", counted)
    monkeypatch.setattr(docker_backend, "detect", counted)
    cfg = tiny("  grid: {env.X: ['0', '1', '2', '3', '4']}\n")
    prepared = plan.prepare(str(cfg), ["backend=docker"])
    assert len(prepared.plans) == 5  # every point planned, with the one detection
    assert len(calls) == 1


def test_local_sweep_runs_every_point_within_the_limit_then_reports(tiny, runs_dir, tmp_path):
    cfg = tiny("  grid: {env.X: ['0', '1', '2']}\n  seeds: [0, 1]\n  parallelism: 2\n")
    proc = _sweep(str(cfg))
    assert proc.returncode == 0, proc.stderr
    spans = _traces(tiny.trace)
    assert sorted((s["x"], s["seed"]) for s in spans) == [(x, s) for x in "012" for s in "01"]
    assert _max_overlap(spans) == 2  # the limit was used and never exceeded
    current = _state(runs_dir)
    assert [p["attempts"] for p in current["points"]] == [1] * 6
    # Each point is an ordinary run: `launcher status` lists it, with its resolved config.
    listed = list(runs.iter_run_dirs(runs_dir))
    assert len(listed) == 6 and all((d / "config.yaml").is_file() for d in listed)

    status = _sweep("status", "tiny", "--runs-dir", str(runs_dir))
    assert status.returncode == 0, status.stderr
    assert "6 points: 6 completed" in status.stdout
    rows = [line.split() for line in status.stdout.splitlines()[2:8]]  # the 6 points
    losses = {(r[4], r[5]): float(r[6]) for r in rows}  # (X, seed) -> final loss
    assert losses[("0", "1")] == 5.0 and losses[("2", "0")] == 0.0

    out = tmp_path / "report"
    report = _sweep("report", current["sweep_id"], "--runs-dir", str(runs_dir), "--out", str(out))
    assert report.returncode == 0, report.stderr
    with open(out / "report.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 6 and {r["state"] for r in table} == {"COMPLETED"}
    assert {(r["env.X"], r["train.seed"], r["loss"]) for r in table} >= {("1", "1", "2.0")}
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_rerun_resubmits_only_failed_points(tiny, runs_dir):
    cfg = tiny("  grid: {env.X: ['0', '1', '2', '3']}\n  parallelism: 4\n", sleep=0.1)
    for x in ("1", "3"):
        (tiny.trace / f"fail-{x}").touch()
    first = _sweep(str(cfg))
    assert first.returncode == 1
    assert "2 completed, 2 failed" in first.stderr and "--retry-failed" in first.stderr
    assert len(_traces(tiny.trace)) == 4

    again = _sweep(str(cfg))  # without --retry-failed: nothing to do
    assert "running 0" in again.stderr and "skipping 4 (2 completed, 2 failed)" in again.stderr
    assert len(_traces(tiny.trace)) == 4

    for x in ("1", "3"):
        (tiny.trace / f"fail-{x}").unlink()
    retry = _sweep(str(cfg), "--retry-failed")
    assert retry.returncode == 0, retry.stderr
    assert "running 2" in retry.stderr and "skipping 2 (2 completed)" in retry.stderr
    spans = _traces(tiny.trace)
    assert sorted(s["x"] for s in spans) == ["0", "1", "1", "2", "3", "3"]
    attempts = {p["overrides"]["env.X"]: p["attempts"] for p in _state(runs_dir)["points"]}
    assert attempts == {"0": 1, "1": 2, "2": 1, "3": 2}

    forced = _sweep(str(cfg), "--force")
    assert forced.returncode == 0 and "running 4" in forced.stderr
    assert len(_traces(tiny.trace)) == 10
    replaced = list((runs_dir / "tiny" / "sweeps").glob("*/replaced/pt-*"))
    assert len(replaced) == 4  # the earlier runs are kept, out of the way


def test_concurrent_invocations_share_the_limit_and_never_double_submit(tiny, runs_dir):
    cfg = tiny("  grid: {env.X: ['0', '1', '2', '3', '4', '5']}\n  parallelism: 2\n")
    argv = [sys.executable, "-m", "launcher", "sweep", str(cfg)]
    procs = [
        subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    spans = _traces(tiny.trace)
    assert sorted(s["x"] for s in spans) == list("012345")  # each point ran exactly once
    assert _max_overlap(spans) <= 2
    assert [p["attempts"] for p in _state(runs_dir)["points"]] == [1] * 6


def test_status_and_report_errors(runs_dir, capsys):
    assert cli.main(["sweep", "status", "nope", "--runs-dir", str(runs_dir)]) == 2
    assert "no sweep 'nope'" in capsys.readouterr().err
    assert cli.main(["sweep", "report"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_metric_comes_from_result_json_or_the_last_metrics_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"loss": 3}\n{"acc": 0.5}\nnot json\n')
    assert state.read_metric(tmp_path, "loss") == 3.0
    assert state.read_metric(tmp_path, "acc") == 0.5
    assert state.read_metric(tmp_path, "missing") is None
    (tmp_path / "result.json").write_text('{"loss": 1.25}')
    assert state.read_metric(tmp_path, "loss") == 1.25
