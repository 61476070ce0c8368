"""The built-in trainer in this process (one rank): padding, accumulation, seeds, precision,
optimizer groups, schedule, checkpoints, hooks. Multi-process behaviour: test_runtime_dist.py.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from launcher import schema
from launcher.errors import BackendError, ConfigError
from launcher.runtime import REQUEUE_EXIT_CODE
from launcher.runtime import checkpoint as ckpt
from launcher.runtime.dist import DistEnv, first_host, from_environ, parse_first_host
from launcher.runtime.loader import make_loader, pad_collate, resolve_picks
from launcher.runtime.optim import build_optimizer, lr_factor, param_groups
from launcher.runtime.trainer import StopRequest, autocast, train
from launcher.spec import JobSpec, LoaderSpec, OptimizerSpec, ScheduleSpec


def spec_of(**train: object) -> JobSpec:
    """A job for the built-in trainer; data loads in this process (no worker start-up cost)."""
    return schema.build(
        JobSpec, {"name": "t", "loader": {"num_workers": 0}, "train": train}, file="test.yaml"
    )


def final_state(run_dir: Path) -> dict:
    found = ckpt.load_latest(run_dir / "checkpoints")
    assert found is not None, f"no checkpoint in {run_dir}"
    return found[1]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss, the last line of each step winning (steps after a crash repeat)."""
    import json

    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "step" in record and "loss" in record and "event" not in record:
            out[record["step"]] = record["loss"]
    return out


# --- padding -----------------------------------------------------------------------------


def test_pad_collate_dict_samples_lengths_3_6_9() -> None:
    samples = [
        {"input_ids": torch.arange(1, n + 1), "labels": torch.arange(1, n + 1) * 10, "y": i}
        for i, n in enumerate((3, 6, 9))
    ]
    batch = pad_collate(samples, pad_value={"labels": -100})
    assert batch["input_ids"].shape == (3, 9)
    assert batch["lengths"].tolist() == [3, 6, 9]
    assert batch["input_ids"][0].tolist() == [1, 2, 3, 0, 0, 0, 0, 0, 0]
    assert batch["labels"][1].tolist() == [10, 20, 30, 40, 50, 60, -100, -100, -100]
    assert batch["input_ids"][2].tolist() == list(range(1, 10))
    assert batch["attention_mask"].dtype == torch.bool
    assert batch["attention_mask"].sum(dim=1).tolist() == [3, 6, 9]
    assert batch["attention_mask"][0].tolist() == [True] * 3 + [False] * 6
    assert batch["y"].tolist() == [0, 1, 2]


def test_pad_collate_tuple_and_tensor_samples() -> None:
    seqs = [torch.ones(n, 2) * n for n in (3, 6, 9)]  # trailing feature dim is kept
    x, label, lengths, mask = pad_collate(
        [(s, torch.tensor(n)) for s, n in zip(seqs, (3, 6, 9), strict=True)]
    )
    assert x.shape == (3, 9, 2)
    assert x[0, 3:].abs().sum() == 0 and x[0, :3].eq(3).all()
    assert label.tolist() == [3, 6, 9]
    assert lengths.tolist() == [3, 6, 9]
    assert mask.tolist()[1] == [True] * 6 + [False] * 3
    padded, lengths, mask = pad_collate([[1, 2, 3], [4, 5, 6, 7, 8, 9], list(range(9))])
    assert padded[0].tolist() == [1, 2, 3, 0, 0, 0, 0, 0, 0]
    assert lengths.tolist() == [3, 6, 9] and mask.sum().item() == 18


# --- loader ------------------------------------------------------------------------------


def test_make_loader_shards_and_takes_picks_from_env_config_wins(monkeypatch) -> None:
    data = torch.utils.data.TensorDataset(torch.arange(64.0))
    seen = []
    for rank in range(2):
        loader = make_loader(data, 8, rank=rank, world_size=2, seed=3, uses_gpu=False)
        loader.sampler.set_epoch(1)
        seen.append(torch.cat([b[0] for b in loader]).tolist())
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(64))

    monkeypatch.setenv("LAUNCHER_NUM_WORKERS", "3")
    monkeypatch.setenv("LAUNCHER_PIN_MEMORY", "1")
    monkeypatch.setenv("LAUNCHER_PERSISTENT_WORKERS", "1")
    monkeypatch.setenv("LAUNCHER_PREFETCH_FACTOR", "4")
    picks = resolve_picks(LoaderSpec(), uses_gpu=False)
    assert (picks.num_workers, picks.prefetch_factor, picks.pin_memory) == (3, 4, False)
    picks = resolve_picks(LoaderSpec(num_workers=0), uses_gpu=False)
    assert picks.num_workers == 0 and picks.prefetch_factor is None


# --- distributed environment -------------------------------------------------------------


def test_dist_env_from_torchrun_slurm_and_single() -> None:
    env = from_environ(
        {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
         "MASTER_ADDR": "node7", "MASTER_PORT": "1234"}
    )  # fmt: skip
    assert env == DistEnv(3, 1, 4, 2, "node7", 1234, "torchrun")
    slurm = {
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "8",
        "SLURM_TASKS_PER_NODE": "4(x2)",
        "SLURM_JOB_NODELIST": "gpu[07-09,12],cpu1",
        "SLURM_JOB_ID": "123456",
    }
    env = from_environ(slurm, host_of=parse_first_host)
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (5, 1, 8, 4)
    assert env.master_addr == "gpu07" and env.source == "slurm"
    assert env.master_port == 15000 + 123456 % 20000
    assert from_environ({}) == DistEnv()
    with pytest.raises(BackendError, match="RANK: expected an integer"):
        from_environ({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(BackendError, match="outside world size"):
        from_environ({"RANK": "2", "WORLD_SIZE": "2"})


def test_slurm_first_host_parser_and_scontrol_runner() -> None:
    assert parse_first_host("node01") == "node01"
    assert parse_first_host("a[1,3]b[2-4],c9") == "a1b2"
    assert parse_first_host("rack[003-010]") == "rack003"
    calls = []

    def fake_scontrol(argv: list[str]) -> str:
        calls.append(argv)
        return "hostA\nhostB\n"

    assert first_host("x[1-2]", run=fake_scontrol, scontrol="/bin/scontrol") == "hostA"
    assert calls == [["/bin/scontrol", "show", "hostnames", "x[1-2]"]]
    assert first_host("x[4-5]", scontrol="") == "x4"


# --- optimizer and schedule --------------------------------------------------------------


def test_param_groups_no_decay_and_per_pattern_lr() -> None:
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(4, 4))
    model.add_module("norm", torch.nn.LayerNorm(4))
    model.add_module("head", torch.nn.Linear(4, 2))
    spec = schema.build(
        OptimizerSpec,
        {"lr": 0.1, "weight_decay": 0.5, "groups": [{"pattern": "head.*", "lr": 0.01}]},
    )
    groups = {tuple(g["names"]): (g["lr"], g["weight_decay"]) for g in param_groups(model, spec)}
    assert groups[("proj.weight",)] == (0.1, 0.5)
    assert groups[("proj.bias", "norm.weight", "norm.bias")] == (0.1, 0.0)
    # The group sets the lr; the bias still gets no weight decay.
    assert groups[("head.weight",)] == (0.01, 0.5)
    assert groups[("head.bias",)] == (0.01, 0.0)
    opt = build_optimizer(model, spec)
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 4
    bad = schema.build(OptimizerSpec, {"groups": [{"pattern": "encoder.*"}]})
    with pytest.raises(ConfigError, match=r"train\.optimizer\.groups\[0\]\.pattern"):
        param_groups(model, bad)


def test_warmup_then_cosine_schedule() -> None:
    f = lr_factor(ScheduleSpec(name="cosine", warmup_steps=4, min_lr_ratio=0.1), 104)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(54) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(104) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(4, 104))
    assert lr_factor(ScheduleSpec(name="constant", warmup_steps=2), 10)(7) == 1.0


# --- training in this process ------------------------------------------------------------


def test_accumulation_of_k_micro_batches_equals_one_big_batch(tmp_path: Path) -> None:
    common = dict(model="mlp", steps=8, global_batch_size=32, checkpoint_every=100, seed=7)
    common["dataset_kwargs"] = {"size": 256}
    big = train(spec_of(**common), tmp_path / "big")
    acc = train(spec_of(**common, micro_batch_size=8), tmp_path / "acc")
    assert big.steps_done == acc.steps_done == 8
    a, b = final_state(tmp_path / "big")["model"], final_state(tmp_path / "acc")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    # ...and training did move the weights (the comparison above could fail).
    fresh = train(spec_of(**{**common, "steps": 1}), tmp_path / "one")
    assert fresh.steps_done == 1
    first = final_state(tmp_path / "one")["model"]
    assert not torch.allclose(first["head.weight"], a["head.weight"])
    start = losses(tmp_path / "acc")
    assert start[1] == pytest.approx(losses(tmp_path / "big")[1], rel=1e-5)


def test_same_seed_same_loss_curve_other_seed_differs(tmp_path: Path) -> None:
    common = dict(model="mlp", model_kwargs={"dropout": 0.3}, steps=15, global_batch_size=16)
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        train(spec_of(**common, seed=seed), tmp_path / name)
        runs[name] = losses(tmp_path / name)
    assert len(runs["a"]) == 15
    assert runs["a"] == runs["b"]  # exact, step by step
    assert runs["a"] != runs["c"]


def test_stop_request_checkpoints_and_resume_is_bitwise_equal(tmp_path: Path) -> None:
    """One process: stop after a step (as a signal would), resume, compare to no stop."""
    common = dict(
        model="mlp",
        model_kwargs={"dropout": 0.2},
        steps=200,
        global_batch_size=16,
        dataset_kwargs={"size": 320},  # 20 steps per epoch
        checkpoint_every=5,
        keep_last=2,
    )
    whole = train(spec_of(**common), tmp_path / "whole")

    stop = StopRequest()
    run = tmp_path / "stopped"

    def stop_after_first_checkpoint() -> None:
        while not (run / "checkpoints" / "step-000000005.pt").exists():
            time.sleep(0.0005)
        stop.request(signal.SIGUSR2)

    watcher = threading.Thread(target=stop_after_first_checkpoint)
    watcher.start()
    first = train(spec_of(**common), run, stop=stop)
    watcher.join()
    assert first.preempted and first.exit_code == REQUEUE_EXIT_CODE
    assert first.signal == "SIGUSR2"
    assert 5 <= first.steps_done < 200
    assert first.checkpoint == ckpt.path_for(run / "checkpoints", first.steps_done)
    second = train(spec_of(**common), run)
    assert not second.preempted and second.steps_done == 200
    assert second.resumed_from == first.checkpoint
    a, b = final_state(tmp_path / "whole"), final_state(run)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert losses(run) == losses(tmp_path / "whole")
    assert whole.final_loss == second.final_loss


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains_on_cpu(tmp_path: Path, precision: str) -> None:
    with autocast(precision, torch.device("cpu")):
        out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == (torch.bfloat16 if precision == "bf16" else torch.float16)
    spec = spec_of(
        model="mlp",
        precision=precision,
        steps=40,
        global_batch_size=32,
        optimizer={"lr": 0.01},
        checkpoint_every=100,
    )
    result = train(spec, tmp_path / precision)
    curve = list(losses(tmp_path / precision).values())
    assert len(curve) == 40 and all(math.isfinite(v) for v in curve)
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.2, curve
    if precision == "fp16":
        assert final_state(tmp_path / precision)["scaler"]["scale"] > 0
    assert result.final_loss == curve[-1]


@pytest.mark.gpu
def test_bf16_trains_on_cuda(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    spec = spec_of(model="transformer", precision="bf16", steps=40, global_batch_size=32,
                   optimizer={"lr": 0.003})  # fmt: skip
    train(spec, tmp_path / "cuda")
    curve = list(losses(tmp_path / "cuda").values())
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.2, curve
    state = final_state(tmp_path / "cuda")
    assert state["rng"][0]["cuda"], "CUDA RNG state is saved"


def test_activation_checkpointing_same_result(tmp_path: Path) -> None:
    common = dict(model="transformer", steps=4, global_batch_size=8, checkpoint_every=100)
    train(spec_of(**common), tmp_path / "plain")
    train(spec_of(**common, activation_checkpointing=["encoder.layers.*"]), tmp_path / "ac")
    a, b = final_state(tmp_path / "plain")["model"], final_state(tmp_path / "ac")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match=r"train\.activation_checkpointing\[0\].*no submodule"):
        train(spec_of(**common, activation_checkpointing=["decoder.*"]), tmp_path / "bad")


def test_user_hooks_build_model_and_dataset(tmp_path: Path, monkeypatch) -> None:
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "hooks.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self, width):\n"
        "        super().__init__()\n"
        "        self.lin = torch.nn.Linear(width, 1)\n"
        "    def forward(self, x, y):\n"
        "        return {'loss': ((self.lin(x).squeeze(1) - y) ** 2).mean()}\n"
        "def build_model(width=4):\n"
        "    return Net(width)\n"
        "class Data(torch.utils.data.Dataset):\n"
        "    def __init__(self, size, width):\n"
        "        g = torch.Generator().manual_seed(0)\n"
        "        self.x = torch.randn(size, width, generator=g)\n"
        "        self.y = self.x.sum(1)\n"
        "    def __len__(self):\n"
        "        return len(self.x)\n"
        "    def __getitem__(self, i):\n"
        "        return {'x': self.x[i], 'y': self.y[i]}\n"
        "def build_dataset(size=64, width=4):\n"
        "    return Data(size, width)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = spec_of(
        model="userpkg.hooks:build_model",
        model_kwargs={"width": 3},
        dataset="userpkg.hooks:build_dataset",
        dataset_kwargs={"width": 3},
        batch_as_kwargs=True,
        steps=30,
        global_batch_size=16,
        optimizer={"lr": 0.05, "weight_decay": 0.0},
    )
    result = train(spec, tmp_path / "user")
    curve = list(losses(tmp_path / "user").values())
    assert result.steps_done == 30 and curve[-1] < curve[0] / 2
    bad = spec_of(
        model="userpkg.hooks:build_model",
        model_kwargs={"depth": 3},
        dataset="userpkg.hooks:build_dataset",
    )
    with pytest.raises(ConfigError, match=r"train\.model_kwargs: build_model: .*depth"):
        train(bad, tmp_path / "bad")


def test_checkpoints_keep_last_and_skip_a_corrupt_newest(tmp_path: Path) -> None:
    folder = tmp_path / "ck"
    for step in (1, 2, 3, 4):
        ckpt.save(folder, step, {"step": step, "w": torch.full((3,), float(step))}, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(folder)] == [3, 4]
    ckpt.path_for(folder, 4).write_bytes(ckpt.path_for(folder, 4).read_bytes()[:100])
    path, state = ckpt.load_latest(folder)
    assert path == ckpt.path_for(folder, 3) and state["w"].tolist() == [3.0, 3.0, 3.0]


def test_batch_sizes_that_do_not_divide_are_config_errors(tmp_path: Path) -> None:
    from launcher.runtime.trainer import batch_plan

    assert batch_plan(spec_of(global_batch_size=32, micro_batch_size=4).train, 2) == (4, 4)
    with pytest.raises(ConfigError, match=r"train\.global_batch_size: must be divisible"):
        batch_plan(spec_of(global_batch_size=15).train, 2)
    with pytest.raises(ConfigError, match=r"train\.micro_batch_size: .*multiple"):
        batch_plan(spec_of(global_batch_size=24, micro_batch_size=8).train, 2)
    with pytest.raises(ConfigError, match=r"test\.yaml: train\.micro_batch_size: must divide"):
        spec_of(global_batch_size=24, micro_batch_size=5)
    with pytest.raises(ConfigError, match="fewer than one step needs"):
        train(spec_of(global_batch_size=64, dataset_kwargs={"size": 32}), tmp_path / "small")


def test_signal_handlers_restored_after_train(tmp_path: Path) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)}
    train(spec_of(steps=2, global_batch_size=8), tmp_path / "r")
    after = {s: signal.getsignal(s) for s in before}
    assert before == after
    assert os.environ.get("PYTHONHASHSEED") == "0"


def test_error_in_forward_propagates_unchanged(tmp_path: Path, monkeypatch) -> None:
    """The trainer clears its own frames' locals on the way out; the error itself stays whole."""
    pkg = tmp_path / "failpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.lin = torch.nn.Linear(32, 8)\n"
        "        self.calls = 0\n"
        "    def forward(self, batch):\n"
        "        self.calls += 1\n"
        "        if self.calls == 3:\n"
        "            raise ValueError('forward failed on call 3')\n"
        "        x, y = batch\n"
        "        return torch.nn.functional.cross_entropy(self.lin(x), y)\n"
        "def build():\n"
        "    return Net()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = spec_of(
        model="failpkg:build",
        dataset="launcher.runtime.models:SyntheticClassification",
        steps=10,
        global_batch_size=8,
    )
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ValueError, match="forward failed on call 3") as info:
        train(spec, tmp_path / "run")
    last = info.traceback[-1]
    assert Path(last.path).name == "__init__.py" and last.frame.code.name == "forward"
    assert signal.getsignal(signal.SIGTERM) == before
