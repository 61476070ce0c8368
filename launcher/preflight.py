"""Preflight: mistakes caught before anything reaches a queue, a daemon or a run folder.

`before_submit` runs the backend's `preflight` (which includes `job_checks`, the checks every
backend shares) between `plan()` and `submit()`: a failed check is one line naming the file,
the key, what was found and how to fix it (exit 2), warnings print and the submit goes on.
The job checks read only files: the entrypoint script under the job's working folder, a
callable's module (found without importing it, so no user code runs) and its function (read
from the module's syntax tree), the working folder, the job's interpreter, the run folder,
and data sources without a checksum.

The slower checks `launcher doctor` adds (torch in the job's interpreter, the network
interface, /dev/shm and memory) are here too; `launcher.doctor` puts them together.

Below the backends (they import it for `Check` and `job_checks`): it reaches a backend only
through the object it is given.
"""

from __future__ import annotations

import ast
import difflib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib.machinery import PathFinder
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from launcher.errors import LauncherError
from launcher.spec import JobSpec

if TYPE_CHECKING:
    from launcher.backends.base import Backend, Plan

# How long the job's own interpreter may take to look a module up (a cold NFS venv).
FIND_TIMEOUT_S = 20.0
# Doctor: importing torch from a cold cache can take a while.
TORCH_TIMEOUT_S = 180.0
SKIP_FLAG = "--no-preflight"


CheckStatus = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class Check:
    """One preflight (or `launcher doctor`) finding: what was checked, how it went, what was
    found and how to fix it, and where in the config (file, dotted key) the fix goes."""

    name: str
    status: CheckStatus
    found: str
    fix: str = ""
    file: str | None = None
    key: str | None = None

    def line(self) -> str:
        """The one line a failed submit prints: file, key, what was found, how to fix it."""
        where = self.file or "<config>"
        if self.key:
            where = f"{where}: {self.key}"
        text = f"{where}: {self.found}"
        if self.fix:
            text = f"{text} ({self.fix})"
        return " ".join(text.split())


class PreflightFailed(LauncherError):
    """A preflight check failed: nothing was submitted. The message is the first failure's
    one line (and how many more there are)."""

    exit_code = 2

    def __init__(self, failures: Sequence[Check]) -> None:
        self.failures = list(failures)
        text = failures[0].line()
        if len(failures) > 1:
            text += f" [and {len(failures) - 1} more failed check(s): see `launcher doctor`]"
        super().__init__(text)


# --- running the checks ----------------------------------------------------------------


def run_checks(backend: Backend, plan: Plan[Any], *, points: int = 1) -> list[Check]:
    """The backend's preflight for this plan (job checks included)."""
    method = getattr(backend, "preflight", None)
    if method is None:
        # A backend without checks of its own: the job's, as if it ran on this machine.
        from launcher.entrypoint import python_for

        return job_checks(plan, python=python_for(plan.spec))
    return list(method(plan, points=points))


def gate(checks: Iterable[Check], *, err: IO[str] | None = None) -> list[Check]:
    """Print the warnings; raise PreflightFailed when a check failed. Returns the checks."""
    checks = list(checks)
    out = err if err is not None else sys.stderr
    for check in checks:
        if check.status == "warn":
            print(f"launcher: warning: {check.line()}", file=out)
    failures = [c for c in checks if c.status == "fail"]
    if failures:
        raise PreflightFailed(failures)
    return checks


def before_submit(
    backend: Backend,
    plan: Plan[Any],
    *,
    points: int = 1,
    skip: bool = False,
    err: IO[str] | None = None,
) -> list[Check]:
    """The gate between plan() and submit(): `skip` is `--no-preflight`."""
    if skip:
        return []
    return gate(run_checks(backend, plan, points=points), err=err)


# --- the checks every backend shares ---------------------------------------------------


def job_checks(plan: Plan[Any], *, python: str | None) -> list[Check]:
    """Checks of the files the job needs, on this machine's filesystem.

    `python`: the job's interpreter when it runs from this machine's (or a shared)
    filesystem; None when it runs in an image, whose interpreter and site-packages cannot be
    looked at from here (then a module is looked for under the working folder only)."""
    spec, file = plan.spec, plan.config_file
    checks: list[Check] = []
    workdir = Path(spec.workdir or os.getcwd())
    checks.append(_workdir_check(workdir, file))
    workdir_ok = checks[-1].status != "fail"
    python_ok = True
    if python is not None and spec.entrypoint.python:
        checks.append(_python_check(spec.entrypoint.python, file))
        python_ok = checks[-1].status != "fail"
    ep = spec.entrypoint
    if workdir_ok and ep.kind == "script":
        checks.append(_script_check(ep.script or "", workdir, file))
    refs: list[tuple[str, str]] = []
    if ep.kind == "callable":
        refs.append(("entrypoint.callable", ep.callable or ""))
    elif ep.kind == "trainer":
        refs += [
            (f"train.{k}", getattr(spec.train, k))
            for k in ("model", "dataset", "collate")
            if ":" in (getattr(spec.train, k) or "")
        ]
    if workdir_ok and python_ok:
        for key, ref in refs:
            checks.append(callable_check(ref, key=key, workdir=workdir, python=python, file=file))
    checks.append(_runs_dir_check(plan, file))
    checks += list(_data_checks(spec, file))
    return checks


def _closest(word: str, choices: Iterable[str]) -> str | None:
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return found[0] if found else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = _closest(word, choices)
    return f"did you mean {close!r}?" if close else ""


def _listing(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir())
    except OSError:
        return []


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def _workdir_check(workdir: Path, file: str | None) -> Check:
    if workdir.is_dir():
        return Check("workdir", "ok", f"{workdir} exists", file=file, key="workdir")
    if workdir.exists():
        return Check(
            "workdir", "fail", f"{workdir} is not a folder", "give the job's folder",
            file=file, key="workdir",
        )  # fmt: skip
    parent = _nearest_existing(workdir.parent)
    close = did_you_mean(workdir.name, _listing(parent)) if parent == workdir.parent else ""
    return Check(
        "workdir",
        "fail",
        f"working folder {workdir} does not exist",
        " ".join(filter(None, [close, "relative paths are relative to the config's folder"])),
        file=file,
        key="workdir",
    )


def _python_check(python: str, file: str | None) -> Check:
    key = "entrypoint.python"
    found = shutil.which(python) if os.sep not in python else python
    if found and os.path.isfile(found) and os.access(found, os.X_OK):
        return Check(key, "ok", f"{python} is an executable", file=file, key=key)
    what = "is not on PATH" if os.sep not in python else "does not exist or is not executable"
    return Check(
        key,
        "fail",
        f"interpreter {python!r} {what}",
        f"give the job's python (e.g. {sys.executable}), or leave it out to use launcher's",
        file=file,
        key=key,
    )


def _script_check(script: str, workdir: Path, file: str | None) -> Check:
    key = "entrypoint.script"
    path = Path(script) if os.path.isabs(script) else workdir / script
    if path.is_file():
        return Check(key, "ok", f"{path} exists", file=file, key=key)
    if path.is_dir():
        return Check(
            key, "fail", f"{path} is a folder, not a script", "name the .py file to run",
            file=file, key=key,
        )  # fmt: skip
    folder = _nearest_existing(path.parent)
    names = [n for n in _listing(folder) if n.endswith(".py") or (folder / n).is_file()]
    close = _closest(path.name, names) if folder == path.parent else None
    if close:
        shown = close if os.path.isabs(script) else os.path.relpath(folder / close, workdir)
        fix = f"did you mean {shown!r}?"
    elif folder != path.parent:
        fix = f"{folder} has no folder {path.parent.relative_to(folder).parts[0]!r}"
    else:
        fix = f"scripts are found under workdir {workdir}"
    return Check(
        key, "fail", f"script {script!r} not found under {workdir}", fix, file=file, key=key
    )


def _runs_dir_check(plan: Plan[Any], file: str | None) -> Check:
    key = "runs_dir"
    run_dir = Path(plan.run_dir)
    base = _nearest_existing(run_dir)
    if base == run_dir and run_dir.is_dir():
        return Check(key, "ok", f"{run_dir} exists", file=file, key=key)
    if not base.is_dir():
        return Check(
            key,
            "fail",
            f"cannot make the run folder {run_dir}: {base} is a file, not a folder",
            "set runs_dir to a folder",
            file=file,
            key=key,
        )
    if not os.access(base, os.W_OK | os.X_OK):
        return Check(
            key,
            "fail",
            f"cannot make the run folder {run_dir}: {base} is not writable",
            "set runs_dir to a folder you can write",
            file=file,
            key=key,
        )
    return Check(key, "ok", f"{run_dir} can be made under {base}", file=file, key=key)


def _data_checks(spec: JobSpec, file: str | None) -> Iterator[Check]:
    for i, source in enumerate(spec.data.sources):
        key = f"data.sources[{i}]"
        if source.path and not os.path.exists(source.path):
            yield Check(
                f"{key}.path",
                "fail",
                f"data source {source.name!r}: {source.path} does not exist",
                "relative paths are relative to the config's folder",
                file=file,
                key=f"{key}.path",
            )
        if not (source.sha256 or source.md5) and not source.is_folder:
            yield Check(
                f"{key}.sha256",
                "warn",
                f"data source {source.name!r} has no checksum: a changed or truncated file "
                "would go unnoticed",
                "add sha256: (its value: sha256sum FILE)",
                file=file,
                key=f"{key}.sha256",
            )


# --- callables: found without running the user's code ----------------------------------

# Run by the job's interpreter when it is not this one: where the module is, without
# importing it (PathFinder, one package level at a time, so no __init__ runs).
_FIND_SCRIPT = r"""
import json, sys
from importlib.machinery import PathFinder
module, workdir = sys.argv[1], sys.argv[2]
path = [workdir, *sys.path[1:]]
origin, missing = None, None
parts = module.split(".")
for i in range(len(parts)):
    name = ".".join(parts[: i + 1])
    spec = PathFinder.find_spec(name, path)
    if spec is None:
        missing = name
        break
    if i < len(parts) - 1:
        path = list(spec.submodule_search_locations or [])
        if not path:
            missing = ".".join(parts[: i + 2])
            break
    origin = spec.origin
print(json.dumps({"origin": origin, "missing": missing}))
"""


def find_module(module: str, search: Sequence[str]) -> tuple[str | None, str | None, list[str]]:
    """(source file or None, the first dotted name not found or None, the folders that name
    was looked for in) for `module`, without executing any of its packages."""
    path = list(search)
    parts = module.split(".")
    origin: str | None = None
    for i in range(len(parts)):
        name = ".".join(parts[: i + 1])
        found = PathFinder.find_spec(name, path)
        if found is None:
            if i == 0 and name in sys.builtin_module_names:
                return None, None, path
            return None, name, path
        if i < len(parts) - 1:
            locations = list(found.submodule_search_locations or [])
            if not locations:
                return None, ".".join(parts[: i + 2]), []
            path = locations
        origin = found.origin
    return origin, None, path


def _module_names(folders: Iterable[str]) -> list[str]:
    """Importable names in these folders (for 'did you mean')."""
    names = []
    for folder in folders:
        for entry in _listing(Path(folder)):
            if entry.endswith(".py"):
                names.append(entry[:-3])
            elif (Path(folder) / entry).is_dir() and entry.isidentifier():
                names.append(entry)
    return names


def top_level_names(source: str) -> tuple[set[str], bool]:
    """Names a module defines at its top level, and whether it may define others we cannot
    see (`from x import *`, a module `__getattr__`)."""
    tree = ast.parse(source)
    names: set[str] = set()
    open_ended = False

    def visit(body: list[ast.stmt]) -> None:
        nonlocal open_ended
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
                if node.name == "__getattr__":
                    open_ended = True
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                if isinstance(node.target, ast.Name):
                    names.add(node.target.id)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    if alias.name == "*":
                        open_ended = True
                    else:
                        names.add(alias.asname or alias.name.split(".")[0])
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                visit(node.body)
                for extra in ("orelse", "finalbody"):
                    visit(getattr(node, extra, []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return names, open_ended


def callable_check(
    ref: str, *, key: str, workdir: Path, python: str | None, file: str | None
) -> Check:
    """`pkg.mod:fn`: the module is found (under workdir, then on the job's interpreter's path)
    and defines `fn` at its top level, read from its source: no user code runs."""
    module, _, attr = ref.partition(":")
    if python is None:
        origin, missing, looked = find_module(module, [str(workdir)])
        if missing:
            return Check(
                key,
                "warn",
                f"module {module!r} is not under workdir {workdir}; only the job's image can "
                "tell whether it has it",
                file=file,
                key=key,
            )
    elif _same_python(python):
        origin, missing, looked = find_module(module, [str(workdir), *sys.path[1:]])
    else:
        try:
            out = subprocess.run(
                [python, "-c", _FIND_SCRIPT, module, str(workdir)],
                capture_output=True,
                text=True,
                timeout=FIND_TIMEOUT_S,
                cwd=workdir,
            )
            answer = json.loads(out.stdout.strip().splitlines()[-1])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return Check(
                key,
                "warn",
                f"could not ask {python} where module {module!r} is",
                "check it with `launcher doctor`",
                file=file,
                key=key,
            )
        origin, missing, looked = answer["origin"], answer["missing"], [str(workdir)]
    if missing:
        close = did_you_mean(missing.rpartition(".")[2], _module_names(looked))
        where = f"under workdir {workdir}" if missing == module.split(".")[0] else ""
        return Check(
            key,
            "fail",
            f"no module {missing!r} {where} or on {python or 'the'} interpreter's path "
            f"(from {ref!r})",
            close or "install it, or put it under the job's working folder",
            file=file,
            key=key,
        )
    if not origin or not origin.endswith(".py"):
        shown = origin or "a namespace package"
        return Check(key, "ok", f"{module} found ({shown}); {attr} not read", file=file, key=key)
    try:
        names, open_ended = top_level_names(Path(origin).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError) as exc:
        why = f"line {exc.lineno}: {exc.msg}" if isinstance(exc, SyntaxError) else str(exc)
        return Check(
            key,
            "fail",
            f"cannot read module {module!r} ({origin}): {why}",
            "fix the module's source",
            file=file,
            key=key,
        )
    if attr in names or open_ended:
        return Check(key, "ok", f"{module}:{attr} defined in {origin}", file=file, key=key)
    public = sorted(n for n in names if not n.startswith("_"))
    return Check(
        key,
        "fail",
        f"module {module!r} ({origin}) defines no {attr!r}",
        did_you_mean(attr, public) or f"it defines: {', '.join(public[:8]) or 'nothing'}",
        file=file,
        key=key,
    )


def _same_python(python: str) -> bool:
    found = shutil.which(python) if os.sep not in python else python
    if not found:
        return False
    try:
        return os.path.samefile(found, sys.executable)
    except OSError:
        return False


# --- launcher doctor -------------------------------------------------------------------


def torch_check(python: str) -> Check:
    """The job's interpreter imports torch: version, CUDA build, GPUs it sees (slow)."""
    code = (
        "import json, torch; print(json.dumps({'version': torch.__version__, "
        "'cuda': torch.version.cuda, 'gpus': torch.cuda.device_count()}))"
    )
    try:
        out = subprocess.run(
            [python, "-c", code], capture_output=True, text=True, timeout=TORCH_TIMEOUT_S
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return Check(
            "python.torch", "fail", f"{python} did not run: {exc}", key="entrypoint.python"
        )
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no message"])[-1]
        return Check(
            "python.torch",
            "fail",
            f"{python} cannot import torch: {last}",
            f"{python} -m pip install torch",
            key="entrypoint.python",
        )
    info = json.loads(out.stdout.strip().splitlines()[-1])
    cuda = f"CUDA {info['cuda']}" if info["cuda"] else "CPU-only build"
    return Check(
        "python.torch",
        "ok",
        f"{python}: torch {info['version']} ({cuda}), sees {info['gpus']} GPU(s)",
    )


def _interfaces() -> dict[str, list[str]]:
    """Interface name -> its IPv4 addresses (`ip -o -4 addr`)."""
    try:
        out = subprocess.run(
            ["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=5
        ).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    found: dict[str, list[str]] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] == "inet":
            found.setdefault(parts[1], []).append(parts[3].split("/")[0])
    for _, name in socket.if_nameindex():
        found.setdefault(name, [])
    return found


def network_check(addr: str, env: dict[str, str], *, what: str) -> Check:
    """Which interface a connection to MASTER_ADDR leaves by (what gloo/NCCL will use unless
    GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME say otherwise), and that those exist."""
    interfaces = _interfaces()
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        name = env.get(var)
        if name and name.split(",")[0].lstrip("^=") not in interfaces:
            return Check(
                "network.interface",
                "fail",
                f"{var}={name}: no such interface here (have: {', '.join(sorted(interfaces))})",
                "set it to one of those, or drop it",
                key=f"env.{var}",
            )
    try:
        ip = socket.gethostbyname(addr)
    except OSError as exc:
        return Check(
            "network.interface",
            "fail",
            f"MASTER_ADDR {addr} ({what}) does not resolve: {exc}",
            "fix the node name or /etc/hosts",
        )
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((ip, 29500))
            local = sock.getsockname()[0]
    except OSError as exc:
        return Check(
            "network.interface", "fail", f"no route to MASTER_ADDR {addr} ({ip}): {exc}", ""
        )
    names = [n for n, addrs in interfaces.items() if local in addrs] or ["?"]
    return Check(
        "network.interface",
        "ok",
        f"distributed init to {addr} ({what}, {ip}) goes out through {names[0]} ({local})",
    )


def shm_memory_checks(spec: JobSpec) -> list[Check]:
    """/dev/shm and memory of this machine against the loader picks for the job's processes."""
    from launcher.hardware import detect, pick_loader, shm_bytes_needed

    hw = detect()
    procs = spec.resources.tasks_per_node
    picks = pick_loader(hw, procs, spec.loader)
    batch = spec.train.micro_batch_size or max(1, spec.train.global_batch_size // procs)
    sample = spec.loader.sample_bytes or 3 * 224 * 224 * 4
    need = shm_bytes_needed(picks, batch, sample, procs)
    gib = 1024**3
    checks = []
    shown = f"{procs} procs x {picks.num_workers} workers, batch {batch}, {sample} B/sample"
    if hw.shm_bytes is None:
        checks.append(Check("host.shm", "warn", "/dev/shm size unknown", ""))
    elif picks.num_workers and need > hw.shm_bytes:
        checks.append(
            Check(
                "host.shm",
                "warn",
                f"/dev/shm {hw.shm_bytes / gib:.1f} GiB < {need / gib:.1f} GiB the loader "
                f"picks need ({shown})",
                "fewer loader.num_workers or a smaller batch, or a bigger /dev/shm",
                key="loader.num_workers",
            )
        )
    else:
        checks.append(
            Check(
                "host.shm",
                "ok",
                f"/dev/shm {(hw.shm_bytes or 0) / gib:.1f} GiB; the loader picks need "
                f"{need / gib:.2f} GiB ({shown})",
            )
        )
    mem = hw.mem_bytes
    asked = spec.resources.mem_gb
    if mem is None:
        checks.append(Check("host.memory", "warn", "memory size unknown", ""))
    elif asked and asked * gib > mem:
        checks.append(
            Check(
                "host.memory",
                "warn",
                f"resources.mem_gb {asked:g} GB is more than this machine's "
                f"{mem / gib:.1f} GiB (fine for a cluster's nodes)",
                key="resources.mem_gb",
            )
        )
    else:
        checks.append(
            Check(
                "host.memory",
                "ok",
                f"memory {mem / gib:.1f} GiB; {hw.cpus} CPUs ({hw.cpus_source}); loader picks "
                f"{picks.num_workers} workers per process",
            )
        )
    return checks
