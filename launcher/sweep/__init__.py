"""Sweeps: grid / zip / random / seeds over dotted config keys, run as Slurm job arrays or
as concurrency-limited local and docker runs, resumable, each configuration run once.

`launcher sweep ...` calls `cli_main`; the submodules load only when a sweep verb runs.
"""

from __future__ import annotations


def cli_main(argv: list[str]) -> int:
    """Everything after `launcher sweep` on the command line."""
    from launcher.sweep.cli import main

    return main(argv)
