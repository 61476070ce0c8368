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
from typing import TYPE_CHECKING, Any

from launcher import __version__
from launcher.errors import LauncherError

if TYPE_CHECKING:
    from launcher.runs import RunRecord

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
    p.add_argument(
        "--no-preflight",
        action="store_true",
        help="submit without the preflight checks (files, cluster policy, engine)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="with --dry-run: also run the preflight checks (they contact the cluster/engine)",
    )

    p = sub.add_parser(
        "sweep",
        help="run a config's sweep: section (also: sweep status DIR, sweep report DIR)",
        add_help=False,
    )
    p.add_argument("args", nargs=argparse.REMAINDER)

    p = sub.add_parser(
        "doctor",
        help="check this machine, Slurm, Docker and (with CONFIG) a job: preflight and more",
    )
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--json", action="store_true", help="the checks as a JSON list")

    p = sub.add_parser("status", help="state of runs (one batched query per backend)")
    p.add_argument("run", nargs="?", help="run id, job name or run dir (default: all runs)")
    p.add_argument("--json", action="store_true")
    _add_runs_dir(p)

    p = sub.add_parser("logs", help="print a run's log for one rank")
    p.add_argument("run")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the run ends")
    p.add_argument(
        "--raw",
        action="store_true",
        help="the log's bytes unchanged (default: control characters shown as \\x1b etc.)",
    )
    _add_runs_dir(p)

    p = sub.add_parser("cancel", help="stop a run on its backend")
    p.add_argument("run")
    _add_runs_dir(p)

    p = sub.add_parser("hw", help="detected hardware and the DataLoader picks, with reasons")
    p.add_argument("config", nargs="?", help="use this config's resources and loader section")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--procs", type=int, help="processes on this machine (default: from config)")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--measure",
        action="store_true",
        help="measure the config's dataset with each num_workers candidate (imports torch)",
    )

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
    if args.check and not args.dry_run:
        from launcher.errors import ConfigError

        raise ConfigError(
            "--check is for --dry-run (a real submit always runs the preflight checks)",
            file="command line",
            key="--check",
        )
    if args.dry_run:
        print(plan.render())
        if args.check:
            from launcher import preflight

            preflight.before_submit(backend, plan)
            print("# preflight: every check passed")
        return 0
    if not args.no_preflight:
        from launcher import preflight

        preflight.before_submit(backend, plan)
    print(f"launcher: run {run_id} ({spec.backend}) -> {run_dir}", file=sys.stderr)
    return backend.submit(plan, foreground=not args.detach, echo=not args.quiet)


def one_line(message: object) -> str:
    """An error message as one printable line: the line breaks of a tool's stderr become
    spaces, every other control character is shown escaped (messages quote files and records)."""
    from launcher.runs import printable

    return printable(" ".join(str(message).strip().splitlines()))


def _read(run_dir: Path) -> RunRecord:
    """The run's record, naming a backend launcher has (else the record is damaged)."""
    from launcher import runs
    from launcher.backends import get_backend
    from launcher.errors import BackendError, DamagedRecord

    record = runs.read_record(run_dir)
    try:
        get_backend(record["backend"])
    except BackendError as exc:
        raise DamagedRecord(str(Path(run_dir) / runs.RECORD), f"backend: {exc}") from None
    return record


def refresh_all(run_dirs: list[Path], warned: set[str] | None = None) -> None:
    """Ask each backend once about all of its unfinished runs. Each backend on its own: one
    that cannot answer (Slurm controller down) costs one warning line, once per `warned` set,
    and its runs keep their last known state; the other backends' runs are still refreshed."""
    from launcher import runs
    from launcher.backends import get_backend
    from launcher.errors import DamagedRecord

    by_backend: dict[str, list[Path]] = {}
    for run_dir in run_dirs:
        try:
            record = _read(run_dir)
        except DamagedRecord:
            continue  # nothing to ask a backend about; status names it
        if record["state"] not in runs.FINAL_STATES:
            by_backend.setdefault(record["backend"], []).append(run_dir)
    for name, dirs in by_backend.items():
        try:
            get_backend(name).refresh(dirs)
        except Exception as exc:  # whatever a backend raises, the other runs still show
            why = str(exc) if isinstance(exc, LauncherError) else f"{type(exc).__name__}: {exc}"
            if warned is None or name not in warned:
                print(
                    f"launcher: {name} status unavailable: {one_line(why)}; "
                    "showing the last known state",
                    file=sys.stderr,
                )
            if warned is not None:
                warned.add(name)


def cmd_status(args: argparse.Namespace) -> int:
    from launcher import causes, hardware, runs
    from launcher.errors import DamagedRecord

    unreadable: dict[Path, str] = {}
    if args.run:
        run_dirs = [runs.find_run(args.runs_dir, args.run)]
    else:
        run_dirs, unreadable = runs.scan_runs(args.runs_dir)
    refresh_all(run_dirs)
    rows: list[tuple[Path, RunRecord | DamagedRecord]] = []
    for run_dir in run_dirs:
        try:
            # A run that did not complete gets its cause once, an ended run its cost; later
            # calls read them back.
            record = causes.ensure_cause(run_dir, _read(run_dir))
            rows.append((run_dir, runs.ensure_cost(run_dir, record)))
        except DamagedRecord as exc:
            if args.run:
                raise  # the one run asked for: one line, exit 2
            rows.append((run_dir, exc))
    rows += [(path, DamagedRecord(str(path), why)) for path, why in unreadable.items()]
    if args.json:
        out: list[dict[str, Any]] = [
            {"run_dir": str(d), "state": "DAMAGED", "record": r.path, "error": r.why}
            if isinstance(r, DamagedRecord)
            else {**r, "run_dir": str(d), "loader": hardware.measured_loader(d)}
            for d, r in rows
        ]
        print(json.dumps(out, indent=2))
        return 0
    if not rows:
        print(f"no runs under {runs.printable(args.runs_dir)}")
        return 0
    show = runs.printable
    print(f"{'RUN':<24} {'NAME':<20} {'BACKEND':<8} {'STATE':<10} {'WORLD':>5}  DETAIL")
    for _, rec in rows:
        if isinstance(rec, DamagedRecord):
            print(f"DAMAGED {show(rec.path)}: {show(rec.why)}")
            continue
        cause = rec.get("cause") or {}
        detail = rec.get("error") or rec.get("warning") or ""
        if cause:
            detail = f"[{cause.get('kind')}] {detail or cause.get('summary')}"
        attempts = rec.get("attempts") or []
        if len(attempts) > 1:
            detail = f"attempt {len(attempts)}; {detail}".rstrip("; ")
        print(
            f"{show(rec['run_id']):<24} {show(rec['name'])[:20]:<20} {show(rec['backend']):<8} "
            f"{rec['state']:<10} {rec['world_size']:>5}  {show(detail)}"
        )
    if args.run:
        run_dir, rec = rows[0]
        if not isinstance(rec, DamagedRecord):
            if rec.get("cost"):
                print(f"cost:     {runs.format_cost(rec['cost'])}")
            if rec["state"] in causes.CAUSE_STATES:
                _print_cause(rec)
                _print_failure_tail(run_dir, rec)
    return 0


def _print_cause(record: RunRecord) -> None:
    """Why, where it started, what to do: above the log tail."""
    from launcher import runs

    cause = record.get("cause") or {}
    if not cause:
        return
    show = runs.printable
    print(f"cause:    {show(cause.get('kind'))}: {show(cause.get('summary'))}")
    if cause.get("rank") is not None:
        where = f"rank {cause['rank']}"
        if cause.get("node"):
            where += f" on {show(cause['node'])}"
        when = cause.get("time")
        if isinstance(when, (int, float)) and when > 0:
            import datetime as dt

            stamp = dt.datetime.fromtimestamp(when, dt.timezone.utc).isoformat(timespec="seconds")
            where += f" at {stamp}"
        print(f"started:  {where}")
    if cause.get("consequences"):
        ranks = ", ".join(str(r) for r in cause["consequences"])
        print(f"then:     rank(s) {ranks} stopped or failed because of it")
    detail = cause.get("detail") or {}
    if cause.get("kind") == "unknown":
        print(f"raw:      {show(json.dumps(detail, sort_keys=True))}")
    print(f"hint:     {show(cause.get('hint'))}")


def _print_failure_tail(run_dir: Path, record: RunRecord) -> None:
    from launcher import runs
    from launcher.backends import get_backend

    cause = record.get("cause") or {}
    rank = cause.get("rank") if cause.get("rank") is not None else record.get("failed_rank")
    if rank is None:
        return
    log = get_backend(record["backend"]).log_files(run_dir).get(rank)
    if log:
        print(f"--- last lines of rank {rank} ({runs.printable(log)}) ---\n{runs.tail(log, 15)}")


class _LogPrinter:
    """Writes a log to stdout as it grows: printable text by default (chunks may end inside
    a UTF-8 character or between CR and LF, so those are carried over), or the bytes as-is."""

    def __init__(self, raw: bool) -> None:
        import codecs

        self.raw = raw
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.held = ""

    def write(self, data: bytes, *, final: bool = False) -> None:
        from launcher.runs import printable

        if self.raw:
            sys.stdout.buffer.write(data)
        else:
            text = self.held + self.decoder.decode(data, final=final)
            self.held = ""
            if text.endswith("\r") and not final:
                text, self.held = text[:-1], "\r"
            sys.stdout.write(printable(text, keep_lines=True))
        sys.stdout.flush()


LOG_CHUNK = 1 << 20


def cmd_logs(args: argparse.Namespace) -> int:
    from launcher import runs
    from launcher.backends import get_backend
    from launcher.errors import RunNotFound

    run_dir = runs.find_run(args.runs_dir, args.run)
    record = _read(run_dir)
    backend = get_backend(record["backend"])
    logs = backend.log_files(run_dir)
    if args.rank not in logs:
        have = ", ".join(str(r) for r in sorted(logs)) or "none yet"
        raise RunNotFound(f"run {record['run_id']} has no log for rank {args.rank} (ranks: {have})")
    path = logs[args.rank]
    out = _LogPrinter(args.raw)
    offset = 0
    warned: set[str] = set()
    while True:
        try:
            with runs.open_plain(path) as fh:
                fh.seek(offset)
                data = fh.read(LOG_CHUNK)
        except FileNotFoundError:
            if not args.follow:
                raise RunNotFound(f"rank {args.rank} has not written {path} yet") from None
            data = b""
        except OSError as exc:
            raise RunNotFound(f"{path}: cannot read this log: {exc.strerror or exc}") from None
        offset += len(data)
        if len(data) == LOG_CHUNK:
            out.write(data)
            continue  # more is there already
        if not args.follow:
            out.write(data, final=True)
            return 0
        out.write(data)
        refresh_all([run_dir], warned)
        if _read(run_dir)["state"] in runs.FINAL_STATES and not data:
            out.write(b"", final=True)
            return 0
        time.sleep(0.5)


def cmd_cancel(args: argparse.Namespace) -> int:
    from launcher import runs
    from launcher.backends import get_backend

    run_dir = runs.find_run(args.runs_dir, args.run)
    record = _read(run_dir)
    get_backend(record["backend"]).cancel(run_dir)
    print(f"cancelled {runs.printable(record['run_id'])} ({record['backend']})")
    return 0


def cmd_hw(args: argparse.Namespace) -> int:
    from launcher import hardware
    from launcher.spec import LoaderSpec

    loader = LoaderSpec()
    trainer = False
    procs = args.procs
    if args.measure:
        if not args.config:
            from launcher.errors import ConfigError

            raise ConfigError("launcher hw --measure needs a CONFIG whose dataset to measure")
        from launcher.runtime import measure

        report = measure.measure_config(args.config, args.overrides, procs)
        print(json.dumps(report, indent=2) if args.json else measure.format_measure(report))
        return 0
    if args.config:
        from launcher import config

        spec = config.load(args.config, args.overrides).spec
        loader = spec.loader
        trainer = spec.entrypoint.kind == "trainer"
        procs = procs or spec.resources.tasks_per_node
    procs = procs or 1
    hw = hardware.detect()
    picks = hardware.pick_loader(hw, procs, loader, trainer=trainer)
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


def cmd_doctor(args: argparse.Namespace) -> int:
    from launcher import doctor

    return doctor.doctor(args.config, args.overrides, as_json=args.json)


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
    "doctor": cmd_doctor,
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
        print(f"launcher: error: {one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("launcher: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
