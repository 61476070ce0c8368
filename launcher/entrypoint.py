"""How a job's entrypoint becomes argv and environment for one process, on any backend.

Every backend starts the same commands with the same torchrun-style variables, so a
script that works locally works in Docker and on Slurm unchanged, and every backend's rank
starts a script through the same exit runner (`rank_argv`). Standard library only at import
time: Slurm's rank wrapper imports it on every task, in containers too.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from launcher.hardware import LoaderPicks
    from launcher.spec import JobSpec

# Set by the launcher for every process; documented in the README.
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# How a rank runs a script: as `python script.py` does, but once the script is done it leaves
# the way multiprocessing's children do (threading._shutdown: threading atexits such as an
# executor's, then non-daemon threads joined; atexit run; files flushed; then os._exit)
# instead of finalizing the interpreter. A native thread the script left behind (a gloo
# worker dropping a finished collective that holds a Python object) can then never take the
# GIL during finalization, where CPython < 3.14 ends it with pthread_exit and the C++
# unwinding aborts the rank ("terminate called without an active exception"). An exception
# other than SystemExit still exits through the interpreter (traceback and exit code 1 as
# python gives them). Standard library only: it runs under the job's interpreter, which may
# not have launcher.
RANK_MAIN = """\
import atexit, builtins, gc, io, os, runpy, sys, threading, types
from importlib.machinery import SourceFileLoader
sys.argv = sys.argv[1:]
main = types.ModuleType("__main__")  # the globals python gives a script or a -m module
main.__dict__["__builtins__"] = builtins
if sys.argv[0] == "-m":  # python -m MODULE ARGS, as python runs it (sys.argv[0] its file)
    del sys.argv[0]
    sys.path[0] = os.getcwd()
    sys.modules["__main__"] = main
    source = None
    run = lambda: runpy._run_module_as_main(sys.argv[0])
else:
    path = os.path.abspath(sys.argv[0])
    try:
        with io.open_code(path) as fh:
            source = fh.read()
    except OSError as exc:  # as python says it, with its exit code
        print(f"{sys.executable}: can't open file {path!r}: [Errno {exc.errno}] {exc.strerror}",
              file=sys.stderr)
        os._exit(2)
    del fh
    sys.path[0] = os.path.dirname(os.path.realpath(path))  # as python sets it
    main.__dict__.update(__file__=path, __cached__=None,
                         __loader__=SourceFileLoader("__main__", path))
    sys.modules["__main__"] = main
    run = lambda: exec(compile(source, path, "exec", dont_inherit=True), main.__dict__)
try:
    run()
    code = 0
except SystemExit as exc:
    code = exc.code
del source
threading._shutdown()
atexit._run_exitfuncs()
main.__dict__.clear()  # as finalization does: the script's objects go, its files close
gc.collect()
for kind in (io.TextIOBase, io.BufferedIOBase):  # files left open elsewhere: flushed
    for obj in gc.get_objects():
        if issubclass(type(obj), kind):  # type(): no __class__ lookup (it may warn)
            try:
                obj.flush()
            except Exception:
                pass
if code is not None and not isinstance(code, int):
    print(code, file=sys.stderr)
    code = 1
for stream in (sys.stdout, sys.stderr):
    try:
        stream.flush()
    except (AttributeError, OSError, ValueError):
        pass
os._exit((code or 0) & 0xFF)
"""


def rank_argv(argv: list[str]) -> list[str]:
    """What a rank really starts (local and Docker supervisor, Slurm's rank wrapper):
    `python script.py ARGS` becomes `python -c RANK_MAIN script.py ARGS`, and `python -m
    MODULE ARGS` (the built-in trainer, a callable) `python -c RANK_MAIN -m MODULE ARGS`;
    anything else (interpreter options, an executable) runs as planned."""
    if len(argv) >= 2 and not argv[1].startswith("-") and argv[1].endswith(".py"):
        return [argv[0], "-c", RANK_MAIN, *argv[1:]]
    if len(argv) >= 3 and argv[1] == "-m":
        return [argv[0], "-c", RANK_MAIN, *argv[1:]]
    return argv


def exit_note(argv: list[str]) -> str | None:
    """What a dry-run says about how a rank of `argv` leaves; None when it runs as planned."""
    if rank_argv(argv) is argv:
        return None
    return (
        "the rank runs through launcher's exit runner (entrypoint.RANK_MAIN): threads "
        "joined, atexit handlers, then os._exit, never interpreter finalization"
    )


def python_for(spec: JobSpec) -> str:
    """The interpreter of the job: the configured one, else the one running launcher."""
    return spec.entrypoint.python or sys.executable


def entry_argv(spec: JobSpec, python: str | None = None) -> list[str]:
    """argv of one process: the user's script, the callable runner, or the built-in trainer."""
    py = python or python_for(spec)
    ep = spec.entrypoint
    if ep.kind == "script":
        return [py, ep.script or "", *ep.args]
    if ep.kind == "callable":
        return [py, "-m", "launcher.call", ep.callable or ""]
    return [py, "-m", "launcher.runtime"]


def dist_env(
    *,
    rank: int,
    local_rank: int,
    world_size: int,
    local_world_size: int,
    master_addr: str,
    master_port: int | str,
) -> dict[str, str]:
    """The torchrun-style variables for one process."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(local_world_size),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
    }


def job_env(spec: JobSpec, *, run_dir: Path | str, picks: LoaderPicks | None) -> dict[str, str]:
    """Variables every process of the job gets: the user's env, run paths, loader picks."""
    env = {
        "LAUNCHER_RUN_DIR": str(run_dir),
        "LAUNCHER_CONFIG": str(Path(run_dir) / "config.yaml"),
        "LAUNCHER_JOB_NAME": spec.name,
        # Reproducible hashing in every rank (seeding also covers random/numpy/torch).
        "PYTHONHASHSEED": str(spec.train.seed),
        # Unbuffered output, so logs show progress as it happens and survive a kill.
        "PYTHONUNBUFFERED": "1",
    }
    if picks is not None:
        env.update(picks.as_env())
    env.update(spec.env)
    return env


# Imports that mean "a Lightning Trainer script": its auto-requeue listens for SIGUSR1 on Slurm
# (lightning.fabric alone has no such handler).
_LIGHTNING = ("pytorch_lightning", "lightning.pytorch")
# ... when the same file also names one of these: a script that takes only a helper from
# Lightning (`from lightning.pytorch import seed_everything`) and saves on SIGTERM itself must
# get TERM (USR1 would kill it).
_TRAINER_NAMES = ("Trainer", "LightningCLI")
# At most this many of the project's own files are read to find a Lightning Trainer.
LIGHTNING_SCAN_FILES = 64


def _imported(node: object, here: Path) -> tuple[list[str], Path | None]:
    """The dotted names an import statement may load (`from m import x`: m and m.x), and the
    folder a relative import starts from (None for an absolute one)."""
    import ast

    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names], None
    if not isinstance(node, ast.ImportFrom):
        return [], None
    module = node.module or ""
    names = [module, *(f"{module}.{a.name}" if module else a.name for a in node.names)]
    base = None
    if node.level:
        base = here.parent
        for _ in range(node.level - 1):
            base = base.parent
    return [n for n in names if n], base


def _local_files(names: list[str], bases: list[Path]) -> list[Path]:
    """The project's own files those names are (found under `bases`); never anything
    installed."""
    found = []
    for name in names:
        rel = Path(*name.split("."))
        for base in bases:
            for candidate in (base / f"{rel}.py", base / rel / "__init__.py"):
                if candidate.is_file():
                    found.append(candidate)
    return found


def _names_trainer(node: object) -> bool:
    """Is this node the name `Trainer` / `LightningCLI` (a name, an attribute, an import)?"""
    import ast

    if isinstance(node, ast.Name):
        return node.id in _TRAINER_NAMES
    if isinstance(node, ast.Attribute):
        return node.attr in _TRAINER_NAMES
    if isinstance(node, ast.alias):
        return node.name.rpartition(".")[2] in _TRAINER_NAMES
    return False


def imports_lightning(path: str | Path, roots: list[Path] | None = None) -> bool:
    """`_scan_for_lightning`, once per file version: a plan asks for the stop signal in
    several places (the rank wrapper, the dry-run text), a sweep once per point."""
    try:
        mtime = Path(path).stat().st_mtime_ns
    except OSError:
        return False
    return _scan_for_lightning(str(path), tuple(str(r) for r in roots or ()), mtime)


@functools.lru_cache(maxsize=64)
def _scan_for_lightning(path: str, roots: tuple[str, ...], _mtime_ns: int) -> bool:
    """Does this Python file, or a module of the project's own that it imports (found under
    `roots`, and next to the file; at most LIGHTNING_SCAN_FILES files), run Lightning's
    Trainer: import Lightning's Trainer package and name `Trainer` (or `LightningCLI`) in the
    same file? Parsed with `ast`, never run; a file that cannot be read or parsed counts as
    not."""
    import ast

    start = Path(path)
    bases = [start.parent, *map(Path, roots)]
    queue, seen = [start], set[Path]()
    while queue and len(seen) < LIGHTNING_SCAN_FILES:
        current = queue.pop(0)
        key = current.resolve()
        if key in seen:
            continue
        seen.add(key)
        try:
            tree = ast.parse(current.read_bytes())
        except (OSError, SyntaxError, ValueError):
            continue
        lightning = trainer = False
        for node in ast.walk(tree):
            trainer = trainer or _names_trainer(node)
            names, relative_to = _imported(node, current)
            if relative_to is None:  # `from . import x` is never Lightning itself
                lightning = lightning or any(
                    n == "lightning" or n.startswith(_LIGHTNING) for n in names
                )
            queue += _local_files(names, [relative_to] if relative_to else bases)
        if lightning and trainer:
            return True
    return False


def entry_file(spec: JobSpec) -> Path | None:
    """The file the entrypoint runs (a script, or a callable's module found under workdir);
    None for the built-in trainer or when it is not found here."""
    ep, workdir = spec.entrypoint, Path(spec.workdir or ".")
    if ep.kind == "script" and ep.script:
        return workdir / ep.script
    if ep.kind == "callable" and ep.callable:
        module = ep.callable.partition(":")[0].replace(".", "/")
        for candidate in (workdir / f"{module}.py", workdir / module / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def stop_signal(spec: JobSpec, *, slurm_env: bool = False) -> str:
    """The signal the job's processes get to stop and save (`entrypoint.stop_signal`, auto
    resolved): USR2 for the built-in trainer; USR1 for Lightning when the ranks run in a
    Slurm job (`slurm_env`: its SLURMEnvironment saves an HPC checkpoint and requeues on
    USR1; without Slurm's variables it has no USR1 handler, and USR1 would kill it); TERM
    for everything else."""
    ep = spec.entrypoint
    if ep.stop_signal != "auto":
        return ep.stop_signal
    if ep.kind == "trainer":
        return "USR2"
    found = entry_file(spec)
    if slurm_env and found is not None and imports_lightning(found, [Path(spec.workdir or ".")]):
        return "USR1"
    return "TERM"


def lightning_stop(spec: JobSpec, *, slurm_env: bool = False) -> bool:
    """Does this job stop the Lightning way (`stop_signal` auto, a Lightning script, in a Slurm
    job)? Then USR1 goes to global rank 0 alone and Slurm's own TERM is blocked in the ranks:
    Lightning's USR1 and TERM handlers run a collective (a barrier after saving, a broadcast)
    from inside the handler, wherever the rank is. A rank that handles it first while another
    waits in the gradient all-reduce pairs a barrier with an all-reduce, and the ranks hang
    before rank 0 saves (1 run in 2 under load). Rank 0 alone writes a DDP checkpoint: once it
    handles USR1 it saves before any collective, the others train on until Slurm's SIGKILL.
    An explicit `entrypoint.stop_signal: USR1` sends it to every rank (a strategy that saves
    on every rank: FSDP, DeepSpeed)."""
    return (
        spec.entrypoint.stop_signal == "auto" and stop_signal(spec, slurm_env=slurm_env) == "USR1"
    )


def stop_grace_s(spec: JobSpec, default: float) -> float:
    """Seconds the processes get after the stop signal before SIGKILL: `entrypoint.stop_grace_s`,
    else the backend's `default`."""
    if spec.entrypoint.stop_grace_s is not None:
        return spec.entrypoint.stop_grace_s
    return default
