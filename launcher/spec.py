"""Frozen, typed description of a training job: the schema of the YAML config.

Units live in field names (`time_min`, `mem_gb`, `shm_gb`). Validation of types and
bounds is driven from here by `schema.py`; cross-field rules live in `problems()`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

Problems = Iterator[tuple[str, str]]

BUILTIN_MODELS = ("mlp", "cnn", "transformer")
CALLABLE_PATTERN = r"[A-Za-z_][\w.]*:[A-Za-z_]\w*"
CALLABLE_HELP = "'package.module:function'"


def _meta(**kw: Any) -> dict[str, Any]:
    return kw


@dataclass(frozen=True)
class EntrypointSpec:
    """What runs in every process: a script, a callable, or (neither) the built-in trainer."""

    script: str | None = None
    args: tuple[str, ...] = ()
    callable: str | None = field(
        default=None, metadata=_meta(pattern=CALLABLE_PATTERN, pattern_help=CALLABLE_HELP)
    )
    # Interpreter for the job's processes; null: the one running `launcher`. It needs only
    # what the script imports: launcher's own wrappers run with launcher's interpreter.
    python: str | None = None
    # The signal every process gets before preemption and the time limit (Slurm), and on
    # `launcher cancel` / Ctrl-C (local, Docker), `stop_grace_s` before SIGKILL. auto: USR2
    # for the built-in trainer; on Slurm USR1 for a script that imports Lightning (its
    # auto-requeue saves hpc_ckpt_*.ckpt and resumes from it; to global rank 0 alone, TERM
    # blocked: `entrypoint.lightning_stop`); TERM otherwise. Written out: every rank.
    stop_signal: Literal["auto", "TERM", "USR1", "USR2", "INT"] = "auto"
    # Seconds to save after the stop signal; null: slurm.signal_delay_s - 10 (at least 10)
    # before the time limit on Slurm (preemption: the partition's GraceTime), and
    # local.stop_grace_s on local and Docker.
    stop_grace_s: float | None = field(default=None, metadata=_meta(min=0.0, max=3600.0))

    @property
    def kind(self) -> Literal["script", "callable", "trainer"]:
        if self.script:
            return "script"
        if self.callable:
            return "callable"
        return "trainer"

    def problems(self) -> Problems:
        if self.script and self.callable:
            yield "callable", "give either 'script' or 'callable', not both"
        if self.args and not self.script:
            yield "args", "args are only for a 'script' entrypoint"


@dataclass(frozen=True)
class ResourcesSpec:
    """What one job asks for. Processes per node default to GPUs per node (or 1 on CPU)."""

    nodes: int = field(default=1, metadata=_meta(min=1, max=4096))
    procs_per_node: int | None = field(default=None, metadata=_meta(min=1, max=1024))
    gpus_per_node: int = field(default=0, metadata=_meta(min=0, max=64))
    cpus_per_proc: int | None = field(default=None, metadata=_meta(min=1, max=1024))
    mem_gb: float | None = field(default=None, metadata=_meta(min=0.001))
    # Time limit in minutes; null: 60 on Slurm, no limit on local/Docker (there it applies
    # only when set: the ranks get entrypoint.stop_signal, SIGKILL after the grace).
    time_min: int | None = field(default=None, metadata=_meta(min=1))

    @property
    def tasks_per_node(self) -> int:
        return self.procs_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    def problems(self) -> Problems:
        if self.gpus_per_node and self.procs_per_node and self.procs_per_node > self.gpus_per_node:
            yield (
                "procs_per_node",
                f"more processes ({self.procs_per_node}) than GPUs per node "
                f"({self.gpus_per_node}): use one process per GPU",
            )


@dataclass(frozen=True)
class LoaderSpec:
    """DataLoader settings; null means "pick from the hardware where the job runs".

    num_workers: "auto" measures a few settings where the job runs (launcher.runtime.autotune),
    "rule" takes the fixed rule's pick unmeasured; null is "auto" for the built-in trainer
    (bench/loader_auto.py: 98-100% of a full grid's best where the rule reached 60-100%) and
    "rule" for a script or callable, whose loader the launcher does not build.
    """

    # Bounds in problems(): "auto" is not a number to compare.
    num_workers: int | Literal["auto", "rule"] | None = None
    pin_memory: bool | Literal["auto"] | None = None
    persistent_workers: bool | None = None
    prefetch_factor: int | None = field(default=None, metadata=_meta(min=1, max=64))
    # Size of one sample in bytes, to size shared memory for worker batches (docker shm).
    sample_bytes: int | None = field(default=None, metadata=_meta(min=1))
    # `auto`: seconds the race may take (its batches are training steps); null: 2% of
    # resources.time_min, between 10 and 120 s.
    measure_budget_s: float | None = field(default=None, metadata=_meta(min=0.0, max=3600.0))
    # `auto`: the dataset's identity for remembered results (e.g. a data version); null:
    # derived from the dataset's class, length and sample 0's shapes.
    fingerprint: str | None = None

    def problems(self) -> Problems:
        if isinstance(self.num_workers, int) and not 0 <= self.num_workers <= 256:
            yield "num_workers", f"expected 0 to 256, 'auto' or 'rule', got {self.num_workers}"


@dataclass(frozen=True)
class ParamGroupSpec:
    """Parameters whose name matches `pattern` (fnmatch) get their own lr / weight decay."""

    pattern: str = field(metadata=_meta(pattern=r".+", pattern_help="a non-empty name pattern"))
    lr: float | None = field(default=None, metadata=_meta(min=0.0))
    weight_decay: float | None = field(default=None, metadata=_meta(min=0.0))


@dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer of the built-in trainer and how parameters are grouped."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = field(default=1e-3, metadata=_meta(min=0.0))
    weight_decay: float = field(default=0.01, metadata=_meta(min=0.0))
    betas: tuple[float, ...] = (0.9, 0.999)
    momentum: float = field(default=0.9, metadata=_meta(min=0.0))
    # Parameter names containing one of these get no weight decay (biases and norms).
    no_decay: tuple[str, ...] = ("bias", "norm")
    # One-dimensional parameters (biases, norm scales such as `bn1.weight`) get no weight decay.
    no_decay_1d: bool = True
    # The first group whose pattern matches a parameter's name wins.
    groups: tuple[ParamGroupSpec, ...] = ()

    def problems(self) -> Problems:
        if len(self.betas) != 2:
            yield "betas", f"expected two numbers, got {len(self.betas)}"
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:
                yield f"betas[{i}]", f"must be >= 0 and < 1, got {beta!r}"


@dataclass(frozen=True)
class ScheduleSpec:
    """LR schedule over `train.steps`: linear warmup, then constant or cosine decay."""

    name: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int = field(default=0, metadata=_meta(min=0))
    # Cosine decays to lr * min_lr_ratio at the last step.
    min_lr_ratio: float = field(default=0.0, metadata=_meta(min=0.0, max=1.0))


COLLATES = ("auto", "default", "pad")


@dataclass(frozen=True)
class TrainSpec:
    """The built-in trainer: model, data, batch sizes, precision, checkpoints."""

    # A built-in model (mlp, cnn, transformer) or 'package.module:build_model'.
    model: str = "mlp"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # null: the model's own synthetic dataset; or 'package.module:build_dataset'.
    dataset: str | None = field(
        default=None, metadata=_meta(pattern=CALLABLE_PATTERN, pattern_help=CALLABLE_HELP)
    )
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    # auto: the dataset's `collate_fn` attribute, else the built-in model's, else default;
    # pad: dynamic padding (launcher.runtime.loader.pad_collate); or 'package.module:fn'.
    collate: str = "auto"
    # Call the model as model(**batch) for mapping batches (Hugging Face style).
    batch_as_kwargs: bool = False
    seed: int = field(default=0, metadata=_meta(min=0, max=2**32 - 1))
    deterministic: bool = False
    # Optimizer steps (each one global_batch_size samples).
    steps: int = field(default=100, metadata=_meta(min=1))
    global_batch_size: int = field(default=32, metadata=_meta(min=1))
    # Per process per micro step; null: global_batch_size / world_size (no accumulation).
    micro_batch_size: int | None = field(default=None, metadata=_meta(min=1))
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    grad_clip: float | None = field(default=None, metadata=_meta(min=0.0))
    # Submodule names (fnmatch patterns, e.g. 'encoder.layers.*') recomputed in backward.
    activation_checkpointing: tuple[str, ...] = ()
    checkpoint_every: int = field(default=50, metadata=_meta(min=1))
    keep_last: int = field(default=3, metadata=_meta(min=1))
    resume: bool = True
    # Console log every N steps (metrics.jsonl gets every step).
    log_every: int = field(default=10, metadata=_meta(min=1))
    # How long a collective (process group init, all-reduce) may wait for the other ranks.
    dist_timeout_s: int = field(default=1800, metadata=_meta(min=10))

    def problems(self) -> Problems:
        import re

        if ":" not in self.model and self.model not in BUILTIN_MODELS:
            yield (
                "model",
                f"expected one of {', '.join(BUILTIN_MODELS)} or {CALLABLE_HELP}, "
                f"got {self.model!r}",
            )
        elif ":" in self.model:
            if not re.fullmatch(CALLABLE_PATTERN, self.model):
                yield "model", f"expected {CALLABLE_HELP}, got {self.model!r}"
            elif self.dataset is None:
                yield "dataset", f"a custom model needs a dataset: {CALLABLE_HELP}"
        if self.collate not in COLLATES:
            if not re.fullmatch(CALLABLE_PATTERN, self.collate):
                yield (
                    "collate",
                    f"expected one of {', '.join(COLLATES)} or {CALLABLE_HELP}, "
                    f"got {self.collate!r}",
                )
        if self.micro_batch_size is not None:
            if self.micro_batch_size > self.global_batch_size:
                yield (
                    "micro_batch_size",
                    f"must be <= global_batch_size ({self.global_batch_size}), "
                    f"got {self.micro_batch_size}",
                )
            elif self.global_batch_size % self.micro_batch_size:
                yield (
                    "micro_batch_size",
                    f"must divide global_batch_size ({self.global_batch_size}), "
                    f"got {self.micro_batch_size}",
                )
        if self.schedule.warmup_steps > self.steps:
            yield (
                "schedule.warmup_steps",
                f"must be <= steps ({self.steps}), got {self.schedule.warmup_steps}",
            )
        for i, name in enumerate(self.activation_checkpointing):
            if not name.strip():
                yield f"activation_checkpointing[{i}]", "expected a submodule name pattern"


@dataclass(frozen=True)
class LocalSpec:
    """Processes on this machine."""

    master_addr: str = "127.0.0.1"
    # null: a free port picked at launch.
    master_port: int | None = field(default=None, metadata=_meta(min=1, max=65535))
    # How long ranks get after SIGTERM before SIGKILL when the run is stopped.
    stop_grace_s: float = field(default=5.0, metadata=_meta(min=0.0))


@dataclass(frozen=True)
class DockerSpec:
    """A container on this machine through the docker SDK."""

    image: str | None = None
    gpu_ids: tuple[str, ...] = ()
    # null: sized from the loader picks; or give it; or share the host's IPC namespace.
    shm_gb: float | None = field(default=None, metadata=_meta(min=0.001))
    ipc_host: bool = False
    # "host_path:container_path[:ro]"
    mounts: tuple[str, ...] = ()
    user: str | None = None
    cpus: float | None = field(default=None, metadata=_meta(min=0.01))
    network_host: bool = True
    workdir: str = "/workspace"
    auto_remove: bool = True


@dataclass(frozen=True)
class ContainerSpec:
    """Run the Slurm tasks in an image (backends/slurm/container.py); the batch shell, which
    decides requeues, stays on the host."""

    # pyxis: pyxis/enroot; apptainer: Apptainer/Singularity; oci: Slurm's own
    # `srun --container` with an oci.conf that calls runc or crun.
    runtime: Literal["pyxis", "apptainer", "oci"] = "pyxis"
    # null: the tag `launcher build` gives this project (same config, same image), converted
    # once per tag at submit. A path (/..., ./...): a ready-made .sqsh, .sif or OCI bundle.
    image: str | None = None
    # Where converted images are cached, on storage every node sees; null: <runs_dir>/.images.
    cache_dir: str | None = None
    # "host_path:container_path[:ro]"; the run dir and workdir are mounted as well.
    mounts: tuple[str, ...] = ()
    workdir: str | None = None
    # Interpreter inside the image.
    python: str = "python3"


@dataclass(frozen=True)
class SlurmSpec:
    """sbatch settings, passed through submitit's SlurmExecutor."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    # Extra `#SBATCH --key=value` lines.
    extra: dict[str, str] = field(default_factory=dict)
    # Shell lines run before the tasks start (module load, venv activate), verbatim.
    setup: tuple[str, ...] = ()
    srun_args: tuple[str, ...] = ()
    max_requeue: int = field(default=3, metadata=_meta(min=0, max=100))
    # Slurm signals the batch shell (USR2) this long before the time limit; its host task
    # then sends entrypoint.stop_signal to every rank so the job can checkpoint.
    signal_delay_s: int = field(default=90, metadata=_meta(min=0))
    container: ContainerSpec | None = None
    # Sweeps: max running array tasks (%N) and the cluster's MaxArraySize if known.
    array_parallelism: int | None = field(default=None, metadata=_meta(min=1))
    max_array_size: int | None = field(default=None, metadata=_meta(min=1))


@dataclass(frozen=True)
class ImageSpec:
    """The training image built from docker/ by `launcher build`."""

    repository: str = "launcher-train"
    base_image: str | None = None
    dockerfile: str = "docker/Dockerfile"
    build_args: dict[str, str] = field(default_factory=dict)
    wheelhouse: str | None = None
    ca_cert: str | None = None
    registry: str | None = None


@dataclass(frozen=True)
class DataSourceSpec:
    """One dataset file or folder: from Google Drive, an http(s) URL, or a local path.

    Fetched into `<cache_dir>/<name>/` (a file keeps its name there; an archive with
    `extract: true` or a Drive folder becomes that folder's content).
    """

    name: str = field(
        metadata=_meta(
            pattern=r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}",
            pattern_help="a name of at most 200 letters, digits, '.', '_' or '-'",
        )
    )
    # A Drive file or folder id, or a drive.google.com link (fetched through gdown).
    gdrive: str | None = None
    url: str | None = field(
        default=None, metadata=_meta(pattern=r"https?://\S+", pattern_help="an http(s):// URL")
    )
    # A file or folder on this machine (relative: to the config file's folder).
    path: str | None = None
    sha256: str | None = field(
        default=None, metadata=_meta(pattern=r"[0-9a-fA-F]{64}", pattern_help="64 hex digits")
    )
    md5: str | None = field(
        default=None, metadata=_meta(pattern=r"[0-9a-fA-F]{32}", pattern_help="32 hex digits")
    )
    # Unpack a zip or tar(.gz/.bz2/.xz) archive; the source's path is then the folder.
    extract: bool = False
    # The Drive id is a folder (implied by a .../drive/folders/... link).
    folder: bool = False
    # File name to store under; null: from the URL or from Drive.
    filename: str | None = field(
        default=None,
        metadata=_meta(
            # One path component: no separators or control characters, at most 255 bytes'
            # worth of characters (data/paths.py checks the bytes again when it joins).
            pattern=r"(?!\.{1,2}$)[^/\\\x00-\x1f\x7f]{1,255}",
            pattern_help="a file name without '/', '\\' or control characters, not '.' or '..'",
        ),
    )

    # Not fields (no annotation): how a Drive id and a Drive link look.
    DRIVE_ID = r"[-\w]{10,}"
    DRIVE_URL = (
        r"https?://(?:drive|docs)\.google\.com/(?:"
        r"(?:file/(?:u/\d+/)?d/|drive/(?:u/\d+/)?folders/)(?P<path_id>[-\w]{10,})"
        r"|.*[?&]id=(?P<query_id>[-\w]{10,}))"
    )

    @staticmethod
    def drive_id(value: str) -> tuple[str, bool] | None:
        """Drive id and "is a folder" from an id or a drive.google.com link; None if neither.

        A regex, not gdown, so validating a config and `--help` stay fast.
        """
        import re

        value = value.strip()
        if re.fullmatch(DataSourceSpec.DRIVE_ID, value):
            return value, False
        match = re.match(DataSourceSpec.DRIVE_URL, value)
        if not match:
            return None
        return match["path_id"] or match["query_id"], "/folders/" in value

    @property
    def is_folder(self) -> bool:
        found = self.drive_id(self.gdrive) if self.gdrive else None
        return self.folder or bool(found and found[1])

    def problems(self) -> Problems:
        given = [k for k in ("gdrive", "url", "path") if getattr(self, k)]
        if len(given) != 1:
            yield "gdrive", "give exactly one of 'gdrive', 'url' or 'path'"
            return
        if self.gdrive and self.drive_id(self.gdrive) is None:
            yield (
                "gdrive",
                f"expected a Google Drive id or a drive.google.com link, got {self.gdrive!r}",
            )
        if self.folder and not self.gdrive:
            yield "folder", "'folder: true' is for a 'gdrive' folder id"
        if self.is_folder and (self.sha256 or self.md5):
            yield "sha256", "a checksum is for one file, not a Drive folder"
        if self.is_folder and self.extract:
            yield "extract", "'extract' is for an archive file, not a Drive folder"
        if self.filename and (self.path or self.is_folder):
            yield "filename", "'filename' is for a downloaded file ('gdrive' file or 'url')"
        if self.filename in (".", ".."):
            yield "filename", f"expected a file name, got {self.filename!r}"


@dataclass(frozen=True)
class DataSpec:
    """Data every node needs before training: fetched once per cache, checksummed."""

    sources: tuple[DataSourceSpec, ...] = ()
    # Relative: to the config file's folder. Put it on a shared filesystem to fetch once
    # per cluster, or on node-local disk to fetch once per node.
    cache_dir: str = "~/.cache/launcher/data"
    # Fetch (or check the cache) in the job before training starts.
    fetch_at_start: bool = True
    # Extra attempts after a failed download, waiting backoff_s, 2x, 4x ... (max 60 s).
    retries: int = field(default=3, metadata=_meta(min=0, max=20))
    backoff_s: float = field(default=2.0, metadata=_meta(min=0.0, max=600.0))
    # Seconds without a byte from the server before an attempt counts as failed.
    timeout_s: float = field(default=60.0, metadata=_meta(min=0.1))
    # Re-hash cached files on every fetch (slow for big files; catches bit rot on the cache).
    rehash: bool = False

    def problems(self) -> Problems:
        seen: set[str] = set()
        for i, source in enumerate(self.sources):
            if source.name in seen:
                yield f"sources[{i}].name", f"duplicate source name {source.name!r}"
            seen.add(source.name)


@dataclass(frozen=True)
class JobSpec:
    """A whole job. Built by `config.load`; never mutated (plans return new objects)."""

    # Any text (it is quoted wherever it goes); folders use a slug of it.
    name: str = field(metadata=_meta(pattern=r"(?s).*\S.*", pattern_help="a non-empty name"))
    entrypoint: EntrypointSpec = field(default_factory=EntrypointSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    backend: Literal["local", "docker", "slurm"] = "local"
    env: dict[str, str] = field(default_factory=dict)
    # Where the job's processes start (relative to the config file's folder); null: cwd.
    workdir: str | None = None
    runs_dir: str = "runs"
    loader: LoaderSpec = field(default_factory=LoaderSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    local: LocalSpec = field(default_factory=LocalSpec)
    docker: DockerSpec = field(default_factory=DockerSpec)
    slurm: SlurmSpec = field(default_factory=SlurmSpec)
    image: ImageSpec = field(default_factory=ImageSpec)
    data: DataSpec = field(default_factory=DataSpec)
    # Validated by sweep.py (its keys are dotted paths into this schema).
    sweep: dict[str, Any] | None = None

    def problems(self) -> Problems:
        for key in self.env:
            if not key.replace("_", "a").isalnum() or key[0].isdigit():
                yield f"env.{key}", "environment variable names are letters, digits and '_'"
