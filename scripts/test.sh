#!/usr/bin/env bash
# The whole test suite from a bare machine: Python deps, a real local Slurm cluster,
# a real Docker engine, lint, then pytest. Safe to run again (every step is idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup.sh
bash slurm/install.sh
bash slurm/start.sh 2
bash scripts/docker-start.sh
bash scripts/make-base-image.sh launcher-base:bookworm
echo "setup took $(( $(date +%s) - start )) s"
python3 -m ruff check .
python3 -m ruff format --check .
python3 -m mypy  # [tool.mypy] in pyproject.toml: the whole package, not strict
# Two workers: Slurm tests mostly wait on the cluster while the rest use the CPUs.
python3 -m pytest -q -ra -n 2 --dist loadgroup --durations=15 "$@"
