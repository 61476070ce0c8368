"""Backends behind one small interface, looked up lazily by name so the CLI stays fast."""

from __future__ import annotations

import importlib

from launcher.backends.base import Backend
from launcher.errors import BackendError

_MODULES = {
    "local": "launcher.backends.local.backend",
    "docker": "launcher.backends.docker",
    "slurm": "launcher.backends.slurm.backend",
}


def get_backend(name: str) -> Backend:
    """The backend object for `name`; an unknown name lists the known ones."""
    if name not in _MODULES:
        raise BackendError(f"unknown backend {name!r}; known backends: {', '.join(_MODULES)}")
    module = importlib.import_module(_MODULES[name])
    return module.BACKEND
