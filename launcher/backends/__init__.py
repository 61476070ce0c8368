"""Backends behind one small interface, looked up lazily by name so the CLI stays fast."""

from __future__ import annotations

import importlib

from launcher.backends.base import Backend

_MODULES = {
    "local": "launcher.backends.local",
    "docker": "launcher.backends.docker",
    "slurm": "launcher.backends.slurm",
}


def get_backend(name: str) -> Backend:
    """The backend object for `name` ('local', 'docker', 'slurm')."""
    module = importlib.import_module(_MODULES[name])
    return module.BACKEND
