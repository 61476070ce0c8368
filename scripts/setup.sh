#!/usr/bin/env bash
# Install launcher and its Python dependencies into the current Python (idempotent).
# torch is pinned first to the CPU build that this kind of machine serves locally, so the
# project's `torch>=2.3,<3` range is already met and no multi-GB CUDA build is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import torch' 2>/dev/null; then
  "$PY" -m pip install -q --disable-pip-version-check torch==2.13.0
fi
"$PY" -m pip install -q --disable-pip-version-check -e '.[dev]'
