"""What the machine a job runs on can give its DataLoaders, and what to pick from that.

Pure standard library, no torch: the submit side uses it for
`launcher hw` and `--dry-run`, and the job side uses it where the job really runs.
GPUs are counted with `nvidia-smi -L` (or CUDA_VISIBLE_DEVICES), never by importing torch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from launcher.spec import LoaderSpec

# One worker per this many bytes of /dev/shm at least: each worker holds prefetch_factor
# batches in shared memory; below this we keep workers few rather than crash with a bus error.
SHM_PER_WORKER = 256 * 1024**2
MEM_PER_WORKER = 1 * 1024**3
MAX_WORKERS = 16
ENV_PREFIX = "LAUNCHER_"
AUTO = "auto"
RULE = "rule"


@dataclass(frozen=True)
class Hardware:
    """What this process may use; each number carries where it came from."""

    cpus: int
    cpus_source: str
    mem_bytes: int | None
    shm_bytes: int | None
    gpus: int
    gpu_names: tuple[str, ...] = ()
    gpus_source: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LoaderPicks:
    """DataLoader settings for one process, with the reason for each."""

    num_workers: int
    pin_memory: bool
    persistent_workers: bool
    prefetch_factor: int | None
    reasons: dict[str, str] = field(default_factory=dict)
    # `num_workers: auto`: the values above are the rule's, the first candidate of a
    # measurement (launcher.runtime.autotune) that the job makes where it runs.
    measure_workers: bool = False
    measure_pin: bool = False

    def as_env(self) -> dict[str, str]:
        """How scripts receive the picks (read them back with `picks_from_env`)."""
        env = {
            f"{ENV_PREFIX}NUM_WORKERS": str(self.num_workers),
            f"{ENV_PREFIX}PIN_MEMORY": "1" if self.pin_memory else "0",
            f"{ENV_PREFIX}PERSISTENT_WORKERS": "1" if self.persistent_workers else "0",
            f"{ENV_PREFIX}PREFETCH_FACTOR": str(self.prefetch_factor or 0),
        }
        if self.measure_workers or self.measure_pin:
            env[f"{ENV_PREFIX}LOADER_MEASURE"] = ",".join(
                name
                for name, on in (
                    ("num_workers", self.measure_workers),
                    ("pin_memory", self.measure_pin),
                )
                if on
            )
        return env

    def to_dict(self) -> dict:
        return asdict(self)


def _cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup CPU quota (v2 cpu.max or v1 cfs_quota), None if unlimited."""
    v2 = root / "cpu.max"
    try:
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            if quota == "max":
                return None
            return int(quota) / int(period)
        q = root / "cpu" / "cpu.cfs_quota_us"
        p = root / "cpu" / "cpu.cfs_period_us"
        if not q.is_file():
            q, p = (
                root / "cpu,cpuacct" / "cpu.cfs_quota_us",
                root / "cpu,cpuacct" / "cpu.cfs_period_us",
            )
        if q.is_file() and p.is_file():
            quota_us = int(q.read_text())
            if quota_us <= 0:
                return None
            return quota_us / int(p.read_text())
    except (OSError, ValueError):
        return None
    return None


def detect_cpus(
    environ: Mapping[str, str], cgroup_root: Path = Path("/sys/fs/cgroup")
) -> tuple[int, str]:
    """Usable CPUs: the smallest of affinity, cgroup quota and Slurm's allocation."""
    candidates: list[tuple[int, str]] = []
    try:
        candidates.append((len(os.sched_getaffinity(0)), "CPU affinity"))
    except (AttributeError, OSError):
        candidates.append((os.cpu_count() or 1, "os.cpu_count"))
    quota = _cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        candidates.append((max(1, int(quota)), f"cgroup CPU quota ({quota:g} CPUs)"))
    for var in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        value = environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            candidates.append((int(value), var))
            break
    return min(candidates, key=lambda c: c[0])


def detect_memory() -> int | None:
    """Memory this process may use: the cgroup limit if set, else the machine's total."""
    limits = []
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            limits.append(int(text))
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError):
        pass
    return min(limits) if limits else None


def detect_shm(path: str = "/dev/shm") -> int | None:
    try:
        return shutil.disk_usage(path).total
    except OSError:
        return None


def detect_gpus(environ: Mapping[str, str]) -> tuple[int, tuple[str, ...], str]:
    """GPUs visible to this process, from `nvidia-smi -L` narrowed by CUDA_VISIBLE_DEVICES."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return 0, (), "CUDA_VISIBLE_DEVICES hides all GPUs"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0, (), "no nvidia-smi on PATH"
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return 0, (), "nvidia-smi -L failed"
    names = tuple(
        line.split(":", 1)[1].split("(")[0].strip()
        for line in out.stdout.splitlines()
        if line.startswith("GPU ")
    )
    if visible is not None:
        count = min(len(names), len([v for v in visible.split(",") if v.strip()]))
        return count, names[:count], "nvidia-smi -L and CUDA_VISIBLE_DEVICES"
    return len(names), names, "nvidia-smi -L"


def detect(environ: Mapping[str, str] | None = None) -> Hardware:
    environ = os.environ if environ is None else environ
    cpus, cpus_source = detect_cpus(environ)
    gpus, names, gpus_source = detect_gpus(environ)
    return Hardware(
        cpus=cpus,
        cpus_source=cpus_source,
        mem_bytes=detect_memory(),
        shm_bytes=detect_shm(),
        gpus=gpus,
        gpu_names=names,
        gpus_source=gpus_source,
    )


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 1024**3:.1f} GiB"


def worker_cap(hw: Hardware, local_world_size: int) -> tuple[int, str]:
    """The most workers one process may get from memory, /dev/shm and MAX_WORKERS."""
    procs = max(1, local_world_size)
    caps = []
    if hw.mem_bytes is not None:
        caps.append((int(hw.mem_bytes // procs // MEM_PER_WORKER), f"memory {_gib(hw.mem_bytes)}"))
    if hw.shm_bytes is not None:
        caps.append(
            (int(hw.shm_bytes // procs // SHM_PER_WORKER), f"/dev/shm {_gib(hw.shm_bytes)}")
        )
    caps.append((MAX_WORKERS, f"at most {MAX_WORKERS} workers per process"))
    cap, what = min(caps, key=lambda c: c[0])
    return max(0, cap), what


def rule_workers(hw: Hardware, local_world_size: int) -> tuple[int, str]:
    """The fixed rule: 2 workers per CPU of each process, none under 2 CPUs, capped."""
    procs = max(1, local_world_size)
    per_proc = hw.cpus // procs
    # Measured on 2 CPUs (bench/loader_picks.py): one worker per spare CPU is no faster than
    # loading in the main process (moving batches between processes costs about what the
    # spare core gains), while 2 workers per CPU keep the cores busy through the copies.
    workers = 2 * per_proc if per_proc >= 2 else 0
    why = f"{hw.cpus} CPUs ({hw.cpus_source}) / {procs} processes = {per_proc} per process; " + (
        "2 workers per CPU" if per_proc >= 2 else "under 2 each: load in the main process"
    )
    cap, what = worker_cap(hw, procs)
    if cap < workers:
        workers, why = cap, f"{why}; capped by {what}"
    return workers, why


def worker_candidates(hw: Hardware, local_world_size: int) -> list[int]:
    """What `num_workers: auto` races: the rule's pick first, then 0, 1, CPUs/2, CPUs, 2xCPUs.

    Per process, within the memory and /dev/shm caps. A handful, not a grid: the bench
    (bench/loader_auto.py) finds the best of a full grid among these on its workloads.
    """
    procs = max(1, local_world_size)
    per_proc = max(1, hw.cpus // procs)
    rule, _ = rule_workers(hw, procs)
    cap, _ = worker_cap(hw, procs)
    out = [rule]
    for w in (0, 1, per_proc // 2, per_proc, 2 * per_proc):
        if w <= cap and w not in out:
            out.append(w)
    return out


def pick_loader(
    hw: Hardware,
    local_world_size: int,
    loader: LoaderSpec | None = None,
    *,
    uses_gpu: bool | None = None,
    trainer: bool = False,
) -> LoaderPicks:
    """Pick per-process DataLoader settings; explicit values in `loader` always win.

    Workers: two per CPU each process gets (none under two CPUs), capped by memory and
    /dev/shm per worker; measured instead with `auto`, which is the built-in trainer's
    default (`trainer`). Pinned memory only helps host-to-GPU copies.
    """
    loader = loader or LoaderSpec()
    procs = max(1, local_world_size)
    reasons: dict[str, str] = {}
    gpu = hw.gpus > 0 if uses_gpu is None else uses_gpu

    measure_workers = loader.num_workers == AUTO or (loader.num_workers is None and trainer)
    if isinstance(loader.num_workers, int) and not measure_workers:
        workers = loader.num_workers
        reasons["num_workers"] = "set in the config"
    else:
        workers, why = rule_workers(hw, procs)
        if measure_workers:
            why = f"measured where the job runs; first candidate and fallback: {why}"
        elif loader.num_workers == RULE:
            why = f"{why} (num_workers: rule)"
        reasons["num_workers"] = why

    measure_pin = False
    if isinstance(loader.pin_memory, bool):
        pin = loader.pin_memory
        reasons["pin_memory"] = "set in the config"
    else:
        pin = gpu
        # With `num_workers: auto` (or `pin_memory: auto`) a GPU job measures pinned against
        # pageable copies of its own batches; without a GPU there is nothing to measure.
        measure_pin = gpu and (measure_workers or loader.pin_memory == AUTO)
        reasons["pin_memory"] = (
            f"{hw.gpus} GPU(s): pinned host memory speeds up host-to-device copies"
            if gpu
            else "no GPU: pinning would only cost memory"
        )
        if measure_pin:
            reasons["pin_memory"] += " (measured where the job runs)"

    if loader.persistent_workers is not None:
        persistent = loader.persistent_workers and workers > 0
        reasons["persistent_workers"] = "set in the config"
    else:
        persistent = workers > 0
        reasons["persistent_workers"] = (
            "keep workers between epochs (no re-fork cost)" if workers else "no workers"
        )

    if loader.prefetch_factor is not None and workers > 0:
        prefetch: int | None = loader.prefetch_factor
        reasons["prefetch_factor"] = "set in the config"
    elif workers > 0:
        prefetch = 2
        reasons["prefetch_factor"] = (
            "2 batches per worker (PyTorch default), enough to hide loading"
        )
    else:
        prefetch = None
        reasons["prefetch_factor"] = "only used with workers"
    return LoaderPicks(workers, pin, persistent, prefetch, reasons, measure_workers, measure_pin)


def lightning_rule(hw: Hardware, local_world_size: int) -> int:
    """Lightning's suggestion (CPUs per process minus one), for comparison in the benches."""
    return max(0, hw.cpus // max(1, local_world_size) - 1)


def picks_from_env(environ: Mapping[str, str] | None = None) -> LoaderPicks | None:
    """The picks the launcher passed to this process, or None when not launched by it."""
    environ = os.environ if environ is None else environ
    key = f"{ENV_PREFIX}NUM_WORKERS"
    if key not in environ:
        return None
    prefetch = int(environ.get(f"{ENV_PREFIX}PREFETCH_FACTOR", "0")) or None
    measure = environ.get(f"{ENV_PREFIX}LOADER_MEASURE", "").split(",")
    return LoaderPicks(
        num_workers=int(environ[key]),
        pin_memory=environ.get(f"{ENV_PREFIX}PIN_MEMORY") == "1",
        persistent_workers=environ.get(f"{ENV_PREFIX}PERSISTENT_WORKERS") == "1",
        prefetch_factor=prefetch,
        reasons={"num_workers": "passed by the launcher"},
        measure_workers="num_workers" in measure,
        measure_pin="pin_memory" in measure,
    )


def shm_bytes_needed(
    picks: LoaderPicks,
    batch_size: int,
    sample_bytes: int,
    local_world_size: int,
    margin: float = 2.0,
) -> int:
    """Shared memory worker batches need: procs x workers x prefetch x batch bytes, with margin."""
    in_flight = max(1, picks.num_workers) * (picks.prefetch_factor or 1)
    return int(local_world_size * in_flight * batch_size * sample_bytes * margin)


def measured_loader(run_dir: str | Path, limit: int = 8 * 1024**2) -> dict | None:
    """The `loader` event (what `num_workers: auto` measured and chose) of a run, or None.

    For `launcher status RUN --json`, without torch. The event comes in the first steps, so
    only the head of metrics.jsonl is read; the last such event wins (a resumed run that
    measured again). A damaged line is skipped.
    """
    import json

    path = Path(run_dir) / "metrics.jsonl"
    found = None
    try:
        with open(path, "rb") as fh:
            head = fh.read(limit)
    except OSError:
        return None
    for line in head.splitlines():
        if b'"loader"' not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == "loader":
            found = record
    return found
