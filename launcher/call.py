"""`python -m launcher.call pkg.mod:fn`: run a user's callable in a launched process.

The callable receives the resolved JobSpec (read from LAUNCHER_CONFIG); the torchrun-style
variables are already in the environment, so it can `init_process_group()` directly.
An int return value becomes the process exit code.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from launcher.errors import ConfigError


def resolve_callable(ref: str) -> Callable[..., Any]:
    """'pkg.mod:fn' -> the function, with a one-line error naming what is missing."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise ConfigError(
            f"expected 'package.module:function', got {ref!r}", key="entrypoint.callable"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"cannot import module {module_name!r}: {exc}", key="entrypoint.callable"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(
            f"module {module_name!r} has no function {attr!r}", key="entrypoint.callable"
        )
    return fn


def main(argv: list[str] | None = None) -> int:
    from launcher.config import load_resolved

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m launcher.call package.module:function", file=sys.stderr)
        return 2
    fn = resolve_callable(argv[0])
    config_path = os.environ.get("LAUNCHER_CONFIG")
    spec = load_resolved(config_path) if config_path else None
    result = fn(spec)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except ConfigError as exc:
        print(f"launcher: error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
