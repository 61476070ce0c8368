"""A free TCP port for MASTER_PORT: asked of the kernel, never guessed."""

from __future__ import annotations

import socket


def free_port(addr: str = "127.0.0.1") -> int:
    """A port that was free on `addr` just now ('' = every interface)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((addr, 0))
        return sock.getsockname()[1]
