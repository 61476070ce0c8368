"""Config loading: defaults, extends, typed overrides, and one-line errors for bad input."""

from __future__ import annotations

import pytest

from launcher import config
from launcher.cli import main
from tests.conftest import launcher_cmd

GOOD = """
name: demo
entrypoint: {script: train.py, args: ["--x", "1"]}
resources: {nodes: 1, procs_per_node: 2}
"""

# (yaml text, dotted key the message must name, a word the message must contain)
BAD = [
    ("entrypoint: {script: t.py}\n", "name", "missing required key"),
    ("name: a\nresources: {nodes: 0}\n", "resources.nodes", ">= 1"),
    ("name: a\nresources: {time_min: -5}\n", "resources.time_min", ">= 1"),
    ("name: a\nresources: {node: 2}\n", "resources.node", "did you mean 'resources.nodes'"),
    ("name: a\nresorces: {nodes: 2}\n", "resorces", "did you mean 'resources'"),
    ("name: a\nresources: {nodes: two}\n", "resources.nodes", "expected an integer"),
    ("name: a\nresources: {nodes: true}\n", "resources.nodes", "expected an integer"),
    ("name: a\nbackend: slurn\n", "backend", "did you mean 'slurm'"),
    ("name: a\ntrain: {precision: bf15}\n", "train.precision", "did you mean 'bf16'"),
    ("name: a\nentrypoint: {script: a.py, callable: 'm:f'}\n", "entrypoint.callable", "not both"),
    ("name: a\nentrypoint: {callable: 'not a callable'}\n", "entrypoint.callable", "module"),
    ("name: a\nentrypoint: {args: ['--x']}\n", "entrypoint.args", "only for a 'script'"),
    ("name: a\nentrypoint: {script: a.py, args: --x}\n", "entrypoint.args", "expected a list"),
    ("name: a\nloader: {num_workers: -1}\n", "loader.num_workers", "0 to 256, 'auto' or 'rule'"),
    ("name: a\nloader: {pin_memory: maybe}\n", "loader.pin_memory", "true or false"),
    ("name: a\nenv: {1BAD: x}\n", "env.1BAD", "environment variable"),
    (
        "name: a\nresources: {gpus_per_node: 1, procs_per_node: 4}\n",
        "resources.procs_per_node",
        "more processes",
    ),
    ("name: a\ntrain: {optimizer: {lr: -1}}\n", "train.optimizer.lr", ">= 0"),
    ("name: a\ntrain: {optimizer: {name: lamb}}\n", "train.optimizer.name", "one of"),
    ("name: a\ntrain: {model: resnet}\n", "train.model", "mlp"),
    ("name: a\nslurm: {max_requeue: 1000}\n", "slurm.max_requeue", "<= 100"),
    ("name: a\nslurm: {container: {mounts: a}}\n", "slurm.container.mounts", "expected a list"),
    ("name: a\ndata: {sources: [{name: x}]}\n", "data.sources[0]", "exactly one of"),
    ("name: a\ndocker: {shm_gb: 0}\n", "docker.shm_gb", ">= 0.001"),
    ("- just\n- a list\n", "", "expected a mapping"),
    ("name: a\nresources: [1, 2]\n", "resources", "expected a mapping"),
    ("name: [a\n", "", "line 2, column 1"),
]


@pytest.mark.parametrize(("text", "key", "words"), BAD, ids=[b[1] or "top" for b in BAD])
def test_bad_config_is_one_line_exit_2(text, key, words, write_config, capsys, runs_dir):
    path = write_config(text)
    code = main(["run", str(path), f"runs_dir={runs_dir}", "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert str(path) in err
    if key:
        assert f": {key}" in err
    assert words in err
    assert not any(runs_dir.iterdir()), "nothing may be created for a bad config"


def test_bad_config_through_the_real_cli_has_no_traceback(write_config):
    path = write_config("name: a\nresources: {nodes: 0}\n")
    proc = launcher_cmd("run", str(path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"launcher: error: {path}: resources.nodes: must be >= 1, got 0"


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("resources.nodez=2", "did you mean 'resources.nodes'"),
        ("resources.nodes=abc", "expected an integer"),
        ("resources.nodes=0", ">= 1"),
        ("nodes", "key.path=value"),
    ],
)
def test_bad_override_names_the_command_line(override, words, write_config, capsys):
    path = write_config(GOOD)
    code = main(["run", str(path), override, "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert words in err


def test_defaults_extends_and_typed_overrides(write_config, tmp_path):
    write_config("name: base\nresources: {nodes: 2, time_min: 30}\nenv: {A: '1'}\n", "base.yaml")
    path = write_config("extends: base.yaml\nname: child\nenv: {B: '2'}\n")
    loaded = config.load(path, ["resources.time_min=45", "env.C=yes", "train.optimizer.lr=0.5"])
    spec = loaded.spec
    assert spec.name == "child"
    assert spec.resources.nodes == 2  # from the base
    assert spec.resources.time_min == 45  # override, typed as int
    assert spec.env == {"A": "1", "B": "2", "C": "yes"}  # 'yes' stays a string for str keys
    assert spec.train.optimizer.lr == 0.5
    assert spec.backend == "local" and spec.resources.procs_per_node is None
    assert spec.resources.tasks_per_node == 1


def test_extends_cycle_is_an_error(write_config):
    write_config("extends: b.yaml\nname: a\n", "a.yaml")
    path = write_config("extends: a.yaml\nname: b\n", "b.yaml")
    with pytest.raises(config.ConfigError, match="cycle"):
        config.load(path)


def test_resolved_config_round_trips(write_config, tmp_path):
    spec = config.load(write_config(GOOD)).spec
    out = tmp_path / "resolved.yaml"
    out.write_text(config.dump(spec))
    assert config.load_resolved(out) == spec
