"""What reaches the sbatch script or the srun line: refused with one line, or exactly data.

The oracle for `#SBATCH` lines is sbatch's own parser (22.05 `src/sbatch/opt.c`,
`_get_argument`), written out below and held to the real sbatch by a test on the cluster.
Property tests build specs with `dataclasses.replace`, past the schema's own checks, so
`sbatch.check` alone is what keeps the script safe.
"""

from __future__ import annotations

import dataclasses
import subprocess
import unicodedata
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from launcher import config
from launcher.backends.slurm.backend import BACKEND
from launcher.backends.slurm.sbatch import LAUNCHER_OWNS, OPTION_NAME
from launcher.errors import ConfigError
from launcher.spec import ContainerSpec
from tests.conftest import ROOT, launcher_cmd
from tests.slurm_helpers import require_cluster

INJECTED_KEY = "requeue\ntouch /tmp/launcher-pwned-key\n#"
MARKER = Path("/tmp/launcher-pwned-key")


def slurm_words(text: str) -> list[str]:
    """The words sbatch 22.05 reads from the rest of one `#SBATCH` line: a backslash
    escapes the next character (inside quotes too), ' and " quote, unquoted whitespace
    separates words, an unquoted # ends the line."""
    words: list[str] = []
    i = 0
    while True:
        while i < len(text) and text[i].isspace() and text[i] != "\n":
            i += 1
        if i >= len(text) or text[i] == "\n":
            return words
        word: list[str] = []
        quote = ""
        escaped = comment = False
        while i < len(text) and (quote or not text[i].isspace()) and text[i] != "\n":
            c = text[i]
            i += 1
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
                continue
            elif quote:
                if c == quote:
                    quote = ""
                    continue
            elif c in "'\"":
                quote = c
                continue
            elif c == "#":
                comment = True
                break
            word.append(c)
        assert not quote, f"sbatch: unmatched quote in {text!r}"
        if word:
            words.append("".join(word))
        if comment:
            return words


def sbatch_options(script: str) -> list[tuple[str, str | None]]:
    """(option, value) of every #SBATCH line, as sbatch reads them; each line one word."""
    found = []
    for line in script.split("\n"):
        if not line.startswith("#SBATCH"):
            continue
        words = slurm_words(line[len("#SBATCH") :])
        assert len(words) == 1 and words[0].startswith("--"), line
        name, eq, value = words[0][2:].partition("=")
        found.append((name, value if eq else None))
    return found


def _base(**raw) -> config.JobSpec:
    data = {
        "name": "t",
        "backend": "slurm",
        "workdir": str(ROOT),
        "runs_dir": "/tmp/runs",
        "entrypoint": {"script": "tests/jobs/env_dump.py"},
        "resources": {"nodes": 2, "procs_per_node": 1, "cpus_per_proc": 1, "time_min": 5},
        **raw,
    }
    return config.build_spec(data, "job.yaml")


def _with_slurm(spec, **changes):
    return dataclasses.replace(spec, slurm=dataclasses.replace(spec.slurm, **changes))


def _plan(spec, run_dir: Path = Path("/tmp/runs/t/RUNID")):
    return BACKEND.plan(spec, run_id="RUNID", run_dir=run_dir, config_file="job.yaml")


def _refusal(spec, run_dir: Path = Path("/tmp/runs/t/RUNID")) -> str:
    with pytest.raises(ConfigError) as info:
        _plan(spec, run_dir)
    text = str(info.value)
    assert "\n" not in text and text.startswith("job.yaml: "), text
    return text


def _unsafe(text: str) -> bool:
    """What must never reach an #SBATCH line: a control character, or a backslash."""
    return "\\" in text or any(unicodedata.category(c) in ("Cc", "Cs") for c in text)


# ---- the reported bug: a newline in an extra KEY ran shell on the cluster ----


def test_newline_in_an_extra_key_is_refused_by_dry_run(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "name": "k",
                "backend": "slurm",
                "workdir": str(ROOT),
                "entrypoint": {"script": "tests/jobs/env_dump.py"},
                "slurm": {"extra": {INJECTED_KEY: "x"}},
            }
        )
    )
    out = launcher_cmd("run", str(cfg), f"runs_dir={tmp_path / 'runs'}", "--dry-run")
    assert out.returncode == 2, out
    assert out.stdout == "" and "Traceback" not in out.stderr
    (line,) = out.stderr.splitlines()
    assert line == (
        f"launcher: error: {cfg}: slurm.extra.'requeue\\ntouch /tmp/launc…': "
        "not a valid sbatch option name (letters, digits, '-', '_')"
    )
    assert not (tmp_path / "runs").exists() and not MARKER.exists()


@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")
def test_newline_in_an_extra_key_never_reaches_the_cluster(tmp_path):
    """The config that ran `touch` on the cluster: now nothing is queued or written."""
    require_cluster()
    name = f"inject-{tmp_path.name}"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "backend": "slurm",
                "workdir": str(ROOT),
                "entrypoint": {"script": "tests/jobs/env_dump.py"},
                "resources": {"cpus_per_proc": 1, "mem_gb": 0.5, "time_min": 2},
                "slurm": {"partition": "debug", "extra": {INJECTED_KEY: "x"}},
            }
        )
    )
    out = launcher_cmd("run", str(cfg), f"runs_dir={tmp_path / 'runs'}")
    assert out.returncode == 2 and "not a valid sbatch option name" in out.stderr, out
    queued = subprocess.run(
        ["squeue", "-h", "--name", name, "-o", "%i"], capture_output=True, text=True, timeout=30
    )
    assert queued.returncode == 0 and queued.stdout == ""
    assert not (tmp_path / "runs").exists() and not MARKER.exists()


# ---- one table of refusals: each names the file and the dotted key ----

REFUSED = [
    ({"name": "a\nb"}, "job.yaml: name: control character '\\n' at position 1"),
    ({"slurm.partition": "debug\n#SBATCH --x"}, "job.yaml: slurm.partition: control character"),
    ({"slurm.account": "acc\r"}, "job.yaml: slurm.account: control character '\\r'"),
    ({"slurm.qos": "q\tq"}, "job.yaml: slurm.qos: control character '\\t'"),
    ({"slurm.constraint": "h100\x1b[2J"}, "job.yaml: slurm.constraint: control character"),
    ({"slurm.partition": "a\\b"}, "job.yaml: slurm.partition: a backslash"),
    ({"slurm.extra": {"comment": "x\ny"}}, "job.yaml: slurm.extra.comment: control character"),
    ({"slurm.extra": {"comment": "x\x85y"}}, "job.yaml: slurm.extra.comment: control character"),
    ({"slurm.extra": {"x y": "1"}}, "job.yaml: slurm.extra.'x y': not a valid sbatch option"),
    ({"slurm.extra": {"-x": "1"}}, "job.yaml: slurm.extra.'-x': not a valid sbatch option"),
    ({"slurm.extra": {"signal": "B:TERM@10"}}, "slurm.extra.signal: launcher sets --signal"),
    ({"slurm.extra": {"sig": "TERM"}}, "slurm.extra.sig: --sig abbreviates --signal"),
    ({"slurm.extra": {"output": "/x"}}, "slurm.extra.output: launcher sets --output itself"),
    ({"slurm.extra": {"error": "/x"}}, "slurm.extra.error: launcher sets --error itself"),
    ({"slurm.extra": {"open_mode": "truncate"}}, "slurm.extra.open_mode: launcher sets"),
    ({"slurm.extra": {"open": "truncate"}}, "slurm.extra.open: --open abbreviates --open-mode"),
    ({"slurm.extra": {"array": "0-3"}}, "slurm.extra.array: launcher sets --array itself"),
    ({"slurm.extra": {"ntasks": "3"}}, "slurm.extra.ntasks: launcher sets --ntasks itself"),
    ({"slurm.extra": {"export": "NONE"}}, "slurm.extra.export: launcher sets --export itself"),
    ({"slurm.extra": {"container": "/b"}}, "slurm.extra.container: launcher sets"),
    ({"slurm.extra": {"no-requeue": ""}}, "slurm.extra.no-requeue: launcher sets"),
    ({"slurm.extra": {"time": "99"}}, "slurm.extra.time: launcher sets --time itself"),
    ({"slurm.extra": {"job_name": "x"}}, "(set name instead)"),
    ({"slurm.extra": {"nodes": "9"}}, "(set resources.nodes instead)"),
    ({"slurm.partition": "debug", "slurm.extra": {"partition": "high"}}, "slurm.partition"),
    ({"slurm.srun_args": ("--output=/x",)}, "slurm.srun_args[0]: '--output=/x' overrides"),
    ({"slurm.srun_args": ("-l", "-o", "/x")}, "slurm.srun_args[1]: '-o' overrides --output"),
    ({"slurm.srun_args": ("-lK",)}, "overrides --kill-on-bad-exit"),
    ({"slurm.srun_args": ("--out", "/x")}, "'--out' overrides --output"),
    ({"slurm.srun_args": ("--chdir=/",)}, "overrides --chdir"),
    ({"slurm.srun_args": ("--export=NONE",)}, "overrides --export"),
    ({"slurm.srun_args": ("--container-image=x",)}, "overrides --container"),
    ({"slurm.srun_args": ("--cpu-bind=none\n",)}, "slurm.srun_args[0]: control character"),
    ({"slurm.setup": ("echo a\0b",)}, "job.yaml: slurm.setup[0]: a NUL byte"),
    ({"slurm.setup": ("\n#SBATCH --output=/x",)}, "slurm.setup[0]: a #SBATCH line here"),
    ({"container": {"image": "img\n"}}, "job.yaml: slurm.container.image: control character"),
    ({"container": {"mounts": ("/a:/a,/etc:/etc",)}}, "slurm.container.mounts[0]: a ','"),
    ({"args": ("a\0b",)}, "job.yaml: entrypoint.args[0]: a NUL byte"),
    ({"env": {"X": "a\0b"}}, "job.yaml: env.X: a NUL byte"),
    ({"runs_dir": "/tmp/%j/runs"}, "job.yaml: runs_dir: '/tmp/%j/runs' holds '%'"),
    ({"runs_dir": "/tmp/a\nb"}, "job.yaml: runs_dir: '/tmp/a\\nb': control character"),
]


def _apply(spec, change: dict):
    for key, value in change.items():
        if key.startswith("slurm."):
            spec = _with_slurm(spec, **{key[6:]: value})
        elif key == "container":
            spec = _with_slurm(spec, container=ContainerSpec(**value))
        elif key == "args":
            spec = dataclasses.replace(
                spec, entrypoint=dataclasses.replace(spec.entrypoint, args=value)
            )
        else:
            spec = dataclasses.replace(spec, **{key: value})
    return spec


@pytest.mark.parametrize(("change", "expected"), REFUSED, ids=[str(c) for c, _ in REFUSED])
def test_unsafe_values_are_refused_with_one_line(change, expected):
    run_dir = Path(change.get("runs_dir", "/tmp/runs")) / "t" / "RUNID"
    assert expected in _refusal(_apply(_base(), change), run_dir)


def test_setup_lines_are_shell_by_design():
    spec = _with_slurm(_base(), setup=("module load x && echo \"$HOME\"; cd '/a b'",))
    assert "module load x && echo \"$HOME\"; cd '/a b'" in _plan(spec).payload.script.split("\n")


@pytest.mark.parametrize(
    "extra",
    [
        {"comment": 'it\'s "q" $(x) `y`; z # w'},
        {"mail-type": "END,FAIL", "wckey": "mine"},
        {"gpus": "2"},  # a full option, not an abbreviation of --gpus-per-node
        {"mem": "0"},  # resources.mem_gb unset: --mem is the user's to give
        {"partition": "high"},  # slurm.partition unset
        {"time_min": "3", "begin": "now+60"},
    ],
)
def test_extra_options_launcher_does_not_set_pass_intact(extra):
    spec = _with_slurm(_base(), extra=extra)
    options = dict(sbatch_options(_plan(spec).payload.script))
    for key, value in extra.items():
        assert options[key.replace("_", "-")] == value


# ---- properties: refused, or one line each with the value intact ----

# Shell and sbatch specials, with and without what must be refused (control chars, \\).
SPECIAL = st.text(alphabet="'\"$`;#&|<>(){}*?!~%=,:@ éab-_", max_size=12)
SAFE = st.text(st.characters(exclude_categories=("Cc", "Cs"), exclude_characters="\\"))
NASTY = st.text(alphabet="'\"\\$`;#&|<>(){}*?!~%=,:@ \n\r\t\x00\x1b\x7f\x85éab-_", max_size=12)
# Four in five values are safe, so about half the examples get through to be parsed back.
TEXT = st.one_of(SPECIAL, SAFE, SPECIAL, SAFE, NASTY | st.text(max_size=20))
KEYS = st.one_of(
    st.from_regex(r"[a-z][a-z0-9_-]{0,10}", fullmatch=True),
    st.from_regex(r"[a-z][a-z0-9_-]{0,10}", fullmatch=True),
    st.sampled_from([*LAUNCHER_OWNS, "sig", "out", "time", "job_name", "part", "gpus", "mem"]),
    st.text(max_size=10),
)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=TEXT.filter(lambda s: s.strip()),
    partition=st.none() | TEXT,
    account=st.none() | TEXT,
    qos=st.none() | TEXT,
    extra=st.dictionaries(KEYS, TEXT, max_size=4),
)
def test_sbatch_values_are_refused_or_one_line_each_intact(name, partition, account, qos, extra):
    spec = _with_slurm(
        dataclasses.replace(_base(), name=name),
        partition=partition or None,
        account=account or None,
        qos=qos or None,
        extra=extra,
    )
    values = {"job-name": name, "partition": partition, "account": account, "qos": qos}
    values = {k: v for k, v in values.items() if v}
    values |= {k.replace("_", "-"): v for k, v in extra.items()}
    # The options launcher itself writes for these settings (sbatch's wckey is only
    # submitit's default: the user's may replace it).
    own = {k for k, _ in sbatch_options(_plan(_base()).payload.script)} - {"wckey"}
    own |= {k for k in ("partition", "account", "qos") if values.get(k)}
    try:
        script = _plan(spec).payload.script
    except ConfigError as exc:
        event("refused")
        assert "\n" not in str(exc)
        bad_key = [
            k
            for k in extra
            if not OPTION_NAME.fullmatch(k)
            or any(o.startswith(k.replace("_", "-")) for o in (*own, *LAUNCHER_OWNS))
        ]
        assert any(_unsafe(v) for v in values.values()) or bad_key, str(exc)
        return
    event("accepted")
    options = sbatch_options(script)
    names = [n for n, _ in options]
    assert len(names) == len(set(names)), "one line per option"
    parsed = dict(options)
    for key, value in values.items():
        assert parsed[key] == value  # exactly the value, as data
    for key in extra:
        # No extra key equals or abbreviates an option launcher sets.
        option = key.replace("_", "-")
        assert option == "gpus" or not any(o.startswith(option) for o in own), key


SRUN_ARG = st.one_of(
    st.sampled_from(["--output=x", "-o", "-lK", "--chdir=/", "--export=NONE", "--out", "-D/"]),
    st.sampled_from(["--cpu-bind=none", "-l", "--mpi=pmix", "-N", "2", "--label", "-u"]),
    SPECIAL,
    SAFE,
    NASTY,
)


@settings(max_examples=300, deadline=None)
@given(args=st.lists(SRUN_ARG, max_size=4), callable_mode=st.booleans())
def test_srun_args_are_refused_or_reach_srun_intact(args, callable_mode):
    spec = _with_slurm(_base(), srun_args=tuple(args))
    if callable_mode:
        entrypoint = _base(entrypoint={"callable": "tests.jobs.callables:ddp_sum"}).entrypoint
        spec = dataclasses.replace(spec, entrypoint=entrypoint)
    try:
        plan = _plan(spec)
    except ConfigError as exc:
        event("refused")
        assert "slurm.srun_args[" in str(exc) and "\n" not in str(exc)
        return
    event("accepted")
    assert not any(unicodedata.category(c) == "Cc" for a in args for c in a)
    for flag in ("--output", "--error", "--chdir", "--kill-on-bad-exit", "--open-mode"):
        assert not any(a == flag or a.startswith(flag + "=") for a in args)
    # Scripts and callables alike run as the one srun step the batch shell starts.
    step = plan.payload.step
    assert step is not None
    start = step.index(f"--chdir={spec.workdir}") + 1
    assert step[start : start + len(args)] == args


@settings(max_examples=200, deadline=None)
@given(folder=TEXT.filter(lambda s: "/" not in s and s not in ("", ".", "..")))
def test_run_folders_are_refused_or_logs_go_exactly_there(folder):
    run_dir = Path("/tmp") / folder / "RUNID"
    spec = dataclasses.replace(_base(), runs_dir=str(Path("/tmp") / folder))
    try:
        plan = _plan(spec, run_dir)
    except ConfigError as exc:
        event("refused")
        assert "runs_dir" in str(exc)
        assert _unsafe(folder) or "%" in folder, str(exc)
        return
    event("accepted")
    assert not _unsafe(folder) and "%" not in folder
    options = dict(sbatch_options(plan.payload.script))
    assert options["output"] == f"{run_dir}/slurm/%j_0_log.out"
    assert f"--output={run_dir}/logs/rank%t.log" in plan.payload.step


# ---- the oracle above is sbatch's own reading ----


@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")
def test_values_reach_slurm_exactly_as_the_parser_above_reads_them(tmp_path):
    """Submit the rendered script held, read the job name and comment back from Slurm."""
    require_cluster()
    values = [
        'it\'s "q" $(touch /tmp/launcher-pwned) `x`; y # z',
        "a b  c",
        "x'y\"z",
        "100% = a,b:c@d",
        "-leading dash",
        "ünï ©ode",
        "#start",
    ]
    for value in values:
        spec = _with_slurm(
            dataclasses.replace(_base(), name=value),
            partition="debug",
            extra={"comment": value},
        )
        plan = _plan(spec, tmp_path / "run")
        options = dict(sbatch_options(plan.payload.script))
        assert options["job-name"] == options["comment"] == value  # the oracle's reading
        script = tmp_path / "job.sh"
        script.write_text(plan.payload.script)
        out = subprocess.run(
            ["sbatch", "--hold", "--parsable", str(script)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        job = out.stdout.strip().split(";")[0]
        try:
            seen = subprocess.run(
                ["squeue", "-h", "-j", job, "-o", "%j|%k"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.rstrip("\n")
        finally:
            subprocess.run(["scancel", job], timeout=30)
        assert seen == f"{value}|{value}"  # Slurm's reading
    assert not Path("/tmp/launcher-pwned").exists()
