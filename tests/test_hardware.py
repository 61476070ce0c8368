"""Hardware detection and loader picks: pure logic, with real cgroup-shaped files."""

from __future__ import annotations

from pathlib import Path

from launcher import hardware
from launcher.hardware import Hardware, pick_loader
from launcher.spec import LoaderSpec
from tests.conftest import launcher_cmd

GIB = 1024**3


def hw(cpus=16, mem=64 * GIB, shm=32 * GIB, gpus=0) -> Hardware:
    return Hardware(cpus=cpus, cpus_source="test", mem_bytes=mem, shm_bytes=shm, gpus=gpus)


def test_workers_split_cpus_between_local_processes():
    picks = pick_loader(hw(cpus=16), 4)
    assert picks.num_workers == 8  # 16 / 4 = 4 CPUs per process, 2 workers per CPU
    assert pick_loader(hw(cpus=2), 2).num_workers == 0  # 1 CPU each: main-process loading
    assert pick_loader(hw(cpus=256), 1).num_workers == 16  # capped
    assert picks.persistent_workers and picks.prefetch_factor == 2
    assert "16 CPUs" in picks.reasons["num_workers"]


def test_small_shm_caps_workers_and_says_so():
    picks = pick_loader(hw(cpus=32, shm=64 * 1024**2), 1)
    assert picks.num_workers == 0
    assert "/dev/shm" in picks.reasons["num_workers"]


def test_pin_memory_follows_gpus_and_config_wins():
    assert pick_loader(hw(gpus=8), 8).pin_memory is True
    assert pick_loader(hw(gpus=0), 1).pin_memory is False
    explicit = pick_loader(hw(gpus=8), 8, LoaderSpec(num_workers=7, pin_memory=False))
    assert explicit.num_workers == 7 and explicit.pin_memory is False
    assert explicit.reasons["num_workers"] == "set in the config"


def test_picks_round_trip_through_env():
    picks = pick_loader(hw(cpus=8, gpus=1), 1)
    back = hardware.picks_from_env(picks.as_env())
    assert (back.num_workers, back.pin_memory, back.prefetch_factor) == (
        picks.num_workers,
        picks.pin_memory,
        picks.prefetch_factor,
    )
    assert hardware.picks_from_env({}) is None


def test_cpu_sources_take_the_smallest(tmp_path: Path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # cgroup v2: 1.5 CPUs
    cpus, source = hardware.detect_cpus({}, cgroup_root=tmp_path)
    assert cpus == 1 and "cgroup" in source
    (tmp_path / "cpu.max").write_text("max 100000\n")
    cpus, source = hardware.detect_cpus({"SLURM_CPUS_PER_TASK": "1"}, cgroup_root=tmp_path)
    assert (cpus, source) == (1, "SLURM_CPUS_PER_TASK")


def test_gpus_hidden_by_cuda_visible_devices():
    assert hardware.detect_gpus({"CUDA_VISIBLE_DEVICES": ""})[0] == 0


def test_hw_command_prints_picks_and_json():
    out = launcher_cmd("hw", "--procs", "2")
    assert out.returncode == 0 and "num_workers" in out.stdout and "CPUs:" in out.stdout
    import json

    data = json.loads(launcher_cmd("hw", "--json", "configs/quickstart.yaml").stdout)
    assert data["procs"] == 2 and data["hardware"]["cpus"] >= 1
