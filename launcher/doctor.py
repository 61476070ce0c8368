"""`launcher doctor [CONFIG]`: every preflight check and slower ones, as a table or JSON.

The slower ones: the job's interpreter importing torch (version, CUDA build, GPUs it sees),
the Slurm controller and accounting (status needs sacct), the network interface distributed
init would use, the Docker engine's version and runtimes, /dev/shm and memory against the
loader picks. A backend the config does not use is still reported, its failures as warnings.

Above the backends: it asks each backend's doctor module for its environment checks.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import IO, TYPE_CHECKING, Any

from launcher.backends.base import Check, Plan
from launcher.preflight import network_check, run_checks, shm_memory_checks, torch_check
from launcher.spec import JobSpec

if TYPE_CHECKING:
    from launcher.backends.base import Backend


def doctor_checks(
    spec: JobSpec | None, plan: Plan[Any] | None, backend: Backend | None
) -> list[Check]:
    """Preflight (when a config is given) and the slower checks of this machine."""
    from launcher.backends import docker_preflight
    from launcher.backends.slurm import preflight as slurm_preflight
    from launcher.entrypoint import python_for

    checks: list[Check] = []
    modules = {"slurm": slurm_preflight, "docker": docker_preflight}
    uses = spec.backend if spec else None
    if plan is not None and backend is not None:
        module = modules.get(uses or "")
        if module is not None and not hasattr(backend, "preflight"):
            # A backend whose preflight method is not wired yet: its module's checks.
            checks += module.preflight(plan)
        else:
            checks += run_checks(backend, plan)
    python = python_for(spec) if spec else sys.executable
    checks.append(torch_check(python))
    for name, module in modules.items():
        used = uses == name
        found = module.doctor_checks(spec if used else None)
        if uses is not None and not used:
            # Another backend's environment: reported, but no reason to fail this config.
            found = [c if c.status != "fail" else _as_warning(c) for c in found]
        checks += found
    if not any(c.name == "network.interface" for c in checks):
        addr = spec.local.master_addr if spec else "127.0.0.1"
        checks.append(network_check(addr, spec.env if spec else {}, what="local.master_addr"))
    checks += shm_memory_checks(spec or JobSpec(name="doctor"))
    return checks


def _as_warning(check: Check) -> Check:
    return Check(check.name, "warn", check.found, check.fix, check.file, check.key)


def render_table(checks: Sequence[Check]) -> str:
    """CHECK STATUS FOUND FIX, one row per check; long cells wrap under their column."""
    import textwrap

    width = max([len("CHECK"), *(len(c.name) for c in checks)])
    lines = [f"{'CHECK':<{width}}  {'STATUS':<6}  FOUND / FIX"]
    for c in checks:
        text = c.found if not c.fix else f"{c.found} -> fix: {c.fix}"
        if c.key and c.status != "ok":
            text = f"[{c.key}] {text}"
        wrapped = textwrap.wrap(text, 100 - width - 10) or [""]
        lines.append(f"{c.name:<{width}}  {c.status:<6}  {wrapped[0]}")
        lines += [f"{'':<{width}}  {'':<6}  {more}" for more in wrapped[1:]]
    return "\n".join(lines)


def doctor(
    config_file: str | None,
    overrides: Sequence[str] = (),
    *,
    as_json: bool = False,
    out: IO[str] | None = None,
) -> int:
    """`launcher doctor [CONFIG] [OVERRIDES] [--json]`: a table (or JSON) of every check;
    exit 0 when nothing fails, else 2."""
    from launcher import config, runs
    from launcher.backends import get_backend

    stream = out if out is not None else sys.stdout
    spec = plan = backend = None
    if config_file:
        loaded = config.load(config_file, list(overrides))
        spec = loaded.spec
        backend = get_backend(spec.backend)
        run_id = runs.new_run_id()
        plan = backend.plan(
            spec,
            run_id=run_id,
            run_dir=runs.run_dir_for(spec.runs_dir, spec.name, run_id),
            config_file=loaded.file,
        )
    checks = doctor_checks(spec, plan, backend)
    if as_json:
        print(json.dumps([asdict(c) for c in checks], indent=2), file=stream)
    else:
        print(render_table(checks), file=stream)
        fails = sum(c.status == "fail" for c in checks)
        warns = sum(c.status == "warn" for c in checks)
        print(f"\n{len(checks)} checks: {fails} failed, {warns} warnings", file=stream)
    return 2 if any(c.status == "fail" for c in checks) else 0
