"""The `launcher` command: parse arguments, call one module per verb, report errors once.

Kept import-light: torch, docker and submitit load only inside the verbs that need them,
so `launcher --help` and every `--dry-run` return in well under 0.2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from launcher import __version__
from launcher.errors import LauncherError

DEFAULT_RUNS_DIR = "runs"


def _add_runs_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--runs-dir",
        default=os.environ.get("LAUNCHER_RUNS_DIR", DEFAULT_RUNS_DIR),
        help="where run directories live (default: ./runs or $LAUNCHER_RUNS_DIR)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launcher",
        description="Take a PyTorch training job from a laptop to a multi-node cluster: "
        "one YAML config, local processes, Docker or Slurm.",
    )
    parser.add_argument("--version", action="version", version=f"launcher {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = sub.add_parser("run", help="run a job (the backend comes from the config)")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. backend=slurm")
    p.add_argument("--dry-run", action="store_true", help="print what would start; start nothing")
    p.add_argument("--detach", action="store_true", help="return at once; follow with `logs`")
    p.add_argument("--quiet", action="store_true", help="do not echo the ranks' output")

    p = sub.add_parser(
        "sweep",
        help="run a config's sweep: section (also: sweep status DIR, sweep report DIR)",
        add_help=False,
    )
    p.add_argument("args", nargs=argparse.REMAINDER)

    p = sub.add_parser("status", help="state of runs (one batched query per backend)")
    p.add_argument("run", nargs="?", help="run id, job name or run dir (default: all runs)")
    p.add_argument("--json", action="store_true")
    _add_runs_dir(p)

    p = sub.add_parser("logs", help="print a run's log for one rank")
    p.add_argument("run")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the run ends")
    _add_runs_dir(p)

    p = sub.add_parser("cancel", help="stop a run on its backend")
    p.add_argument("run")
    _add_runs_dir(p)

    p = sub.add_parser("hw", help="detected hardware and the DataLoader picks, with reasons")
    p.add_argument("config", nargs="?", help="use this config's resources and loader section")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--procs", type=int, help="processes on this machine (default: from config)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("build", help="build the training image from docker/ (docker SDK)")
    p.add_argument("config", nargs="?", help="config whose image: section to use")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--base-image", help="base image (build argument BASE_IMAGE)")
    p.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--wheelhouse", help="folder of wheels to install offline")
    p.add_argument("--ca-cert", help="extra CA certificate for builds behind a TLS proxy")
    p.add_argument("--push", action="store_true", help="push to image.registry after building")
    p.add_argument("--no-cache", action="store_true")

    p = sub.add_parser("data", help="fetch, verify or index data")
    dsub = p.add_subparsers(dest="data_verb", metavar="ACTION", required=True)
    d = dsub.add_parser("fetch", help="fetch the config's data: sources (checksummed)")
    d.add_argument("config")
    d.add_argument("overrides", nargs="*")
    d = dsub.add_parser("verify", help="check every file in DIR decodes and matches a manifest")
    d.add_argument("directory")
    d.add_argument("--manifest", help="sha256 manifest to check against")
    d.add_argument("--jobs", type=int, help="parallel processes (default: usable CPUs)")
    d = dsub.add_parser("manifest", help="write a sha256 manifest of DIR (atomically)")
    d.add_argument("directory")
    d.add_argument("--jobs", type=int)
    return parser


# --- verbs -------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from launcher import config, runs
    from launcher.backends import get_backend

    loaded = config.load(args.config, args.overrides)
    spec = loaded.spec
    run_id = runs.new_run_id()
    run_dir = runs.run_dir_for(spec.runs_dir, spec.name, run_id)
    backend = get_backend(spec.backend)
    plan = backend.plan(spec, run_id=run_id, run_dir=run_dir, config_file=loaded.file)
    if args.dry_run:
        print(plan.render())
        return 0
    print(f"launcher: run {run_id} ({spec.backend}) -> {run_dir}", file=sys.stderr)
    return backend.submit(plan, foreground=not args.detach, echo=not args.quiet)


def _selected_runs(runs_dir: str, ref: str | None) -> list[Path]:
    from launcher import runs

    if ref:
        return [runs.find_run(runs_dir, ref)]
    return list(runs.iter_run_dirs(runs_dir))


def refresh_all(run_dirs: list[Path]) -> None:
    """Ask each backend once about all of its unfinished runs."""
    from launcher import runs
    from launcher.backends import get_backend

    by_backend: dict[str, list[Path]] = {}
    for run_dir in run_dirs:
        record = runs.read_record(run_dir)
        if record["state"] not in runs.FINAL_STATES:
            by_backend.setdefault(record["backend"], []).append(run_dir)
    for name, dirs in by_backend.items():
        get_backend(name).refresh(dirs)


def cmd_status(args: argparse.Namespace) -> int:
    from launcher import runs

    run_dirs = _selected_runs(args.runs_dir, args.run)
    refresh_all(run_dirs)
    records = [runs.read_record(d) | {"run_dir": str(d)} for d in run_dirs]
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    if not records:
        print(f"no runs under {args.runs_dir}")
        return 0
    print(f"{'RUN':<24} {'NAME':<20} {'BACKEND':<8} {'STATE':<10} {'WORLD':>5}  DETAIL")
    for rec in records:
        detail = rec.get("error") or ""
        attempts = rec.get("attempts") or []
        if len(attempts) > 1:
            detail = f"attempt {len(attempts)}; {detail}".rstrip("; ")
        print(
            f"{rec['run_id']:<24} {rec['name'][:20]:<20} {rec['backend']:<8} "
            f"{rec['state']:<10} {rec.get('world_size', ''):>5}  {detail}"
        )
    if args.run and records[0]["state"] == "FAILED":
        _print_failure_tail(Path(records[0]["run_dir"]), records[0])
    return 0


def _print_failure_tail(run_dir: Path, record: dict) -> None:
    from launcher import runs
    from launcher.backends import get_backend

    rank = record.get("failed_rank")
    if rank is None:
        return
    log = get_backend(record["backend"]).log_files(run_dir).get(int(rank))
    if log:
        print(f"--- last lines of rank {rank} ({log}) ---\n{runs.tail(log, 15)}")


def cmd_logs(args: argparse.Namespace) -> int:
    from launcher import runs
    from launcher.backends import get_backend
    from launcher.errors import RunNotFound

    run_dir = runs.find_run(args.runs_dir, args.run)
    record = runs.read_record(run_dir)
    backend = get_backend(record["backend"])
    logs = backend.log_files(run_dir)
    if args.rank not in logs:
        have = ", ".join(str(r) for r in sorted(logs)) or "none yet"
        raise RunNotFound(f"run {record['run_id']} has no log for rank {args.rank} (ranks: {have})")
    path = logs[args.rank]
    offset = 0
    while True:
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                data = fh.read()
        except FileNotFoundError:
            if not args.follow:
                raise RunNotFound(f"rank {args.rank} has not written {path} yet") from None
            data = b""
        offset += len(data)
        sys.stdout.write(data.decode(errors="replace"))
        sys.stdout.flush()
        if not args.follow:
            return 0
        refresh_all([run_dir])
        if runs.read_record(run_dir)["state"] in runs.FINAL_STATES and not data:
            return 0
        time.sleep(0.5)


def cmd_cancel(args: argparse.Namespace) -> int:
    from launcher import runs
    from launcher.backends import get_backend

    run_dir = runs.find_run(args.runs_dir, args.run)
    record = runs.read_record(run_dir)
    get_backend(record["backend"]).cancel(run_dir)
    print(f"cancelled {record['run_id']} ({record['backend']})")
    return 0


def cmd_hw(args: argparse.Namespace) -> int:
    from launcher import hardware
    from launcher.spec import LoaderSpec

    loader = LoaderSpec()
    procs = args.procs
    if args.config:
        from launcher import config

        spec = config.load(args.config, args.overrides).spec
        loader = spec.loader
        procs = procs or spec.resources.tasks_per_node
    procs = procs or 1
    hw = hardware.detect()
    picks = hardware.pick_loader(hw, procs, loader)
    if args.json:
        print(
            json.dumps(
                {"hardware": hw.to_dict(), "procs": procs, "picks": picks.to_dict()}, indent=2
            )
        )
        return 0
    gib = 1024**3
    mem = f"{hw.mem_bytes / gib:.1f} GiB" if hw.mem_bytes else "unknown"
    shm = f"{hw.shm_bytes / gib:.1f} GiB" if hw.shm_bytes else "unknown"
    print(f"CPUs:     {hw.cpus} ({hw.cpus_source})")
    print(f"memory:   {mem}")
    print(f"/dev/shm: {shm}")
    gpus = ", ".join(hw.gpu_names) if hw.gpu_names else "none"
    print(f"GPUs:     {hw.gpus} ({gpus}; {hw.gpus_source})")
    print(f"DataLoader picks for each of {procs} process(es):")
    for key in ("num_workers", "pin_memory", "persistent_workers", "prefetch_factor"):
        print(f"  {key:<19} {getattr(picks, key)!s:<6} {picks.reasons.get(key, '')}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    import dataclasses

    from launcher import config
    from launcher.errors import ConfigError
    from launcher.spec import ImageSpec

    image = config.load(args.config, args.overrides).spec.image if args.config else ImageSpec()
    changes: dict = {}
    if args.base_image:
        changes["base_image"] = args.base_image
    if args.wheelhouse:
        changes["wheelhouse"] = str(Path(args.wheelhouse).resolve())
    if args.ca_cert:
        changes["ca_cert"] = str(Path(args.ca_cert).resolve())
    if args.build_arg:
        build_args = dict(image.build_args)
        for item in args.build_arg:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ConfigError(
                    f"expected KEY=VALUE, got {item!r}", file="command line", key="--build-arg"
                )
            build_args[key] = value
        changes["build_args"] = build_args
    image = dataclasses.replace(image, **changes)
    from launcher.image import project_root, run_build_command

    return run_build_command(image, project_root(), no_cache=args.no_cache, push=args.push)


def cmd_data(args: argparse.Namespace) -> int:
    from launcher import data

    if args.data_verb == "fetch":
        from launcher import config

        return data.run_fetch_command(config.load(args.config, args.overrides).spec.data)
    if args.data_verb == "verify":
        manifest = Path(args.manifest) if args.manifest else None
        return data.run_verify_command(Path(args.directory), manifest=manifest, jobs=args.jobs)
    return data.run_manifest_command(Path(args.directory), jobs=args.jobs)


def cmd_sweep(args: argparse.Namespace) -> int:
    from launcher import sweep

    return sweep.cli_main(args.args)


VERBS = {
    "run": cmd_run,
    "sweep": cmd_sweep,
    "status": cmd_status,
    "logs": cmd_logs,
    "cancel": cmd_cancel,
    "hw": cmd_hw,
    "build": cmd_build,
    "data": cmd_data,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sweep"]:
        # The sweep verb parses its own options (they may come before CONFIG).
        args = argparse.Namespace(verb="sweep", args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return VERBS[args.verb](args)
    except LauncherError as exc:
        print(f"launcher: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("launcher: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
