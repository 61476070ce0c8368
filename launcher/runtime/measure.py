"""`launcher hw --measure CONFIG`: each num_workers candidate measured on a config's dataset.

Apart from autotune.py because it builds the config's model and dataset (runtime.models),
which itself uses the loader: autotune stays below both.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from launcher.hardware import worker_candidates
from launcher.runtime.autotune import measure_candidates


def measure_config(
    config: str, overrides: Sequence[str] = (), procs: int | None = None
) -> dict[str, Any]:
    """What `launcher hw --measure CONFIG` prints: the config's dataset, micro batch and
    candidates on this machine, each candidate's loader-alone rate, and the rule's pick."""
    from launcher import config as config_mod
    from launcher.hardware import detect, rule_workers
    from launcher.runtime import models
    from launcher.runtime.trainer import batch_plan

    spec = config_mod.load(config, list(overrides)).spec
    procs = procs or spec.resources.tasks_per_node
    world = spec.resources.world_size
    micro, _ = batch_plan(spec.train, world)
    hw = detect()
    built = models.build(spec.train)
    candidates = worker_candidates(hw, procs)
    rows = measure_candidates(built.dataset, micro, candidates, collate_fn=built.collate_fn)
    best = max(rows, key=lambda r: r["batches_per_s"])
    return {
        "config": config,
        "dataset": built.description,
        "micro_batch_size": micro,
        "procs": procs,
        "hardware": hw.to_dict(),
        "rule": rule_workers(hw, procs)[0],
        "candidates": rows,
        "fastest": best["num_workers"],
        "note": "the loader alone: the training step, which shares the CPUs, is not in these "
        "figures; num_workers: auto measures with it",
    }


def format_measure(report: Mapping[str, Any]) -> str:
    lines = [
        f"{report['dataset']}, micro batch {report['micro_batch_size']}, "
        f"{report['procs']} process(es), {report['hardware']['cpus']} CPUs",
        f"  {'num_workers':>11} {'batches/s':>10} {'samples/s':>10}",
    ]
    for row in report["candidates"]:
        note = "  <- rule" if row["num_workers"] == report["rule"] else ""
        note += "  <- fastest" if row["num_workers"] == report["fastest"] else ""
        lines.append(
            f"  {row['num_workers']:>11} {row['batches_per_s']:>10.1f} "
            f"{row['samples_per_s']:>10.0f}{note}"
        )
    lines.append(f"  ({report['note']})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m launcher.runtime.measure CONFIG [overrides] [--json]`: what
    `launcher hw --measure CONFIG` prints."""
    import argparse

    from launcher.errors import LauncherError

    parser = argparse.ArgumentParser(prog="python -m launcher.runtime.measure")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--procs", type=int)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        report = measure_config(args.config, args.overrides, args.procs)
    except LauncherError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_measure(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
