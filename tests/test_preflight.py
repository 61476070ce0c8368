"""Preflight's job checks through the real CLI (local backend: files only), the gate's one line
and exit code, `--no-preflight`, `--dry-run` staying pure, and the pure parsers (canned sinfo
and sbatch text) for what the local cluster cannot show."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from launcher.backends.base import Check
from launcher.backends.slurm import preflight as slurm_preflight
from launcher.preflight import PreflightFailed, gate, top_level_names
from tests.conftest import launcher_cmd


def _job(tmp_path: Path, body: str) -> Path:
    (tmp_path / "train.py").write_text("print('hello')\n")
    pkg = tmp_path / "pkg"
    pkg.mkdir(exist_ok=True)
    # Importing the package would leave a file behind: preflight must not run user code.
    (pkg / "__init__.py").write_text("open(__file__ + '.imported', 'w').close()\n")
    (pkg / "entry.py").write_text(
        "open(__file__ + '.imported', 'w').close()\n\ndef main(spec):\n    return 0\n"
    )
    (pkg / "broken.py").write_text("def main(:\n")
    (pkg / "data.py").write_text("class Squares:\n    pass\n\nbuild_dataset = Squares\n")
    path = tmp_path / "job.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            name: pf-local
            runs_dir: {tmp_path / "runs"}
            workdir: .
            """
        )
        + textwrap.dedent(body)
    )
    return path


def _refused(tmp_path: Path, path: Path, *overrides: str) -> str:
    out = launcher_cmd("run", str(path), *overrides, cwd=tmp_path, timeout=120)
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    errors = [x for x in lines if not x.startswith("launcher: warning: ")]
    assert len(errors) == 1, lines
    assert errors[0].startswith(f"launcher: error: {path}: "), lines
    assert not (tmp_path / "runs").exists()  # no run record, not even half-written
    return errors[0]


SCRIPT = "entrypoint:\n  script: train.py\n"
CALLABLE = "entrypoint:\n  callable: pkg.entry:main\n"

# (id, config body, overrides, key, words the line holds)
MISTAKES = [
    (
        "script-typo",
        SCRIPT,
        ["entrypoint.script=trian.py"],
        "entrypoint.script",
        ["did you mean 'train.py'"],
    ),
    (
        "script-is-a-folder",
        SCRIPT,
        ["entrypoint.script=pkg"],
        "entrypoint.script",
        ["is a folder, not a script"],
    ),
    (
        "script-in-missing-folder",
        SCRIPT,
        ["entrypoint.script=src/train.py"],
        "entrypoint.script",
        ["has no folder 'src'"],
    ),
    ("workdir-missing", SCRIPT, ["workdir=./jobz"], "workdir", ["does not exist"]),
    (
        "callable-module-typo",
        CALLABLE,
        ["entrypoint.callable=pkg.entyr:main"],
        "entrypoint.callable",
        ["no module 'pkg.entyr'", "did you mean 'entry'"],
    ),
    (
        "callable-package-missing",
        CALLABLE,
        ["entrypoint.callable=pgk.entry:main"],
        "entrypoint.callable",
        ["no module 'pgk'", "did you mean 'pkg'"],
    ),
    (
        "callable-function-typo",
        CALLABLE,
        ["entrypoint.callable=pkg.entry:mian"],
        "entrypoint.callable",
        ["defines no 'mian'", "did you mean 'main'"],
    ),
    (
        "callable-module-does-not-parse",
        CALLABLE,
        ["entrypoint.callable=pkg.broken:main"],
        "entrypoint.callable",
        ["cannot read module 'pkg.broken'", "line 1"],
    ),
    (
        "trainer-dataset-function-missing",
        "train:\n  model: mlp\n",
        ["train.model=pkg.data:build_model", "train.dataset=pkg.data:build_dataset"],
        "train.model",
        ["defines no 'build_model'"],
    ),
    (
        "data-path-missing",
        SCRIPT + "data:\n  sources:\n    - name: shards\n      path: ./shards\n",
        [],
        "data.sources[0].path",
        ["'shards'", "does not exist"],
    ),
    (
        "runs-dir-under-a-file",
        SCRIPT,
        ["runs_dir={tmp}/train.py/runs"],
        "runs_dir",
        ["is a file, not a folder"],
    ),
]


@pytest.mark.parametrize(
    "body,overrides,key,words", [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES]
)
def test_each_job_mistake_is_one_line_and_exit_2(tmp_path, body, overrides, key, words):
    path = _job(tmp_path, body)
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    line = _refused(tmp_path, path, *overrides)
    assert f"{path}: {key}: " in line, line
    for word in words:
        assert word in line, line
    assert not list(tmp_path.rglob("*.imported")), "preflight ran the user's code"


def test_a_callable_is_found_without_importing_its_package(tmp_path):
    path = _job(tmp_path, CALLABLE)
    out = launcher_cmd("run", str(path), "--dry-run", "--check", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "# preflight: every check passed" in out.stdout
    assert not list(tmp_path.rglob("*.imported"))


def test_dry_run_checks_nothing_and_check_runs_preflight(tmp_path):
    path = _job(tmp_path, SCRIPT)
    out = launcher_cmd("run", str(path), "entrypoint.script=nope.py", "--dry-run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr  # pure: the plan only
    out = launcher_cmd(
        "run", str(path), "entrypoint.script=nope.py", "--dry-run", "--check", cwd=tmp_path
    )
    assert out.returncode == 2 and "entrypoint.script: script 'nope.py' not found" in out.stderr
    out = launcher_cmd("run", str(path), "--check", cwd=tmp_path)
    assert out.returncode == 2 and "--check is for --dry-run" in out.stderr


def test_no_preflight_skips_the_checks(tmp_path):
    path = _job(tmp_path, SCRIPT)
    out = launcher_cmd(
        "run", str(path), "entrypoint.script=nope.py", "--no-preflight", cwd=tmp_path
    )
    # Submitted anyway: the run starts and fails on its own, with a record.
    assert out.returncode not in (0, 2), out.stderr
    assert list((tmp_path / "runs").rglob("record.json"))


def test_a_warning_prints_and_the_submit_goes_on(tmp_path):
    (tmp_path / "shards.bin").write_bytes(b"x")
    body = SCRIPT + "data:\n  sources:\n    - name: shards\n      path: ./shards.bin\n"
    path = _job(tmp_path, body)
    out = launcher_cmd("run", str(path), "--dry-run", "--check", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "launcher: warning: " in out.stderr
    assert "data.sources[0].sha256: data source 'shards' has no checksum" in out.stderr


def test_a_sweep_is_checked_once_before_any_point_is_claimed(tmp_path):
    body = SCRIPT + "sweep:\n  grid:\n    train.seed: [1, 2, 3]\n"
    path = _job(tmp_path, body)
    out = launcher_cmd("sweep", str(path), "entrypoint.script=trian.py", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "entrypoint.script: script 'trian.py' not found" in out.stderr
    assert "did you mean 'train.py'" in out.stderr
    assert not list((tmp_path / "runs").rglob("sweep.json"))
    assert not list((tmp_path / "runs").rglob("record.json"))


def test_doctor_lists_every_check_as_json_and_exits_2_on_a_failure(tmp_path):
    path = _job(tmp_path, SCRIPT)
    out = launcher_cmd("doctor", str(path), "entrypoint.script=trian.py", "--json", timeout=300)
    assert out.returncode == 2, out.stderr
    checks = json.loads(out.stdout)
    by_name = {c["name"]: c for c in checks}
    assert by_name["entrypoint.script"]["status"] == "fail"
    assert "python.torch" in by_name and "network.interface" in by_name
    assert all(set(c) == {"name", "status", "found", "fix", "file", "key"} for c in checks)


# --- pure logic: canned text for what the local cluster cannot produce -------------------


def test_gate_raises_with_the_first_failure_and_counts_the_rest():
    checks = [
        Check("a", "ok", "fine"),
        Check("b", "warn", "hm", file="f.yaml", key="x"),
        Check("c", "fail", "bad", "do this", file="f.yaml", key="y"),
        Check("d", "fail", "worse", file="f.yaml", key="z"),
    ]
    with pytest.raises(PreflightFailed) as info:
        gate(checks)
    assert (
        str(info.value)
        == "f.yaml: y: bad (do this) [and 1 more failed check(s): see `launcher doctor`]"
    )
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    "text,minutes",
    [
        ("infinite", float("inf")),
        ("30", 30),
        ("1:30:00", 90),
        ("2-00:00:00", 2880),
        ("45:30", 45.5),
    ],
)
def test_slurm_time_limits_read_as_minutes(text, minutes):
    assert slurm_preflight.parse_time_min(text) == minutes


@pytest.mark.parametrize(
    "stderr,key",
    [
        (
            "sbatch: error: invalid partition specified: x\n"
            "allocation failure: Invalid partition name specified",
            "slurm.partition",
        ),
        (
            "sbatch: error: Batch job submission failed: Requested time limit is invalid "
            "(missing or exceeds some limit)",
            "resources.time_min",
        ),
        (
            "sbatch: error: Batch job submission failed: Invalid account or "
            "account/partition combination specified",
            "slurm.account",
        ),
        ("sbatch: error: Batch job submission failed: Invalid qos specification", "slurm.qos"),
        (
            "sbatch: error: Batch job submission failed: Job violates accounting/QOS "
            "policy (job submit limit, user's size and/or time limits)",
            "slurm.qos",
        ),
        ("allocation failure: Requested node configuration is not available", "resources"),
        (
            "sbatch: error: Batch job submission failed: Node count specification invalid",
            "resources.nodes",
        ),
    ],
)
def test_sbatch_refusals_name_the_key_that_fixes_them(stderr, key):
    found, reason, fix = slurm_preflight.refusal(stderr)
    assert found == key
    assert "\n" not in reason and not reason.startswith(("sbatch:", "allocation failure"))
    assert fix


def test_a_run_folder_other_nodes_cannot_see_warns(tmp_path):
    sinfo = "gpu|gpu*|gn1|64|512000|gpu:8|2-00:00:00|up|idle|gn1.cluster|10.0.0.5|(null)\n"
    nodes = slurm_preflight.parse_sinfo(sinfo)
    assert nodes[0].gpus == 8 and nodes[0].max_time_min == 2880 and nodes[0].default

    class _Plan:
        run_dir = Path("/tmp/runs/job/1")

    check = slurm_preflight._shared_fs_check(_Plan(), nodes, "job.yaml")  # type: ignore[arg-type]
    assert check.status == "warn" and "gn1 cannot see" in check.line()
    assert check.key == "runs_dir"


def test_top_level_names_read_from_the_syntax_tree():
    names, open_ended = top_level_names(
        "import os as o\nfrom x import y\nif True:\n    def f(): ...\nelse:\n    g = 1\n"
        "try:\n    import h\nexcept ImportError:\n    h = None\nclass C: ...\n"
    )
    assert names >= {"o", "y", "f", "g", "h", "C"} and not open_ended
    assert top_level_names("from m import *\n")[1]


def test_a_sweep_over_max_submit_jobs_is_refused_where_limits_are_enforced():
    """Canned `scontrol -o show assoc_mgr` and `show config` (the local cluster enforces no
    limits, so its real answer can only show the warning)."""
    from launcher.backends.slurm.preflight import Answer, _assoc_checks
    from launcher.spec import JobSpec, SlurmSpec

    user = __import__("getpass").getuser()
    assoc = Answer(
        0,
        f"ClusterName=c Account=proj UserName={user}(0) Partition= ID=2 MaxJobs= "
        "MaxSubmitJobs=500 MaxWallPJ=\nQOS=normal(1) UsageRaw=0 MaxSubmitJobsPU=800\n",
        "",
    )
    spec = JobSpec(name="s", slurm=SlurmSpec(account="proj", qos="normal"))
    for enforce, status in (("associations,limits", "fail"), ("none", "warn")):
        config = Answer(0, f"AccountingStorageEnforce = {enforce}\n", "")
        checks = _assoc_checks(spec, assoc, 1000, config, "job.yaml")
        limit = next(c for c in checks if c.name == "slurm.max_submit")
        assert limit.status == status
        assert "1000 points" in limit.found and "MaxSubmitJobs of association proj" in limit.found
        assert "500" in limit.found
    checks = _assoc_checks(spec, assoc, 400, config, "job.yaml")
    assert next(c for c in checks if c.name == "slurm.max_submit").status == "ok"


def test_sweep_check_is_only_for_a_dry_run(tmp_path):
    path = _job(tmp_path, SCRIPT + "sweep:\n  grid:\n    train.seed: [1, 2]\n")
    out = launcher_cmd("sweep", str(path), "--check", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "launcher: error: command line: --check: --check is for --dry-run "
        "(a real submit always runs the preflight checks)"
    )
