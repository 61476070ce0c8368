"""`num_workers: auto` (launcher.runtime.autotune): real torch, real DataLoader workers, the
built-in trainer. The two synthetic datasets are built so the right answer wins by far more
than this shared machine's noise: samples that wait 2 ms each (I/O-like: 4 workers load about
4x faster than the main process) and samples made of 64 tiny tensors each (every one crosses
the worker queue as its own shared-memory file: the main process loads them 30x faster).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from launcher import schema
from launcher.hardware import (
    Hardware,
    LoaderPicks,
    measured_loader,
    pick_loader,
    worker_candidates,
)
from launcher.ports import free_port
from launcher.runtime import autotune
from launcher.runtime import checkpoint as ckpt
from launcher.runtime.loader import ResumableSampler, make_loader, resolve_picks, tuner_for
from launcher.runtime.trainer import StopRequest, train
from launcher.spec import JobSpec, LoaderSpec

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3


# --- datasets and models the trainer imports as `tests.test_autotune:...` ------------------


class Waiting(torch.utils.data.Dataset):
    """Each sample waits 2 ms (a read from slow storage): workers overlap the waits."""

    def __init__(self, size: int = 4096, wait_s: float = 0.002) -> None:
        self.size, self.wait_s = size, wait_s
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(size, 8, generator=g)
        self.y = (self.x.sum(1) > 0).long()

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(self.wait_s)
        return self.x[i], self.y[i]


class ManyTensors(torch.utils.data.Dataset):
    """Samples of 64 tiny tensors: cheap in the main process, dear through the worker queue."""

    def __init__(self, size: int = 8192, fields: int = 64, distinct: int = 256) -> None:
        self.size = size
        g = torch.Generator().manual_seed(0)
        x = torch.randn(distinct, fields, 2, generator=g)
        # Built once: a sample costs a list lookup in the main process.
        self.items = [{f"f{j}": x[i, j].clone() for j in range(fields)} for i in range(distinct)]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i % len(self.items)]


class Net(torch.nn.Module):
    """Takes either dataset's batches; dropout so the RNG streams matter for exact resume."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 2)
        self.drop = torch.nn.Dropout(0.2)

    def forward(self, batch: object) -> torch.Tensor:
        if isinstance(batch, dict):
            x = torch.cat([batch[f"f{j}"] for j in range(4)], 1)  # 4 of the 64 fields
            y = (x.sum(1) > 0).long()
        else:
            x, y = batch  # type: ignore[misc]
        return torch.nn.functional.cross_entropy(self.lin(self.drop(x)), y)


def build_model() -> Net:
    return Net()


def build_waiting(size: int = 4096) -> Waiting:
    return Waiting(size)


def build_many(size: int = 8192) -> ManyTensors:
    return ManyTensors(size)


def spec_of(num_workers: object = "auto", budget: float = 120, **train: object) -> JobSpec:
    defaults: dict[str, object] = {
        "model": "tests.test_autotune:build_model",
        "dataset": "tests.test_autotune:build_waiting",
        "steps": 160,
        "global_batch_size": 8,
        "checkpoint_every": 1000,
        "log_every": 1000,
    }
    loader = {"num_workers": num_workers, "measure_budget_s": budget}
    return schema.build(
        JobSpec, {"name": "t", "loader": loader, "train": defaults | train}, file="test.yaml"
    )


def events(run_dir: Path, name: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == name]


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "event" not in rec:
            out[rec["step"]] = rec["loss"]
    return out


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A cache file of the test's own, and a one-thread step.

    Two intra-op threads on a loaded 2-CPU machine make even a tiny step cost 10-30 ms of
    waiting between threads; one thread keeps the step small and steady, so the loader's
    difference between the settings is what the tests see.
    """
    path = tmp_path / "cache" / "loader-picks.json"
    monkeypatch.setenv(autotune.CACHE_ENV, str(path))
    for var in ("LAUNCHER_NUM_WORKERS", "LAUNCHER_LOADER_MEASURE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield path
    torch.set_num_threads(threads)


# --- the choice ----------------------------------------------------------------------------


def test_waiting_samples_get_workers(tmp_path: Path, cache: Path) -> None:
    train(spec_of(), tmp_path / "run")
    (event,) = events(tmp_path / "run", "loader")
    rates = {row["num_workers"]: row["batches_per_s"] for row in event["table"]}
    assert event["source"] == "measured"
    assert event["num_workers"] >= 2, event
    # The figure behind the choice: far more than noise between the two ends.
    assert rates[event["num_workers"]] > 1.8 * rates[0], rates


def test_many_tiny_tensors_load_in_the_main_process(tmp_path: Path, cache: Path) -> None:
    train(spec_of(dataset="tests.test_autotune:build_many", global_batch_size=16), tmp_path / "r")
    (event,) = events(tmp_path / "r", "loader")
    rates = {row["num_workers"]: row["batches_per_s"] for row in event["table"]}
    assert event["num_workers"] == 0, event["table"]
    rule = event["table"][0]["num_workers"]  # the rule's pick races first
    assert rates[0] > 3 * rates[rule], rates


def test_race_prefers_fewer_workers_within_noise_and_drops_the_clearly_worse() -> None:
    race = autotune.Race([4, 0, 1, 2])
    for w, rate in ((4, 100.0), (0, 50.0), (1, 98.0), (2, 99.0)):
        race.next_slot()
        race.record(w, 20, 20 / rate)
    race.end_round()
    assert 0 not in race.survivors and set(race.survivors) == {4, 2}  # halved
    for w in list(race.queue):
        race.next_slot()
        race.record(w, 40, 40 / {4: 100.0, 2: 98.5}[w])
    race.end_round()
    assert race.decided == 2 and "fewer workers" in race.why
    out = autotune.Race([4, 0])
    out.stop("budget spent")
    assert out.decided == 4 and "rule" in out.why  # nothing measured: the rule's pick


def test_candidates_start_with_the_rule_and_respect_shm() -> None:
    hw = Hardware(cpus=96, cpus_source="t", mem_bytes=512 * GIB, shm_bytes=256 * GIB, gpus=8)
    assert worker_candidates(hw, 8) == [16, 0, 1, 6, 12]  # 12 CPUs each: rule 24, capped 16
    small = Hardware(cpus=96, cpus_source="t", mem_bytes=512 * GIB, shm_bytes=GIB, gpus=8)
    assert max(worker_candidates(small, 8)) == 0  # 1 GiB / 8 procs < 256 MiB per worker
    picks = pick_loader(hw, 8, LoaderSpec(num_workers="auto"))
    assert picks.measure_workers and picks.measure_pin and picks.num_workers == 16
    assert not pick_loader(hw, 8, LoaderSpec(num_workers=3)).measure_workers
    env = picks.as_env()
    assert env["LAUNCHER_LOADER_MEASURE"] == "num_workers,pin_memory"
    cpu = resolve_picks(LoaderSpec(num_workers="auto"), local_world_size=1, uses_gpu=False)
    assert cpu.measure_workers and not cpu.measure_pin and not cpu.pin_memory


# --- remembered ----------------------------------------------------------------------------


def _tuned(dataset: torch.utils.data.Dataset, batch: int, hw: Hardware, path: Path):
    sampler = ResumableSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    picks = LoaderPicks(4, False, True, 2, measure_workers=True)
    return tuner_for(
        dataset,
        batch,
        sampler=sampler,
        picks=picks,
        world_size=1,
        local_world_size=1,
        budget_s=30,
        workload="test",
        hw=hw,
        cache=autotune.PicksCache(path),
    )


def _drive(tuner: autotune.LoaderTuner) -> autotune.Measured:
    for epoch in range(100):
        tuner.sampler.set_epoch(epoch)
        tuner.sampler.set_start(0)  # as the trainer does: the tuner moves it on settling
        for _ in tuner.iterate():
            if tuner.result is not None:
                return tuner.result
    race = tuner.race
    raise AssertionError(
        f"the race did not end: window0 {tuner.window0}, epoch {tuner.epoch_batches} batches, "
        f"round {race.round}, queue {race.queue}, survivors {race.survivors}, "
        f"slots {race.slots}, batches {tuner._batches}"
    )


def test_result_is_reused_and_measured_again_when_the_key_changes(cache: Path) -> None:
    hw = Hardware(cpus=2, cpus_source="t", mem_bytes=16 * GIB, shm_bytes=8 * GIB, gpus=0)
    data = ManyTensors(2048)
    first = _drive(_tuned(data, 16, hw, cache))
    assert first.source == "measured" and first.num_workers == 0 and first.batches > 0
    stored = json.loads(cache.read_text())[first.key]
    assert stored["num_workers"] == 0 and stored["parts"]["batch_size"] == 16
    again = _tuned(data, 16, hw, cache)
    assert again.result is not None and again.result.source == "cache"  # before any batch
    assert again.result.num_workers == 0 and again.result.batches == 0
    assert again.picks.num_workers == 0 and again.result.table == stored["table"]
    other_hw = Hardware(cpus=4, cpus_source="t", mem_bytes=16 * GIB, shm_bytes=8 * GIB, gpus=0)
    for changed in (
        _tuned(data, 32, hw, cache),  # batch size
        _tuned(ManyTensors(1024), 16, hw, cache),  # dataset length
        _tuned(data, 16, other_hw, cache),  # hardware
    ):
        assert changed.result is None  # not remembered: it races
        assert _drive(changed).source == "measured"
    assert len(json.loads(cache.read_text())) == 4
    cache.write_text("{not json")  # a broken file measures again, and is rewritten
    assert _drive(_tuned(data, 16, hw, cache)).source == "measured"
    assert len(json.loads(cache.read_text())) == 1


def test_short_epochs_cap_the_slots_and_too_short_ones_keep_the_rule(cache: Path) -> None:
    # A loader fast enough that the probe asks for windows of hundreds of batches, over
    # epochs of 40: every slot fits in one epoch, so the race ends (it once waited forever
    # for a slot longer than an epoch).
    hw = Hardware(cpus=2, cpus_source="t", mem_bytes=16 * GIB, shm_bytes=8 * GIB, gpus=0)
    tuner = _tuned(ManyTensors(16 * 40), 16, hw, cache)
    result = _drive(tuner)
    assert result.source == "measured", result.why
    assert tuner.epoch_batches == 40 and all(tuner.slot_length(r) <= 40 for r in range(4))
    assert all(row["batches"] < 40 * row["slots"] for row in result.table), result.table
    # Epochs of 10 batches leave nothing to time after the warm-up: the rule's pick, at once.
    short = _tuned(ManyTensors(16 * 10), 16, hw, cache)
    kept = _drive(short)
    assert kept.source == "rule" and "too short" in kept.why and kept.num_workers == 4
    assert kept.batches == 0 and all(row["slots"] == 0 for row in kept.table)


def test_trainer_reuses_a_remembered_result_across_runs(tmp_path: Path, cache: Path) -> None:
    spec = spec_of(dataset="tests.test_autotune:build_many", global_batch_size=16, steps=120)
    train(spec, tmp_path / "a")
    train(spec, tmp_path / "b")
    (a,), (b,) = events(tmp_path / "a", "loader"), events(tmp_path / "b", "loader")
    assert a["source"] == "measured" and b["source"] == "cache" and b["step"] == 1
    assert a["num_workers"] == b["num_workers"] and b["batches"] == 0
    # What `launcher status RUN --json` shows, read without torch.
    shown = measured_loader(tmp_path / "a")
    assert shown is not None and shown["num_workers"] == a["num_workers"]
    assert shown["table"] == a["table"] and measured_loader(tmp_path / "none") is None


def test_make_loader_auto_measures_the_loader_alone(cache: Path) -> None:
    slow = make_loader(Waiting(2048), 8, num_workers="auto", rank=0, world_size=1, budget_s=30)
    fast = make_loader(ManyTensors(2048), 16, num_workers="auto", rank=0, world_size=1)
    assert slow.num_workers >= 2 and fast.num_workers == 0
    assert slow.measured.source == "measured" and "loader alone" in cache.read_text()
    # The returned loader starts the epoch from its first sample, like any other.
    assert len(list(iter(fast))) == 2048 // 16


# --- exact -------------------------------------------------------------------------------


def test_auto_equals_the_chosen_value_and_resume_mid_race_is_exact(
    tmp_path: Path, cache: Path
) -> None:
    """A run stopped during the race and resumed (racing again) ends as a fixed run would."""
    common = {"steps": 120, "checkpoint_every": 5, "dataset_kwargs": {"size": 640}}
    fixed = train(spec_of(0, **common), tmp_path / "fixed")  # 80 steps an epoch
    stop = StopRequest()
    run = tmp_path / "auto"

    def stop_after_first_checkpoint() -> None:
        while not (run / "checkpoints" / "step-000000005.pt").exists():
            time.sleep(0.0005)
        stop.request(signal.SIGUSR2)

    watcher = threading.Thread(target=stop_after_first_checkpoint)
    watcher.start()
    first = train(spec_of(**common), run, stop=stop)
    watcher.join()
    assert first.preempted and first.steps_done < 40  # well inside the race
    assert not events(run, "loader") and not cache.exists()  # no result yet
    second = train(spec_of(**common), run)
    assert second.resumed_from is not None and second.steps_done == 120
    (event,) = events(run, "loader")
    assert event["source"] == "measured" and event["step"] > first.steps_done
    assert losses(run) == losses(tmp_path / "fixed")
    assert second.final_loss == fixed.final_loss
    a = ckpt.load_latest(tmp_path / "fixed" / "checkpoints")
    b = ckpt.load_latest(run / "checkpoints")
    assert a is not None and b is not None
    for key in a[1]["model"]:
        assert torch.equal(a[1]["model"][key], b[1]["model"][key]), key


# --- ranks ---------------------------------------------------------------------------------


def _rank_main() -> None:
    """One rank of test_ranks_of_a_node_agree (run as a subprocess)."""
    from launcher.runtime.dist import distributed

    with distributed() as ctx:
        data = Waiting(2048, wait_s=0.001 * (1 + ctx.env.rank))  # rank 1 waits twice as long
        sampler = ResumableSampler(data, num_replicas=2, rank=ctx.env.rank, seed=0)
        picks = LoaderPicks(4, False, True, 2, measure_workers=True)
        tuner = autotune.LoaderTuner(
            data,
            8,
            sampler=sampler,
            picks=picks,
            hw=Hardware(cpus=2, cpus_source="t", mem_bytes=8 * GIB, shm_bytes=8 * GIB, gpus=0),
            local_world_size=2,
            budget_s=60,
            exchange=autotune.Exchange(ctx.control, ctx.distributed),
            local_rank=ctx.env.local_rank,
        )
        seen: list[float] = []
        result = None
        for epoch in range(50):
            sampler.set_epoch(epoch)
            for batch in tuner.iterate():
                seen.extend(batch[0][:, 0].tolist())
                if tuner.result is not None:
                    result = tuner.result
                    break
            if result is not None:
                break
        assert result is not None
        out = Path(os.environ["TEST_OUT"]) / f"rank{ctx.env.rank}.json"
        out.write_text(json.dumps({"result": result.to_dict(), "n": len(seen)}))


def test_ranks_of_a_node_agree(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAUNCHER_", "SLURM_"))}
    env.update(
        PYTHONPATH=str(ROOT),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        TEST_OUT=str(tmp_path),
    )
    code = "import tests.test_autotune as t; t._rank_main()"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            cwd=ROOT,
        )
        for r in range(2)
    ]
    assert [p.wait(timeout=240) for p in procs] == [0, 0]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    # One setting and one table for the node: both ranks saw the same (slowest-rank) figures.
    assert r0["result"]["num_workers"] == r1["result"]["num_workers"]
    assert r0["result"]["table"] == r1["result"]["table"]
    assert r0["n"] == r1["n"] and r0["result"]["batches"] == r1["result"]["batches"]


def test_hw_measure_prints_the_candidates_for_a_configs_dataset(tmp_path):
    import json
    import subprocess
    import sys

    cfg = tmp_path / "job.yaml"
    cfg.write_text("name: m\ntrain: {steps: 4}\n")
    out = subprocess.run(
        [sys.executable, "-m", "launcher", "hw", str(cfg), "--measure", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    measured = {row["num_workers"] for row in report["candidates"]}
    assert report["rule"] in measured and 0 in measured
    assert report["fastest"] in measured
    assert all(row["samples_per_s"] > 0 for row in report["candidates"])
