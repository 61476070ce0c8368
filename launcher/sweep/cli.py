"""Arguments of `launcher sweep CONFIG ...`, `launcher sweep status ...`, `... report ...`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from launcher.errors import ConfigError

DEFAULT_RUNS_DIR = "runs"


class _Parser(argparse.ArgumentParser):
    """Usage errors become one-line ConfigErrors (exit 2), like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message, file="command line", hint=f"see `{self.prog} --help`")


def _runs_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--runs-dir",
        default=os.environ.get("LAUNCHER_RUNS_DIR", DEFAULT_RUNS_DIR),
        help="where run directories live (default: ./runs or $LAUNCHER_RUNS_DIR)",
    )


def run_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="launcher sweep",
        description="Run every point of the config's sweep: section. Rerunning the same "
        "sweep submits only points that are missing (and failed ones with --retry-failed). "
        "Also: `launcher sweep status SWEEP`, `launcher sweep report SWEEP`.",
    )
    p.add_argument("config", help="YAML config file with a sweep: section")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, including sweep.* keys")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="list the points and the array script; submit nothing",
    )
    p.add_argument("--retry-failed", action="store_true", help="also resubmit failed points")
    p.add_argument(
        "--force", action="store_true", help="resubmit every point that is not running now"
    )
    p.add_argument("--max-points", type=int, help="cap on the number of points (sweep.max_points)")
    p.add_argument("--wait", action="store_true", help="Slurm: wait until every point has ended")
    p.add_argument(
        "--no-preflight",
        action="store_true",
        help="submit without the preflight checks (cluster policy, files, engine)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="with --dry-run: also run the preflight checks (they contact the cluster)",
    )
    return p


def status_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="launcher sweep status", description="state of every point of a sweep")
    p.add_argument("sweep", help="sweep folder, sweep id, or job name (its latest sweep)")
    p.add_argument("--metric", help="metric to show (default: the sweep's metric)")
    _runs_dir(p)
    return p


def report_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="launcher sweep report",
        description="write report.csv (one row per point) and report.png (metric vs each key)",
    )
    p.add_argument("sweep", help="sweep folder, sweep id, or job name (its latest sweep)")
    p.add_argument("--metric", help="metric to report (default: the sweep's metric)")
    p.add_argument("--out", help="output folder (default: the sweep folder)")
    _runs_dir(p)
    return p


def main(argv: list[str]) -> int:
    from launcher.sweep import report, state

    if argv and argv[0] == "status":
        args = status_parser().parse_args(argv[1:])
        directory = state.resolve(args.sweep, args.runs_dir)
        return report.print_status(directory, sys.stdout, args.metric)
    if argv and argv[0] == "report":
        args = report_parser().parse_args(argv[1:])
        directory = state.resolve(args.sweep, args.runs_dir)
        out = Path(args.out) if args.out else directory
        csv_path, png_path = report.write_report(directory, out, args.metric)
        print(f"wrote {csv_path}\nwrote {png_path}")
        return 0
    args = run_parser().parse_intermixed_args(argv)
    if args.max_points is not None and args.max_points < 1:
        raise ConfigError(
            f"expected an integer >= 1, got {args.max_points}",
            file="command line",
            key="--max-points",
        )
    from launcher.sweep import execute, plan

    prepared = plan.prepare(args.config, args.overrides, max_points=args.max_points)
    if args.check and not args.dry_run:
        raise ConfigError(
            "--check is for --dry-run (a real submit always runs the preflight checks)",
            file="command line",
            key="--check",
        )
    opts = execute.Options(
        dry_run=args.dry_run,
        retry_failed=args.retry_failed,
        force=args.force,
        wait=args.wait,
        preflight=not args.no_preflight,
        check=args.check,
    )
    return execute.run(prepared, opts)
