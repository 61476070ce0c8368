"""`launcher data fetch|verify|manifest`: progress, a summary, the bad files, an exit code."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from launcher.errors import DataError
from launcher.files import human_size
from launcher.spec import DataSpec


def _consoles() -> tuple[Any, Any]:
    """(stdout console for results, stderr console for progress and notes)."""
    from rich.console import Console

    return Console(highlight=False), Console(stderr=True, highlight=False)


def _fail(err: Any, exc: DataError) -> int:
    err.print(f"launcher: error: {exc}", markup=False, soft_wrap=True)
    return exc.exit_code


def run_fetch_command(data: DataSpec, *, base_dir: Path | None = None) -> int:
    """Fetch every source of a config's data: section; print where each one is."""
    from launcher.data.fetch import fetch_sources

    out, err = _consoles()
    if not data.sources:
        err.print("no data sources in this config (data.sources is empty)")
        return 0
    try:
        results = fetch_sources(data, base_dir=base_dir, console=err)
    except DataError as exc:
        return _fail(err, exc)
    for r in results:
        out.print(
            f"{r.name}\t{r.status}\t{human_size(r.size)}\t{r.path}", markup=False, soft_wrap=True
        )
    return 0


def run_verify_command(
    directory: Path,
    *,
    manifest: Path | None = None,
    jobs: int | None = None,
    write_manifest: bool = False,
) -> int:
    """Check a dataset folder; with write_manifest, also write its sha256 manifest if clean.

    Without --manifest, DIR/SHA256SUMS is checked when it exists (and rewritten when
    write_manifest is set). Exit code 1 when any file is bad; no manifest is written then.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from launcher.data.verify import MANIFEST_NAME, verify_tree
    from launcher.data.verify import write_manifest as write

    out, err = _consoles()
    directory = Path(directory)
    target = manifest or directory / MANIFEST_NAME
    check_against = None
    if not write_manifest:
        check_against = manifest or (target if target.is_file() else None)
        if check_against is not None and manifest is None:
            err.print(f"checking against {check_against}", markup=False)
    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        # No refresh thread: the check pool can then fork (see verify._pool_context).
        auto_refresh=False,
    )

    def advance(n: int) -> None:
        progress.advance(task, n)
        progress.refresh()

    task = progress.add_task("verifying", total=None)
    try:
        with progress:
            report = verify_tree(
                directory,
                manifest=check_against,
                jobs=jobs,
                want_hashes=write_manifest,
                exclude=(target,) if write_manifest else (),
                progress=advance,
                on_total=lambda n: progress.update(task, total=n),
            )
    except DataError as exc:
        return _fail(err, exc)
    for path, problems in report.bad.items():
        out.print(f"BAD {path}: {'; '.join(problems)}", markup=False, soft_wrap=True)
    rate = f"{report.files_per_s:,.0f} files/s" if report.seconds > 0 else "-"
    summary = (
        f"{report.files:,} files ({human_size(report.bytes)}) checked in {report.seconds:.2f} s "
        f"({rate}, {report.jobs} process{'es' if report.jobs > 1 else ''}): "
        f"{len(report.bad):,} bad"
    )
    err.print(summary, markup=False)
    if report.bad:
        if write_manifest:
            err.print(f"manifest not written: fix or remove the bad files first ({target})")
        return 1
    if write_manifest:
        write(target, report.hashes)
        err.print(f"wrote {target} ({len(report.hashes):,} files)", markup=False)
    return 0


def run_manifest_command(directory: Path, *, jobs: int | None = None) -> int:
    """Check DIR, then write DIR/SHA256SUMS atomically (only if every file is good)."""
    return run_verify_command(directory, manifest=None, jobs=jobs, write_manifest=True)


def main() -> None:  # pragma: no cover - manual use: python -m launcher.data.commands DIR
    raise SystemExit(run_verify_command(Path(sys.argv[1])))
