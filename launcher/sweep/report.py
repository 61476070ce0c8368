"""`sweep status` (a table of every point) and `sweep report` (CSV + PNG of a metric)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from launcher import causes, runs
from launcher.errors import RunNotFound
from launcher.files import atomic_write_bytes
from launcher.sweep import state

# Up to this many distinct values of a key are plotted as evenly spaced categories.
FEW_VALUES = 12


def _order_key(label: str) -> float:
    return float(label)


def show_value(value: Any) -> str:
    """A swept value as a table cell: floats in 6 significant digits, mappings as JSON."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def table(headers: list[str], rows: list[list[str]], limit: int = 40) -> str:
    """Left-aligned columns; a column is at most `limit` characters wide. Cells come from
    records and configs: control characters are shown, never sent to the terminal."""
    headers = [runs.printable(h) for h in headers]
    rows = [[runs.printable(c) for c in row] for row in rows]
    widths = [min(limit, len(h)) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = min(limit, max(widths[i], len(cell)))
    lines = []
    last = len(headers) - 1
    for row in [headers, *rows]:
        # The last column (the error, the cause) is not cut: nothing is aligned after it.
        cells = [
            c if len(c) <= limit or i == last else c[: limit - 1] + "~" for i, c in enumerate(row)
        ]
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    return "\n".join(lines)


def collect(directory: Path, metric: str | None = None) -> tuple[state.SweepFile, list[dict]]:
    """The sweep's state with each point's current state (one batched refresh per backend),
    attempts, job id and final metric."""
    saved = state.SweepState.load(directory)
    if saved is None:
        raise RunNotFound(f"{directory}: no {state.SWEEP_FILE} there")
    current = saved.data
    metric = metric or current.get("metric") or "loss"
    states = state.current_states(saved.points, current["backend"])
    rows = []
    for entry in saved.points:
        now = states[entry["id"]]
        record: Mapping[str, Any] = {}
        if now != state.NEW:
            try:
                record = runs.read_record(entry["run_dir"])
            except (RunNotFound, ValueError):
                record = {}
        info = record.get("backend_info") or {}
        job_ids = entry.get("job_ids") or []
        if job_ids and info.get("job_id") != job_ids[-1]:
            record = {}  # from an earlier attempt; this one's task has not started yet
        job = job_ids[-1] if job_ids else info.get("job_id", "")
        cause: Mapping[str, Any] = {}
        if record and now in runs.FINAL_STATES:
            # Kept in the record once the point ended (Slurm's from sacct, at its end).
            record = runs.ensure_cost(Path(entry["run_dir"]), record)  # type: ignore[arg-type]
        if record and now in causes.CAUSE_STATES:
            # Read from the record once it is there; found (and kept) on the first status.
            cause = causes.ensure_cause(Path(entry["run_dir"]), record).get("cause") or {}  # type: ignore[arg-type]
        rows.append(
            {
                "index": entry["index"],
                "id": entry["id"],
                "state": now,
                "attempts": entry.get("attempts", 0),
                "job_id": str(job or ""),
                **{f"key:{k}": entry["overrides"].get(k) for k in current["keys"]},
                "metric": state.read_metric(entry["run_dir"], metric) if record else None,
                "error": record.get("error") or "",
                "cause": cause.get("kind", ""),
                "cause_summary": cause.get("summary", ""),
                "cost": record.get("cost") or None,
                "run_dir": entry["run_dir"],
            }
        )
    current["metric"] = metric
    return current, rows


def print_status(directory: Path, out: TextIO, metric: str | None = None) -> int:
    current, rows = collect(directory, metric)
    keys = current["keys"]
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    shown = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
    print(
        runs.printable(
            f"sweep {current['sweep_id']} ({current['name']}, {current['backend']}): "
            f"{len(rows)} points: {shown}"
        ),
        file=out,
    )
    cells = [
        [
            str(r["index"]),
            r["id"],
            r["state"],
            str(r["attempts"]),
            r["job_id"],
            *(show_value(r[f"key:{k}"]) for k in keys),
            "" if r["metric"] is None else f"{r['metric']:.6g}",
            (f"[{r['cause']}] {r['cause_summary']}" if r["cause"] else r["error"])[:160],
        ]
        for r in rows
    ]
    headers = ["#", "POINT", "STATE", "TRIES", "JOB", *keys, current["metric"].upper(), "ERROR"]
    print(table(headers, cells), file=out)
    by_cause: dict[str, int] = {}
    for row in rows:
        if row["cause"]:
            by_cause[row["cause"]] = by_cause.get(row["cause"], 0) + 1
    if by_cause:
        ranked = sorted(by_cause.items(), key=lambda kv: (-kv[1], kv[0]))
        print("failed points by cause: " + ", ".join(f"{k} {n}" for k, n in ranked), file=out)
    costs = [r["cost"] for r in rows if r["cost"]]
    if costs:
        ended = sum(1 for r in rows if r["state"] in runs.FINAL_STATES)
        missing = ended - len(costs)
        unknown = f" ({missing} ended points have no recorded cost)" if missing > 0 else ""
        total = runs.format_cost(runs.add_costs(costs))
        print(f"cost of {len(costs)} points: {total}{unknown}", file=out)
    return 0


def write_report(directory: Path, out_dir: Path, metric: str | None = None) -> tuple[Path, Path]:
    """report.csv (one row per point) and report.png (the metric against each swept key)."""
    current, rows = collect(directory, metric)
    keys: list[str] = current["keys"]
    metric = current["metric"]
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["index", "point", "state", "attempts", *keys, metric, "run_dir"])
    for r in rows:
        writer.writerow(
            [
                r["index"],
                r["id"],
                r["state"],
                r["attempts"],
                *(show_value(r[f"key:{k}"]) for k in keys),
                "" if r["metric"] is None else repr(r["metric"]),
                r["run_dir"],
            ]
        )
    csv_path = out_dir / "report.csv"
    runs.atomic_write_text(csv_path, buf.getvalue())
    png_path = out_dir / "report.png"
    atomic_write_bytes(png_path, _plot(current, rows, keys, metric))
    return csv_path, png_path


def _plot(current: state.SweepFile, rows: list[dict], keys: list[str], metric: str) -> bytes:
    """One panel per swept key: the metric of each finished point against the key's value."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on a cluster login node
    import matplotlib.pyplot as plt

    log_keys = set(current.get("log_keys") or [])
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.6 * nrows), squeeze=False)
    have = [r for r in rows if r["metric"] is not None]
    for i, key in enumerate(keys):
        ax = axes[i // ncols][i % ncols]
        values = [r[f"key:{key}"] for r in have]
        ys = [r["metric"] for r in have]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        distinct = sorted({show_value(v) for v in values}, key=_order_key if numeric else str)
        if numeric and len(distinct) > FEW_VALUES:
            # Many values (random search): a real x axis, log for loguniform / wide ranges.
            ax.scatter(values, ys, s=18, alpha=0.8)
            if key in log_keys or (min(values) > 0 and max(values) / min(values) >= 100):
                ax.set_xscale("log")
        elif values:
            # A few values (grid, seeds, categories): evenly spaced, with the mean of each.
            pos = {label: n for n, label in enumerate(distinct)}
            xs = [pos[show_value(v)] for v in values]
            ax.scatter(xs, ys, s=18, alpha=0.8)
            means = [
                sum(y for x, y in zip(xs, ys, strict=True) if x == n) / xs.count(n)
                for n in range(len(distinct))
            ]
            ax.plot(range(len(distinct)), means, color="C1", marker="_", label="mean")
            ax.set_xticks(range(len(distinct)), distinct, rotation=30, ha="right")
            ax.legend(fontsize="small")
        else:
            ax.text(
                0.5, 0.5, f"no '{metric}' values yet", ha="center", va="center",
                transform=ax.transAxes,
            )  # fmt: skip
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    for j in range(len(keys), nrows * ncols):
        axes[j // ncols][j % ncols].axis("off")
    fig.suptitle(f"sweep {current['sweep_id']}: {len(have)}/{len(rows)} points with {metric}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
